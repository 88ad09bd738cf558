"""``lightning-byz report``: run a grid of offline recipe variants, plot accuracy vs step, tabulate.

Each seed figure is a set of runs of one ``recipes/*-offline.yaml`` with CLI overrides, simulated in
this process. Per figure it writes ``<figure>.png`` (validation accuracy vs server step) and
``<figure>.md`` (final and best accuracy per run) and ``<figure>.json`` (every curve).

    lightning-byz report --grid small --out docs/report [--only mnist_ctma]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GRIDS = ("tiny", "small", "full")
STEPS = {"tiny": 6, "small": 150, "full": None}  # server steps per run; None: the recipe's max_steps


class Unweighted:
    """Wrap an aggregator so it ignores the server's weights (the non-weighted baseline)."""

    def __init__(self, aggregator: Callable[..., Tensor]) -> None:
        self.aggregator = aggregator

    def __call__(self, vectors: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.aggregator(vectors, None)


class AccuracyCurve(Callback):
    """Record ``(server step, val_acc)`` after every validation (sanity checks excluded)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val_acc"])))


@dataclass
class Run:
    label: str
    overrides: list[str] = field(default_factory=list)
    unweighted: bool = False


@dataclass
class Figure:
    name: str
    title: str
    claim: str
    recipe: str
    runs: list[Run]


def _agg(name: str, **kwargs) -> list[str]:
    prefix = "--trainer.strategy.init_args."
    return [f"{prefix}aggregator={name}", f"{prefix}aggregator_kwargs={json.dumps(kwargs) if kwargs else 'null'}"]


def _attack(name: str, workers: list[int] | None = None) -> list[str]:
    args = [f"--trainer.callbacks.init_args.attack={name}"]
    if name == "label_flip":
        args.append("--trainer.callbacks.init_args.num_classes=10")
    if workers:
        args.append(f"--trainer.callbacks.init_args.workers={json.dumps(workers)}")
    return args


def figures(grid: str) -> list[Figure]:
    """The runs of each seed figure: ``full`` all, ``small`` a cut (one base rule / attack less),
    ``tiny`` two runs of the first figure."""
    full = grid == "full"
    weighted = Figure(
        "mnist_async_weighted", "Weighted vs unweighted (17 workers, 8 Byzantine, P ∝ i²)",
        "weighted beats unweighted", "mnist_async_weighted-offline.yaml",
        [Run(f"{'w-' if not unw else ''}{rule} / {attack}", _agg(rule) + _attack(attack), unw)
         for attack in ("sign_flip", "label_flip") for rule in ("cwmed", "rfa")[: 2 if full else 1]
         for unw in (False, True)],
    )
    if grid == "tiny":
        weighted.runs = weighted.runs[:2]
        return [weighted]
    ctma = Figure(
        "mnist_ctma", "w-CTMA on/off (17 workers, 8 Byzantine, P ∝ i²)",
        "w-CTMA helps most under empire", "mnist_ctma-offline.yaml",
        [Run(f"{name} / {attack}", agg + _attack(attack))
         for attack in ("sign_flip", "alie", "ipm")
         for name, agg in (("w-cwmed", _agg("cwmed")), ("ctma(w-cwmed)", _agg("ctma", base="cwmed", lam=0.2)))],
    )
    optim = Figure(
        "cifar10_mu2sgd", "μ²-SGD vs momentum vs SGD (9 workers, 4 Byzantine, P ∝ i, λ = 0.4)",
        "μ²-SGD ≈ momentum ≫ SGD", "cifar10_mu2sgd-offline.yaml",
        [Run(f"{opt} / {attack}", [f"--model.init_args.optimizer={opt}"] + _attack(attack))
         for attack in ("sign_flip", "ipm")[: 2 if full else 1] for opt in ("mu2sgd", "momentum", "sgd")],
    )
    rules = [("fa", {}), ("normalised mean (fa, m=n)", {"m": 15}), ("cwtm", {"lam": 0.2}), ("cwmed", {}),
             ("multikrum", {"lam": 0.2})]
    if full:
        rules += [("meamed", {"lam": 0.2}), ("phocas", {"lam": 0.2}), ("bulyan", {"lam": 0.2})]
    flag = Figure(
        "cifar10_flag", "FA vs robust rules, f = 3 of 15 send random gradients (sync)",
        "FA beats the others under random gradients", "cifar10_flag-offline.yaml",
        [Run(label, _agg(label.split(" ")[0] if not kw.get("m") else "fa", **kw)) for label, kw in rules],
    )
    return [weighted, ctma, optim, flag]


def run_one(recipe: Path, run: Run, grid: str) -> list[tuple[int, float]]:
    """Fit one variant in-process; its accuracy curve."""
    from lightning_byz.cli import run_cli

    args = ["--config", str(recipe), *run.overrides, "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    steps = STEPS[grid]
    if steps is not None:
        args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(1, steps // 6)}"]
    cli = run_cli(args, run=False)
    strategy = cli.trainer.strategy
    if run.unweighted:
        strategy.aggregator = Unweighted(strategy.aggregator)
    curve = AccuracyCurve()
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, cli.datamodule)
    return curve.points


def plot(figure: Figure, curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in curves.items():
        steps, accs = zip(*points) if points else ((), ())
        ax.plot(steps, accs, marker="o", markersize=3, label=label)
    ax.set(title=figure.title, xlabel="server step", ylabel="validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(figure: Figure, curves: dict[str, list[tuple[int, float]]]) -> str:
    lines = [f"### {figure.title}", "", f"Claim: {figure.claim}. Recipe: `recipes/{figure.recipe}`.", "",
             "| run | final acc | best acc |", "|---|---|---|"]
    for label, points in curves.items():
        final = f"{points[-1][1]:.3f}" if points else "n/a"
        best = f"{max(a for _, a in points):.3f}" if points else "n/a"
        lines.append(f"| {label} | {final} | {best} |")
    return "\n".join(lines) + "\n"


def report(grid: str = "small", out: str | Path = "docs/report", recipes: Path = RECIPES,
           only: list[str] | None = None) -> dict:
    """Run every figure of ``grid`` (or those named in ``only``); write their PNG, markdown table and
    JSON curves under ``out``."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    selected = figures(grid)
    unknown = sorted(set(only or []) - {f.name for f in selected})
    if unknown:
        raise ValueError(f"no figure {unknown} in grid {grid!r}; it has {[f.name for f in selected]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for figure in selected:
        if only and figure.name not in only:
            continue
        recipe = recipes / figure.recipe
        if not recipe.is_file():
            raise FileNotFoundError(f"recipe {recipe} not found (run from the repository, or pass --recipes)")
        curves = {}
        for run in figure.runs:
            start = time.monotonic()
            curves[run.label] = run_one(recipe, run, grid)
            print(f"[report] {figure.name}: {run.label}: {curves[run.label][-1:]} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
        plot(figure, curves, out / f"{figure.name}.png")
        (out / f"{figure.name}.md").write_text(table(figure, curves) + f"\n![{figure.name}]({figure.name}.png)\n")
        results[figure.name] = {"grid": grid, "claim": figure.claim, "recipe": figure.recipe, "curves": curves}
        (out / f"{figure.name}.json").write_text(json.dumps(results[figure.name], indent=1))
    return results


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-byz report", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=GRIDS, default="small",
                        help="tiny: 2 runs of 6 steps (tests); small: every figure, 150 steps a run; "
                             "full: every figure, the offline recipes' own steps")
    parser.add_argument("--out", default="docs/report", help="output directory (default docs/report)")
    parser.add_argument("--recipes", type=Path, default=RECIPES, help="directory of the *-offline.yaml recipes")
    parser.add_argument("--only", nargs="+", metavar="FIGURE", help="run only these figures")
    opts = parser.parse_args(args)
    try:
        report(opts.grid, opts.out, opts.recipes, opts.only)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"report written to {opts.out}")
    return 0
