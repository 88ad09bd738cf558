"""Sharded parameter server: which slice of the flat parameters each server owns, and the few
cross-shard reductions that keep every aggregation rule exact.

With ``S`` servers, server k owns the contiguous slice :meth:`ShardLayout.slice` ``k`` of the flat
parameters and of every worker's latest vector. Coordinate-wise rules (mean, cwmed, cwtm, meamed,
phocas, Bulyan's second phase) need nothing from the other shards. Every rule that needs inner
products builds its n×n Gram matrix as the sum of the shards' partial Gram matrices
(:func:`shard_sum` inside :func:`~lightning_byz.aggregators.base.gram`), runs its n-space iterations
identically on every server and combines its own slice. The other reductions, each a few numbers:

- the largest |entry| of each row (:func:`~lightning_byz.aggregators.base.row_scales`, for the
  flag aggregator's exact rescaling at extreme magnitudes): :func:`shard_max`;
- the distances of the rows to a coordinate-wise base (``ctma`` over cwmed, cwtm, ...): a sum of
  squared partial distances;
- the omniscient attacks' honest statistics (norms, Gram matrices, projections) in the attack slot;
- the server's checks of an update: non-finite rows left by the attack slot, the aggregate's
  largest entry (the overflow guard).

Reductions run in the *current group*, set with :func:`across_shards` around a shard's share of an
update (a context variable, so the aggregation code keeps its signatures and a single-server run
pays nothing). Every server must make the same decisions from the reduced values (branches, argmins,
ties), so reduced values must be bitwise identical on all servers: a group sums the partial values
in shard order (an all-gather, then a local sum) rather than trusting ``MPI_Allreduce``, which the
standard does not oblige to give every rank the same bits. The result equals S = 1 up to the order
of floating-point summation.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Protocol, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class ShardLayout:
    """``num_servers`` contiguous slices of ``numel`` coordinates, sizes differing by at most one."""

    def __init__(self, numel: int, num_servers: int):
        if not isinstance(num_servers, int) or isinstance(num_servers, bool) or num_servers < 1:
            raise ValueError(f"num_servers must be an integer >= 1, got {num_servers!r}")
        if num_servers > numel:
            raise ValueError(f"num_servers={num_servers} exceeds the {numel} parameters to shard")
        self.numel, self.num_servers = numel, num_servers
        base, extra = divmod(numel, num_servers)
        sizes = [base + (k < extra) for k in range(num_servers)]
        self.bounds = [sum(sizes[:k]) for k in range(num_servers + 1)]

    def slice(self, k: int) -> slice:
        return slice(self.bounds[k], self.bounds[k + 1])

    def size(self, k: int) -> int:
        return self.bounds[k + 1] - self.bounds[k]

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` (last dimension) on every shard."""
        return [flat[..., self.slice(k)] for k in range(self.num_servers)]


class ShardGroup(Protocol):
    """The servers of one update, as seen by shard ``rank``: reduces small tensors across them, in
    shard order."""

    rank: int

    def sum(self, t: Tensor) -> Tensor:
        """Σ over shards of ``t`` (same shape and dtype on every shard), identical on every shard."""

    def max(self, t: Tensor) -> Tensor:
        """Element-wise maximum over shards (NaN counts as +inf)."""


class ThreadGroup:
    """``size`` shards of one process, each run by its own thread (the simulation, the benchmark):
    every reduction is a barrier at which the threads exchange their partial values."""

    def __init__(self, size: int):
        self.size = size
        self._parts: list[Tensor | None] = [None] * size
        self._barrier = threading.Barrier(size)

    def member(self, rank: int) -> "ThreadGroup.Member":
        return ThreadGroup.Member(self, rank)

    def _gather(self, rank: int, t: Tensor) -> list[Tensor]:
        self._parts[rank] = t
        self._barrier.wait()
        parts = list(self._parts)
        self._barrier.wait()  # nobody overwrites a part before every shard has read them all
        return parts

    class Member:
        """Shard ``rank``'s handle on the group (what :func:`across_shards` takes)."""

        def __init__(self, group: "ThreadGroup", rank: int):
            self.group, self.rank = group, rank

        def sum(self, t: Tensor) -> Tensor:
            parts = self.group._gather(self.rank, t)
            out = parts[0].clone()
            for p in parts[1:]:
                out += p.to(out.device)
            return out

        def max(self, t: Tensor) -> Tensor:
            parts = self.group._gather(self.rank, _nan_to_inf(t))
            return torch.stack([p.to(t.device) for p in parts]).amax(0)

        def abort(self) -> None:
            """Release the other shards from a reduction this one will never reach (it failed)."""
            self.group._barrier.abort()


