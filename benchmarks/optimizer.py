"""Optimizer step overhead of μ²-SGD against torch.optim.SGD (foreach), on ResNet-18's parameter shapes.

Gradients are synthesised and handed over by a closure that does no work, so the second gradient
evaluation of μ²-SGD is excluded: what is timed is the rule work (and, for the full ``Mu2SGD.step``,
its copy of x_t, kept as the next step's x_{t−1}). The candidates run round-robin; the best of the
repeats is the measure on a shared machine. Prints times and ratios to plain SGD and momentum SGD;
issue 5's target is a ratio <= 3.

The step is memory-bound, so count array passes (reads + writes of d floats): SGD reads g, x and
writes x (3). STORM + AnyTime read g, g_prev, d, w, x and write d, w, x: 8 at best fused, 12 with
foreach kernels (two lerps for STORM, add + lerp for AnyTime), i.e. 2.7x / 4x SGD in bytes moved;
the full step also writes x_{t−1} (+1 fused, +2 as a copy).

    .venv/bin/python benchmarks/optimizer.py [--device cuda] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torchvision

from lightning_byz.optim import AnyTimeServer, Mu2SGD, Storm


def timed(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall times (s) of each candidate, run round-robin so that load from other processes hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(repeats + 2):  # two warm-up rounds
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)

    shapes = [p.shape for p in torchvision.models.resnet18().parameters()]
    gen = torch.Generator().manual_seed(0)

    def fresh() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        return params, grads

    def with_grads(params, grads):
        for p, g in zip(params, grads):
            p.grad = g
        return params

    d = sum(s.numel() for s in shapes)
    print(f"ResNet-18 shapes: {len(shapes)} tensors, {d:,} parameters, device {device}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats")

    candidates = {}
    for name, kw in [("SGD", {}), ("SGD momentum", {"momentum": 0.9})]:
        params, grads = fresh()
        candidates[name] = torch.optim.SGD(with_grads(params, grads), lr=1e-6, foreach=True, **kw).step

    def rule_work(params, grads, schedule):
        worker, server = Storm(schedule=schedule), AnyTimeServer(params, schedule=schedule)
        worker.direction(grads, None)
        return lambda: server.step(params, worker.direction(grads, grads), 1e-6)

    def mu2sgd_step(params, grads, schedule):
        opt = Mu2SGD(params, lr=1e-6, schedule=schedule)
        closure = lambda: with_grads(params, grads) and None  # noqa: E731  no gradient evaluation
        return lambda: opt.step(closure)

    for schedule in ("fixed", "theory"):
        candidates[f"Storm+AnyTime rules ({schedule})"] = rule_work(*fresh(), schedule)
        candidates[f"Mu2SGD.step ({schedule})"] = mu2sgd_step(*fresh(), schedule)
    flat_params, flat_grads = (torch.randn(d, generator=gen).to(device) for _ in range(2))
    candidates["Storm+AnyTime rules (flat [d])"] = rule_work([flat_params], [flat_grads], "fixed")

    with torch.no_grad():
        times = timed(candidates, args.repeats, device)
    best = {name: min(ts) for name, ts in times.items()}
    base, mom = best["SGD"], best["SGD momentum"]
    print(f"{'':32s} {'best ms':>8s} {'median':>8s} {'/SGD':>6s} {'/momentum':>9s}  (ratios of best times)")
    for name, ts in times.items():
        print(f"{name:32s} {best[name] * 1e3:8.2f} {statistics.median(ts) * 1e3:8.2f} "
              f"{best[name] / base:6.2f} {best[name] / mom:9.2f}")


if __name__ == "__main__":
    main()
