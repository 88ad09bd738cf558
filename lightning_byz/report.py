"""``lightning-byz report``: run a grid of offline recipe variants, plot accuracy vs step, tabulate.

Each seed figure is a set of runs of one ``recipes/*-offline.yaml`` with CLI overrides, simulated in
this process. With ``--seeds K`` every run is repeated with seeds 0..K−1 (``seed_everything``: model
init; the strategy's ``seed``: arrivals, shards, fault draws; the train/validation split stays fixed).
Per figure it writes ``<figure>.png`` (validation accuracy vs server step: the mean over seeds, with a
min–max band), ``<figure>.md`` (final and best accuracy per run: mean [min, max] over seeds) and
``<figure>.json`` (every curve of every seed, and the summary).

    lightning-byz report --grid small --seeds 2 --out docs/report [--only mnist_ctma]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_byz.config import recipes_dir

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

GRIDS = ("tiny", "small", "full")
STEPS = {"tiny": 6, "small": None, "full": None}  # server steps per run; None: the recipe's own max_steps
Curve = list[tuple[int, float]]  # (server step, validation accuracy) after each validation


class Unweighted:
    """Wrap an aggregator so it ignores the server's weights (the non-weighted baseline)."""

    def __init__(self, aggregator: Callable[..., Tensor]) -> None:
        self.aggregator = aggregator

    def __call__(self, vectors: Tensor, weights: Tensor | None = None) -> Tensor:
        return self.aggregator(vectors, None)


class AccuracyCurve(Callback):
    """Record ``(server step, val_acc)`` after every validation (sanity checks excluded)."""

    def __init__(self) -> None:
        self.points: Curve = []

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
    """One seed figure: its runs, and the pairs of runs (a, b) whose paired difference tests its claim."""

    name: str
    title: str
    claim: str
    recipe: str
    runs: list[Run]
    compare: list[tuple[str, str]] = field(default_factory=list)


def rule_args(name: str, **kwargs) -> list[str]:
    prefix = "--trainer.strategy.init_args."
    return [f"{prefix}aggregator={name}", f"{prefix}aggregator_kwargs={json.dumps(kwargs) if kwargs else 'null'}"]


def attack_args(name: str, workers: list[int] | None = None) -> list[str]:
    args = [f"--trainer.callbacks.init_args.attack={name}"]
    if name == "label_flip":
        args.append("--trainer.callbacks.init_args.num_classes=10")
    if workers:
        args.append(f"--trainer.callbacks.init_args.workers={json.dumps(workers)}")
    return args


# The optimizers of the μ²-SGD figure, as Dahan & Levy run them: μ²-SGD (STORM on the workers), momentum
# as an EMA on each worker before aggregation (their baseline), plain SGD.
OPTIMIZER_ARGS = {
    "mu2sgd": ["--model.init_args.optimizer=mu2sgd"],
    "momentum": ["--model.init_args.optimizer=sgd", "--trainer.strategy.init_args.worker_momentum=0.9"],
    "sgd": ["--model.init_args.optimizer=sgd"],
}


def _flag_rules(grid: str, n: int, f: int, extra: tuple[str, ...] = ()) -> list[Run]:
    """The FA paper's comparison at ``n`` workers, ``f`` faulty: FA, the "normalised mean" (FA with
    m = n), and the classic rules with Byzantine budget lam = f/n (``full`` adds MeaMed, Phocas,
    Bulyan); ``extra`` rules without arguments (e.g. the plain mean) come first."""
    lam = round(f / n, 6)
    rules = [(name, rule_args(name)) for name in extra] + [
        ("fa", rule_args("fa")), ("normalised mean (fa, m=n)", rule_args("fa", m=n)), ("cwtm", rule_args("cwtm", lam=lam)),
        ("cwmed", rule_args("cwmed")), ("multikrum", rule_args("multikrum", lam=lam))]
    if grid == "full":
        rules += [(name, rule_args(name, lam=lam)) for name in ("meamed", "phocas", "bulyan")]
    return [Run(label, overrides) for label, overrides in rules]


def _versus(runs: list[Run], first: str) -> list[tuple[str, str]]:
    """``first`` against every other run of the figure."""
    return [(first, run.label) for run in runs if run.label != first]


