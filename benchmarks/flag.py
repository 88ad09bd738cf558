"""Flag Aggregator vs one thin SVD of the d×n matrix (what the paper's code runs per IRLS iteration).

For each (d, n) it times the whole aggregation (Gram pass, n-space IRLS, output pass; default
arguments) and ``torch.linalg.svd(G, full_matrices=False)`` on the same float32 input, and prints
time ratios and peak extra memory as a multiple of the input size. Memory: on CUDA
``torch.cuda.max_memory_allocated`` above the input; on CPU the rise of the process's peak RSS
(VmHWM in /proc/self/status, reset before each measurement by writing 5 to /proc/self/clear_refs,
after ``malloc_trim`` hands freed heap pages back so that reused memory is counted too).

    python benchmarks/flag.py                       # d in {1e6, 1.1e7}, n in {7, 15, 60}, CPU
    python benchmarks/flag.py --d 1e6 --n 7 15 --device cuda --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from lightning_byz.aggregators.flag import FlagAggregator


def reset_peak_rss() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_bytes(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure(fn, X: torch.Tensor, repeats: int) -> tuple[float, int]:
    """Best wall time of ``fn(X)`` over ``repeats`` runs and its peak extra memory in bytes."""
    cuda = X.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(X)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        del out
    extra = torch.cuda.max_memory_allocated() - base if cuda else rss_bytes("VmHWM") - base
    return best, max(extra, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=float, nargs="+", default=[1e6, 1.1e7])
    parser.add_argument("--n", type=int, nargs="+", default=[7, 15, 60])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    fa = FlagAggregator()
    print(f"device={args.device} dtype=float32 repeats={args.repeats}")
    print(f"{'d':>10} {'n':>4} {'FA s':>8} {'SVD s':>8} {'FA/SVD':>7} {'FA mem/input':>13} {'SVD mem/input':>14}")
    for d in (int(x) for x in args.d):
        for n in args.n:
            X = torch.randn(n, d, device=args.device)
            fa(X[:, :1000])  # warm-up (kernels, eigh)
            t_fa, m_fa = measure(fa, X, args.repeats)
            size = X.numel() * X.element_size()
            row = f"{d:>10} {n:>4} {t_fa:>8.3f}"
            try:
                t_svd, m_svd = measure(lambda G: torch.linalg.svd(G.T, full_matrices=False), X, args.repeats)
                row += f" {t_svd:>8.3f} {t_fa / t_svd:>7.3f} {m_fa / size:>13.2f} {m_svd / size:>14.2f}"
            except torch.linalg.LinAlgError as err:  # cuSOLVER refuses d ≈ 1e7: its workspace size overflows
                row += f" {'refused':>8} {'':>7} {m_fa / size:>13.2f} {'':>14}  SVD: {str(err).split(',')[0]}"
            print(row, flush=True)
            del X


if __name__ == "__main__":
    main()
