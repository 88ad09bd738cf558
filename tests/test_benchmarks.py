"""The scripts in ``benchmarks/`` run end to end on tiny sizes and print their ratios (no timing is
asserted: these machines are noisy). Keeps them from rotting as the library changes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
RATIO = r"\d+\.\d+x?"
NUMBERS = r"[\d.]+\s+[\d.]+"  # best and median ms


def case(script: str, args: list[str], printed: str, *marks):
    return pytest.param(script, args, printed, marks=marks, id=script)


CASES = [
    case("aggregators.py", ["--n", "5", "--d", "1e3", "--rules", "mean", "cwmed", "flag", "--repeats", "1",
                            "--no-byzfl", "--device", "cpu"], rf"\| cwmed \| {RATIO}"),
    case("flag.py", ["--d", "1e3", "--n", "7", "--device", "cpu"], rf"1000\s+7\s.*\s{RATIO}"),
    case("optimizer.py", ["--batch-sizes", "1", "--step-repeats", "1", "--repeats", "1", "--device", "cpu"],
         rf"Mu2SGD\s+{NUMBERS}\s+{RATIO}[\s\S]*Mu2SGD\.step \(fixed\)\s+{NUMBERS}\s+{RATIO}"),
    case("server_optimizer.py", ["--optimizers", "adam", "--repeats", "1", "--rounds", "1"],
         rf"adam\s+[\d.]+ms\s+[\d.]+ms\s+{RATIO}"),
    case("augmentation.py", ["--batch", "2", "--size", "8", "--repeats", "1", "--device", "cpu"],
         rf"cat_map:\s+[\d.]+ ms/batch =\s+{RATIO} the step"),
    case("ps_throughput.py", ["--d", "1e3", "--workers", "2", "--seconds", "0.2", "--repeats", "1",
                              "--timeout", "180"], rf"1e\+03\s+2\s.*\s{RATIO}\s*$", pytest.mark.mpi),
    pytest.param("ps_throughput.py", ["--servers", "1", "2", "--shards", "1e4:4", "--rules", "cwmed", "gm",
                                      "--repeats", "1", "--timeout", "120"],
                 rf"1e\+04\s+4\s+gm\s+2\s.*\s{RATIO}\s*$", marks=pytest.mark.mpi, id="ps_throughput_servers"),
    case("async_vs_sync.py", ["--target", "0.5", "--delay", "0.05", "--max-steps", "100", "--timeout", "90"],
         rf"sync/async = {RATIO}", pytest.mark.mpi, pytest.mark.slow),
    pytest.param("async_vs_sync.py", ["--versus", "ddp", "--target", "0.5", "--max-steps", "100", "--timeout", "90"],
                 rf"async/ddp = {RATIO}", marks=(pytest.mark.mpi, pytest.mark.slow), id="async_vs_ddp"),
]


@pytest.mark.parametrize("script, args, printed", CASES)
def test_benchmark_runs_and_prints_its_ratio(script, args, printed):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(printed, proc.stdout, re.MULTILINE), proc.stdout[-3000:]
