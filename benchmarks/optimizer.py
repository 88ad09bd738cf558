"""Optimizer step overhead of μ²-SGD against torch.optim.SGD on a 1.1e7-parameter model.

Two measures, candidates run round-robin, best of the repeats (a shared machine only ever adds time):

1. **Training step**: ``optimizer.step(closure)`` on the CIFAR ResNet-18 of the
   recipes (11.2M parameters), closure = zero_grad + forward + cross-entropy + backward on one batch.
   SGD's step runs the closure once; ``Mu2SGD.step`` runs it twice (at x_{t−1}, then at x_t) and the
   time of the extra evaluation at x_{t−1} is subtracted, so both include one gradient evaluation.
   Batch 1 is the worst case: the smallest gradient evaluation next to the same update.
2. **Update only**: ResNet-18's parameter shapes with synthetic gradients handed over by a closure
   that does no work, so only the rule arithmetic (and, for ``Mu2SGD.step``, its copy of x_t, kept
   as the next x_{t−1}) is timed. This is the bound the ratio of 1. approaches as the gradient
   evaluation gets cheap.

The update is memory-bound, so count array passes (reads + writes of d floats): SGD reads g, x and
writes x (3). STORM + AnyTime read g, g_prev, d, w, x and write d, w, x: 8 at best fused, 12 with
foreach kernels (two lerps for STORM, add + lerp for AnyTime), i.e. 2.7x / 4x SGD in bytes moved;
the full step also writes x_{t−1} (+1 fused, +2 as a copy).

    .venv/bin/python benchmarks/optimizer.py [--device cuda] [--batch-sizes 1,8,32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

from lightning_byz.models.nets import build_net
from lightning_byz.optim import AnyTimeServer, Mu2SGD, Storm


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(candidates: dict[str, Callable[[], float]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Wall times (s) of each candidate less the seconds it returns as excluded, run round-robin so
    that load from other processes hits all alike."""
    sync = synchronizer(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(repeats + 2):  # two warm-up rounds
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            excluded = fn()
            sync()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start - excluded)
    return times


def excluding_nothing(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        fn()
        return 0.0
    return run


def training_steps(batch: int, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], list[float]]:
    """Step times (s) of SGD, momentum SGD and μ²-SGD on ResNet-18 at ``batch``, the μ²-SGD extra
    evaluation excluded, and the durations of SGD's gradient evaluations."""
    sync = synchronizer(device)
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    images, labels = images.to(device), labels.to(device)
    optimizers = {
        "SGD": lambda p: torch.optim.SGD(p, lr=1e-3),
        "SGD momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
        "Mu2SGD": lambda p: Mu2SGD(p, lr=1e-3),
    }
    candidates, evaluations = {}, {}
    for name, make in optimizers.items():
        torch.manual_seed(0)
        model = build_net("resnet18").to(device)
        opt, calls = make(model.parameters()), []

        def closure(model=model, opt=opt, calls=calls) -> torch.Tensor:
            start = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            sync()
            calls.append(time.perf_counter() - start)
            return loss

        def step(opt=opt, closure=closure, calls=calls) -> float:
            before = len(calls)
            opt.step(closure)
            return calls[before] if len(calls) - before == 2 else 0.0  # Mu2SGD evaluates at x_{t-1} first

        candidates[name], evaluations[name] = step, calls
    return timed(candidates, repeats, device), evaluations["SGD"][2:]  # past the two warm-up rounds


def update_only(repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Times (s) of the optimizer arithmetic alone on ResNet-18's parameter shapes."""
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
    d = sum(s.numel() for s in shapes)
    flat_params, flat_grads = (torch.randn(d, generator=gen).to(device) for _ in range(2))
    candidates["Storm+AnyTime rules (flat [d])"] = rule_work([flat_params], [flat_grads], "fixed")
    with torch.no_grad():
        return timed({name: excluding_nothing(fn) for name, fn in candidates.items()}, repeats, device)


def print_ratios(times: dict[str, list[float]]) -> None:
    best = {name: min(ts) for name, ts in times.items()}
    base, mom = best["SGD"], best["SGD momentum"]
    print(f"{'':32s} {'best ms':>8s} {'median':>8s} {'/SGD':>6s} {'/momentum':>9s}  (ratios of best times)")
    for name, ts in times.items():
        print(f"{name:32s} {best[name] * 1e3:8.2f} {statistics.median(ts) * 1e3:8.2f} "
              f"{best[name] / base:6.2f} {best[name] / mom:9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated; empty skips the training steps")
    parser.add_argument("--step-repeats", type=int, default=8, help="repeats of each training step")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each update-only candidate")
    args = parser.parse_args()
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    resnet_size = sum(p.numel() for p in build_net("resnet18").parameters())

    for batch in (int(b) for b in args.batch_sizes.split(",") if b):
        times, evaluations = training_steps(batch, args.step_repeats, device)
        print(f"\n1. Training step, CIFAR ResNet-18 ({resnet_size:,} parameters), batch {batch}, device {device}, "
              f"{threads} threads, {args.step_repeats} repeats; one gradient evaluation per step "
              f"(median {statistics.median(evaluations) * 1e3:.1f} ms), μ²-SGD's extra one excluded")
        print_ratios(times)

    print(f"\n2. Update only, ResNet-18's parameter shapes, device {device}, {threads} threads, "
          f"{args.repeats} repeats; closures do no work")
    print_ratios(update_only(args.repeats, device))


if __name__ == "__main__":
    main()
