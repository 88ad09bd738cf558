"""The local mpirun launcher: command, environment, device helpers, and real 1 + 3 rank jobs."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_byz.launcher import device_for_rank, launch, mpi_env, mpirun_command

RANKS = "from mpi4py import MPI; c = MPI.COMM_WORLD; print('rank', c.Get_rank(), 'of', c.Get_size())"
CRASH = """
import time
from mpi4py import MPI
comm = MPI.COMM_WORLD
if comm.Get_rank() == 2:
    raise RuntimeError("rank 2 failed")
comm.Barrier()  # the others wait for rank 2 forever unless the job is aborted
time.sleep(120)
"""


def test_command_layout():
    cmd = mpirun_command(3, ["-m", "pkg", "--x"], python=sys.executable)
    assert Path(cmd[0]).name == "mpirun" and Path(cmd[0]).parent == Path(sys.executable).parent
    assert cmd[1:] == ["-n", "4", sys.executable, "-m", "mpi4py", "-m", "pkg", "--x"]
    with pytest.raises(ValueError, match="num_workers"):
        mpirun_command(0, ["x.py"])
    with pytest.raises(ValueError, match="argv is empty"):
        mpirun_command(2, [])


def test_env_defaults_do_not_override_the_user():
    env = mpi_env(4, base={"OMPI_MCA_btl_tcp_if_include": "eth0"})
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert env["PRTE_MCA_rmaps_default_mapping_policy"] == ":oversubscribe"
    assert env["OMPI_MCA_btl_tcp_if_include"] == "eth0"
    assert int(env["OMP_NUM_THREADS"]) >= 1


def test_device_for_rank():
    with pytest.raises(ValueError, match="local_rank"):
        device_for_rank(-1)
    if torch.cuda.is_available():
        assert device_for_rank(torch.cuda.device_count()) == torch.device("cuda", 0)
    else:
        assert device_for_rank(5) == torch.device("cpu")


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_one_server_three_workers_job():
    job = launch(3, ["-c", RANKS], timeout=45, capture_output=True)
    assert job.returncode == 0, job.stderr
    assert sorted(job.stdout.split("\n")[:-1]) == [f"rank {r} of 4" for r in range(4)]


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_a_crashed_rank_ends_the_job_fast(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    start = time.monotonic()
    job = launch(3, [str(script)], timeout=45, capture_output=True)
    assert job.returncode != 0
    assert time.monotonic() - start < 20
    assert "rank 2 failed" in job.stderr


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_timeout_stops_every_rank(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    with pytest.raises(subprocess.TimeoutExpired) as info:
        launch(1, [str(script)], timeout=4, capture_output=True)
    pids = [int(p) for p in (info.value.output or "").split()]
    assert len(pids) == 2  # both ranks had started
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.mpi
@pytest.mark.timeout(90)
def test_ctrl_c_on_the_launcher_stops_every_rank(tmp_path):
    """The launcher (``lightning-byz launch`` is ``python -m lightning_byz.launcher -- -m lightning_byz``)
    puts mpirun in a session of its own, so a terminal's Ctrl-C reaches only the launcher: it must
    take the whole job down, not leave the ranks running."""
    script = tmp_path / "hang.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "lightning_byz.launcher", "-n", "1", "--", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline()) for _ in range(2)]  # both ranks are up
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "every rank of the job stopped" in err, err[-2000:]
    time.sleep(0.5)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_launcher_script_dry_run():
    script = Path(__file__).parents[1] / "launch" / "mpirun-local"
    out = subprocess.run([str(script), "-n", "2", "--dry-run", "--", "-m", "mod", "a"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "-n 3" in out.stderr and out.stderr.rstrip().endswith("-m mpi4py -m mod a")
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in out.stdout
