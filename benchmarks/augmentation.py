"""Cost of the FA paper's nonlinear augmentation per batch, as a ratio to a small CNN's training step.

For each kind, times ``NonlinearAugmentation.on_worker_batch`` on a batch of CIFAR-sized images
(every image augmented, Gaussian noise on) against the forward + backward of a small CNN
(conv(32)–conv(64)–fc(10)) on the same batch; also the one-off precomputation of the pixel map
(LSODA for the ODE kinds). Issue 7's requirement: augmentation must not dominate a training step.

    .venv/bin/python benchmarks/augmentation.py [--batch 64] [--size 32] [--device cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_byz.faults import NonlinearAugmentation
from lightning_byz.faults.augmentation import KINDS, cat_map_permutation, flow_grid


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in seconds, after two warm-up calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def small_cnn(size: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    model = small_cnn(args.size).to(device)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()

    step = timed(train_step, args.repeats, device)
    print(f"device {device}, batch {args.batch}x3x{args.size}x{args.size}")
    print(f"small CNN forward+backward: {step * 1e3:8.3f} ms (baseline)")
    for kind in KINDS:
        start = time.perf_counter()  # the one-off precomputation, outside the cache
        if kind == "cat_map":
            cat_map_permutation.__wrapped__(args.size)
        else:
            flow_grid.__wrapped__(kind, args.size, args.size, 0.5)
        setup = time.perf_counter() - start
        aug = NonlinearAugmentation([1], kind=kind, noise_std=(0.05, 0.2))
        aug.setup_faults(1, 0)
        steps = iter(range(10**9))
        per_batch = timed(lambda: aug.on_worker_batch(1, next(steps), (images, labels)),
                          args.repeats, device)
        print(f"{kind:>15}: {per_batch * 1e3:8.3f} ms/batch = {per_batch / step:6.3f}x the step"
              f"  (one-off map precomputation {setup * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
