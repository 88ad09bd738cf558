"""MPI with S server ranks: server 0 decides, servers 1..S−1 follow (issue 17's sharded server).

Ranks 0..S−1 are servers, each owning slice k of the layout (:class:`~lightning_byz.sharding.ShardLayout`);
ranks S.. are workers, which send every server its slice and take the parameters back in S slices
(:class:`~lightning_byz.transport.mpi.MPIWorkerTransport`). Server 0 runs the usual serve loop and
parameter server on slice 0 and decides everything that must be the same on every slice: whether a
message is valid, who is in an update, the weights, the learning rate, whom to answer. The other
servers validate their slice of each message and report a verdict; they store, aggregate, step and
answer only when server 0 says so. So an update is applied on all slices at the same version, with
the same weights and the same workers.

Between the servers (their own communicator; ``control``, a duplicate, for these messages):

- verdict, follower → server 0: int64 ``[worker, step, version, ok]`` then the reason (UTF-8);
  ``step = -1``: bytes from that worker that could not be read as a message;
- commands, server 0 → followers, in order: ``STORE worker step`` (keep that message's slice as the
  worker's row), ``DONE worker step`` (server 0 is through with it: drop the slice if not stored),
  ``UPDATE lr k workers… weights…`` (aggregate with these, step), ``REPLY worker version stop``
  (send your slice of the parameters), ``GATHER`` (send your slice of the parameters to server 0,
  which then holds the whole point: before it validates, at the end), ``SNAPSHOT`` (for a checkpoint:
  your rows, and your slices of the point and of the server rule's element-wise state) and ``END``
  (followed by the whole final point, so every rank ends with the server's model, as with one server).
  A checkpoint so holds every slice; on resume every server rank loads its own slices from it.

A message counts once server 0 holds its slice and every follower's verdict. A follower that never
reports on a message (its slice never came: a Byzantine worker sending to some servers only) makes
that message refused after ``slice_timeout`` seconds; meanwhile server 0 serves the others. Slices
of one message that disagree (a worker sending different steps to different servers) are the
sender's problem: a follower missing the stored step keeps a zero row for it, a Byzantine row like
any other. Every cross-shard reduction of an update runs over the servers' communicator
(:class:`~lightning_byz.sharding.MPIGroup`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from lightning_byz.ps.messages import Message, Rejection, Reply
from lightning_byz.ps.server import ParameterServer
from lightning_byz.sharding import ShardLayout, owned_part, put_owned_part
from lightning_byz.transport import mpi

log = logging.getLogger(__name__)

TAG_VERDICT, TAG_COMMAND, TAG_GATHER = 31, 32, 33
STORE, DONE, UPDATE, REPLY, GATHER, SNAPSHOT, END = range(1, 8)
REASON_BYTES = 256
ANY_STEP = -1


def server_communicator(num_servers: int) -> MPI.Comm | None:
    """The servers' communicator (ranks 0..S−1 of the world, in order); None on a worker. Collective
    over the whole world: every rank calls it."""
    world = mpi.world()
    rank = world.Get_rank()
    comm = world.Split(0 if rank < num_servers else MPI.UNDEFINED, rank)
    return None if comm == MPI.COMM_NULL else comm


def _bits(values: Tensor) -> np.ndarray:
    """float64 values as int64 words (commands are int64 arrays)."""
    return values.detach().to("cpu", torch.float64).contiguous().numpy().view(np.int64)


class LeaderTransport:
    """Server 0's transport: its own slice of every message, paired with the followers' verdicts;
    every reply is also a ``REPLY`` command, so each follower sends its slice.

    Hands a message to the serve loop once every follower's verdict on it is in (``refused`` names
    the first bad one), or ``slice_timeout`` seconds after its slice arrived without them.
    """

    def __init__(self, inner: mpi.MPIServerTransport, control: MPI.Comm, layout: ShardLayout,
                 slice_timeout: float = 30.0, server_timeout: float | None = None):
        self.inner, self.control, self.layout = inner, control, layout
        self.server_timeout = server_timeout  # bound on waiting for a follower's slices
        self.followers = range(1, control.Get_size())
        self.slice_timeout = float(slice_timeout)
        self.waiting: dict[int, tuple[Message, float]] = {}  # worker -> its message (a copy), when it came
        self.verdicts: dict[int, dict[int, tuple[int, str | None]]] = {}  # worker -> follower -> (step, reason)
        self.handed: tuple[int, int] | None = None  # (worker, step) of the message the loop has now
        self._sends: list[MPI.Request] = []
        self._verdict = np.empty(4 + REASON_BYTES // 8, np.int64)
        self._backoff = mpi.Backoff()

    # -- commands ------------------------------------------------------------------------------
    def command(self, *words: int | np.ndarray) -> None:
        """Send one command to every follower (non-blocking; kept until sent; order is kept)."""
        data = np.concatenate([np.atleast_1d(np.asarray(w, dtype=np.int64)) for w in words])
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends += [self.control.Isend([data, MPI.INT64_T], dest=k, tag=TAG_COMMAND) for k in self.followers]

    def stored(self, worker: int, step: int) -> None:
        self.command(STORE, worker, step)

    def updating(self, workers: Tensor, weights: Tensor, lr: float) -> None:
        self.command(UPDATE, _bits(torch.tensor([lr])), len(workers), workers.cpu().numpy(), _bits(weights))

    def gather(self, params: Tensor) -> None:
        """Put every follower's slice of the parameters into ``params`` (the whole point, here)."""
        self.command(GATHER)
        for k in self.followers:
            self._take_part([(params, 0)], k)

    def snapshot(self, server: ParameterServer) -> Tensor:
        """For a checkpoint: every follower's slices of the point and of the server rule's element-wise
        state (the optimizer's moments, AnyTime's anchor) into this server's, and every worker's whole
        latest vector, returned ([num_workers, d])."""
        self.command(SNAPSHOT)
        pairs = [(server.params, 0), *server.server_rule.elementwise_state()]
        rows = [server.latest[0].cpu()]
        for k in self.followers:
            block = torch.empty(server.num_workers, self.layout.size(k), dtype=server.params.dtype)
            self._receive(block, k)
            rows.append(block)
            self._take_part(pairs, k)
        return torch.cat(rows, dim=1)

    def _take_part(self, pairs: list[tuple[Tensor, int]], k: int) -> None:
        """Receive follower ``k``'s :func:`owned_part` of ``pairs`` and put it in place."""
        flat = torch.empty_like(owned_part(pairs, self.layout, k), device="cpu")
        self._receive(flat, k)
        put_owned_part(pairs, self.layout, k, flat)

    def _receive(self, into: Tensor, k: int) -> None:
        req = self.control.Irecv([into.numpy(), MPI.BYTE], source=k, tag=TAG_GATHER)
        mpi.wait(req, self.server_timeout, f"server {k}")

    def end(self, params: Tensor) -> None:
        """Training is over: every follower gets ``END`` and the whole final point."""
        self.command(END)
        whole = params.detach().cpu().contiguous()
        self._sends += [self.control.Isend([whole.numpy(), MPI.BYTE], dest=k, tag=TAG_GATHER) for k in self.followers]
        for req in self._sends:
            mpi.wait(req, self.server_timeout, "a server rank (the end)")
        self._sends = []

    # -- the serve loop's transport ----------------------------------------------------------------
    def poll(self, timeout: float) -> Message | Rejection | None:
        if self.handed is not None:  # the loop is through with the last message
            self.command(DONE, *self.handed)
            self.handed = None
        deadline = time.monotonic() + timeout
        self._backoff.reset()
        while True:
            self._take_verdicts()
            ready = self._ready()
            if ready is not None:
                return self._hand(ready)
            got = self.inner.poll(0.0)
            if isinstance(got, Rejection):
                self.command(DONE, got.worker, ANY_STEP)
                return got
            if got is not None:
                if self._verdicts_of(got.worker, got.step) is not None:
                    return self._hand(got)
                self.waiting[got.worker] = (got.clone(), time.monotonic())  # the newest per worker
                continue
            if time.monotonic() >= deadline:
                return None
            self._backoff.idle()

    def _hand(self, msg: Message) -> Message:
        self.waiting.pop(msg.worker, None)
        refused = self._refusal(msg)
        self.verdicts.pop(msg.worker, None)
        self.handed = (msg.worker, msg.step)
        if refused is not None:
            msg = replace(msg, refused=refused)
        return msg

    def _ready(self) -> Message | None:
        """A waiting message whose verdicts are all in, or that waited too long for them."""
        now = time.monotonic()
        for worker, (msg, since) in self.waiting.items():
            if self._verdicts_of(worker, msg.step) is not None or now - since > self.slice_timeout:
                return msg
        return None

    def _verdicts_of(self, worker: int, step: int) -> list[str | None] | None:
        """The followers' reasons (None: fine) on ``worker``'s message ``step``, once all are in."""
        got = self.verdicts.get(worker, {})
        out = []
        for k in self.followers:
            if k not in got or got[k][0] not in (step, ANY_STEP):
                return None
            out.append(got[k][1])
        return out

    def _refusal(self, msg: Message) -> str | None:
        verdicts = self._verdicts_of(msg.worker, msg.step)
        if verdicts is None:
            missing = [k for k in self.followers if self.verdicts.get(msg.worker, {}).get(k, (None,))[0] != msg.step]
            return f"no slice on server(s) {missing} within {self.slice_timeout:g}s (a message must reach every server)"
        for k, reason in zip(self.followers, verdicts):
            if reason is not None:
                return f"server {k}'s slice: {reason}"
        return None

    def _take_verdicts(self) -> None:
        status = MPI.Status()
        while self.control.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_VERDICT, status=status):
            k = status.Get_source()
            self.control.Recv([self._verdict, MPI.INT64_T], source=k, tag=TAG_VERDICT)
            worker, step, _, ok = (int(v) for v in self._verdict[:4])
            reason = None if ok else self._verdict[4:].tobytes().rstrip(b"\0").decode(errors="replace")
            self.verdicts.setdefault(worker, {})[k] = (step, reason)

    def reply(self, worker: int, reply: Reply) -> None:
        self.inner.reply(worker, replace(reply, params=reply.params[self.layout.slice(0)]))
        self.command(REPLY, worker, reply.version, int(reply.stop))


