"""The seeds' networks (MNIST CNN, CIFAR ResNet-18), a small MLP, and ``ImageClassifier``, the
LightningModule that trains any of them by registry name (``net: mnist_cnn`` in YAML)."""

from lightning_byz.models.classifier import ImageClassifier
from lightning_byz.models.nets import MLP, NETS, ResNet18, SmallCNN, build_net

__all__ = ["MLP", "NETS", "ImageClassifier", "ResNet18", "SmallCNN", "build_net"]
