"""Attack gallery: final accuracy of every robust aggregation rule under every attack, simulated.

Each cell trains the offline quick start (``recipes/quickstart.yaml``: offline MNIST, the MLP
classifier, async parameter server) with 9 simulated workers arriving uniformly, workers 8 and 9
Byzantine (λ = 2/9 ≈ 0.22 of the updates), validates once at the end and keeps that accuracy.
Rules with a Byzantine budget get lam = 2/9. Attacks: those of
:data:`lightning_byz.faults.attacks.ATTACKS` but ``random_uniform`` (the recipe's scale 4 for
``sign_flip`` and ``random``; the papers' scale 1 for the omniscient ones, ALIE with its paper's
z), no attack, and the rate-aware adversary: ``flood`` (random gradients, the Byzantine workers arriving 10× as often, default warm-up),
``first-arrival`` (the same with ``min_workers=1``: no warm-up quorum) and ``flood+cap`` (``flood``
with the server's ``max_weight=1/9``: no worker above its fair share). ``drop`` runs with
``min_workers=7`` (the honest workers): under the default warm-up (all 9) the server would first
wait ``worker_timeout`` (60 virtual seconds of arrivals) for the droppers to count as silent. Writes
``attack_gallery.{png,json}`` to ``--out`` and the table (mean final accuracy over seeds 0..K−1)
into ``attack_gallery.md`` between its generated-block markers, keeping the text around them.

    python benchmarks/attack_gallery.py --grid small --seeds 1 --out /tmp/gallery   # 9 cells, < 1 min
    python benchmarks/attack_gallery.py --grid full --seeds 3 --jobs 2 --out docs/
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lightning_byz.config import recipes_dir
from lightning_byz.faults.attacks import ATTACKS, OMNISCIENT
from lightning_byz.report import AccuracyCurve, Run, attack_args, build, format_cell, rule_args, spread

RECIPE = "quickstart.yaml"
NUM_WORKERS = 9
BYZANTINE = [8, 9]
LAM = round(len(BYZANTINE) / NUM_WORKERS, 6)
FLOOD = 10.0
FLOOD_ATTACK = "random"
FAIR_CAP = round(1 / NUM_WORKERS, 6)  # max_weight of the flood+cap column: every worker's fair share
STEPS = {"small": 20, "full": 300}  # server steps per cell (default of --steps)
SMALL_RULES = ("mean", "cwmed", "ctma(cwmed)")
SMALL_ATTACKS = ("none", "random", "ipm")
BEGIN, END = "<!-- attack_gallery.py: begin -->", "<!-- attack_gallery.py: end -->"

# Bulyan is left out: it needs n >= 4f + 3 = 11 workers for f = 2 (lam < (1 - 3/n)/4 = 0.17 at n = 9).
RULES: dict[str, list[str]] = {
    "mean": rule_args("mean"),
    "cwmed": rule_args("cwmed"),
    "cwtm": rule_args("cwtm", lam=LAM),
    "meamed": rule_args("meamed", lam=LAM),
    "phocas": rule_args("phocas", lam=LAM),
    "gm": rule_args("gm"),
    "krum": rule_args("krum", lam=LAM),
    "multikrum": rule_args("multikrum", lam=LAM),
    "cclip": rule_args("cclip"),
    "ctma(cwmed)": rule_args("ctma", base="cwmed", lam=LAM),
    "nnm+cwmed": rule_args("cwmed", pre="nnm", lam=LAM),
    "flag": rule_args("flag"),
}


FLOODS = {"flood": [], "first-arrival": ["--trainer.strategy.init_args.min_workers=1"],
          "flood+cap": [f"--trainer.strategy.init_args.max_weight={FAIR_CAP}"]}


def attack_overrides(attack: str) -> list[str]:
    """CLI overrides of one gallery column (see the module doc)."""
    if attack == "none":
        return ["--trainer.callbacks=[]"]
    if attack in FLOODS:
        args = attack_args(FLOOD_ATTACK, BYZANTINE) + [f"--trainer.callbacks.init_args.flood={FLOOD}"]
        return args + FLOODS[attack]
    args = attack_args(attack, BYZANTINE)
    if attack == "drop":  # skip the warm-up's wait for the droppers to go silent (see the module doc)
        args.append(f"--trainer.strategy.init_args.min_workers={NUM_WORKERS - len(BYZANTINE)}")
    if attack == "alie":  # the paper's z (Baruch et al.: from n and f), as every attack here is its paper's
        args.append("--trainer.callbacks.init_args.z_rule=workers")
    return args + (["--trainer.callbacks.init_args.scale=1.0"] if attack in OMNISCIENT else [])


# random_uniform (FA's random gradients) is left to the Flag Aggregator reproduction: the grid keeps within an hour.
ALL_ATTACKS = ("none", *(a for a in ATTACKS if a != "random_uniform"), *FLOODS)


def grid(name: str) -> tuple[list[str], list[str]]:
    """The rule and attack labels of grid ``name`` (``small`` or ``full``)."""
    if name == "small":
        return list(SMALL_RULES), list(SMALL_ATTACKS)
    return list(RULES), list(ALL_ATTACKS)


def run_cell(rule: str, attack: str, steps: int, seed: int, data=None) -> tuple[float, float, object]:
    """Fit one cell in-process; (final validation accuracy, Byzantine share of the server's weights
    at the end — s_i / Σ s_j after any ``max_weight`` cap —, the fitted datamodule). ``data``: a
    datamodule set up by an earlier cell, reused so the digits are loaded once."""
    overrides = [f"--trainer.strategy.init_args.num_workers={NUM_WORKERS}",
                 "--trainer.strategy.init_args.arrival=uniform", f"--trainer.max_steps={steps}",
                 f"--trainer.val_check_interval={steps}", *RULES[rule], *attack_overrides(attack)]
    cli = build(recipes_dir() / RECIPE, Run(f"{rule} / {attack}", overrides), None, seed)
    curve = AccuracyCurve()
    cli.trainer.callbacks.append(curve)
    data = cli.datamodule if data is None else data
    cli.trainer.fit(cli.model, data)
    server = cli.trainer.strategy.server
    workers = torch.arange(1, NUM_WORKERS + 1)
    weights = server.weights(workers).double().cpu()
    return curve.points[-1][1], float(weights[[w - 1 for w in BYZANTINE]].sum()), data


def heatmap(rules: list[str], attacks: list[str], means: dict, path: Path, title: str) -> None:
    """Rules × attacks, colour and label the mean final accuracy (grey "err": the cell failed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    values = [[means[r][a] if means[r][a] is not None else math.nan for a in attacks] for r in rules]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(attacks), 1.2 + 0.42 * len(rules)))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    image = ax.imshow(values, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            text = "err" if math.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if math.isnan(value) or value > 0.6 else "white")
    ax.set_xticks(range(len(attacks)), attacks, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rules)), rules, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label="final val accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rules: list[str], attacks: list[str], accuracies: dict, shares: dict, seeds: int,
          provenance: str) -> str:
    """Markdown: ``provenance``, one row per rule and one column per attack (mean [min, max] over
    seeds), then a row with the Byzantine workers' share of the server's final weights (over all runs)."""
    over = f"mean [min, max] over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [provenance, "", f"Final validation accuracy ({over}); `error`: the run raised. Last row: the "
             "Byzantine workers' share of the server's weights at the end (mean over every rule and seed).",
             "", "| rule | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 1) + "|"]
    for rule in rules:
        cells = [format_cell(spread(accuracies[rule][a])) if accuracies[rule][a] else "error" for a in attacks]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    pooled = {a: [v for r in rules for v in shares[r][a]] for a in attacks}
    lines.append("| *Byzantine weight* | " + " | ".join(
        f"*{sum(v) / len(v):.2f}*" if v else "–" for v in pooled.values()) + " |")
    return "\n".join(lines + ["", "![attack gallery](attack_gallery.png)"])


