"""MPI transport: rank 0 serves, ranks 1..N work, on a private duplicate of COMM_WORLD.

Wire format (one message each way, raw bytes):
  worker -> server: int64 header [worker, step, version, flags] + payload (update [d] | buffers [b])
  server -> worker: int64 header [version, flags, h0, h1] + payload (params [d] | buffers [b]);
  h0, h1: the worker rule's scheduled hyper-parameters as float64 bits (unused ones 0)
``flags`` on the way up: 0 an update, 1 nothing (dropped/lost: answer with the current parameters),
2 a stop request (the worker got SIGTERM; no payload).
On the way down: 0 continue, 1 stop (the payload holds the final parameters).
The transport owns this format: the server side yields :class:`Message` / :class:`Rejection`
objects and takes :class:`Reply` objects; the worker side sends a ``Message`` and returns a ``Reply``.

The server keeps one persistent receive per worker and polls them all (``Testsome`` with a short
back-off), so it acts on whichever workers are ready and never waits on a slow one. Ready messages
are served least-recently-served first, so identical workers get the same share whatever their rank
(``Testany`` would always favour the lowest ready rank). Replies are non-blocking sends from
per-worker host buffers; when a worker has not yet taken its previous reply (it sent again without
receiving), the new reply is deferred, never waited for, so no worker can stall the server. The PyPI Open MPI is not CUDA-aware, so GPU
tensors are staged through pinned host buffers; CPU tensors go to mpi4py as numpy views, no copy.

**Liveness.** Every wait of a worker on the server is bounded: the server process sends a heartbeat
(an empty message on ``TAG_ALIVE``) to every worker every few seconds from a thread, whatever its
main thread does (serving, validating, saving a checkpoint), and a worker that hears nothing from the
server for ``server_timeout`` seconds raises :class:`ServerSilentError` (its rank's exception then
aborts the job) — counted from the first heartbeat, so a server still starting up (downloading its
data) is waited for. This detects a server process that stopped (frozen, its node lost or cut off) that
the MPI runtime has not noticed; a server stuck *inside* user code keeps beating (Lightning's
``max_time`` or the scheduler's limit ends that). Needs ``MPI_THREAD_MULTIPLE`` (mpi4py asks for it);
without it there is no heartbeat and workers wait unbounded, as before (logged). With S servers
every server rank beats to the workers, rank 0 to the other server ranks too; a worker watches all S
(it waits for a reply from each), a server rank > 0 watches rank 0.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import Tensor

from lightning_byz.ps.messages import Message, Rejection, Reply
from lightning_byz.sharding import ShardLayout

log = logging.getLogger(__name__)

HEADER = 4  # int64 words
HEADER_BYTES = 8 * HEADER
TAG_UP, TAG_DOWN, TAG_METRICS, TAG_TEXT, TAG_ALIVE = 11, 12, 13, 14, 15
UP_UPDATE, UP_NOTHING, UP_STOP = 0, 1, 2
DOWN_CONTINUE, DOWN_STOP = 0, 1
DRAIN_EVERY = 256  # polls between two sweeps for messages on unexpected tags (and at every quiet poll)


def world() -> MPI.Comm:
    return MPI.COMM_WORLD


def under_mpi() -> bool:
    """True when launched by mpirun/srun with more than one rank."""
    return MPI.COMM_WORLD.Get_size() > 1


class PeerSilentError(RuntimeError):
    """Another server rank sent nothing for longer than ``server_timeout`` (a sharded server)."""


def wait(req: MPI.Request, timeout: float | None = None, waiting_for: str = "") -> None:
    """Wait for ``req`` (see :func:`_poll_until`); with ``timeout``, raise :class:`PeerSilentError`
    naming ``waiting_for`` once that many seconds have passed."""
    if timeout is None:
        _poll_until(req.Test)
        return
    deadline = time.monotonic() + timeout

    def done() -> bool:
        if req.Test():
            return True
        if time.monotonic() > deadline:
            raise PeerSilentError(f"rank {MPI.COMM_WORLD.Get_rank()}: nothing from {waiting_for} for {timeout:g} s "
                                  "(its process stopped or its node is unreachable); ending this job")
        return False

    _poll_until(done)


class Backoff:
    """The idle rounds of a polling loop: 50 spins, then sleeps from 20 µs doubling up to 1 ms, instead
    of MPI's busy wait, so a waiting rank leaves the CPU to the others when ranks share cores."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.spins, self.pause = 0, 2e-5

    def idle(self) -> None:
        self.spins += 1
        if self.spins > 50:
            time.sleep(self.pause)
            self.pause = min(self.pause * 2, 1e-3)