def figures(grid: str) -> list[Figure]:
    """The runs of each seed figure: ``full`` all, ``small`` a cut (one base rule / attack less, fewer λ,
    no MeaMed, Phocas, Bulyan in the FA comparisons), ``tiny`` two short runs of two figures."""
    full = grid == "full"
    attacks, bases = ("sign_flip", "label_flip"), ("cwmed", "rfa")[: 2 if full else 1]
    weighted = Figure(
        "mnist_async_weighted", "Weighted vs unweighted (17 workers, 8 Byzantine, P ∝ i², λ = 0.4)",
        "weighted beats unweighted (Dahan & Levy 2024, Fig. 1)", "mnist_async_weighted-offline.yaml",
        [Run(f"{'w-' if not unw else ''}{rule} / {attack}", rule_args(rule) + attack_args(attack), unw)
         for attack in attacks for rule in bases for unw in (False, True)],
        [(f"w-{rule} / {attack}", f"{rule} / {attack}") for attack in attacks for rule in bases],
    )
    sweep = (0, 0.1, 0.5, 1, 3, 7, 14) if full else (0, 0.1, 0.5, 1, 7)  # the paper suggests λ = Θ(p)
    lam = Figure(
        "cifar10_flag_lambda", "FA's regulariser λ, p = 7, f = 1 random gradient (sync)",
        "FA improves on or matches Multi-Krum and Bulyan over a range of λ (FA paper, Fig. 8)",
        "cifar10_flag_lambda-offline.yaml",
        [Run(f"fa, λ = {value}", rule_args("fa", lam=value)) for value in sweep]
        + [Run(name, rule_args(name, lam=round(1 / 7, 6))) for name in ("multikrum", "bulyan")],
        [(f"fa, λ = {value}", other) for value in sweep for other in ("multikrum", "bulyan")],
    )
    if grid == "tiny":
        weighted.runs, lam.runs = weighted.runs[:2], [lam.runs[0], lam.runs[len(sweep) - 1]]  # λ = 0, 7
        weighted.compare, lam.compare = weighted.compare[:1], [("fa, λ = 0", "fa, λ = 7")]
        return [weighted, lam]
    ctma_attacks = ("sign_flip", "alie", "ipm")
    ctma = Figure(
        "mnist_ctma", "w-CTMA on/off (17 workers, 8 Byzantine, P ∝ i², λ = 0.4)",
        "w-CTMA helps most under empire (Dahan & Levy 2024, Fig. 2)", "mnist_ctma-offline.yaml",
        [Run(f"{name} / {attack}", agg + attack_args(attack))
         for attack in ctma_attacks
         for name, agg in (("w-cwmed", rule_args("cwmed")), ("ctma(w-cwmed)", rule_args("ctma", base="cwmed", lam=0.4)))],
        [(f"ctma(w-cwmed) / {attack}", f"w-cwmed / {attack}") for attack in ctma_attacks],
    )
    optim_attacks = ("sign_flip", "ipm")[: 2 if full else 1]
    optim = Figure(
        "cifar10_mu2sgd", "μ²-SGD vs momentum vs SGD (9 workers, 4 Byzantine, P ∝ i, λ = 0.4)",
        "μ²-SGD ≈ momentum ≫ SGD (Dahan & Levy 2024, Fig. 3)", "cifar10_mu2sgd-offline.yaml",
        [Run(f"{opt} / {attack}", OPTIMIZER_ARGS[opt] + attack_args(attack))
         for attack in optim_attacks for opt in ("mu2sgd", "momentum", "sgd")],
        [(f"{a} / {attack}", f"{b} / {attack}") for attack in optim_attacks
         for a, b in (("mu2sgd", "sgd"), ("momentum", "sgd"), ("mu2sgd", "momentum"))],
    )
    flag_runs = _flag_rules(grid, 15, 3)
    flag = Figure(
        "cifar10_flag", "FA vs robust rules, f = 3 of 15 send random gradients (sync)",
        "FA beats the others under random gradients (FA paper, Figs. 4-5)", "cifar10_flag-offline.yaml",
        flag_runs, _versus(flag_runs, "fa"),
    )
    loss_runs = _flag_rules(grid, 15, 3, extra=("mean",))
    loss = Figure(
        "cifar10_flag_packet_loss", "FA vs robust rules, 10% packet loss on 3 of 15 links (sync)",
        "FA converges to a higher accuracy than the others under packet loss (FA paper, Fig. 6a)",
        "cifar10_flag_packet_loss-offline.yaml", loss_runs, _versus(loss_runs, "fa"),
    )
    augmentation_runs = _flag_rules(grid, 15, 3, extra=("mean",))
    augmentation = Figure(
        "cifar10_flag_augmentation", "FA vs robust rules, 3 of 15 workers train on augmented data (sync)",
        "FA handles nonlinear augmentation on the Byzantine workers more stably than the others "
        "(FA paper, Fig. 7)",
        "cifar10_flag_augmentation-offline.yaml", augmentation_runs, _versus(augmentation_runs, "fa"),
    )
    return [weighted, ctma, optim, flag, loss, augmentation, lam]


