"""Non-IID partitions of the training set (``lightning_byz.data.partition``): the split's properties,
label discovery, and a simulated fit whose workers see only their own classes."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_byz import AsyncPSStrategy
from lightning_byz.data import OfflineMNISTDataModule, Partition
from lightning_byz.data.partition import dataset_labels
from lightning_byz.data.shards import shard_loader
from lightning_byz.faults.base import Fault
from lightning_byz.models import ImageClassifier


def labels_of(n_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(n_classes), per_class))


@settings(max_examples=40, deadline=None)
@given(scheme=st.sampled_from(["dirichlet", "labels"]), shards=st.integers(1, 12), classes=st.integers(2, 10),
       k=st.integers(1, 3), alpha=st.sampled_from([0.3, 1.0, 10.0]), seed=st.integers(0, 2**31))
def test_a_split_is_disjoint_covers_what_it_assigns_and_is_seeded(scheme, shards, classes, k, alpha, seed):
    labels = labels_of(classes, 30)
    partition = Partition(scheme, alpha=alpha, classes=min(k, classes))
    parts = partition.split(labels, shards, seed)
    assert len(parts) == shards
    flat = np.concatenate(parts)
    assert len(flat) == len(np.unique(flat))  # disjoint
    if scheme == "dirichlet":
        assert len(flat) == len(labels) and min(map(len, parts)) >= 1  # everything, nobody empty
    else:
        held = [set(labels[p].tolist()) for p in parts]
        assert all(len(h) == partition.classes for h in held)  # exactly k classes each
        covered = set().union(*held)
        assert sorted(flat.tolist()) == sorted(np.flatnonzero(np.isin(labels, list(covered))).tolist())
    again = partition.split(labels, shards, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_alpha_sets_the_label_skew():
    """Share of a shard's largest class, mean over 10 shards of 10 classes: ~1/10 when IID."""
    labels = labels_of(10, 500)

    def top_share(alpha: float) -> float:
        parts = Partition("dirichlet", alpha=alpha).split(labels, 10, seed=1)
        return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))

    assert top_share(0.1) > 0.5 and top_share(100.0) < 0.15
    assert top_share(0.1) > top_share(1.0) > top_share(100.0)


def test_seeds_give_different_splits_and_impossible_ones_are_clear_errors():
    labels = labels_of(10, 50)
    a, b = (Partition("dirichlet", alpha=1.0).split(labels, 4, seed) for seed in (0, 1))
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="raise dirichlet_alpha"):  # 2 classes, each to one shard
        Partition("dirichlet", alpha=1e-4).split(labels_of(2, 50), 40, seed=0)
    with pytest.raises(ValueError, match="classes_per_worker=11 but the training set has 10"):
        Partition("labels", classes=11).split(labels, 4, seed=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"partition": "zipf"}, "partition must be one of"),
    ({"partition": "dirichlet", "dirichlet_alpha": 0.0}, "dirichlet_alpha must be > 0"),
    ({"partition": "labels", "classes_per_worker": 0}, "classes_per_worker must be an integer >= 1"),
])
def test_bad_partition_options_are_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncPSStrategy(transport="simulated", num_workers=3, **kwargs)


class NoTargets(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.zeros(2), i % 3


class WithTargets(NoTargets):
    targets = [0, 1, 2, 0, 1, 2]


def test_labels_are_found_through_the_usual_attributes():
    y = torch.tensor([3, 1, 2, 3])
    assert dataset_labels(TensorDataset(torch.zeros(4, 2), y)).tolist() == [3, 1, 2, 3]
    assert dataset_labels(WithTargets()).tolist() == [0, 1, 2, 0, 1, 2]
    assert dataset_labels(Subset(WithTargets(), [5, 0])).tolist() == [2, 0]
    assert dataset_labels(NoTargets()).tolist() == [0, 1, 2, 0, 1, 2]  # read sample by sample
    with pytest.raises(ValueError, match="one integer class label per sample"):
        dataset_labels(TensorDataset(torch.zeros(4, 2), torch.zeros(4, 3)))


def test_shard_loader_serves_each_worker_its_part_reshuffled_each_epoch():
    data = TensorDataset(torch.arange(40.0)[:, None], torch.arange(40) % 4)
    loader = DataLoader(data, batch_size=5)
    shards = [shard_loader(loader, 4, i, seed=0, partition=Partition("labels", classes=1)) for i in range(4)]
    seen = [torch.cat([y for _, y in shard]) for shard in shards]
    assert sorted(int(s.unique().item()) for s in seen) == [0, 1, 2, 3]  # one class each, all different
    def order(shard) -> list[int]:
        return torch.cat([x[:, 0] for x, _ in shard]).int().tolist()

    first = order(shards[0])
    shards[0].sampler.set_epoch(1)
    assert sorted(first) == sorted(order(shards[0])) and first != order(shards[0])


class SeenLabels(L.Callback, Fault):
    """Records the labels of every batch each worker trains on."""

    def __init__(self):
        self.seen: dict[int, set[int]] = {}

    def on_worker_batch(self, worker, step, batch):
        self.seen.setdefault(worker, set()).update(batch[1].tolist())
        return batch


def test_a_simulated_fit_trains_each_worker_on_its_own_classes():
    strategy = AsyncPSStrategy(aggregator="cwmed", transport="simulated", num_workers=5, partition="labels",
                               classes_per_worker=2, seed=3)
    seen = SeenLabels()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=200, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[seen])
    trainer.fit(ImageClassifier(net="mlp", lr=0.05), OfflineMNISTDataModule(batch_size=16))
    assert sorted(seen.seen) == [1, 2, 3, 4, 5]
    assert all(len(labels) == 2 for labels in seen.seen.values()), seen.seen
    assert set().union(*seen.seen.values()) == set(range(10))  # 5 workers x 2 classes: every class once
