"""MPI transport: rank 0 serves, ranks 1..N−1 work, on a private duplicate of COMM_WORLD.

Wire format (one message each way, raw bytes):
  worker -> server: int64 header [worker, step, version, flags] + payload (update [d] | buffers [b])
  server -> worker: int64 header [version, flags, 0, 0] + payload (params [d] | buffers [b])
``flags`` on the way up: 0 an update, 1 nothing (dropped/lost: answer with the current parameters).
On the way down: 0 continue, 1 stop (the payload holds the final parameters).

The server keeps one persistent receive per worker and polls them (``Testany`` with a short
back-off), so it acts on whichever worker is ready and never waits on a slow one; replies are
non-blocking sends from per-worker host buffers. The PyPI Open MPI is not CUDA-aware, so GPU
tensors are staged through pinned host buffers; CPU tensors go to mpi4py as numpy views, no copy.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

HEADER = 4  # int64 words
HEADER_BYTES = 8 * HEADER
TAG_UP, TAG_DOWN, TAG_METRICS = 11, 12, 13
UP_UPDATE, UP_NOTHING = 0, 1
DOWN_CONTINUE, DOWN_STOP = 0, 1


def world() -> MPI.Comm:
    return MPI.COMM_WORLD


def under_mpi() -> bool:
    """True when launched by mpirun/srun with more than one rank."""
    return MPI.COMM_WORLD.Get_size() > 1


def _wait(req: MPI.Request) -> None:
    """Wait for ``req``, polling with a short back-off (<= 1 ms) instead of MPI's busy wait: a waiting
    worker then leaves the CPU to the server when ranks share cores (oversubscribed machines)."""
    spins, pause = 0, 2e-5
    while not req.Test():
        spins += 1
        if spins > 50:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class _Buffer:
    """A byte buffer with an int64 header view and a payload tensor view (pinned when for CUDA)."""

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        host = torch.empty(HEADER_BYTES + numel * itemsize, dtype=torch.uint8, pin_memory=pin)
        self.host = host
        self.bytes = host.numpy()
        self.header = self.bytes[:HEADER_BYTES].view(np.int64)
        self.payload = host[HEADER_BYTES:].view(dtype)


class MPIServerTransport:
    """Server side: poll every worker's persistent receive; answer each without blocking."""

    def __init__(self, comm: MPI.Comm, numel: int, dtype: torch.dtype, pin: bool, slack: int = 1024):
        self.comm = comm
        self.num_workers = comm.Get_size() - 1
        self.numel = numel
        self.dtype = dtype
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        # a little slack so a too-long message is detected by its size rather than truncated
        self.recv = [_Buffer(numel + slack, dtype, pin) for _ in range(self.num_workers)]
        self.send = [_Buffer(numel, dtype, pin) for _ in range(self.num_workers)]
        self.requests = [
            comm.Recv_init([b.bytes, MPI.BYTE], source=w + 1, tag=TAG_UP) for w, b in enumerate(self.recv)
        ]
        self.sends: list[MPI.Request] = [MPI.REQUEST_NULL] * self.num_workers
        MPI.Prequest.Startall(self.requests)
        self.active = [True] * self.num_workers

    def poll(self, timeout: float) -> tuple[int, np.ndarray, Tensor | None, str | None] | None:
        """Wait up to ``timeout`` s for one message; return (worker, header, payload, error) or None.

        ``payload`` is a view into the receive buffer, valid until :meth:`release` (worker).
        ``error`` names a malformed message (wrong size); its payload is None.
        """
        status = MPI.Status()
        deadline = time.monotonic() + timeout
        spins, pause = 0, 2e-5
        while True:
            try:
                idx, flag = MPI.Request.Testany(self.requests, status)
            except MPI.Exception as exc:  # e.g. a message longer than its buffer: truncated
                return self._unreadable(exc)
            if flag and idx != MPI.UNDEFINED:
                break
            if time.monotonic() >= deadline:
                return None
            spins += 1
            if spins > 50:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
        worker = idx + 1
        buf = self.recv[idx]
        nbytes = status.Get_count(MPI.BYTE)
        if nbytes < HEADER_BYTES or (nbytes - HEADER_BYTES) % self.itemsize:
            return worker, buf.header, None, f"malformed message of {nbytes} bytes"
        if buf.header[3] == UP_NOTHING:
            return worker, buf.header, None, None
        numel = (nbytes - HEADER_BYTES) // self.itemsize
        return worker, buf.header, buf.payload[:numel], None

    def _unreadable(self, exc: MPI.Exception) -> tuple[int, np.ndarray, None, str]:
        """Find the request that failed and report its worker (the caller re-arms it with release)."""
        for i, req in enumerate(self.requests):
            try:
                req.Test()
            except MPI.Exception:
                return i + 1, self.recv[i].header, None, f"unreadable message ({exc.Get_error_string()})"
        raise exc

    def release(self, worker: int) -> None:
        """The message of ``worker`` has been consumed: receive its next one."""
        self.requests[worker - 1].Start()

    def reply(self, worker: int, params: Tensor, buffers: Tensor | None, version: int, stop: bool = False) -> None:
        """Send ``params`` (and buffers) to ``worker`` without blocking."""
        i = worker - 1
        self.sends[i].Wait()  # the previous reply to this worker has left its buffer
        buf = self.send[i]
        d = params.numel()
        buf.payload[:d].copy_(params)
        if buffers is not None and buffers.numel():
            buf.payload[d : d + buffers.numel()].copy_(buffers)
        buf.header[:] = (version, DOWN_STOP if stop else DOWN_CONTINUE, 0, 0)
        self.sends[i] = self.comm.Isend([buf.bytes, MPI.BYTE], dest=worker, tag=TAG_DOWN)

    def close(self, drain: float) -> None:
        """Wait for outstanding replies; cancel the receives nobody will match (after ``drain`` s)."""
        MPI.Request.Waitall(self.sends)
        deadline = time.monotonic() + drain
        pending = list(range(self.num_workers))
        while pending and time.monotonic() < deadline:
            pending = [i for i in pending if not self.requests[i].Test()]
            if pending:
                time.sleep(1e-3)
        for i in pending:
            self.requests[i].Cancel()
        for req in self.requests:
            req.Free()


