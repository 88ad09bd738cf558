"""The protocol between fault callbacks and the parameter-server strategy.

A fault is a Lightning ``Callback`` that also subclasses :class:`Fault`. The strategy collects every
``Fault`` among ``trainer.callbacks`` and calls these hooks at the same points in MPI and simulated
mode, so one configuration (worker ids 1..N for N workers) behaves the same in both:

- ``setup_faults`` once before training (validate ids against the worker count: ``ValueError``),
- ``on_worker_batch`` on a worker's batch before its training step (data-level faults),
- ``worker_delay`` seconds a worker waits before sending (stragglers; virtual time when simulated),
- ``arrival_rate``: how many times as often as an honest worker it arrives (a flooding worker;
  simulated: its compute time is divided by the rate; MPI: it sends each message that many times),
- ``on_worker_message`` on the vector a worker is about to send; ``None`` means nothing arrives
  (drop attack, a lost message); the server then answers with the current parameters,
- ``crashed``: the worker has stopped for good (crash-stop),
- ``server_attack`` on the server, over the latest vectors of all workers (omniscient attacks),
- ``metrics`` whenever the strategy logs: counters of what the fault did (floats, keys
  prefixed by the fault's kind, e.g. ``packet_loss/packets_lost``). Worker-side counters live in
  the process that ran the worker hooks (each worker rank under MPI; the one process when
  simulated). Under MPI the workers send them to the server at the end as raw float64 values of
  the names each fault declares in ``counters`` (a fixed schema, no pickle), and the server logs
  ``metrics_of`` those values.

Hooks default to doing nothing, so a fault overrides only what it needs.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

from torch import Tensor


class Fault:
    """Mixin for fault-injection callbacks; see the module docstring for when each hook runs."""

    #: names of the counters ``counts`` holds (``counts[name] += n``), the schema workers report in
    counters: tuple[str, ...] = ()

    def setup_faults(self, num_workers: int, seed: int) -> None:
        """Validate the configuration for workers 1..num_workers and seed any randomness."""

    def on_worker_batch(self, worker: int, step: int, batch: Any) -> Any:
        return batch

    def worker_delay(self, worker: int, step: int) -> float:
        return 0.0

    def arrival_rate(self, worker: int) -> float:
        return 1.0

    def on_worker_message(self, worker: int, step: int, vector: Tensor) -> Tensor | None:
        return vector

    def crashed(self, worker: int, step: int) -> bool:
        return False

    def server_attack(self, vectors: Tensor, weights: Tensor, workers: Tensor) -> Tensor:
        """Return ``vectors`` ([k, d], rows of workers ``workers``, weighted by ``weights``), possibly
        with rows of Byzantine workers replaced. Must not modify the input in place."""
        return vectors

    def metrics(self) -> dict[str, float]:
        """Counters of what this fault has done so far, for the strategy to log."""
        return {}

    def counter_values(self) -> list[float]:
        """This process's values of :attr:`counters`, in their order."""
        counts = getattr(self, "counts", {})
        return [float(counts.get(name, 0)) for name in self.counters]

    def metrics_of(self, counts: Counter[str]) -> dict[str, float]:
        """The metrics another process's counters (e.g. a worker rank's) stand for."""
        return {}


class FaultSet:
    """The run's faults behind one object: each hook runs every fault in the order given.

    The strategy collects them from ``trainer.callbacks``; the worker step, the simulation and the
    server call this instead of looping over faults themselves.
    """

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults = list(faults)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def setup(self, num_workers: int, seed: int) -> None:
        for fault in self.faults:
            fault.setup_faults(num_workers, seed)

    def batch(self, worker: int, step: int, batch: Any) -> Any:
        for fault in self.faults:
            batch = fault.on_worker_batch(worker, step, batch)
        return batch

    def message(self, worker: int, step: int, vector: Tensor | None) -> Tensor | None:
        """The vector after every message fault; None once one of them drops it."""
        for fault in self.faults:
            if vector is None:
                break
            vector = fault.on_worker_message(worker, step, vector)
        return vector

    def byzantine_workers(self) -> list[int]:
        """The workers a Byzantine fault controls (the server knows them from the configuration)."""
        return sorted({w for f in self.faults if getattr(f, "kind", None) == "byzantine" for w in f.workers})

    def delay(self, worker: int, step: int) -> float:
        return sum(fault.worker_delay(worker, step) for fault in self.faults)

    def rate(self, worker: int) -> float:
        return math.prod(fault.arrival_rate(worker) for fault in self.faults)

    def crashed(self, worker: int, step: int) -> bool:
        return any(fault.crashed(worker, step) for fault in self.faults)

    def server_attack(self, vectors: Tensor, weights: Tensor, workers: Tensor) -> Tensor:
        for fault in self.faults:
            vectors = fault.server_attack(vectors, weights, workers)
        return vectors

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fault in self.faults:
            out.update(fault.metrics())
        return out

    @property
    def num_counters(self) -> int:
        """Length of the counter vector a worker reports (the schema both sides derive from the config)."""
        return sum(len(fault.counters) for fault in self.faults)

    def counter_values(self) -> list[float]:
        return [v for fault in self.faults for v in fault.counter_values()]

    def metrics_of(self, values: Sequence[float]) -> dict[str, float]:
        """The metrics of a counter vector from :meth:`counter_values` (of another process)."""
        out: dict[str, float] = {}
        offset = 0
        for fault in self.faults:
            n = len(fault.counters)
            out.update(fault.metrics_of(Counter(dict(zip(fault.counters, values[offset : offset + n])))))
            offset += n
        return out