class MPIGroup:
    """The server ranks of an MPI job (a communicator of the S servers, rank k owning shard k). A
    reduction that waits longer than ``timeout`` seconds for the others raises (a frozen server rank
    would otherwise hold the job forever)."""

    def __init__(self, comm, timeout: float | None = None):
        self.comm, self.timeout = comm, timeout
        self.size, self.rank = comm.Get_size(), comm.Get_rank()

    def _wait(self, req) -> None:
        from lightning_byz.transport import mpi

        mpi.wait(req, self.timeout, "the other server ranks (a cross-shard reduction)")

    def sum(self, t: Tensor) -> Tensor:
        from mpi4py import MPI

        local = t.detach().to("cpu", torch.float64).contiguous().numpy()
        parts = torch.empty((self.size, *local.shape), dtype=torch.float64)
        self._wait(self.comm.Iallgather([local, MPI.DOUBLE], [parts.numpy(), MPI.DOUBLE]))
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out.to(t.device, t.dtype)

    def max(self, t: Tensor) -> Tensor:
        from mpi4py import MPI

        local = _nan_to_inf(t.detach()).to("cpu", torch.float64).contiguous().numpy()
        out = local.copy()
        self._wait(self.comm.Iallreduce([local, MPI.DOUBLE], [out, MPI.DOUBLE], op=MPI.MAX))  # max is exact
        return torch.from_numpy(out).to(t.device, t.dtype)


def run_on_shards(job: Callable[[int], T], num_servers: int, pool: ThreadPoolExecutor | None = None) -> list[T]:
    """``[job(0), ..., job(S − 1)]``, shard k's job in its own thread (from ``pool``, else a fresh one)
    inside :func:`across_shards` of a :class:`ThreadGroup`; with one server, ``job(0)`` in this
    thread. A job that fails releases the others from the reductions they wait in (they fail
    too); the first error is raised."""
    if num_servers == 1:
        return [job(0)]
    group = ThreadGroup(num_servers)

    def run(k: int) -> T:
        member = group.member(k)
        try:
            with across_shards(member):
                return job(k)
        except BaseException:
            member.abort()
            raise

    if pool is None:
        with ThreadPoolExecutor(num_servers) as fresh:
            return run_on_shards(job, num_servers, fresh)
    futures = [pool.submit(run, k) for k in range(num_servers)]
    errors = [f.exception() for f in futures]
    cause = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if cause or any(errors):
        raise (cause or [e for e in errors if e is not None])[0]
    return [f.result() for f in futures]


def owned_part(pairs: list[tuple[Tensor, int]], layout: ShardLayout, k: int) -> Tensor:
    """The entries of ``(tensor, offset)`` pairs (entry j at coordinate offset + j) that fall in shard
    ``k``'s slice, concatenated in order: what server k sends so another can hold the whole state."""
    parts = [t.detach().reshape(-1)[lo - offset : hi - offset] for t, offset, lo, hi in _overlaps(pairs, layout, k)]
    if not parts:
        return torch.empty(0)
    return torch.cat([p.to(parts[0].dtype) for p in parts])


def put_owned_part(pairs: list[tuple[Tensor, int]], layout: ShardLayout, k: int, flat: Tensor) -> None:
    """Write shard ``k``'s :func:`owned_part` ``flat`` back into the tensors of ``pairs``."""
    start = 0
    for t, offset, lo, hi in _overlaps(pairs, layout, k):
        view = t.view(-1)[lo - offset : hi - offset]
        view.copy_(flat[start : start + hi - lo])
        start += hi - lo


def _overlaps(pairs: list[tuple[Tensor, int]], layout: ShardLayout, k: int):
    first, last = layout.bounds[k], layout.bounds[k + 1]
    for t, offset in pairs:
        lo, hi = max(first, offset), min(last, offset + t.numel())
        if lo < hi:
            yield t, offset, lo, hi


def _nan_to_inf(t: Tensor) -> Tensor:
    return t.masked_fill(torch.isnan(t), float("inf")) if t.is_floating_point() else t


_group: contextvars.ContextVar[ShardGroup | None] = contextvars.ContextVar("lightning_byz_shard_group", default=None)


@contextlib.contextmanager
def across_shards(group: ShardGroup | None) -> Iterator[None]:
    """Reductions inside this block run across ``group`` (None: one server, nothing to reduce)."""
    token = _group.set(group)
    try:
        yield
    finally:
        _group.reset(token)


def shard_rank() -> int:
    """The current shard's index (0 on a single server): what is counted once is counted by shard 0."""
    group = _group.get()
    return 0 if group is None else group.rank


def shard_sum(t: Tensor) -> Tensor:
    """``t`` summed over the shards of the current group (``t`` itself on a single server)."""
    group = _group.get()
    return t if group is None else group.sum(t)


def shard_max(t: Tensor) -> Tensor:
    """``t``'s element-wise maximum over the shards of the current group (``t`` on a single server)."""
    group = _group.get()
    return t if group is None else group.max(t)
