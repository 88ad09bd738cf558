"""Shared test helpers: run the user-style script under mpirun or in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# One intra-op thread for the whole suite, in this process and in every process it starts (simulated
# runs, benchmarks; MPI ranks get one from mpi_env anyway). The suite's models are tiny, so a second
# thread buys little on a quiet machine; with any other job beside the suite on 2 cores, torch's two
# OpenMP threads spin at every barrier for the thread the scheduler took away. Measured with one busy
# loop beside it (2026-12-04): in-process trainings ran 30-60x slower than quiet (a simulated cwmed
# run 222 s against 7 s) and the whole suite took 43 min.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lightning_byz.launcher import launch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SCRIPTS = Path(__file__).parent / "scripts"
USER_SCRIPT = str(SCRIPTS / "user_mlp.py")


def read_results(out: Path, ranks: int) -> list[dict]:
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(ranks)]


@pytest.fixture
def run_mpi(tmp_path):
    """``run_mpi(workers, *args, timeout=...)`` -> (CompletedProcess, results of every rank)."""

    def run(workers: int, *args: str, timeout: float = 240, expect_ok: bool = True):
        out = tmp_path / "result"
        proc = launch(workers, [USER_SCRIPT, "--out", str(out), *args], timeout=timeout, capture_output=True)
        if expect_ok:
            assert proc.returncode == 0, proc.stderr[-4000:]
            return proc, read_results(out, workers + 1)
        return proc, None

    return run


@pytest.fixture
def run_simulated(tmp_path):
    """``run_simulated(*args)`` -> the single process's result (a fresh interpreter per run)."""

    def run(*args: str, out_name: str = "sim", timeout: float = 300):
        out = tmp_path / out_name
        proc = subprocess.run(
            [sys.executable, USER_SCRIPT, "--out", str(out), "--transport", "simulated", *args],
            capture_output=True, text=True, timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return read_results(out, 1)[0]

    return run


def callbacks_from_yaml(text: str) -> list:
    """The callbacks a YAML ``callbacks:`` list instantiates, as LightningCLI's parser would."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    return parser.instantiate(parser.parse_string(text)).callbacks
