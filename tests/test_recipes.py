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
from lightning_byz.faults import NonlinearAugmentation, PacketLoss
from lightning_byz.faults.common import WorkerFault

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
ROOT = RECIPES[0].parent.parent


def test_recipes_exist():
    names = {r.stem for r in RECIPES}
    for seed in ("quickstart", "mnist_async_weighted", "mnist_ctma", "cifar10_mu2sgd", "cifar10_flag",
                 "cifar10_flag_packet_loss", "cifar10_flag_augmentation", "cifar10_flag_lambda"):
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


def faults(cli) -> list[WorkerFault]:
    return [cb for cb in cli.trainer.callbacks if isinstance(cb, WorkerFault)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_instantiates(recipe):
    cli = run_cli(["--config", str(recipe)], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, AsyncPSStrategy) and strategy.transport == "simulated"
    assert isinstance(strategy.aggregator, Aggregator)
    config = yaml.safe_load(recipe.read_text())["trainer"]
    declared = config["strategy"]["init_args"]
    assert strategy.num_workers == declared["num_workers"]
    if "lam" in (declared.get("aggregator_kwargs") or {}):
        assert strategy.aggregator.lam == declared["aggregator_kwargs"]["lam"]
    built = faults(cli)
    assert [type(f).__name__ for f in built] == [c["class_path"].rsplit(".", 1)[1] for c in config["callbacks"]]
    assert all(max(f.workers) <= strategy.num_workers for f in built)
    if recipe.stem.endswith("-offline") or recipe.stem == "quickstart":
        assert type(cli.datamodule).__name__ == "OfflineMNISTDataModule"


def test_flag_fault_recipes_follow_the_paper():
    """FA paper: 10% loss on 3 of 15 links (Fig. 6a), augmented data on 3 of 15 workers (Fig. 7),
    the λ sweep at p = 7, f = 1 (Fig. 8); offline variants keep the workers and faults."""
    for variant in ("", "-offline"):
        loss = run_cli(["--config", str(ROOT / "recipes" / f"cifar10_flag_packet_loss{variant}.yaml")], run=False)
        (fault,) = faults(loss)
        assert isinstance(fault, PacketLoss) and fault.rate == 0.1 and len(fault.workers) == 3
        assert loss.trainer.strategy.num_workers == 15 and loss.trainer.strategy.mode == "sync"
        aug = run_cli(["--config", str(ROOT / "recipes" / f"cifar10_flag_augmentation{variant}.yaml")], run=False)
        (fault,) = faults(aug)
        assert isinstance(fault, NonlinearAugmentation) and fault.map_kind == "lotka_volterra"
        assert len(fault.workers) == 3 and aug.trainer.strategy.num_workers == 15
        lam = run_cli(["--config", str(ROOT / "recipes" / f"cifar10_flag_lambda{variant}.yaml"),
                       "--trainer.strategy.init_args.aggregator_kwargs={lam: 7}"], run=False)
        assert lam.trainer.strategy.num_workers == 7 and lam.trainer.strategy.aggregator.lam == 7.0
        assert [(type(f).__name__, f.workers) for f in faults(lam)] == [("ByzantineWorkers", (7,))]


def test_recipes_follow_the_papers_protocols():
    """Weight for Robustness (released code): 17 workers, 8 Byzantine sending λ = 0.4 of the updates
    whatever their speed, batch 16, CTMA trimming at least λ; the μ²-SGD figure's small CIFAR CNN and
    hyper-parameters. FA: uniform [0, 1) random gradients, lr 0.2 ×0.2 every 10 epochs, 40 epochs."""
    for variant in ("", "-offline"):
        for name in ("mnist_async_weighted", "mnist_ctma"):
            cli = run_cli(["--config", str(ROOT / "recipes" / f"{name}{variant}.yaml")], run=False)
            strategy = cli.trainer.strategy
            assert (strategy.num_workers, strategy.byzantine_share, cli.datamodule.batch_size) == (17, 0.4, 16)
            assert strategy.worker_momentum == 0.9  # the paper's EMA momentum on the workers
            assert [f.workers for f in faults(cli)] == [tuple(range(1, 9))]
            if name == "mnist_ctma":
                assert strategy.aggregator.lam >= strategy.byzantine_share
        for name in ("cifar10_flag", "cifar10_flag_lambda"):
            cli = run_cli(["--config", str(ROOT / "recipes" / f"{name}{variant}.yaml")], run=False)
            assert [(f.attack, f.scale) for f in faults(cli)] == [("random_uniform", 1.0)]
    mu2sgd = run_cli(["--config", str(ROOT / "recipes" / "cifar10_mu2sgd.yaml")], run=False)
    hp, strategy = mu2sgd.model.hparams, mu2sgd.trainer.strategy
    assert (hp.net, hp.optimizer, hp.lr, hp.beta, hp.gamma, hp.weight_decay) == ("cifar_cnn", "mu2sgd", 0.01, 0.25, 0.1, 0)
    assert (mu2sgd.datamodule.batch_size, strategy.byzantine_share, strategy.aggregator.name) == (16, 0.4, "cwmed")
    for name, rounds_per_10_epochs in (("cifar10_flag", 260), ("cifar10_flag_packet_loss", 260),
                                       ("cifar10_flag_augmentation", 260), ("cifar10_flag_lambda", 558)):
        cli = run_cli(["--config", str(ROOT / "recipes" / f"{name}.yaml")], run=False)
        hp, workers = cli.model.hparams, cli.trainer.strategy.num_workers
        assert (hp.optimizer, hp.lr, hp.weight_decay, cli.datamodule.batch_size) == ("momentum", 0.2, 5e-4, 128)
        assert cli.model.schedule == ("step", (rounds_per_10_epochs, 0.2, "step"))
        assert round(10 * 50_000 / (workers * 128)) == rounds_per_10_epochs  # FA: x0.2 every 10 epochs
        assert round(cli.trainer.max_steps * workers * 128 / 50_000) == 40  # ~1,050 rounds of 15 workers


def test_override_reaches_the_strategy():
    recipe = ROOT / "recipes" / "cifar10_flag-offline.yaml"
    cli = run_cli(["--config", str(recipe), "--trainer.strategy.init_args.aggregator=cwtm",
                   "--trainer.strategy.init_args.aggregator_kwargs={lam: 0.2}"], run=False)
    assert type(cli.trainer.strategy.aggregator).__name__.lower().startswith("cwtm")
    assert cli.trainer.strategy.aggregator.lam == 0.2


def run_quickstart(tmp_path: Path, *launch: str) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    """The README's command, from a fresh directory: the recipe by name (``launch``: under mpirun)."""
    script = Path(sys.executable).parent / "lightning-byz"
    command = [str(script), *launch, *(["--"] if launch else []), "fit", "--config", "quickstart",
               "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_dir = re.search(r"^logs: (.+)$", proc.stdout, re.M).group(1)
    assert (tmp_path / log_dir / "config.yaml").is_file()
    return proc, list(csv.DictReader(open(tmp_path / log_dir / "metrics.csv")))


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_quickstart_trains(tmp_path):
    """``lightning-byz fit --config quickstart`` as the README has a user run it (~1 min on 2 cores)."""
    _, rows = run_quickstart(tmp_path)
    accs = column(rows, "val_acc")
    assert len(accs) == 5 and accs[-1] > 0.8, accs  # measured 0.869 (deterministic)


# The README's MPI line on this 2-core machine (9 processes), final val_acc measured 2026-12-03, quiet:
# 0.880, 0.865, 0.897 (lr 0.1 and lam 0.25 before: 0.34-0.61); the floor leaves ~0.1 for a loaded machine.
QUICKSTART_MPI_FLOOR = 0.75


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quickstart_over_mpi_trains_as_the_simulation(tmp_path):
    """``lightning-byz launch -n 8 -- fit --config quickstart``: the Byzantine share under real timing
    stays inside the recipe's budget (no warning) and the accuracy matches the simulated run's."""
    proc, rows = run_quickstart(tmp_path, "launch", "-n", "8")
    accs = column(rows, "val_acc")
    assert len(accs) == 5 and accs[-1] >= QUICKSTART_MPI_FLOOR, accs
    (share,) = column(rows, "ps/byzantine_weight_final")
    assert 0.15 < share < 0.35, share  # 2 of 8 equally fast workers: about 0.25, inside lam = 0.35
    assert "of the weight" not in proc.stderr
