"""LightningDataModules yielding ``(images, labels)`` batches: an offline MNIST subset that needs no
network (the default), and MNIST / CIFAR-10 through torchvision."""

from lightning_byz.data.base import DatasetMissingError, ImageDataModule
from lightning_byz.data.offline import OfflineMNISTDataModule
from lightning_byz.data.partition import Partition
from lightning_byz.data.vision import CIFAR10DataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DatasetMissingError",
    "ImageDataModule",
    "MNISTDataModule",
    "OfflineMNISTDataModule",
    "Partition",
]
