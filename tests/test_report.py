"""``lightning-byz report``: the grids, multi-seed runs on the tiny grid, the summaries, and the
unweighted baseline wrapper."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lightning_byz.aggregators import get_aggregator
from lightning_byz.cli import main
from lightning_byz.config import recipes_dir
from lightning_byz.report import Unweighted, band, build, figures, format_cell, paired, run_one, summarise

RECIPES = recipes_dir()

SEED_FIGURES = {"mnist_async_weighted", "mnist_ctma", "cifar10_mu2sgd", "cifar10_flag", "cifar10_flag_packet_loss",
                "cifar10_flag_augmentation", "cifar10_flag_lambda"}


def test_unweighted_ignores_weights():
    X = torch.tensor([[0.0], [1.0], [10.0]])
    w = torch.tensor([1.0, 1.0, 8.0])
    cwmed = get_aggregator("cwmed")
    assert cwmed(X, w).item() == 10.0
    assert Unweighted(cwmed)(X, w).item() == 1.0


def test_grids_cover_every_seed_figure():
    assert {f.name for f in figures("small")} == SEED_FIGURES
    assert sum(len(f.runs) for f in figures("full")) > sum(len(f.runs) for f in figures("small"))
    assert {f.name: [r.label for r in f.runs] for f in figures("tiny")} == {
        "mnist_async_weighted": ["w-cwmed / sign_flip", "cwmed / sign_flip"],
        "cifar10_flag_lambda": ["fa, λ = 0", "fa, λ = 7"]}


def test_every_full_grid_run_instantiates():
    """Each run's overrides reach the strategy (no training): the λ sweep sets FA's regulariser, the
    unweighted baselines wrap their rule, the fault figures keep their faults."""
    for figure in figures("full"):
        for run in figure.runs:
            cli = build(RECIPES / figure.recipe, run, steps=6, seed=1)
            strategy = cli.trainer.strategy
            assert strategy.seed == 1 and cli.trainer.max_steps == 6
            assert isinstance(strategy.aggregator, Unweighted) == run.unweighted
            lam = re.fullmatch(r"fa, λ = (.+)", run.label)
            if lam:
                assert strategy.aggregator.lam == float(lam.group(1))
    assert len(figures("full")[-1].runs) == 9  # λ ∈ {0, 0.1, 0.5, 1, 3, 7, 14}, Multi-Krum, Bulyan


def test_band_and_summary_over_seeds():
    curves = [[(1, 0.2), (2, 0.4), (3, 0.5)], [(1, 0.4), (2, 0.8)]]  # seed 1 has no step 3
    steps, mean, low, high = band(curves)
    assert steps == [1, 2] and mean == pytest.approx([0.3, 0.6]) and low == [0.2, 0.4] and high == [0.4, 0.8]
    summary = summarise(curves)
    assert summary["final"] == pytest.approx({"mean": 0.65, "min": 0.5, "max": 0.8, "std": 0.15})
    assert summary["best"] == pytest.approx({"mean": 0.65, "min": 0.5, "max": 0.8, "std": 0.15})
    assert summarise([[(1, 0.3)], []]) is None


def test_every_comparison_names_runs_of_its_figure():
    for grid in ("tiny", "small", "full"):
        for figure in figures(grid):
            labels = {run.label for run in figure.runs}
            assert figure.compare, figure.name
            assert all(a in labels and b in labels and a != b for a, b in figure.compare), figure.name


def test_paired_differences_are_taken_seed_by_seed():
    """a wins seeds 0 and 2 and loses seed 1: the differences, not the difference of the means'
    extremes; the effect is the mean difference over the larger of the two runs' seed std."""
    a = [[(5, 0.2), (10, 0.9)], [(10, 0.5)], [(10, 0.7)]]
    b = [[(10, 0.8)], [(10, 0.6)], [(10, 0.3)]]
    stats = paired(a, b)
    diffs = [0.1, -0.1, 0.4]
    mean = sum(diffs) / 3
    std = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
    assert stats == pytest.approx({"mean": mean, "min": -0.1, "max": 0.4, "std": std, "wins": 2,
                                   "effect": mean / summarise(b)["final"]["std"]})
    assert summarise(b)["final"]["std"] > summarise(a)["final"]["std"]
    assert paired(a, a)["wins"] == 0 and paired(a, a)["mean"] == 0
    assert paired(a, [[(10, 0.5)], [], [(10, 0.5)]]) is None  # a run that never evaluated
    constant = [[(10, 0.5)]] * 3
    assert paired(constant, constant)["effect"] == 0.0


def test_tiny_report_with_two_seeds(tmp_path):
    """2 figures × 2 runs × 2 seeds of 6 steps: every curve in the JSON, seeds that differ and
    reproduce, and a table and summary computed from those curves."""
    assert main(["report", "--grid", "tiny", "--seeds", "2", "--out", str(tmp_path)]) == 0
    for figure in figures("tiny"):
        assert (tmp_path / f"{figure.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        result = json.loads((tmp_path / f"{figure.name}.json").read_text())
        assert result["seeds"] == [0, 1] and result["steps"] == 6 and result["recipe"] == figure.recipe
        table = (tmp_path / f"{figure.name}.md").read_text()
        assert "over 2 seeds" in table
        for run in figure.runs:
            seed0, seed1 = result["curves"][run.label]
            for curve in (seed0, seed1):
                assert [step for step, _ in curve] == [1, 2, 3, 4, 5, 6]
                assert all(0 <= acc <= 1 for _, acc in curve)
            assert seed0 != seed1  # the seed reaches the run
            finals = [seed0[-1][1], seed1[-1][1]]
            final = result["summary"][run.label]["final"]
            assert final["mean"] == pytest.approx(sum(finals) / 2)
            assert (final["min"], final["max"]) == (min(finals), max(finals))
            assert f"| {run.label} | {final['mean']:.3f} [{min(finals):.3f}, {max(finals):.3f}] |" in table
        for comparison in result["paired"]:
            a, b = (result["curves"][comparison[k]] for k in ("a", "b"))
            assert comparison == {"a": comparison["a"], "b": comparison["b"], **paired(a, b)}
            assert (f"| {comparison['a']} | {comparison['b']} | {format_cell(comparison, signed=True)} | "
                    f"{comparison['wins']}/2 |") in table
        assert [(c["a"], c["b"]) for c in result["paired"]] == figure.compare
    lam = figures("tiny")[1]
    rerun = run_one(RECIPES / lam.recipe, lam.runs[1], steps=6, seed=1)
    assert [list(p) for p in rerun] == json.loads((tmp_path / f"{lam.name}.json").read_text())[
        "curves"][lam.runs[1].label][1]  # a seed reproduces its curve exactly


def test_bad_options_are_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--grid", "huge"])
    with pytest.raises(SystemExit):
        main(["report", "--grid", "tiny", "--only", "mnist_ctma"])
    assert "no figure ['mnist_ctma'] in grid 'tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", "--grid", "tiny", "--seeds", "0"])
    assert "--seeds must be >= 1" in capsys.readouterr().err
