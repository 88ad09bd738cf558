"""One process plays N workers: who arrives next, and each worker's own data shard.

Arrivals are an event simulation on a virtual clock: worker i needs an exponentially distributed
time with mean ``step_time / (N q_i)`` per step (``q`` the normalised arrival distribution), plus
any straggler delay. Without delays the next arrival is then worker i with probability exactly q_i
(``"uniform"``, ``"id"``: q_i ∝ i, ``"id2"``: q_i ∝ i², as in Dahan & Levy), and delays, crashes
and timeouts act in the same (virtual) seconds as under MPI. Everything is drawn from one seeded
generator, so a run is deterministic.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler


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

    def start(self, delay) -> None:
        for w in range(1, self.n + 1):
            self.schedule(w, 0, delay)

    def schedule(self, worker: int, step: int, delay) -> None:
        """Worker ``worker`` starts its step ``step`` now; it arrives after compute time + delay."""
        q = float(self.q[worker - 1])
        if q <= 0:
            return
        compute = -math.log1p(-float(torch.rand((), generator=self.gen, dtype=torch.float64)))
        compute *= self.step_time / (self.n * q)
        heapq.heappush(self.queue, (self.now + compute + delay(worker, step), worker))

    def next(self) -> int:
        if not self.queue:
            raise RuntimeError("no worker left to arrive: all crashed or have zero arrival probability")
        self.now, worker = heapq.heappop(self.queue)
        return worker

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "now": self.now, "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.now = state["now"]
        self.queue = [tuple(x) for x in state["queue"]]
        heapq.heapify(self.queue)


def shard_loader(loader: DataLoader, shards: int, shard: int, seed: int, keep_workers: bool = False) -> DataLoader:
    """A copy of ``loader`` over shard ``shard`` (0-based) of ``shards`` equal parts of its dataset.

    ``keep_workers`` keeps the loader's worker processes (one real worker per process); the
    simulation loads in-process, since N loaders with their own worker pools would swamp a laptop.
    """
    if not isinstance(loader, DataLoader):
        raise ValueError(f"parameter-server training shards a torch DataLoader, got {type(loader).__name__}")
    sampler = DistributedSampler(loader.dataset, num_replicas=shards, rank=shard, shuffle=True, seed=seed)
    workers = loader.num_workers if keep_workers else 0
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        persistent_workers=workers > 0 and loader.persistent_workers,
    )


class ShardStream:
    """Endless batches of one shard; each pass reshuffles (epoch-seeded), position is resumable."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch = 0
        self.position = 0
        self._it: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                self.loader.sampler.set_epoch(self.epoch)
                self._it = iter(self.loader)
                for _ in range(self.position):  # resume: skip what was already consumed
                    next(self._it)
            try:
                batch = next(self._it)
                self.position += 1
                return batch
            except StopIteration:
                self._it, self.epoch, self.position = None, self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = state["epoch"], state["position"], None


class Ticks:
    """What Lightning's loop iterates when the strategy supplies the data itself: step numbers.

    Its length is that of the user's train dataloader, so an "epoch" keeps its usual size; it is
    resumable (Lightning saves its position), so a mid-epoch checkpoint resumes mid-epoch.
    """

    def __init__(self, length: int):
        self.length = length
        self.position = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        start, self._resume_at = self._resume_at, 0
        for self.position in range(start, self.length):
            yield self.position

    def state_dict(self) -> dict:
        return {"position": self.position + 1}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = state["position"] % max(self.length, 1)
