"""AsyncPSStrategy under real ``mpirun``: 1 server + 3 workers, a user's unchanged script."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import SCRIPTS
from lightning_byz.launcher import mpi_env, mpirun_path

pytestmark = [pytest.mark.mpi, pytest.mark.slow, pytest.mark.timeout(300)]

# Accuracy floors of async MPI runs (non-deterministic): measured 2026-12-03, 4 runs each on this 2-core
# machine quiet, plain async 0.878-0.895 and with a malformed worker 0.874-0.895; one CI run under load gave
# 0.824 with the malformed worker. The floor keeps a margin below the loaded minimum.
ASYNC_FLOOR = 0.75


def test_async_mpi_trains_and_every_rank_holds_the_server_parameters(run_mpi):
    _, results = run_mpi(3, "--steps", "400")
    assert [r["global_zero"] for r in results] == [True, False, False, False]
    assert results[0]["global_step"] == 400  # max_steps counts server updates
    assert len({r["params"] for r in results}) == 1  # as after DDP: one model everywhere
    assert all(r["acc"] >= ASYNC_FLOOR for r in results), [r["acc"] for r in results]
    assert sum(results[0]["counts"]) == 400 + 2 and min(results[0]["counts"]) > 0  # the warm-up counts 3 messages once


def test_sync_mpi_rounds_use_every_worker(run_mpi):
    _, results = run_mpi(3, "--steps", "150", "--mode", "sync", "--aggregator", "mean")
    server = results[0]
    assert server["counts"] == [150, 150, 150]  # each round waits for all three workers
    assert server["acc"] >= 0.8
    assert len({r["params"] for r in results}) == 1


def test_a_straggler_does_not_slow_the_others(run_mpi):
    _, results = run_mpi(3, "--steps", "200", "--straggler", "3", "--delay", "0.5")
    counts = results[0]["counts"]
    assert counts[2] * 4 < min(counts[0], counts[1]), counts


def test_malformed_messages_are_rejected_and_training_goes_on(run_mpi):
    _, results = run_mpi(3, "--steps", "300", "--malformed-worker", "2")
    server = results[0]
    assert server["rejected"].get("non-finite values (NaN/Inf) in the update", 0) > 0
    assert server["rejected"].get("wrong size", 0) > 0
    assert set(server["rejected_by_worker"]) == {"2"}
    assert server["acc"] >= ASYNC_FLOOR and server["global_step"] == 300


def test_a_killed_worker_ends_the_job_nonzero_and_fast(run_mpi):
    start = time.monotonic()
    proc, _ = run_mpi(2, "--steps", "100000", "--kill-worker", "2", "20", expect_ok=False, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90


def test_checkpoint_and_resume_continue_training(run_mpi, tmp_path):
    ckpt = tmp_path / "ckpt"
    _, first = run_mpi(3, "--steps", "200", "--ckpt-dir", str(ckpt))
    assert (ckpt / "last.ckpt").exists()
    # 200 more updates: at 300 in all the async schedule left the accuracy at 0.83-0.89 over five runs
    _, resumed = run_mpi(3, "--steps", "400", "--resume", str(ckpt / "last.ckpt"))
    assert resumed[0]["global_step"] == 400
    assert sum(resumed[0]["counts"]) == 400 + 2  # counts came back from the checkpoint (+2: the warm-up)
    assert resumed[0]["version"] == 400
    assert resumed[0]["acc"] >= ASYNC_FLOOR


def test_mpi_transport_with_one_rank_is_a_clear_error(tmp_path):
    code = "from lightning_byz import AsyncPSStrategy; AsyncPSStrategy(transport='mpi')"
    cmd = [mpirun_path(), "-n", "1", sys.executable, "-m", "mpi4py", "-c", code]
    proc = subprocess.run(cmd, env=mpi_env(1), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs at least 2 MPI ranks" in proc.stderr


def test_a_rogue_worker_cannot_run_code_stall_or_derail_the_server(run_mpi, tmp_path):
    """Worker 2 sends malicious pickles on every protocol tag and others, on both communicators, at the
    start, mid-run and at teardown; raw fuzz on the update tag every step without taking its replies;
    updates of absurd finite magnitude. The pickle is never loaded, the server trains to the end,
    rejects what it must with reasons, and every honest rank ends with the server's parameters."""
    marker = tmp_path / "pwned"
    _, results = run_mpi(3, "--steps", "300", "--rogue-worker", "2", "--marker", str(marker))
    server = results[0]
    assert not marker.exists()
    assert server["global_step"] == server["version"] == 300
    reasons = set(server["rejected"])
    assert any(r.startswith("message on unexpected tag") for r in reasons), reasons
    assert reasons & {"malformed header", "unknown sender", "malformed message of 0 bytes"} or any(
        r.startswith("malformed") for r in reasons), reasons
    assert set(server["rejected_by_worker"]) == {"2"}
    assert results[1]["params"] == results[3]["params"] == server["params"]
    assert server["acc"] >= ASYNC_FLOOR - 0.05, server["acc"]  # one of three workers is the rogue