def _poll_until(done: Callable[[], bool]) -> None:
    """Poll ``done`` with a :class:`Backoff`: a waiting worker then leaves the CPU to the server when
    ranks share cores (oversubscribed machines). On a rank that watches the server
    (:func:`watch_the_server`) the wait ends in :class:`ServerSilentError` once the server has been
    silent for its timeout."""
    backoff = Backoff()
    next_check = time.monotonic() + WATCH_EVERY
    while not done():
        backoff.idle()
        if _watch is not None and time.monotonic() >= next_check:
            _watch.check()
            next_check = time.monotonic() + WATCH_EVERY


class ServerSilentError(RuntimeError):
    """A server rank sent nothing, not even a heartbeat, for longer than ``server_timeout``."""


WATCH_EVERY = 0.1  # seconds between two looks for the server's heartbeat while a worker waits


class ServerWatch:
    """Worker (or server rank > 0): when each watched server's heartbeat was last taken, and the bound
    (heartbeats wait in MPI's queue while the worker computes; they are taken before judging, so a
    long step is no silence)."""

    def __init__(self, comm: MPI.Comm, timeout: float, servers: Sequence[int] = (0,)):
        self.comm, self.timeout = comm, float(timeout)
        self.last: dict[int, float] = {}  # no heartbeat yet: that server may still be starting (no bound)
        self.servers = list(servers)
        self._beat = np.empty(1, np.int64)

    def check(self) -> None:
        """Take the heartbeats that arrived; raise when a server, once heard, has been silent too long."""
        for server in self.servers:
            while self.comm.Iprobe(source=server, tag=TAG_ALIVE):
                self.comm.Recv([self._beat, MPI.INT64_T], source=server, tag=TAG_ALIVE)
                self.last[server] = time.monotonic()
        for server, last in self.last.items():
            silent = time.monotonic() - last
            if silent > self.timeout:
                raise ServerSilentError(
                    f"rank {self.comm.Get_rank()}: no word from the server (rank {server}), not even its heartbeat, "
                    f"for {silent:.0f} s (server_timeout={self.timeout:g}): its process stopped or its node is "
                    "unreachable; ending this job (resume from the last checkpoint)"
                )


class Heartbeat:
    """Server: a daemon thread that sends every rank in ``targets`` an empty ``TAG_ALIVE`` message every
    ``interval`` seconds (a rank still holding the previous one is skipped: nothing piles up)."""

    def __init__(self, comm: MPI.Comm, interval: float, targets: Sequence[int]):
        self.comm, self.interval = comm, float(interval)
        self._stop = threading.Event()
        self._beat = np.zeros(1, np.int64)
        self._sends = {w: MPI.REQUEST_NULL for w in targets}
        self._thread = threading.Thread(target=self._run, name="lightning-byz-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for w, req in self._sends.items():
                if completed(req):
                    self._sends[w] = self.comm.Isend([self._beat, MPI.INT64_T], dest=w, tag=TAG_ALIVE)

    def stop(self) -> None:
        """End the thread and cancel the heartbeats nobody took (before MPI is finalised)."""
        self._stop.set()
        self._thread.join()
        for req in self._sends.values():
            if not completed(req):
                req.Cancel()


_watch: ServerWatch | None = None
_heartbeat: Heartbeat | None = None


def _threads_ok() -> bool:
    if MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
        return True
    log.warning("MPI gives no MPI_THREAD_MULTIPLE: no server heartbeat, workers wait for the server unbounded")
    return False


def start_heartbeat(server_timeout: float, targets: Sequence[int] | None = None) -> None:
    """Server: beat (process-wide, once) to ``targets`` (default: every other rank) often enough for
    ranks that allow ``server_timeout`` s."""
    global _heartbeat
    if _heartbeat is None and under_mpi() and _threads_ok():
        rank = world().Get_rank()
        targets = [r for r in range(world().Get_size()) if r != rank] if targets is None else targets
        _heartbeat = Heartbeat(world(), interval=min(2.0, server_timeout / 5), targets=targets)
        atexit.register(_heartbeat.stop)  # runs before mpi4py's MPI_Finalize (registered earlier)


def watch_the_server(server_timeout: float, servers: Sequence[int] = (0,)) -> None:
    """Worker (or server rank > 0): from now on (process-wide) every wait on the server is bounded by
    ``server_timeout``: the ranks ``servers`` must keep beating."""
    global _watch
    if _watch is None and under_mpi() and _threads_ok():
        _watch = ServerWatch(world(), server_timeout, servers)
    if _watch is not None:
        _watch.timeout = float(server_timeout)


def duplicate(comm: MPI.Comm) -> MPI.Comm:
    """``comm.Dup()`` whose wait is bounded as every worker wait on the server is."""
    new, req = comm.Idup()
    wait(req)
    return new


class _Buffer:
    """A byte buffer with an int64 header view and a payload tensor view (pinned when for CUDA)."""

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool):
        itemsize = torch.empty(0, dtype=dtype).element_size()
        host = torch.empty(HEADER_BYTES + numel * itemsize, dtype=torch.uint8, pin_memory=pin)
        self.host = host
        self.bytes = host.numpy()
        self.header = self.bytes[:HEADER_BYTES].view(np.int64)
        self.hyper = self.bytes[:HEADER_BYTES].view(np.float64)[2:]  # the last two header words
        self.payload = host[HEADER_BYTES:].view(dtype)


