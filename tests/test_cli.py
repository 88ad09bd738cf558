"""The ``lightning-byz`` entry point: subcommands, ``launch`` forwarding, clear data errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_byz import AsyncPSStrategy
from lightning_byz.cli import main
from lightning_byz.data import DatasetMissingError

ROOT = Path(__file__).resolve().parent.parent


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "lightning_byz", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "lightning-byz" in proc.stdout
    assert all(cmd in proc.stdout for cmd in ("fit", "validate", "test"))


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2
    assert "report" in capsys.readouterr().err


def test_launch_forwards_to_mpirun(capsys):
    pytest.importorskip("mpi4py")
    rc = main(["launch", "-n", "2", "--dry-run", "--", "fit", "--config", "quickstart"])
    assert rc == 0
    command = capsys.readouterr().err
    assert "-n 3" in command
    assert command.strip().endswith("-m mpi4py -m lightning_byz fit --config quickstart")


def test_launch_needs_separator(capsys):
    assert main(["launch", "-n", "2", "fit"]) == 2
    assert "--" in capsys.readouterr().err


def test_missing_cifar_names_path_and_flag(tmp_path):
    missing = tmp_path / "no_cifar"
    with pytest.raises(DatasetMissingError) as err:
        main(["fit", "--config", str(ROOT / "recipes" / "cifar10_flag.yaml"),
              f"--data.init_args.data_dir={missing}", "--data.init_args.download=false",
              "--trainer.accelerator=cpu", "--trainer.max_steps=1", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}"])
    message = str(err.value)
    assert str(missing) in message and "download: true" in message and "--data.download=true" in message


def test_aggregator_kwargs_and_keywords():
    assert AsyncPSStrategy(aggregator="cwtm", aggregator_kwargs={"lam": 0.2}, num_workers=3).aggregator.lam == 0.2
    assert AsyncPSStrategy(aggregator="cwtm", lam=0.3, num_workers=3).aggregator.lam == 0.3
    with pytest.raises(ValueError, match="both in aggregator_kwargs and as keywords"):
        AsyncPSStrategy(aggregator="cwtm", aggregator_kwargs={"lam": 0.2}, lam=0.3, num_workers=3)


def test_bundled_recipes_run_by_name_and_ship_in_the_wheel(tmp_path):
    from lightning_byz.config import resolve_recipe, run_cli

    cli = run_cli(["--config", "quickstart", "--trainer.logger=false"], run=False)
    assert cli.trainer.strategy.num_workers == 8
    assert resolve_recipe("mnist_ctma-offline").endswith("mnist_ctma-offline.yaml")
    with pytest.raises(FileNotFoundError, match="recipes: .*quickstart"):
        resolve_recipe("no_such_recipe")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lightning_byz/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")} <= names
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "lightning_byz").rglob("__init__.py")}
    assert {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")} == packages | {"lightning_byz/recipes"}
