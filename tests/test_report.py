"""``lightning-byz report`` on the tiny grid, and the unweighted baseline wrapper."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_byz.aggregators import get_aggregator
from lightning_byz.cli import main
from lightning_byz.report import Unweighted, figures


def test_unweighted_ignores_weights():
    X = torch.tensor([[0.0], [1.0], [10.0]])
    w = torch.tensor([1.0, 1.0, 8.0])
    cwmed = get_aggregator("cwmed")
    assert cwmed(X, w).item() == 10.0
    assert Unweighted(cwmed)(X, w).item() == 1.0


def test_grids_cover_every_seed_figure():
    assert {f.name for f in figures("small")} == {"mnist_async_weighted", "mnist_ctma", "cifar10_mu2sgd",
                                                  "cifar10_flag"}
    assert sum(len(f.runs) for f in figures("full")) > sum(len(f.runs) for f in figures("small"))
    assert [len(f.runs) for f in figures("tiny")] == [2]


def test_tiny_report_writes_plot_and_table(tmp_path, capsys):
    assert main(["report", "--grid", "tiny", "--out", str(tmp_path)]) == 0
    png = tmp_path / "mnist_async_weighted.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "mnist_async_weighted.md").read_text()
    assert "| w-cwmed / sign_flip |" in table and "| cwmed / sign_flip |" in table
    curves = json.loads((tmp_path / "mnist_async_weighted.json").read_text())["curves"]
    assert all(len(points) == 6 and points[-1][0] == 6 and 0 <= points[-1][1] <= 1 for points in curves.values())


def test_unknown_grid_or_figure_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--grid", "huge"])
    with pytest.raises(SystemExit):
        main(["report", "--grid", "tiny", "--only", "mnist_ctma"])
    assert "no figure ['mnist_ctma'] in grid 'tiny'" in capsys.readouterr().err