def write_block(path: Path, block: str) -> None:
    """Put ``block`` between the markers of ``path``, keeping the rest (a new file: the block alone)."""
    text = path.read_text() if path.is_file() else f"# Attack gallery\n\n{BEGIN}\n{END}\n"
    head, found, rest = text.partition(BEGIN)
    if not found or END not in rest:
        raise ValueError(f"{path} lacks the markers {BEGIN} ... {END}")
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{rest.partition(END)[2]}")


_data = None  # this process's datamodule, set up by its first cell and reused by the next ones


def _run_task(task: tuple[str, str, int, int]) -> tuple[tuple[str, str, int], float | None, float | None, str | None]:
    """One (rule, attack, seed) cell, in this process: its accuracy and Byzantine share, or its error."""
    global _data
    rule, attack, seed, steps = task
    start = time.monotonic()
    try:
        accuracy, share, _data = run_cell(rule, attack, steps, seed, _data)
    except Exception as err:  # a failing rule is a result of the gallery, reported in the table
        print(f"[gallery] {rule} / {attack} (seed {seed}): ERROR {err}", flush=True)
        return (rule, attack, seed), None, None, f"{type(err).__name__}: {err}"
    print(f"[gallery] {rule} / {attack} (seed {seed}): {accuracy:.3f} ({time.monotonic() - start:.1f} s)", flush=True)
    return (rule, attack, seed), accuracy, share, None