class MPIServerTransport:
    """Server side: poll every worker's persistent receive; answer each without blocking.

    Args:
        comm: the job's communicator (rank 0 is the server).
        params_numel, buffers_numel: sizes of the two parts of every payload.
        dtype, device: of the server's model; payloads are handed over on ``device``.
        pin: stage through pinned host buffers (a CUDA server).
        slack: extra receive room, so a too-long message is detected by its size, not truncated.
        on_discard: told ``(worker, reason)`` of every message discarded unread (the server's ``reject``).
        first_worker: the rank of worker 1 (the ranks before it are servers: 1, or S when sharded).
    """

    def __init__(
        self,
        comm: MPI.Comm,
        params_numel: int,
        buffers_numel: int,
        dtype: torch.dtype,
        device: torch.device,
        pin: bool = False,
        slack: int = 1024,
        on_discard: Callable[[int, str], None] = lambda rank, reason: log.warning("rank %d: %s", rank, reason),
        first_worker: int = 1,
    ):
        self.comm = comm
        self.first_worker = first_worker
        self.num_workers = comm.Get_size() - first_worker
        self.d, self.b = params_numel, buffers_numel
        self.device = torch.device(device)
        self.itemsize = torch.empty(0, dtype=dtype).element_size()
        numel = self.d + self.b
        self.recv = [_Buffer(numel + slack, dtype, pin) for _ in range(self.num_workers)]
        self.send = [_Buffer(numel, dtype, pin) for _ in range(self.num_workers)]
        self.requests = [
            comm.Recv_init([b.bytes, MPI.BYTE], source=first_worker + w, tag=TAG_UP) for w, b in enumerate(self.recv)
        ]
        self.sends: list[MPI.Request] = [MPI.REQUEST_NULL] * self.num_workers
        self.deferred: dict[int, Reply] = {}  # worker -> the reply waiting for its previous one to leave
        MPI.Prequest.Startall(self.requests)
        self._statuses = [MPI.Status() for _ in range(self.num_workers)]
        self._ready: list[tuple[int, int]] = []  # (worker index, bytes) received, not yet handed out
        self._served = [0] * self.num_workers  # when each worker was last served (a counter)
        self._clock = 0
        self._consumed: int | None = None  # the worker whose message the last poll handed out
        self._scratch = np.empty(1 << 16, np.uint8)  # where unexpected messages are received and dropped
        self.on_discard = on_discard
        self._polls = 0

    def poll(self, timeout: float) -> Message | Rejection | None:
        """Wait up to ``timeout`` s for one message; its tensors are valid until the next poll."""
        self._rearm()
        deadline = time.monotonic() + timeout
        backoff = Backoff()
        self._polls += 1
        if self._polls % DRAIN_EVERY == 0:
            self._drain_unexpected()
        while not self._ready:
            self._flush_deferred()
            try:
                done = MPI.Request.Testsome(self.requests, self._statuses)
            except MPI.Exception as exc:  # e.g. a message longer than its buffer: truncated
                return self._unreadable(exc)
            if done:
                self._ready = [(i, self._statuses[k].Get_count(MPI.BYTE)) for k, i in enumerate(done)]
                self._ready.sort(key=lambda item: self._served[item[0]], reverse=True)  # pop() = least recent
                break
            if time.monotonic() >= deadline:
                self._drain_unexpected()
                return None
            backoff.idle()
        idx, nbytes = self._ready.pop()
        self._clock += 1
        self._served[idx] = self._clock
        self._consumed = idx
        return self._decode(idx + 1, nbytes)

    def _drain_unexpected(self) -> None:
        """Receive and discard what arrived on a tag the server does not read now (counted in
        ``on_discard``, never interpreted): only raw update messages are ever looked at."""
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG, status):
            source, tag = status.Get_source(), status.Get_tag()
            if tag == TAG_UP:
                return  # an update waiting for its worker's receive to be re-armed
            size = min(status.Get_count(MPI.BYTE), self._scratch.size)
            try:
                self.comm.Recv([self._scratch[:size], MPI.BYTE], source=source, tag=tag)
            except MPI.Exception:  # longer than the scratch buffer: truncated, and so consumed
                pass
            self.on_discard(source - self.first_worker + 1, f"message on unexpected tag {tag} (discarded unread)")

    def _decode(self, worker: int, nbytes: int) -> Message | Rejection:
        """Read the received bytes of ``worker`` against the wire format."""
        buf = self.recv[worker - 1]
        if nbytes < HEADER_BYTES or (nbytes - HEADER_BYTES) % self.itemsize:
            return Rejection(worker, f"malformed message of {nbytes} bytes")
        sender, step, version, flags = (int(v) for v in buf.header)
        if sender != worker:
            return Rejection(worker, f"unknown sender: header claims worker {sender}, sent by rank {worker}")
        if flags not in (UP_UPDATE, UP_NOTHING, UP_STOP) or step < 0 or version < 0:
            return Rejection(worker, f"malformed header: step {step}, version {version}, flags {flags}")
        if flags == UP_STOP and nbytes != HEADER_BYTES:
            return Rejection(worker, f"malformed stop request of {nbytes} bytes")
        if flags != UP_UPDATE:
            return Message(worker, step, version, None, stop_request=flags == UP_STOP)
        payload = buf.payload[: (nbytes - HEADER_BYTES) // self.itemsize]
        if payload.numel() != self.d + self.b:  # the server rejects it by its size
            return Message(worker, step, version, payload.to(self.device))
        vector = payload[: self.d].to(self.device, non_blocking=True)
        buffers = payload[self.d :].to(self.device, non_blocking=True) if self.b else None
        return Message(worker, step, version, vector, buffers)

    def _unreadable(self, exc: MPI.Exception) -> Rejection:
        """Find the request that failed and report its worker (the next poll re-arms it)."""
        for i, req in enumerate(self.requests):
            try:
                req.Test()
            except MPI.Exception:
                self._consumed = i
                return Rejection(i + 1, f"unreadable message ({exc.Get_error_string()})")
        raise exc

    def _rearm(self) -> None:
        """The last message has been consumed: receive that worker's next one."""
        if self._consumed is None:
            return
        if self.device.type == "cuda":  # non-blocking copies out of the receive buffer must be done
            torch.cuda.current_stream(self.device).synchronize()
        self.requests[self._consumed].Start()
        self._consumed = None

    def reply(self, worker: int, reply: Reply) -> None:
        """Send ``reply`` to ``worker`` without blocking (deferred while its previous reply is in flight)."""
        i = worker - 1
        if not self.sends[i].Test():  # the worker has not taken its previous reply yet
            self.deferred[worker] = reply.clone()
            return
        self.deferred.pop(worker, None)
        self._send(i, reply)

    def _flush_deferred(self) -> None:
        """Send the deferred replies whose workers have taken the previous one."""
        for worker in [w for w in self.deferred if self.sends[w - 1].Test()]:
            self._send(worker - 1, self.deferred.pop(worker))

    def _send(self, i: int, reply: Reply) -> None:
        buf = self.send[i]
        d = reply.params.numel()
        buf.payload[:d].copy_(reply.params)
        if reply.buffers is not None and reply.buffers.numel():
            buf.payload[d : d + reply.buffers.numel()].copy_(reply.buffers)
        buf.header[:] = (reply.version, DOWN_STOP if reply.stop else DOWN_CONTINUE, 0, 0)
        buf.hyper[: len(reply.hyper)] = reply.hyper
        self.sends[i] = self.comm.Isend([buf.bytes, MPI.BYTE], dest=self.first_worker + i, tag=TAG_DOWN)

    def absorb(self) -> None:
        """After the stop: deliver deferred replies, and receive and drop whatever updates arrive, so
        no worker blocks on a send the server no longer reads. Called while waiting at teardown."""
        self._rearm()
        for i, _ in self._ready:
            self.requests[i].Start()
        self._ready = []
        self._flush_deferred()
        try:
            done = MPI.Request.Testsome(self.requests) or []
        except MPI.Exception:  # an unreadable message: find and re-arm it
            done = [i for i, req in enumerate(self.requests) if completed(req)]
        for i in done:
            self.requests[i].Start()

    def close(self) -> None:
        """Cancel what nobody matched (every worker has passed the teardown barrier) and free it all."""
        for req in [*self.sends, *self.requests]:
            if not completed(req):
                req.Cancel()
        for req in self.requests:
            req.Free()


def completed(req: MPI.Request) -> bool:
    try:
        return req.Test()
    except MPI.Exception:
        return True


class MPIWorkerTransport:
    """Worker side: send one message, receive the parameters to use next.

    With S servers (``layout``), server k (rank k) gets the header and slice k of the vector (server 0
    the buffers too) and answers with slice k of the parameters; the reply is whole once all S
    slices are in. A vector of the wrong size is sliced by the layout, the last server taking the
    rest, so the server that holds the odd slice rejects it.
    """

    def __init__(self, comm: MPI.Comm, params_numel: int, buffers_numel: int, dtype: torch.dtype, pin: bool = False,
                 layout: ShardLayout | None = None):
        self.comm = comm
        self.d, self.b = params_numel, buffers_numel
        self.layout = ShardLayout(params_numel, 1) if layout is None else layout
        sizes = [self.layout.size(k) + (self.b if k == 0 else 0) for k in range(self.layout.num_servers)]
        self.out = [_Buffer(n, dtype, pin) for n in sizes]
        self.inp = [_Buffer(n, dtype, pin) for n in sizes]
        self.params = self.inp[0].payload[: self.d] if self.layout.num_servers == 1 else torch.empty(self.d, dtype=dtype)

    def exchange(self, msg: Message) -> Reply:
        """Send ``msg`` (vector None: an empty "nothing" message); return the servers' reply."""
        replies = self._post_receives()
        flags = UP_UPDATE if msg.vector is not None else UP_STOP if msg.stop_request else UP_NOTHING
        sends = [self._send(k, (msg.worker, msg.step, msg.version, flags), parts)
                 for k, parts in enumerate(self._parts(msg))]
        for req in sends:
            wait(req)
        for req in replies:
            wait(req)
        return self._reply()

    def _parts(self, msg: Message) -> list[list[Tensor]]:
        """What goes to each server: its slice of the vector (server 0: and the buffers)."""
        S = self.layout.num_servers
        if msg.vector is None:
            return [[] for _ in range(S)]
        bounds = self.layout.bounds
        parts = [[msg.vector[bounds[k] : bounds[k + 1] if k < S - 1 else None]] for k in range(S)]
        if msg.buffers is not None:
            parts[0].append(msg.buffers)
        return parts

    def _send(self, k: int, header: tuple[int, int, int, int], parts: list[Tensor]) -> MPI.Request:
        n = sum(p.numel() for p in parts)
        out = self.out[k]
        if n > out.payload.numel():  # too long: the server rejects it by its size
            out = _Buffer(n, parts[0].dtype, False)
        offset = 0
        for p in parts:
            out.payload[offset : offset + p.numel()].copy_(p)
            offset += p.numel()
        out.header[:] = header
        nbytes = HEADER_BYTES + n * out.payload.element_size()
        return self.comm.Isend([out.bytes[:nbytes], MPI.BYTE], dest=k, tag=TAG_UP)

    def _post_receives(self) -> list[MPI.Request]:
        return [self.comm.Irecv([b.bytes, MPI.BYTE], source=k, tag=TAG_DOWN) for k, b in enumerate(self.inp)]

    def wait_stop(self) -> Reply:
        """A crashed worker sends nothing more; it only waits for the final parameters."""
        for req in self._post_receives():
            wait(req)
        return self._reply()

    def _reply(self) -> Reply:
        first = self.inp[0]
        version, flags = int(first.header[0]), int(first.header[1])
        versions = [int(b.header[0]) for b in self.inp]
        if len(set(versions)) > 1:
            raise RuntimeError(f"the servers answered at different versions {versions}: they are out of step")
        if self.layout.num_servers > 1:
            for k, b in enumerate(self.inp):
                self.params[self.layout.slice(k)].copy_(b.payload[: self.layout.size(k)])
        buffers = first.payload[self.layout.size(0) : self.layout.size(0) + self.b] if self.b else None
        hyper = tuple(float(h) for h in first.hyper)
        return Reply(version, self.params, buffers, stop=flags == DOWN_STOP, hyper=hyper)


def barrier(comm: MPI.Comm, timeout: float, while_waiting: Callable[[], None] = lambda: None) -> None:
    """A barrier that gives up (and aborts the job) instead of hanging forever."""
    req = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not req.Test():
        if time.monotonic() > deadline:
            log.error("teardown barrier timed out after %.0fs; aborting the MPI job", timeout)
            comm.Abort(3)
        while_waiting()
        time.sleep(1e-3)


def send_metrics(comm: MPI.Comm, values: list[float]) -> MPI.Request:
    """Worker: send its fault counters (raw float64, in the schema's order) to the server at the end."""
    data = np.asarray(values, dtype=np.float64)
    return comm.Isend([data, MPI.DOUBLE], dest=0, tag=TAG_METRICS)


def gather_metrics(
    comm: MPI.Comm, count: int, timeout: float, while_waiting: Callable[[], None] = lambda: None,
    first_worker: int = 1,
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Server: every worker's ``count`` counter values, as far as they arrive within ``timeout`` s.

    Raw float64 against the schema both sides derive from the configuration: nothing a worker sends
    is unpickled or interpreted beyond numbers. Returns (values by worker rank, rejection reason by
    worker rank); workers are the ranks from ``first_worker`` on.
    """
    workers = range(first_worker, comm.Get_size())
    buffers = {w: np.empty(count + 1, np.float64) for w in workers}  # +1: a too-long message shows
    requests = {w: comm.Irecv([buffers[w], MPI.DOUBLE], source=w, tag=TAG_METRICS) for w in workers}
    deadline = time.monotonic() + timeout
    values: dict[int, np.ndarray] = {}
    rejected: dict[int, str] = {}
    status = MPI.Status()
    while requests and time.monotonic() < deadline:
        for w, req in list(requests.items()):
            try:
                done = req.Test(status)
            except MPI.Exception as exc:
                rejected[w] = f"unreadable fault counters ({exc.Get_error_string()})"
                del requests[w]
                continue
            if done:
                n = status.Get_count(MPI.BYTE)
                row = buffers[w][:count]
                if n != 8 * count:
                    rejected[w] = f"fault counters of {n} bytes instead of {8 * count}"
                elif not np.isfinite(row).all():
                    rejected[w] = "non-finite fault counters"
                else:
                    values[w] = row
                del requests[w]
        while_waiting()
        time.sleep(1e-3)
    for req in requests.values():
        req.Cancel()
    return values, rejected


def send_text(comm: MPI.Comm, text: str, timeout: float = 30.0) -> None:
    """Server: send ``text`` (UTF-8: JSON from the trusted server, never a pickle) to every worker.

    Waits at most ``timeout`` seconds for the sends (workers that do not take it are logged and
    their sends cancelled), so a worker that skips the matching :func:`recv_text` cannot hang the server."""
    data = np.frombuffer(text.encode(), dtype=np.uint8).copy()
    requests = {w: comm.Isend([data, MPI.BYTE], dest=w, tag=TAG_TEXT) for w in range(1, comm.Get_size())}
    deadline = time.monotonic() + timeout
    while requests and time.monotonic() < deadline:
        requests = {w: req for w, req in requests.items() if not req.Test()}
        time.sleep(1e-3)
    for w, req in requests.items():
        log.warning("worker %d did not take the server's message within %.0fs (it does not evaluate or "
                    "stop with the server); cancelled", w, timeout)
        req.Cancel()


def check_the_server() -> None:
    """Raise :class:`ServerSilentError` if this process watches the server and it has gone silent
    (for wait loops of their own)."""
    if _watch is not None:
        _watch.check()


def recv_text(comm: MPI.Comm) -> str:
    """Worker: the next text the server sends with :func:`send_text` (polling, so signals still work)."""
    status = MPI.Status()
    _poll_until(lambda: comm.Iprobe(source=0, tag=TAG_TEXT, status=status))
    data = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
    comm.Recv([data, MPI.BYTE], source=0, tag=TAG_TEXT)
    return data.tobytes().decode()
