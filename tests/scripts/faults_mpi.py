"""The fault callbacks under MPI: ``mpirun -n 4 python faults_mpi.py --out PREFIX``.

Trains the MLP of ``user_mlp.py`` (1 server + 3 workers, cwmed, 500 updates, sync rounds by default)
with worker 1 sending its update sign-flipped and 10% packet loss on worker 2's link; every rank
writes its test accuracy and its fault counters (worker-side counters live on the worker ranks) to
``PREFIX.<rank>``, the server also its per-worker arrival counts.

Sync rounds give the attacker exactly 1/3 of the weight and make the run deterministic. In async
mode the schedule decides: the attacker (rank 1) arrived 35–38% of the time (six runs) and
the accuracy ranged 0.69–0.88 (ten runs).
"""

from __future__ import annotations

import argparse
import json
import sys

import lightning as L
import torch
from user_mlp import MLP, loaders

from lightning_byz import AsyncPSStrategy
from lightning_byz.faults import ByzantineWorkers, PacketLoss


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--mode", default="sync")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = MLP()
    strategy = AsyncPSStrategy(aggregator="cwmed", transport="mpi", mode=args.mode, seed=0)
    faults = [ByzantineWorkers([1], "sign_flip"), PacketLoss([2], rate=0.1)]
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", max_steps=args.steps, logger=False, callbacks=faults,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    train, test = loaders()
    trainer.fit(model, train)
    acc = trainer.test(model, test, verbose=False)[0]["test_acc"]
    metrics = {k: v for fault in faults for k, v in fault.metrics().items()}
    with open(f"{args.out}.{strategy.global_rank}", "w") as f:
        json.dump({"rank": strategy.global_rank, "acc": acc, "metrics": metrics,
                   "gathered": strategy.worker_fault_metrics,
                   "counts": strategy.server.counts.tolist() if strategy.is_server else None}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