def _one_thread() -> None:
    torch.set_num_threads(1)


def gallery(grid_name: str = "small", seeds: int = 3, steps: int | None = None,
            out: str | Path = "docs", jobs: int = 1) -> dict:
    """Run every cell of ``grid_name`` for seeds 0..``seeds``−1, in ``jobs`` processes (each cell is
    seeded, so the results do not depend on ``jobs``); write the table, heatmap and JSON."""
    if seeds < 1 or jobs < 1 or (steps is not None and steps < 1):
        raise ValueError(f"--seeds, --steps and --jobs must be >= 1, got {seeds}, {steps} and {jobs}")
    steps = STEPS[grid_name] if steps is None else steps
    rules, attacks = grid(grid_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(rule, attack, seed, steps) for rule in rules for attack in attacks for seed in range(seeds)]
    start = time.monotonic()
    if jobs == 1:
        done = [_run_task(task) for task in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
            done = list(pool.map(_run_task, tasks))
    wall = time.monotonic() - start
    cells = {key: (accuracy, share, error) for key, accuracy, share, error in done}
    errors = {f"{r} / {a} / seed {s}": error for (r, a, s), (_, _, error) in cells.items() if error}
    failed = {(r, a) for (r, a, _), (_, _, error) in cells.items() if error}  # a cell with any failed seed
    accuracies = {r: {a: [] if (r, a) in failed else [cells[r, a, s][0] for s in range(seeds)] for a in attacks}
                  for r in rules}
    byzantine_share = {r: {a: [] if (r, a) in failed else [cells[r, a, s][1] for s in range(seeds)]
                           for a in attacks} for r in rules}
    means = {r: {a: (sum(v) / len(v) if v else None) for a, v in row.items()} for r, row in accuracies.items()}
    title = (f"Final accuracy, {NUM_WORKERS} workers, {len(BYZANTINE)} Byzantine (λ ≈ {LAM:.2f}), "
             f"{steps} steps, mean of {seeds} seed{'s' * (seeds > 1)}")
    heatmap(rules, attacks, means, out / "attack_gallery.png", title)
    cell_s = wall * jobs / len(tasks)
    provenance = (f"Produced by `python benchmarks/attack_gallery.py --grid {grid_name} --seeds {seeds} "
                  f"--steps {steps} --jobs {jobs}` in {wall / 60:.1f} min ({cell_s:.1f} s per run and process, "
                  f"`torch.set_num_threads(1)`).")
    write_block(out / "attack_gallery.md", table(rules, attacks, accuracies, byzantine_share, seeds, provenance))
    results = {"grid": grid_name, "seeds": list(range(seeds)), "steps": steps, "jobs": jobs, "num_workers": NUM_WORKERS,
               "byzantine": BYZANTINE, "lam": LAM, "flood": FLOOD, "flood_attack": FLOOD_ATTACK, "fair_cap": FAIR_CAP,
               "wall_s": round(wall, 1), "cell_s": round(cell_s, 2),
               "rules": {r: RULES[r] for r in rules}, "attacks": {a: attack_overrides(a) for a in attacks},
               "accuracy": accuracies, "byzantine_weight_share": byzantine_share, "errors": errors}
    (out / "attack_gallery.json").write_text(json.dumps(results, indent=1))
    return results


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=tuple(STEPS), default="small",
                        help=f"small: {len(SMALL_RULES)} rules x {len(SMALL_ATTACKS)} attacks (tests); "
                             f"full: {len(RULES)} rules x {len(ALL_ATTACKS)} attacks")
    parser.add_argument("--seeds", type=int, default=3, metavar="K", help="seeds 0..K-1 per cell (default 3)")
    parser.add_argument("--steps", type=int, metavar="N", help=f"server steps per cell (default {STEPS})")
    parser.add_argument("--out", default="docs", help="output directory (default docs/)")
    parser.add_argument("--jobs", type=int, default=1, metavar="J",
                        help="cells run in J processes at once, one thread each (default 1: in this process)")
    opts = parser.parse_args(args)
    _one_thread()
    try:
        results = gallery(opts.grid, opts.seeds, opts.steps, opts.out, opts.jobs)
    except ValueError as err:
        parser.error(str(err))
    print(f"[gallery] {results['wall_s']:.0f} s, {results['cell_s']:.1f} s per cell; written to {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
