"""The server's step of the user's optimizer against that optimizer's own step, on ResNet-18.

Baseline: ``torch.optim.<Opt>.step()`` on the plain ResNet-18 (11.2M parameters, 62 tensors) with
``.grad`` set. Candidate: :class:`~lightning_byz.optim.OptimizerServer` with the same optimizer on
the same model made flat (:class:`~lightning_byz.ps.FlatModel`): the aggregate ([d], one tensor)
becomes the parameters' ``.grad`` as views, then the same ``step`` runs. The difference is the cost
of the hand-over (62 ``.grad`` assignments, no copy); the target is a ratio <= 1.2. Both run round
robin, best of the repeats (a shared machine only adds time); torch picks the same implementation
(for-loop on CPU, foreach on CUDA) for both unless ``--foreach`` forces it.

    .venv/bin/python benchmarks/server_optimizer.py [--optimizers adam,adamw,sgd_momentum] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_byz.models.nets import build_net
from lightning_byz.optim import OptimizerServer
from lightning_byz.ps import FlatModel

OPTIMIZERS = {
    "adam": lambda ps, foreach: torch.optim.Adam(ps, lr=1e-3, foreach=foreach),
    "adamw": lambda ps, foreach: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=foreach),
    "sgd_momentum": lambda ps, foreach: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=foreach),
}


def best_time(step, sync, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, device: torch.device, foreach: bool | None, repeats: int, rounds: int) -> tuple[float, float]:
    torch.manual_seed(0)
    plain = build_net("resnet18", 10).to(device)
    flat_net = build_net("resnet18", 10).to(device)
    flat = FlatModel(flat_net)
    gen = torch.Generator(device=device).manual_seed(1)
    direction = torch.randn(flat.numel, generator=gen, device=device)
    for p, g in zip(plain.parameters(), direction.split([p.numel() for p in plain.parameters()])):
        p.grad = g.view_as(p).clone()
    baseline_opt = OPTIMIZERS[name](plain.parameters(), foreach)
    server = OptimizerServer(OPTIMIZERS[name](flat_net.parameters(), foreach), flat.param_list, flat.params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baseline_opt.step()  # optimizer state created outside the timing
    server.step([flat.params], [direction], 0.0)
    base, cand = [], []
    for _ in range(rounds):  # round robin: both see the same machine load
        base.append(best_time(baseline_opt.step, sync, repeats))
        cand.append(best_time(lambda: server.step([flat.params], [direction], 0.0), sync, repeats))
    return min(base), min(cand)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", default="adam,adamw,sgd_momentum")
    p.add_argument("--device", default="cpu")
    p.add_argument("--foreach", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    foreach = {"auto": None, "on": True, "off": False}[args.foreach]
    device = torch.device(args.device)
    print(f"ResNet-18 (11.2M parameters) on {device}, foreach={args.foreach}: best of {args.repeats}x{args.rounds}")
    print(f"{'optimizer':>14} {'torch step':>12} {'server step':>12} {'ratio':>7}")
    for name in args.optimizers.split(","):
        base, cand = measure(name, device, foreach, args.repeats, args.rounds)
        print(f"{name:>14} {base * 1e3:>10.2f}ms {cand * 1e3:>10.2f}ms {cand / base:>7.2f}")


if __name__ == "__main__":
    main()
