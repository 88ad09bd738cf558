"""Everyday Lightning habits, unchanged, under AsyncPSStrategy (simulated or mpirun).

A digits MLP logged with torchmetrics and ``sync_dist=True``, SGD with momentum under OneCycleLR
(which cycles the momentum too), ``val_check_interval`` in steps, ``ModelCheckpoint(monitor,
save_top_k)``, ``LearningRateMonitor``, and one way to stop early (``--stop``): ``EarlyStopping``,
``trainer.should_stop`` set by the module, ``max_time``, or SIGTERM on every rank (preemption, with
``OnExceptionCheckpoint``). After fit every rank calls
``validate/test(ckpt_path=...)`` and ``predict`` and writes what it got to ``<out>.<rank>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from user_mlp import loaders  # noqa: E402

from lightning_byz import AsyncPSStrategy  # noqa: E402


class DigitsMLP(L.LightningModule):
    def __init__(self, max_steps: int, optimizer: str = "onecycle", stop_at: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        if self.hparams.stop_at is not None and self.trainer.global_step >= self.hparams.stop_at:
            self.trainer.should_stop = True
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, sync_dist=True)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.net(x), y)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0]).argmax(1)

    def configure_optimizers(self):
        if self.hparams.optimizer == "mu2sgd":
            from lightning_byz.optim import Mu2SGD

            return Mu2SGD(self.parameters(), lr=0.1, beta=0.25)
        opt = torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Preempted(L.Callback):
    """Slurm preemption: every rank gets SIGTERM (here each sends it to itself at its step 30); with
    ``only_rank``, that rank alone (someone kills one process)."""

    def __init__(self, only_rank: int | None = None):
        self.only_rank = only_rank

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 30 and self.only_rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)


class ScheduleBeta(L.Callback):
    """On the server only (as a scheduler would): μ²-SGD's worker-side β becomes 0.5 at step 20;
    at the end, the β each worker rule of this process uses."""

    betas: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.is_global_zero and trainer.global_step == 20:
            trainer.optimizers[0].param_groups[0]["beta"] = 0.5

    def on_train_end(self, trainer, pl_module):
        role = trainer.strategy._role
        workers = getattr(role, "workers", None) or [getattr(role, "worker", None)]
        self.betas = [w.rule.beta for w in workers if w is not None]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--transport", default="auto")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--stop", choices=["early_stopping", "should_stop", "max_time", "sigterm", "sigterm_worker"], default="early_stopping")
    p.add_argument("--optimizer", choices=["onecycle", "mu2sgd"], default="onecycle")
    p.add_argument("--resume", default=None, help="a checkpoint to resume fit from")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    model = DigitsMLP(args.steps, args.optimizer, stop_at=60 if args.stop == "should_stop" else None)
    checkpoint = ModelCheckpoint(dirpath=out.parent / "ckpt", monitor="val_acc", mode="max", save_top_k=2,
                                 save_last=True)
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step", log_momentum=True)]
    if args.stop.startswith("sigterm"):
        only = 2 if args.stop == "sigterm_worker" else None
        callbacks += [Preempted(only), OnExceptionCheckpoint(dirpath=out.parent / "preempted")]
    if args.stop == "early_stopping":
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", stopping_threshold=0.8, patience=100))
    beta = ScheduleBeta()
    if args.optimizer == "mu2sgd":
        callbacks.append(beta)
    strategy = AsyncPSStrategy(aggregator="cwmed", transport=args.transport, num_workers=args.num_workers, seed=0)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", max_steps=args.steps, val_check_interval=20,
        check_val_every_n_epoch=None, max_time="00:00:00:12" if args.stop == "max_time" else None,
        logger=CSVLogger(out.parent, name="logs"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=5,
    )
    train, test = loaders()
    trainer.fit(model, train, test, ckpt_path=args.resume)
    rank = strategy.global_rank
    result = {
        "global_step": trainer.global_step,
        "validate_best": trainer.validate(ckpt_path="best", dataloaders=test, verbose=False),
        "test_best": trainer.test(ckpt_path="best", dataloaders=test, verbose=False),
        "test_last": trainer.test(ckpt_path="last", dataloaders=test, verbose=False),
        "predict": trainer.predict(model, test),
        "best_model_path": trainer.checkpoint_callback.best_model_path,
        "best_model_score": None,
    }
    if strategy.server is not None:
        result["best_model_score"] = float(checkpoint.best_model_score)
        result["top_k"] = sorted(Path(p).name for p in checkpoint.best_k_models)
        result["predict"] = int(sum(len(p) for p in result["predict"]))
        result["version"] = strategy.server.version
    result["betas"] = beta.betas
    Path(f"{out}.{rank}").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
