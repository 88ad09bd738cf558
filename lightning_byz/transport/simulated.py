"""The simulated transport: N virtual workers in the server's own process.

``poll`` is an arrival: the :class:`~lightning_byz.arrivals.ArrivalClock` says who arrives next,
that worker's :class:`~lightning_byz.ps.WorkerStep` computes its message on the next batch of its
shard (running Lightning's closure at the worker's own point), and the message goes to the serve
loop; ``reply`` hands a worker its new point and schedules its next arrival. Crashed workers are
never scheduled again. When no arrival is due but some worker waits for the server (a warm-up or a
sync round short of silent workers), a poll lets ``timeout`` virtual seconds pass and returns
nothing, as a quiet MPI poll would, so timeouts fire in virtual time too. So the serve loop, validation, faults and the worker step are the very code
an MPI run executes; only the clock is virtual, and the run is deterministic.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from lightning_byz.arrivals import ArrivalClock
from lightning_byz.data.shards import ShardStream
from lightning_byz.faults.base import FaultSet
from lightning_byz.ps.messages import Message, Reply
from lightning_byz.ps.worker import WorkerStep


class SimulatedTransport:
    """Virtual workers 1..N, each with its step, its shard stream and the point it computes at.

    ``closure`` (Lightning's, set before each serve) evaluates the model; after a poll, ``batch`` is
    the batch that closure's training step must use and ``result`` what it returned.
    """

    def __init__(
        self,
        workers: list[WorkerStep],
        clock: ArrivalClock,
        start: Tensor,
        faults: FaultSet,
        to_device: Callable[[Any], Any],
    ):
        self.workers = workers
        self.clock = clock
        self.faults = faults
        self.to_device = to_device
        self.query = start.expand(len(workers), -1).clone()  # the point each worker computes at
        self.streams: list[ShardStream] = []
        self.closure: Callable[[], Any] | None = None
        self.batch: Any = None
        self.result: Any = None
        self.waiting: set[int] = set()  # workers that sent and wait for a reply
        clock.start(faults.delay, faults.rate)

    def poll(self, timeout: float) -> Message | None:
        """The next arrival's message; None after ``timeout`` virtual seconds when none is due."""
        while self.clock.queue:
            w = self.clock.next()
            worker = self.workers[w - 1]
            if worker.crashed():
                continue  # crash-stop: never scheduled again
            self.batch = worker.batch(self.to_device(self.streams[w - 1].next()))
            msg, self.result = worker.message(self.query[w - 1], self.closure)
            self.waiting.add(w)
            return msg
        if not self.waiting:
            raise RuntimeError("no worker left to arrive: all crashed or have zero arrival probability")
        self.clock.now += timeout
        return None

    def reply(self, worker: int, reply: Reply) -> None:
        """Worker ``worker`` continues from ``reply.params``; a stop ends nothing here (one process)."""
        if reply.stop:
            return
        self.waiting.discard(worker)
        self.query[worker - 1].copy_(reply.params)
        self.workers[worker - 1].version = reply.version
        if reply.hyper:
            self.workers[worker - 1].rule.set_hyperparameters(reply.hyper)
        self.clock.schedule(worker, self.workers[worker - 1].step, self.faults.delay, self.faults.rate)