class Follower:
    """Server k > 0: validate its slice of each message, report, and do what server 0 commands."""

    def __init__(self, server: ParameterServer, transport: mpi.MPIServerTransport, control: MPI.Comm,
                 layout: ShardLayout, shard: int):
        self.server, self.transport, self.control = server, transport, control
        self.layout, self.shard = layout, shard
        self.pending: dict[int, tuple[int, Tensor | None]] = {}  # worker -> (step, its slice)
        self.inconsistent = 0  # STOREs of a step this server never got (Byzantine senders)
        self._command = np.empty(8 + 3 * server.num_workers, np.int64)
        self._verdict = np.zeros(4 + REASON_BYTES // 8, np.int64)
        self._sends: list[MPI.Request] = []
        self._backoff = mpi.Backoff()

    def serve_until_update(self) -> bool:
        """Serve until server 0 commands an update (False) or the end (True)."""
        self._backoff.reset()
        while True:
            got = self.transport.poll(0.0)
            if got is not None:
                self._report(got)
                continue
            command = self._next_command()
            if command is None:
                mpi.check_the_server()
                self._backoff.idle()
                continue
            kind = int(command[0])
            if kind == UPDATE:
                self._update(command)
                return False
            if kind == END:  # with the whole final point, so this rank's model is the server's too
                whole = torch.empty_like(self.server.params, device="cpu")
                mpi.wait(self.control.Irecv([whole.numpy(), MPI.BYTE], source=0, tag=TAG_GATHER))
                self.server.params.copy_(whole)
                return True
            self._execute(kind, command)

    def _report(self, got: Message | Rejection) -> None:
        if isinstance(got, Rejection):
            self.pending.pop(got.worker, None)
            self._send_verdict(got.worker, ANY_STEP, 0, got.reason)
            return
        reason = None if not 1 <= got.worker <= self.server.num_workers else self.server.invalid_slice(got)
        vector = got.vector.clone() if reason is None and got.vector is not None else None
        self.pending[got.worker] = (got.step, vector)
        self._send_verdict(got.worker, got.step, got.version, reason)

    def _send_verdict(self, worker: int, step: int, version: int, reason: str | None) -> None:
        data = self._verdict.copy()
        data[:4] = (worker, step, version, int(reason is None))
        if reason is not None:
            text = reason.encode()[: REASON_BYTES - 1]
            data[4:].view(np.uint8)[: len(text)] = np.frombuffer(text, np.uint8)
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.control.Isend([data, MPI.INT64_T], dest=0, tag=TAG_VERDICT))

    def _next_command(self) -> np.ndarray | None:
        status = MPI.Status()
        if not self.control.Iprobe(source=0, tag=TAG_COMMAND, status=status):
            return None
        self.control.Recv([self._command, MPI.INT64_T], source=0, tag=TAG_COMMAND, status=status)
        return self._command[: status.Get_count(MPI.INT64_T)]

    def _execute(self, kind: int, command: np.ndarray) -> None:
        if kind == STORE:
            worker, step = int(command[1]), int(command[2])
            held = self.pending.get(worker)
            rows = self.server.latest[0]
            if held is not None and held[0] == step and held[1] is not None:
                rows[worker - 1].copy_(held[1])
            else:  # the sender gave this server another message than server 0: a Byzantine row anyway
                rows[worker - 1].zero_()
                self.inconsistent += 1
                if self.inconsistent <= 3:
                    log.warning("server %d: worker %d's slice of step %d never came here; its row is zero",
                                self.shard, worker, step)
        elif kind == DONE:
            worker, step = int(command[1]), int(command[2])
            if worker in self.pending and step in (self.pending[worker][0], ANY_STEP):
                del self.pending[worker]
        elif kind == REPLY:
            worker, version, stop = (int(v) for v in command[1:4])
            params = self.server.params[self.layout.slice(self.shard)]
            self.transport.reply(worker, Reply(version, params, None, bool(stop)))
        elif kind == GATHER:
            self._send_part([(self.server.params, 0)])
        elif kind == SNAPSHOT:
            rows = self.server.latest[0].detach().cpu().contiguous()
            mpi.wait(self.control.Isend([rows.numpy(), MPI.BYTE], dest=0, tag=TAG_GATHER))
            self._send_part([(self.server.params, 0), *self.server.server_rule.elementwise_state()])
        else:
            raise RuntimeError(f"server {self.shard}: unknown command {kind} from server 0")

    def _send_part(self, pairs: list[tuple[Tensor, int]]) -> None:
        part = owned_part(pairs, self.layout, self.shard).cpu().contiguous()
        mpi.wait(self.control.Isend([part.numpy(), MPI.BYTE], dest=0, tag=TAG_GATHER))

    def _update(self, command: np.ndarray) -> None:
        lr = float(command[1:2].view(np.float64)[0])
        k = int(command[2])
        workers = torch.from_numpy(command[3 : 3 + k].copy())
        weights = torch.from_numpy(command[3 + k : 3 + 2 * k].copy().view(np.float64))
        self.server.apply(workers, weights.to(self.server.params.device, self.server.params.dtype), lr)

    def close(self) -> None:
        for req in self._sends:
            if not mpi.completed(req):
                req.Cancel()
        self._sends = []
