"""System faults: stragglers (slow workers) and crash-stop workers.

A straggler's delay is real sleep under MPI and virtual time in simulated mode (the strategy
decides); either way the delay drawn for ``(worker, step)`` is the same number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_byz.faults.common import WorkerFault


class Straggler(WorkerFault):
    """``workers`` wait ``delay`` seconds before each send: a fixed number, or ``(low, high)`` for a
    delay drawn uniformly per step."""

    kind = "straggler"
    counters = ('delays', 'delay_seconds')

    def __init__(self, workers: Sequence[int], delay: float | tuple[float, float] = 1.0) -> None:
        super().__init__(workers)
        low, high = (delay, delay) if isinstance(delay, (int, float)) else tuple(delay)
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < 0:
            raise ValueError(f"straggler delay must be finite and >= 0 seconds, got {delay!r}")
        if low > high:
            raise ValueError(f"straggler delay range (low, high) has low > high: {delay!r}")
        self.low, self.high = float(low), float(high)

    def worker_delay(self, worker: int, step: int) -> float:
        if not self.targets(worker):
            return 0.0
        seconds = self.low
        if self.high > self.low:
            u = torch.rand((), generator=self.generator(worker, step), dtype=torch.float64)
            seconds = self.low + (self.high - self.low) * float(u)
        self.counts["delays"] += 1
        self.counts["delay_seconds"] += seconds
        return seconds


class Crash(WorkerFault):
    """Crash-stop: ``workers`` stop for good at their step ``at_step`` (they never send it)."""

    kind = "crash"

    def __init__(self, workers: Sequence[int], at_step: int = 0) -> None:
        super().__init__(workers)
        if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
            raise ValueError(f"crash at_step must be an integer >= 0, got {at_step!r}")
        self.at_step = at_step

    def crashed(self, worker: int, step: int) -> bool:
        return self.targets(worker) and step >= self.at_step
