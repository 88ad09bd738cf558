"""Every recipe parses and instantiates through the CLI; the quickstart trains end to end."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_byz import AsyncPSStrategy
from lightning_byz.aggregators.base import Aggregator
from lightning_byz.cli import main, run_cli
from lightning_byz.faults import ByzantineWorkers

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
ROOT = RECIPES[0].parent.parent


def test_recipes_exist():
    names = {r.stem for r in RECIPES}
    for seed in ("quickstart", "mnist_async_weighted", "mnist_ctma", "cifar10_mu2sgd", "cifar10_flag"):
        assert seed in names
        assert seed == "quickstart" or f"{seed}-offline" in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_print_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["strategy"]["class_path"] == "lightning_byz.AsyncPSStrategy"
    assert config["seed_everything"] == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_instantiates(recipe):
    cli = run_cli(["--config", str(recipe)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, AsyncPSStrategy) and strategy.transport == "simulated"
    assert isinstance(strategy.aggregator, Aggregator)
    declared = yaml.safe_load(recipe.read_text())["trainer"]["strategy"]["init_args"]
    assert strategy.num_workers == declared["num_workers"]
    if "lam" in (declared.get("aggregator_kwargs") or {}):
        assert strategy.aggregator.lam == declared["aggregator_kwargs"]["lam"]
    attacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, ByzantineWorkers)]
    assert len(attacks) == 1 and max(attacks[0].workers) <= strategy.num_workers
    if recipe.stem.endswith("-offline") or recipe.stem == "quickstart":
        assert type(cli.datamodule).__name__ == "OfflineMNISTDataModule"


def test_override_reaches_the_strategy():
    recipe = ROOT / "recipes" / "cifar10_flag-offline.yaml"
    cli = run_cli(["--config", str(recipe), "--trainer.strategy.init_args.aggregator=cwtm",
                   "--trainer.strategy.init_args.aggregator_kwargs={lam: 0.2}"], run=False)
    assert type(cli.trainer.strategy.aggregator).__name__.lower().startswith("cwtm")
    assert cli.trainer.strategy.aggregator.lam == 0.2


@pytest.mark.slow
def test_quickstart_trains(tmp_path):
    """``lightning-byz fit --config recipes/quickstart.yaml`` as a user runs it (~1-3 min on 2 cores)."""
    script = Path(sys.executable).parent / "lightning-byz"
    proc = subprocess.run([str(script), "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
                           "--trainer.enable_progress_bar=false"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = re.search(r"^logs: (.+)$", proc.stdout, re.M).group(1)
    rows = list(csv.DictReader(open(tmp_path / log_dir / "metrics.csv")))
    accs = [float(r["val_acc"]) for r in rows if r.get("val_acc")]
    assert len(accs) == 5 and accs[-1] > 0.8, accs
    assert (tmp_path / log_dir / "config.yaml").is_file()