def build(recipe: Path, run: Run, steps: int | None = None, seed: int = 0) -> LightningCLI:
    """The LightningCLI (not run) of one variant: ``steps`` server steps (None: the recipe's, validating
    as it says; else 6 validations), ``seed`` for the model init, arrivals, shards and faults."""
    from lightning_byz.config import run_cli

    args = ["--config", str(recipe), *run.overrides, f"--seed_everything={seed}",
            f"--trainer.strategy.init_args.seed={seed}", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    if steps is not None:
        args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={max(1, steps // 6)}"]
    cli = run_cli(args, run=False)
    if run.unweighted:
        cli.trainer.strategy.aggregator = Unweighted(cli.trainer.strategy.aggregator)
    return cli


def run_one(recipe: Path, run: Run, steps: int | None = None, seed: int = 0) -> Curve:
    """Fit one variant in-process (see :func:`build`); its accuracy curve."""
    cli = build(recipe, run, steps, seed)
    curve = AccuracyCurve()
    cli.trainer.callbacks.append(curve)
    cli.trainer.fit(cli.model, cli.datamodule)
    return curve.points


def band(curves: list[Curve]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps evaluated in every seed's curve, with the mean, min and max accuracy over seeds there."""
    by_step = [dict(c) for c in curves]
    steps = sorted(set.intersection(*map(set, by_step))) if by_step else []
    accs = [[seed[step] for seed in by_step] for step in steps]
    return steps, [sum(a) / len(a) for a in accs], [min(a) for a in accs], [max(a) for a in accs]


def spread(values: list[float]) -> dict[str, float]:
    """Mean, min, max and (population) std of one number over seeds."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return {"mean": mean, "min": min(values), "max": max(values), "std": std}


def summarise(curves: list[Curve]) -> dict[str, dict[str, float]] | None:
    """Final and best accuracy of each seed's curve, summarised over seeds (None: no evaluation)."""
    if not curves or not all(curves):
        return None
    return {"final": spread([c[-1][1] for c in curves]), "best": spread([max(a for _, a in c) for c in curves])}


def paired(a: list[Curve], b: list[Curve]) -> dict[str, float] | None:
    """Final accuracy of run ``a`` minus run ``b``, seed by seed (same arrivals, shards and init):
    the spread of the differences, how many seeds ``a`` wins, and the effect in units of the runs'
    seed spread (mean difference / the larger std of the two runs' final accuracies; 0 when both
    are constant). None where a run has no evaluation."""
    finals_a, finals_b = summarise(a), summarise(b)
    if finals_a is None or finals_b is None:
        return None
    diffs = [ca[-1][1] - cb[-1][1] for ca, cb in zip(a, b)]
    stats = spread(diffs)
    noise = max(finals_a["final"]["std"], finals_b["final"]["std"])
    stats["wins"] = sum(d > 0 for d in diffs)
    stats["effect"] = stats["mean"] / noise if noise > 0 else 0.0
    return stats


def plot(figure: Figure, curves: dict[str, list[Curve]], path: Path) -> None:
    """Mean accuracy vs step per run; with several seeds a shaded min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    seeds = max((len(c) for c in curves.values()), default=1)
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    for label, runs in curves.items():
        steps, mean, low, high = band(runs)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=label)
        if seeds > 1:
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    title = figure.title + (f"\nmean of {seeds} seeds, band: min–max" if seeds > 1 else "")
    ax.set(title=title, xlabel="server step", ylabel="validation accuracy")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_cell(stat: dict[str, float] | None, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    form = "+.3f" if signed else ".3f"
    if stat["min"] == stat["max"]:
        return f"{stat['mean']:{form}}"
    return f"{stat['mean']:{form}} [{stat['min']:{form}}, {stat['max']:{form}}]"


def table(figure: Figure, summary: dict[str, dict | None], seeds: int,
          comparisons: dict[tuple[str, str], dict | None] | None = None) -> str:
    """Markdown: the claim, final and best accuracy per run (mean [min, max] over seeds), then the
    figure's paired comparisons (see :func:`paired`)."""
    over = f" (mean [min, max] over {seeds} seeds)" if seeds > 1 else ""
    lines = [f"### {figure.title}", "", f"Claim: {figure.claim}. Recipe: `recipes/{figure.recipe}`.", "",
             f"| run | final acc{over} | best acc{over} |", "|---|---|---|"]
    for label, stats in summary.items():
        lines.append(f"| {label} | {format_cell(stats and stats['final'])} | {format_cell(stats and stats['best'])} |")
    if comparisons:
        lines += ["", f"Paired by seed: final accuracy of a − b{over}, seeds a wins, and the effect in seed "
                  "spreads (mean difference / the larger std of a's and b's final accuracy):", "",
                  "| a | b | a − b | wins | effect |", "|---|---|---|---|---|"]
        for (a, b), stats in comparisons.items():
            if stats is None:
                lines.append(f"| {a} | {b} | n/a | n/a | n/a |")
            else:
                lines.append(f"| {a} | {b} | {format_cell(stats, signed=True)} | {stats['wins']}/{seeds} | "
                             f"{stats['effect']:+.1f} |")
    return "\n".join(lines) + "\n"


def report(grid: str = "small", out: str | Path = "docs/report", recipes: Path | None = None,
           only: list[str] | None = None, seeds: int = 1, steps: int | None = None) -> dict:
    """Run every figure of ``grid`` (or those named in ``only``), each run with seeds 0..``seeds``−1
    for ``steps`` server steps (default: the grid's); write their PNG, markdown table and JSON curves
    under ``out``."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    steps = STEPS[grid] if steps is None else steps
    selected = figures(grid)
    unknown = sorted(set(only or []) - {f.name for f in selected})
    if unknown:
        raise ValueError(f"no figure {unknown} in grid {grid!r}; it has {[f.name for f in selected]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = recipes_dir() if recipes is None else Path(recipes)
    results = {}
    for figure in selected:
        if only and figure.name not in only:
            continue
        recipe = recipes / figure.recipe
        if not recipe.is_file():
            raise FileNotFoundError(f"recipe {recipe} not found (pass --recipes: the folder of the *-offline.yaml)")
        figure_start = time.monotonic()
        curves: dict[str, list[Curve]] = {}
        for run in figure.runs:
            curves[run.label] = []
            for seed in range(seeds):
                start = time.monotonic()
                curves[run.label].append(run_one(recipe, run, steps, seed))
                print(f"[report] {figure.name}: {run.label} (seed {seed}): {curves[run.label][-1][-1:]} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
        summary = {label: summarise(runs) for label, runs in curves.items()}
        comparisons = {(a, b): paired(curves[a], curves[b]) for a, b in figure.compare}
        plot(figure, curves, out / f"{figure.name}.png")
        (out / f"{figure.name}.md").write_text(
            table(figure, summary, seeds, comparisons) + f"\n![{figure.name}]({figure.name}.png)\n")
        results[figure.name] = {
            "grid": grid,
            "steps": max((c[-1][0] for runs in curves.values() for c in runs if c), default=0),  # last evaluated
            "seeds": list(range(seeds)), "claim": figure.claim,
            "recipe": figure.recipe, "wall_s": round(time.monotonic() - figure_start, 1),
            "summary": summary, "paired": [{"a": a, "b": b, **(stats or {})} for (a, b), stats in comparisons.items()],
            "curves": curves}
        (out / f"{figure.name}.json").write_text(json.dumps(results[figure.name], indent=1))
    return results


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-byz report", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=GRIDS, default="small",
                        help="tiny: 2 figures of 2 runs, 6 steps each (tests); small: every figure, a cut "
                             "of its runs; full: every run (small and full: the offline recipes' own steps)")
    parser.add_argument("--out", default="docs/report", help="output directory (default docs/report)")
    parser.add_argument("--recipes", type=Path, default=None,
                        help="directory of the *-offline.yaml recipes (default: the bundled ones)")
    parser.add_argument("--only", nargs="+", metavar="FIGURE", help="run only these figures")
    parser.add_argument("--seeds", type=int, default=1, metavar="K",
                        help="run every variant with seeds 0..K-1; plot the mean and min-max band (default 1)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="server steps per run, with 6 validations (default: the grid's)")
    opts = parser.parse_args(args)
    try:
        report(opts.grid, opts.out, opts.recipes, opts.only, opts.seeds, opts.steps)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(f"report written to {opts.out}")
    return 0
