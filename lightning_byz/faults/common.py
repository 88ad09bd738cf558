"""What every worker-targeted fault shares: id validation, seeded randomness, counters.

Randomness is drawn from a fresh CPU ``torch.Generator`` seeded from
``(seed, stream, worker, step)`` through numpy's ``SeedSequence`` (a well-mixing hash), so a
fault's draws depend only on those four numbers: the same in MPI and simulated mode, on CPU and
GPU, and after resuming a run. Draws happen on CPU and move to the target device, because CPU and
CUDA generators give different streams.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_byz.faults.base import Fault


def check_worker_ids(ids: Iterable[int], what: str = "workers") -> tuple[int, ...]:
    """Validate a non-empty list of distinct worker ids >= 1 (0 is the server); return it sorted."""
    items = list(ids) if isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)) else []
    if not items:
        raise ValueError(f"{what} must be a non-empty list of worker ids, got {ids!r}")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"{what}: worker ids must be integers, got {i!r}")
        if i == 0:
            raise ValueError(f"{what}: rank 0 is the parameter server and cannot be a fault target")
        if i < 0:
            raise ValueError(f"{what}: worker ids are 1..num_workers, got {i}")
    if len(set(items)) != len(items):
        raise ValueError(f"{what}: duplicate worker ids in {items!r}")
    return tuple(sorted(int(i) for i in items))


def seeded_generator(seed: int, stream: str, worker: int, step: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, stream, worker, step)`` alone."""
    entropy = [int(seed), zlib.crc32(stream.encode()), int(worker), int(step)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class WorkerFault(Callback, Fault):
    """Base of the fault callbacks: the targeted ``workers``, the run's seed, named counters.

    Subclasses set ``kind`` (the metrics prefix and randomness stream) and count events with
    ``self.counts[name] += n``; :meth:`metrics` reports them as ``{kind}/{name}``. Counters are
    saved in checkpoints through the callback's ``state_dict``.
    """

    kind = "fault"

    def __init__(self, workers: Sequence[int], what: str = "workers") -> None:
        self.workers = check_worker_ids(workers, what)
        self._what = what
        self.num_workers: int | None = None
        self.seed = 0
        self.counts: Counter[str] = Counter()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(workers=self.workers)

    def targets(self, worker: int) -> bool:
        return worker in self.workers

    def setup_faults(self, num_workers: int, seed: int) -> None:
        if num_workers < 1:
            raise ValueError(f"{type(self).__name__}: num_workers must be >= 1, got {num_workers}")
        too_big = [i for i in self.workers if i > num_workers]
        if too_big:
            raise ValueError(
                f"{type(self).__name__}: {self._what} {too_big} out of range; worker ids are "
                f"1..{num_workers}"
            )
        self.num_workers = num_workers
        self.seed = int(seed)

    def generator(self, worker: int, step: int) -> torch.Generator:
        return seeded_generator(self.seed, self.kind, worker, step)

    def metrics(self) -> dict[str, float]:
        return self.metrics_of(self.counts)

    def metrics_of(self, counts: Counter[str]) -> dict[str, float]:
        """The logged metrics of a set of counters (this process's, or a worker rank's)."""
        return {f"{self.kind}/{name}": float(value) for name, value in sorted(counts.items())}

    def state_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.counts = Counter(state_dict.get("counts", {}))
