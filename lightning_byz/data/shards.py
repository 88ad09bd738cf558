"""Each worker's own data: a shard of the user's DataLoader, an endless resumable stream of it, and
the step numbers Lightning iterates when the strategy supplies the data itself."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader, DistributedSampler

from lightning_byz.data.partition import Partition, ShardSampler, dataset_labels


def shard_loader(loader: DataLoader, shards: int, shard: int, seed: int, keep_workers: bool = False,
                 partition: Partition = Partition()) -> DataLoader:
    """A copy of ``loader`` over shard ``shard`` (0-based) of ``shards`` parts of its dataset, split
    as ``partition`` says (default: IID equal parts; :mod:`lightning_byz.data.partition`).

    ``keep_workers`` keeps the loader's worker processes (one real worker per process); the
    simulation loads in-process, since N loaders with their own worker pools would swamp a laptop.
    """
    if not isinstance(loader, DataLoader):
        raise ValueError(f"parameter-server training shards a torch DataLoader, got {type(loader).__name__}")
    if partition.scheme == "iid":
        sampler = DistributedSampler(loader.dataset, num_replicas=shards, rank=shard, shuffle=True, seed=seed)
    else:
        sampler = ShardSampler(partition.split(dataset_labels(loader.dataset), shards, seed)[shard], seed)
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
