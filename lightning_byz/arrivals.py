"""The simulation's virtual time: who arrives next, from an arrival distribution and a seeded clock.

Worker i needs an exponentially distributed time with mean ``step_time / (N q_i)`` per step (``q``
the normalised arrival distribution), plus any straggler delay. Without delays the next arrival is
then worker i with probability exactly q_i (``"uniform"``, ``"id"``: q_i ∝ i, ``"id2"``: q_i ∝ i²,
as in Dahan & Levy), and delays, crashes and timeouts act in the same (virtual) seconds as under
MPI. Everything is drawn from one seeded generator, so a run is deterministic.

**A fixed Byzantine share** (:meth:`ArrivalClock.set_byzantine_share`, the strategy's
``byzantine_share=λ``): the papers fix λ, the fraction of *updates* that are Byzantine, whatever
the workers' speeds. Each arrival is then first given a group — Byzantine with probability λ
(``"random"``), or every ⌈1/λ⌉-th arrival (``"interleave"``, what Dahan & Levy's released code does;
it realises 1/⌈1/λ⌉, e.g. 1/3 at λ = 0.4) — and one of that group's queued workers arrives, drawn
with probability ∝ q_i, so within a group arrivals follow ``arrival`` (delays then move the clock,
not the order). A group with nobody queued (all crashed) yields to the other.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence

SCHEDULES = ("random", "interleave")

import torch


def arrival_probabilities(arrival: str | Sequence[float], num_workers: int) -> torch.Tensor:
    """q_i for workers 1..N from a name (``uniform``, ``id``, ``id2``) or explicit probabilities."""
    ids = torch.arange(1, num_workers + 1, dtype=torch.float64)
    if isinstance(arrival, str):
        table = {"uniform": torch.ones_like(ids), "id": ids, "id2": ids**2}
        if arrival not in table:
            raise ValueError(f"arrival must be 'uniform', 'id', 'id2' or a list of probabilities, got {arrival!r}")
        q = table[arrival]
    else:
        q = torch.as_tensor(list(arrival), dtype=torch.float64)
        if q.shape != (num_workers,):
            raise ValueError(f"arrival probabilities: need {num_workers} values (one per worker), got {q.numel()}")
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()) or not q.sum() > 0:
            raise ValueError(f"arrival probabilities must be finite, non-negative, not all zero: {q.tolist()}")
    return q / q.sum()


class ArrivalClock:
    """Virtual-time arrivals of N workers; :meth:`next` returns who arrives and advances the clock."""

    def __init__(self, q: torch.Tensor, step_time: float, seed: int):
        self.q = q
        self.step_time = step_time
        self.gen = torch.Generator().manual_seed(seed)
        self.now = 0.0
        self.queue: list[tuple[float, int]] = []
        self.n = len(q)
        self.byzantine: frozenset[int] = frozenset()
        self.share: float | None = None
        self.schedule_kind = "random"
        self.arrivals = 0

    def set_byzantine_share(self, byzantine: Sequence[int], share: float, schedule: str = "random") -> None:
        """From now on the ``byzantine`` workers make the fraction ``share`` of the arrivals."""
        if schedule not in SCHEDULES:
            raise ValueError(f"byzantine_schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.byzantine, self.share, self.schedule_kind = frozenset(byzantine), float(share), schedule

    def start(self, delay, rate=None) -> None:
        for w in range(1, self.n + 1):
            self.schedule(w, 0, delay, rate)

    def schedule(self, worker: int, step: int, delay, rate=None) -> None:
        """Worker ``worker`` starts its step ``step`` now; it arrives after compute time + delay.

        ``delay(worker, step)`` adds seconds (stragglers); ``rate(worker)`` divides the compute time
        (a flooding worker arrives that many times as often)."""
        q = float(self.q[worker - 1])
        if q <= 0:
            return
        compute = -math.log1p(-float(torch.rand((), generator=self.gen, dtype=torch.float64)))
        compute *= self.step_time / (self.n * q)
        if rate is not None:
            compute /= rate(worker)
        heapq.heappush(self.queue, (self.now + compute + delay(worker, step), worker))

    def next(self) -> int:
        if not self.queue:
            raise RuntimeError("no worker left to arrive: all crashed or have zero arrival probability")
        self.arrivals += 1
        if self.share is None or not self.byzantine:
            self.now, worker = heapq.heappop(self.queue)
            return worker
        byzantine_turn = self._byzantine_turn()
        mine = [item for item in self.queue if (item[1] in self.byzantine) == byzantine_turn] or self.queue
        q = torch.tensor([float(self.q[w - 1]) for _, w in mine], dtype=torch.float64)
        when, worker = mine[int(torch.multinomial(q, 1, generator=self.gen))]
        self.queue.remove((when, worker))
        heapq.heapify(self.queue)
        self.now = max(self.now, when)
        return worker

    def _byzantine_turn(self) -> bool:
        if self.schedule_kind == "interleave":
            return (self.arrivals - 1) % math.ceil(1 / self.share) == 0
        return float(torch.rand((), generator=self.gen, dtype=torch.float64)) < self.share

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "now": self.now, "queue": list(self.queue), "arrivals": self.arrivals}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.now = state["now"]
        self.queue = [tuple(x) for x in state["queue"]]
        heapq.heapify(self.queue)
        self.arrivals = int(state.get("arrivals", 0))