def test_identical_workers_get_the_same_share_whatever_their_rank():
    """8 identical workers, the server the bottleneck: ready messages are served least-recently-served
    first. Measured min/max of the counts: 0.96-0.98 over 3 runs at load 5 on 2 cores (Testany gave
    0.56, falling with the rank)."""
    from lightning_byz.launcher import launch

    script = str(SCRIPTS / "fair_service.py")
    proc = launch(8, [script, "--updates", "400"], timeout=150, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])["counts"]
    assert min(counts) / max(counts) >= 0.8, counts


@pytest.mark.parametrize("rank, phase, runner", [
    (0, "validation", []),  # plain `mpirun python script.py`
    (0, "callback", ["-m", "mpi4py"]),
    (0, "checkpoint", []),
    (2, "worker_step", []),
    (1, "data_loader", []),
])
def test_an_exception_on_any_rank_ends_the_job_under_any_launcher(rank, phase, runner, tmp_path):
    from conftest import USER_SCRIPT

    ckpt = tmp_path / "ckpt"
    cmd = [mpirun_path(), "-n", "3", sys.executable, *runner, USER_SCRIPT, "--out", str(tmp_path / "r"),
           "--steps", "100000", "--boom", str(rank), phase, "--ckpt-dir", str(ckpt)]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=mpi_env(3), capture_output=True, text=True, timeout=150)
    _ended_with_the_traceback_of(proc, start, rank, named=not runner)
    if phase == "checkpoint":  # the save that raised wrote nothing; the one before is intact
        import torch

        assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 50


def _ended_with_the_traceback_of(proc, start: float, rank: int, named: bool = True) -> None:
    """The job exited non-zero within 60 s (+ start-up), printing ``boom``; the failing rank named."""
    assert proc.returncode != 0
    assert time.monotonic() - start < 90
    if named:
        role = "the server" if rank == 0 else f"worker {rank}"
        assert f"rank {rank} ({role}) failed" in proc.stderr, proc.stderr[-3000:]
    assert "boom" in proc.stderr, proc.stderr[-3000:]


def test_an_exception_under_the_console_script_ends_the_job(tmp_path):
    """`mpirun lightning-byz fit ...` (what the Slurm templates run with srun): a server-side exception."""
    from pathlib import Path

    boom = json.dumps([{"class_path": "user_mlp.Boom", "init_args": {"rank": 0, "phase": "validation"}}])
    cmd = [mpirun_path(), "-n", "3", str(Path(sys.executable).parent / "lightning-byz"), "fit", "--config",
           "quickstart", "--trainer.strategy.init_args.num_workers=null", "--trainer.logger=false",
           "--trainer.max_steps=100000", "--trainer.val_check_interval=20", f"--trainer.callbacks={boom}"]
    env = {**mpi_env(3), "PYTHONPATH": str(SCRIPTS)}
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    _ended_with_the_traceback_of(proc, start, 0)


def test_a_frozen_server_ends_the_job_and_a_long_validation_does_not(run_mpi):
    """Workers bound their wait on the server (server_timeout 4 s): a server process stopped at update
    20 (SIGSTOP: a hung node) ends the job non-zero, the workers naming the server; a server that
    validates for 5 s at a time keeps them waiting (its heartbeat), and the run ends normally."""
    start = time.monotonic()
    proc, _ = run_mpi(2, "--steps", "100000", "--server-timeout", "4", "--stall", "freeze", "0",
                      expect_ok=False, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 90
    assert "no word from the server (rank 0)" in proc.stderr, proc.stderr[-3000:]
    proc, results = run_mpi(2, "--steps", "40", "--server-timeout", "4", "--stall", "validation", "5",
                            "--val-every", "20", timeout=150)
    assert results[0]["global_step"] == 40
