"""MNIST and CIFAR-10 through torchvision, with the standard normalisation (and CIFAR augmentation).

Without the files and without ``download: true`` — or when the download fails, e.g. offline — they
raise ``DatasetMissingError`` naming the directory and the flag to set.
"""

from __future__ import annotations

from pathlib import Path

from torchvision import datasets, transforms

from lightning_byz.data.base import MNIST_MEAN, MNIST_STD, DatasetMissingError, ImageDataModule

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class _TorchvisionDataModule(ImageDataModule):
    dataset_class: type
    name: str

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.data_dir = str(Path(data_dir).expanduser().resolve())
        self.download = download

    def train_transform(self) -> transforms.Compose:
        return self.test_transform()

    def test_transform(self) -> transforms.Compose:
        raise NotImplementedError

    def _open(self, train: bool, transform, download: bool):
        try:
            return self.dataset_class(self.data_dir, train=train, transform=transform, download=download)
        except (OSError, RuntimeError) as err:
            if download:
                raise DatasetMissingError(
                    f"could not download {self.name} into {self.data_dir} ({err}). Without a network, "
                    f"copy the {self.name} files there and set download: false "
                    "(or use OfflineMNISTDataModule, which needs no network)"
                ) from err
            raise DatasetMissingError(
                f"{self.name} not found in {self.data_dir}: set download: true "
                f"(--data.download=true) to fetch it, or point data_dir at a copy ({err})"
            ) from err

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only)."""
        for train in (True, False):
            self._open(train, None, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._open(True, self.train_transform(), download=False)
        self.test_set = self._open(False, self.test_transform(), download=False)


class MNISTDataModule(_TorchvisionDataModule):
    """torchvision MNIST (60,000 / 10,000), ``[1, 28, 28]`` normalised images."""

    dataset_class = datasets.MNIST
    name = "MNIST"

    def test_transform(self) -> transforms.Compose:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])


class CIFAR10DataModule(_TorchvisionDataModule):
    """torchvision CIFAR-10 (50,000 / 10,000); training images get random crop (pad 4) + flip."""

    dataset_class = datasets.CIFAR10
    name = "CIFAR-10"

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 128,
                 num_workers: int = 0, augment: bool = True) -> None:
        super().__init__(data_dir, download, batch_size, num_workers)
        self.augment = augment

    def train_transform(self) -> transforms.Compose:
        if not self.augment:
            return self.test_transform()
        return transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ])

    def test_transform(self) -> transforms.Compose:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