class MPIWorkerTransport:
    """Worker side: send one update, receive the parameters to use next."""

    def __init__(self, comm: MPI.Comm, numel: int, dtype: torch.dtype, pin: bool):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.out = _Buffer(numel, dtype, pin)
        self.inp = _Buffer(numel, dtype, pin)

    def exchange(self, step: int, version: int, payload: Tensor | None) -> tuple[np.ndarray, Tensor]:
        """Send ``payload`` (None: an empty "nothing" message); return (reply header, reply payload)."""
        reply = self.comm.Irecv([self.inp.bytes, MPI.BYTE], source=0, tag=TAG_DOWN)  # posted before the send
        if payload is None:
            self.out.header[:] = (self.rank, step, version, UP_NOTHING)
            _wait(self.comm.Isend([self.out.bytes[:HEADER_BYTES], MPI.BYTE], dest=0, tag=TAG_UP))
        else:
            n = payload.numel()
            if n > self.out.payload.numel():  # a malformed, too-long message (fault injection)
                out = _Buffer(n, payload.dtype, False)
            else:
                out = self.out
            out.payload[:n].copy_(payload)
            out.header[:] = (self.rank, step, version, UP_UPDATE)
            nbytes = HEADER_BYTES + n * payload.element_size()
            _wait(self.comm.Isend([out.bytes[:nbytes], MPI.BYTE], dest=0, tag=TAG_UP))
        _wait(reply)
        return self.inp.header, self.inp.payload

    def wait_stop(self) -> tuple[np.ndarray, Tensor]:
        """A crashed worker sends nothing more; it only waits for the final parameters."""
        _wait(self.comm.Irecv([self.inp.bytes, MPI.BYTE], source=0, tag=TAG_DOWN))
        return self.inp.header, self.inp.payload
