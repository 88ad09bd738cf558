"""``ImageClassifier``: cross-entropy training of a registered net, optimizer chosen by name.

Metrics are logged with ``self.log`` and never ``sync_dist``: the parameter-server strategy has no
collectives, so each rank logs what it sees.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_byz.models.nets import build_net

OPTIMIZERS = ("sgd", "momentum", "adamw", "mu2sgd")


def parse_lr_schedule(spec: str | None) -> tuple[str, tuple] | None:
    """``None`` | ``"cosine"`` (over all training steps) | ``"step:EVERY:GAMMA[:UNIT]"``: the lr times
    GAMMA every EVERY epochs (``UNIT`` ``epoch``, the default, e.g. ``step:10:0.2``) or server steps
    (``step``: a paper's "every 10 epochs" of all workers' data is 10·|data| / (workers·batch) rounds,
    while a server epoch is |data| / batch updates)."""
    if spec is None:
        return None
    kind, *args = spec.split(":")
    try:
        if kind == "cosine" and not args:
            return "cosine", ()
        if kind == "step" and len(args) in (2, 3):
            every, gamma, unit = int(args[0]), float(args[1]), (args[2:] or ["epoch"])[0]
            if every >= 1 and 0 < gamma <= 1 and unit in ("epoch", "step"):
                return "step", (every, gamma, unit)
    except ValueError:
        pass
    raise ValueError(f"lr_schedule {spec!r}: expected None, 'cosine' or 'step:EVERY:GAMMA[:epoch|step]' "
                     "(e.g. 'step:10:0.2')")


class ImageClassifier(L.LightningModule):
    """Classify images with ``net`` (``mnist_cnn`` | ``cifar_cnn`` | ``resnet18`` | ``mlp``; ``net_kwargs`` go to it).

    ``optimizer``: ``sgd`` (plain), ``momentum`` (SGD with ``momentum``), ``adamw`` (AdamW with
    ``weight_decay``) or ``mu2sgd`` (``lightning_byz.optim.Mu2SGD`` with STORM ``beta`` and AnyTime
    ``gamma``). Under ``AsyncPSStrategy`` the server steps the first three on the aggregate (momentum
    after aggregation; the strategy's ``worker_momentum`` moves it before); μ²-SGD is split.
    """

    def __init__(
        self,
        net: str = "mnist_cnn",
        num_classes: int = 10,
        optimizer: Literal["sgd", "momentum", "adamw", "mu2sgd"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        beta: float = 0.25,
        gamma: float = 0.1,
        weight_decay: float = 0.0,
        lr_schedule: str | None = None,
        net_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if optimizer == "momentum" and not 0 < momentum < 1:
            raise ValueError(f"momentum must be in (0, 1) for optimizer 'momentum', got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.schedule = parse_lr_schedule(lr_schedule)
        self.save_hyperparameters()
        self.net = build_net(net, num_classes, **(net_kwargs or {}))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels))
        self.log(f"{stage}_acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "mu2sgd":
            from lightning_byz.optim import Mu2SGD

            opt = Mu2SGD(self.parameters(), lr=hp.lr, beta=hp.beta, gamma=hp.gamma, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            momentum = hp.momentum if hp.optimizer == "momentum" else 0.0
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=momentum, weight_decay=hp.weight_decay)
        if self.schedule is None:
            return opt
        kind, args = self.schedule
        if kind == "cosine":
            steps = int(self.trainer.estimated_stepping_batches)
            sched = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps), "interval": "step"}
        else:
            sched = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=args[0], gamma=args[1]),
                     "interval": args[2]}
        return {"optimizer": opt, "lr_scheduler": sched}
