"""How the training set is split among the workers: IID, Dirichlet label skew, or k labels each.

Non-IID shards are what separates robust rules in practice (honest workers then disagree, and an
attacker hides in that spread): the benchmarks of ByzFL and Blades use the same two schemes.

* ``iid``: equal random shards (``DistributedSampler``'s split; the default, unchanged).
* ``dirichlet``: for each class c, the proportions of its samples that go to the N workers are
  drawn from Dir(α·1_N) (Hsu, Qi & Brown 2019); small α (0.1) gives each worker a few dominant
  classes, large α (100) approaches IID. Draws that leave a worker with fewer than ``min_size``
  samples are redrawn (a bounded number of times, then an error says to raise α).
* ``labels``: worker i holds exactly k classes, ``order[(i·k + j) mod C]`` for j < k, with ``order`` a
  seeded permutation of the C classes; each class is split evenly among the workers holding it
  (McMahan et al. 2017's "pathological non-IID", with exact class counts).

The split depends only on the labels, N and the seed, so every MPI rank computes the same one and
takes its own part; the simulation uses the same code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "labels")
MAX_REDRAWS = 100


@dataclass(frozen=True)
class Partition:
    """A split of the training set among workers (see the module doc)."""

    scheme: str = "iid"
    alpha: float = 0.5
    classes: int = 2
    min_size: int = 1

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"partition must be one of {SCHEMES}, got {self.scheme!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.classes, int) and self.classes >= 1):
            raise ValueError(f"classes_per_worker must be an integer >= 1, got {self.classes!r}")

    def __str__(self) -> str:
        return {"iid": "iid", "dirichlet": f"dirichlet(alpha={self.alpha:g})",
                "labels": f"labels({self.classes} per worker)"}[self.scheme]

    def split(self, labels: np.ndarray, shards: int, seed: int) -> list[np.ndarray]:
        """Indices of each of ``shards`` workers (disjoint; sorted) for a non-IID scheme."""
        rng = np.random.default_rng([seed, 0x5EED])
        classes = np.unique(labels)
        by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        if self.scheme == "dirichlet":
            parts = self._dirichlet(by_class, shards, rng)
        elif self.scheme == "labels":
            parts = self._labels(by_class, shards, rng)
        else:
            raise ValueError("the iid split is DistributedSampler's (see shard_loader)")
        return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]

    def describe(self, labels: np.ndarray, parts: list[np.ndarray]) -> str:
        """One line for the log: samples per worker and how many classes make up 95% of each shard."""
        sizes = [len(p) for p in parts]
        dominant = []
        for p in parts:
            counts = np.sort(np.bincount(labels[p]))[::-1] if len(p) else np.zeros(1)
            dominant.append(int(np.searchsorted(np.cumsum(counts), 0.95 * counts.sum()) + 1))
        return (f"partition {self}: {len(parts)} workers, samples per worker min {min(sizes)} / median "
                f"{int(np.median(sizes))} / max {max(sizes)}; classes holding 95% of a shard: min "
                f"{min(dominant)} / mean {np.mean(dominant):.1f} / max {max(dominant)}")

    def _dirichlet(self, by_class: list[np.ndarray], shards: int, rng: np.random.Generator) -> list[list]:
        for _ in range(MAX_REDRAWS):
            parts: list[list] = [[] for _ in range(shards)]
            for idx in by_class:
                cuts = (np.cumsum(rng.dirichlet(np.full(shards, float(self.alpha))))[:-1] * len(idx)).astype(int)
                for i, piece in enumerate(np.split(idx, cuts)):
                    parts[i].append(piece)
            if min(sum(len(p) for p in part) for part in parts) >= self.min_size:
                return parts
        raise ValueError(f"dirichlet_alpha={self.alpha:g} leaves a worker with fewer than {self.min_size} samples "
                         f"in {MAX_REDRAWS} draws for {shards} workers: raise dirichlet_alpha")

    def _labels(self, by_class: list[np.ndarray], shards: int, rng: np.random.Generator) -> list[list]:
        n_classes = len(by_class)
        if self.classes > n_classes:
            raise ValueError(f"classes_per_worker={self.classes} but the training set has {n_classes} classes")
        order = rng.permutation(n_classes)
        holds = [[int(order[(i * self.classes + j) % n_classes]) for j in range(self.classes)] for i in range(shards)]
        holders: list[list[int]] = [[] for _ in range(n_classes)]
        for i, held in enumerate(holds):
            for c in held:
                holders[c].append(i)
        unused = [c for c in range(n_classes) if not holders[c]]
        if unused:
            log.warning("partition %s over %d workers leaves %d of %d classes to nobody", self, shards,
                        len(unused), n_classes)
        parts: list[list] = [[] for _ in range(shards)]
        for c, idx in enumerate(by_class):
            for worker, piece in zip(holders[c], np.array_split(idx, max(len(holders[c]), 1))):
                parts[worker].append(piece)
        return parts


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The class label of every sample: ``targets``/``labels`` (torchvision), a ``TensorDataset``'s
    last tensor, through ``Subset``s; otherwise by reading every sample (logged: it loads them all)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is not None:
            return _as_labels(values)
    if isinstance(dataset, TensorDataset):
        return _as_labels(dataset.tensors[-1])
    log.warning("%s has no targets attribute: reading every sample once to learn its label", type(dataset).__name__)
    return _as_labels([dataset[i][1] for i in range(len(dataset))])


def _as_labels(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    elif not isinstance(values, np.ndarray):
        values = [int(v) for v in values]
    labels = np.asarray(values)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a non-IID partition needs one integer class label per sample, got shape "
                         f"{labels.shape} of {labels.dtype}")
    return labels


class ShardSampler(torch.utils.data.Sampler[int]):
    """One worker's fixed indices, reshuffled each epoch (``set_epoch``, seeded), as DistributedSampler."""

    def __init__(self, indices: np.ndarray, seed: int):
        self.indices, self.seed, self.epoch = [int(i) for i in indices], seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])

    def __len__(self) -> int:
        return len(self.indices)
