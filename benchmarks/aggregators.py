"""Time every registered aggregator as a multiple of a plain ``mean`` over the same tensor.

``X.mean(dim=0)`` reads X once: it is the memory-bandwidth floor, so ratios say how many reads of
the data a rule costs and travel between machines better than seconds. For each device, n and d
this prints one markdown table: our rule with uniform weights (``lam = f/n``), with random
weights, and where an equivalent exists, ByzFL's rule (same f) and torch baselines on the same X.

    python benchmarks/aggregators.py                       # n in {9, 17, 60}, d in {1e5, 1e6, 1.1e7}
    python benchmarks/aggregators.py --n 17 --d 1e6 --rules cwmed cwtm --repeats 7
    python benchmarks/aggregators.py --byzfl-site /tmp/byzfl-venv/lib/python3.11/site-packages
    python benchmarks/aggregators.py --n 17 --d 1e6 --huge 1e30   # f rows at 1e30: the safe path

ByzFL (``pip install byzfl`` into a separate virtualenv) is imported from ``--byzfl-site``; only its
aggregator modules are loaded, so its plotting dependencies need not be installed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import sys
import time
import types

import torch
from torch import Tensor

from lightning_byz.aggregators import available_aggregators, get_aggregator
from lightning_byz.aggregators.base import registered

# our name -> (ByzFL class, whether it takes f)
BYZFL_EQUIVALENTS = {
    "mean": ("Average", False),
    "cwmed": ("Median", False),
    "cwtm": ("TrMean", True),
    "meamed": ("Meamed", True),
    "gm": ("GeometricMedian", False),
    "krum": ("Krum", True),
    "multikrum": ("MultiKrum", True),
    "cclip": ("CenteredClipping", False),
    "nnm": ("NNM", True),
}
TORCH_BASELINES = {
    "torch.median(dim=0)": lambda X: torch.median(X, dim=0).values,
    "torch.sort(dim=0)": lambda X: torch.sort(X, dim=0).values,
}


def rule_names() -> list[str]:
    """Registered names without aliases (an alias maps to a class registered under another name)."""
    return [name for name in available_aggregators() if registered(name).name == name]


def byzantine_count(n: int) -> int:
    """f used for every rule: the largest f with n >= 4f + 3 (Bulyan's bound), at least 1."""
    return max(1, (n - 3) // 4)


def build(name: str, n: int):
    """Our aggregator ``name`` with ``lam = f/n`` when it takes a budget."""
    params = inspect.signature(registered(name).__init__).parameters
    return get_aggregator(name, lam=byzantine_count(n) / n) if "lam" in params else get_aggregator(name)


def load_byzfl(site: str | None):
    """ByzFL's aggregator classes by name, or None (with the reason printed) if not importable."""
    if site:
        sys.path.append(site)
    try:
        spec = importlib.util.find_spec("byzfl")
        if spec is None:
            raise ImportError("byzfl not found (pass --byzfl-site)")
        package = types.ModuleType("byzfl")  # skip byzfl/__init__: it imports seaborn for plots
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = package
        aggregators = importlib.import_module("byzfl.aggregators.aggregators")
        preaggregators = importlib.import_module("byzfl.aggregators.preaggregators")
    except Exception as error:  # noqa: BLE001 - any import failure just drops the comparison
        print(f"# ByzFL not available ({error}); comparing with torch baselines only")
        return None
    return {**vars(preaggregators), **vars(aggregators)}


def seconds(fn, X: Tensor, repeats: int, budget: float) -> float:
    """Best wall time of ``fn(X)`` over ``repeats`` calls after one warm-up (fewer past ``budget`` s)."""
    sync = torch.cuda.synchronize if X.is_cuda else (lambda: None)
    best, spent = math.inf, 0.0
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn(X)
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget:
            break
    return best


def table(device: str, n: int, d: int, names, byzfl, args) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(n, d, generator=gen, device=device)
    w = torch.rand(n, generator=gen, device=device) + 0.1
    f = byzantine_count(n)
    if args.huge:  # the rules' safe path: f rows far beyond the others
        X[:f] = args.huge

    def floor() -> float:
        return seconds(lambda A: A.mean(dim=0), X, args.repeats, args.budget)

    base = floor()
    huge = f", {f} rows at {args.huge:g}" if args.huge else ""
    print(f"\n### {device}, n={n}, d={d:.3g}, float32, f={f} (lam=f/n){huge}; mean = {base * 1e3:.2f} ms\n")
    print("| rule | uniform | weighted | ByzFL |")
    print("|---|---:|---:|---:|")
    for name in names:
        try:
            agg = build(name, n)
        except Exception as error:  # noqa: BLE001 - a rule that cannot be built is reported, not fatal
            print(f"| {name} | not built: {error} | | |")
            continue
        uniform = seconds(agg, X, args.repeats, args.budget)
        weighted = seconds(lambda A: agg(A, w), X, args.repeats, args.budget)
        theirs = ""
        if byzfl and name in BYZFL_EQUIVALENTS and device == "cpu":
            cls, takes_f = BYZFL_EQUIVALENTS[name]
            rule = byzfl[cls](f=f) if takes_f else byzfl[cls]()
            theirs = f"{seconds(rule, X, args.repeats, args.budget) / base:.1f}x ({cls})"
        base = min(base, floor())  # re-measure the floor between rules: the machine is shared
        print(f"| {name} | {uniform / base:.1f}x | {weighted / base:.1f}x | {theirs} |", flush=True)
    for label, fn in TORCH_BASELINES.items():
        print(f"| {label} | {seconds(fn, X, args.repeats, args.budget) / base:.1f}x | | |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[9, 17, 60], help="numbers of vectors")
    parser.add_argument("--d", type=float, nargs="+", default=[1e5, 1e6, 1.1e7], help="dimensions")
    parser.add_argument("--rules", nargs="+", default=None, help="aggregator names (default: all)")
    parser.add_argument("--device", nargs="+", default=None, help="cpu and/or cuda (default: both if present)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best is kept)")
    parser.add_argument("--budget", type=float, default=20.0, help="stop repeating past this many s")
    parser.add_argument("--huge", type=float, default=None, help="set f rows to this value (safe path)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--byzfl-site", default=None, help="site-packages dir holding byzfl")
    parser.add_argument("--no-byzfl", action="store_true", help="skip the ByzFL comparison")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = args.rules or rule_names()
    unknown = sorted(set(names) - set(available_aggregators()))
    if unknown:
        parser.error(f"unknown rules {unknown}; available: {', '.join(available_aggregators())}")
    byzfl = None if args.no_byzfl else load_byzfl(args.byzfl_site)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads; ratios = time / mean time")
    for device in devices:
        for n in args.n:
            for d in args.d:
                table(device, n, int(d), names, byzfl, args)


if __name__ == "__main__":
    main()
