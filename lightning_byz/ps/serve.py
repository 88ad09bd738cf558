"""The server's side of the exchange, written once for every transport.

:class:`ServeLoop` takes whatever the transport hands over (a :class:`Message`, a
:class:`Rejection`, or nothing within the poll timeout), lets the :class:`ParameterServer`
validate it, applies an update when one is due and decides whom to answer:

- warm-up (both modes): nobody is answered before the first update, which waits for
  ``min_workers`` distinct workers (see :mod:`lightning_byz.ps.server`);
- ``async``: then every accepted arrival is an update; the sender is answered at once;
- ``sync``: a worker whose vector joined the round waits for the round's update, then everyone
  waiting is answered;
- a message the server rejected, or an empty one, is answered at once (it joined no round or
  warm-up, and the sender may try again), so one broken worker cannot hold the others hostage;
- bytes the transport could not read as a message (a :class:`Rejection`) are counted and not
  answered: no honest worker sends them, and answering would queue replies nobody asked for;
- a poll that times out lets the server notice silent workers; a sync round they left incomplete
  then closes with the workers it has.

The MPI server, the simulation and ``benchmarks/ps_throughput.py`` all run this loop; they
differ only in the transport.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol

from lightning_byz.ps.flat import FlatModel
from lightning_byz.ps.messages import Message, Rejection, Reply
from lightning_byz.ps.server import ParameterServer


class ServerTransport(Protocol):
    """Where the server's messages come from and its replies go."""

    def poll(self, timeout: float) -> Message | Rejection | None:
        """The next message (valid until the next poll), or None after ``timeout`` seconds of nothing."""

    def reply(self, worker: int, reply: Reply) -> None:
        """Send ``reply`` to ``worker`` without waiting for it to be received."""


class ServeLoop:
    """Receive → validate → maybe update → answer, over ``transport``.

    ``model`` (optional) is the server's module: aggregated buffers (BatchNorm statistics) are loaded
    into it after each update and its buffers travel with every reply. ``on_warm_up(heard, needed)``
    (optional) hears how the warm-up goes, after every message and quiet poll until the first update.
    ``hyper()`` (optional) gives the worker rule's scheduled hyper-parameters, sent with every reply.
    ``on_stop_request(worker)`` (optional) hears a worker's stop request (its SIGTERM).
    """

    def __init__(
        self,
        server: ParameterServer,
        transport: ServerTransport,
        model: FlatModel | None = None,
        poll_timeout: float = 1.0,
        on_warm_up: Callable[[int, int], None] | None = None,
        hyper: Callable[[], tuple[float, ...]] = tuple,
        on_stop_request: Callable[[int], None] = lambda worker: None,
    ):
        self.server = server
        self.transport = transport
        self.model = model if model is not None and model.buffers_numel else None
        self.poll_timeout = poll_timeout
        self.on_warm_up = on_warm_up
        self.hyper = hyper
        self.on_stop_request = on_stop_request
        self.pending: list[int] = []  # workers owed a reply (sync: until the round ends)

    def serve_until_update(self) -> None:
        """Serve messages until one update has been applied."""
        while not self.serve_one():
            if self.on_warm_up is not None and not self.server.warm:
                self.on_warm_up(len(self.server.round), self.server.collection_target())

    def serve_one(self) -> bool:
        """Handle one message (or one quiet poll); True when it led to an update."""
        server = self.server
        got = self.transport.poll(self.poll_timeout)
        if got is None:  # nothing for a while: note silent workers; a sync round may now be complete
            if not (server.round_complete() and server.round):
                return False
            self._update()
            self.answer(self.pending)
            return True
        if isinstance(got, Rejection):
            server.reject(got.worker, got.reason)
            return False
        if got.stop_request:  # no update in it: answer, and let the owner stop the job
            reason = server.invalid(got)
            if reason is not None:
                server.reject(got.worker, f"stop request: {reason}")
                return False
            self.on_stop_request(got.worker)
            self.answer([got.worker])
            return False
        due = server.receive(got)
        self.pending.append(got.worker)
        if due:
            self._update()
        if due or (server.mode == "async" and server.warm):
            self.answer(self.pending)
        elif got.worker not in server.round:
            self.answer([got.worker])
        return due

    def _update(self) -> None:
        self.server.update()
        buffers = self.server.buffers() if self.model is not None else None
        if buffers is not None:
            self.model.load_buffers(buffers)

    def answer(self, workers: Iterable[int], stop: bool = False) -> None:
        """Send the current parameters (and buffers) to ``workers``; they are no longer owed a reply."""
        workers = list(workers)
        buffers = self.model.gather_buffers() if self.model is not None else None
        reply = Reply(self.server.version, self.server.params, buffers, stop, self.hyper())
        for w in workers:
            self.transport.reply(w, reply)
        self.pending = [w for w in self.pending if w not in workers]

    def stop(self) -> None:
        """Training is over: every worker gets the final parameters with the stop flag."""
        self.answer(range(1, self.server.num_workers + 1), stop=True)
