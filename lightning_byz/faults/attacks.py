"""Byzantine workers: the attacks of both seeds, as one callback.

- ``label_flip`` (data level): labels y -> C − 1 − y on the Byzantine workers' batches.
- ``sign_flip``: the worker sends −scale·v instead of its vector v.
- ``random``: the worker sends i.i.d. Gaussian entries of std ``scale`` (FA's random gradients).
- ``drop``: the worker sends nothing (the hook returns ``None``).
- ``alie`` ("a little is enough", Baruch et al., NeurIPS 2019): every Byzantine row becomes
  μ − z·σ, μ and σ the per-coordinate weighted mean and standard deviation of the honest rows.
  Unless given, z = Φ⁻¹((n − s)/n) with s = ⌊n/2 + 1⌋ − f (their §4, n workers, f Byzantine).
- ``ipm`` ("fall of empires", inner-product manipulation, Xie et al., UAI 2019): every Byzantine row
  becomes −eps·μ (eps = 0.1 as in Dahan & Levy's "empire").

The omniscient attacks (alie, ipm) run in the server's attack slot over the latest vector of each
worker, weighted as the server weighs them (async: s_i / Σ s_j), so they use the WEIGHTED honest
statistics; σ² = Σ w_i (x_i − μ)² / Σ w_i over honest rows (the population form).

The Byzantine fraction λ of the updates the server receives is not set here: in simulated mode it
follows from the arrival schedule, see :mod:`lightning_byz.faults.schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_byz.faults.batch import get_field, replace_field
from lightning_byz.faults.common import WorkerFault

ATTACKS = ("label_flip", "sign_flip", "random", "drop", "alie", "ipm")
OMNISCIENT = ("alie", "ipm")


def alie_z(num_workers: int, num_byzantine: int) -> float:
    """Baruch et al. 2019's z_max: s = ⌊n/2 + 1⌋ − f workers must be swayed; z = Φ⁻¹((n − s)/n)."""
    n, f = num_workers, num_byzantine
    s = math.floor(n / 2 + 1) - f
    if not 0 < s < n:
        raise ValueError(
            f"alie: z is undefined for n={n} workers with f={f} Byzantine (needs "
            "0 < ⌊n/2+1⌋−f < n); pass z= explicitly"
        )
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


def weighted_mean_std(vectors: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate weighted mean and (population) standard deviation of the rows."""
    w = (weights / weights.sum()).to(vectors.dtype)[:, None]
    mean = (w * vectors).sum(0)
    var = (w * (vectors - mean).square()).sum(0)
    return mean, var.sqrt()


class ByzantineWorkers(WorkerFault):
    """Make ``workers`` Byzantine with ``attack`` (one of :data:`ATTACKS`).

    Args:
        workers: worker ids (1..num_workers).
        attack: the attack's name.
        num_classes: C for ``label_flip`` (required there).
        scale: factor of ``sign_flip``, standard deviation of ``random``.
        z: ALIE's z; default Baruch et al.'s z_max for n = num_workers, f = len(workers).
        eps: IPM's ε.
        target_key: where the labels are in a batch (position in a tuple/list, or a dict key).
    """

    kind = "byzantine"

    def __init__(
        self,
        workers: Sequence[int],
        attack: str,
        num_classes: int | None = None,
        scale: float = 1.0,
        z: float | None = None,
        eps: float = 0.1,
        target_key: int | str = 1,
    ) -> None:
        super().__init__(workers)
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
        if attack == "label_flip" and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_flip needs num_classes >= 2, got {num_classes!r}")
        if not math.isfinite(scale) or (attack == "random" and scale < 0):
            raise ValueError(f"{attack}: scale must be finite (and >= 0 for random), got {scale}")
        if z is not None and not math.isfinite(z):
            raise ValueError(f"alie: z must be finite, got {z}")
        if not math.isfinite(eps):
            raise ValueError(f"ipm: eps must be finite, got {eps}")
        self.attack = attack
        self.num_classes = num_classes
        self.scale = float(scale)
        self.eps = float(eps)
        self.target_key = target_key
        self.z = z

    def setup_faults(self, num_workers: int, seed: int) -> None:
        super().setup_faults(num_workers, seed)
        if self.attack == "alie" and self.z is None:
            self.z = alie_z(num_workers, len(self.workers))

    def on_worker_batch(self, worker: int, step: int, batch: Any) -> Any:
        if self.attack != "label_flip" or not self.targets(worker):
            return batch
        labels = get_field(batch, self.target_key, "target_key")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"label_flip needs integer class labels, got dtype {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"label_flip: labels outside 0..{self.num_classes - 1}")
        self.counts["batches_attacked"] += 1
        return replace_field(batch, self.target_key, self.num_classes - 1 - labels)

    def on_worker_message(self, worker: int, step: int, vector: Tensor) -> Tensor | None:
        if self.attack not in ("sign_flip", "random", "drop") or not self.targets(worker):
            return vector
        self.counts["messages_attacked"] += 1
        if self.attack == "drop":
            return None
        if self.attack == "sign_flip":
            return vector * -self.scale
        generator = self.generator(worker, step)
        noise = torch.randn(vector.shape, generator=generator, dtype=vector.dtype)
        return noise.mul_(self.scale).to(vector.device)

    def server_attack(self, vectors: Tensor, weights: Tensor, workers: Tensor) -> Tensor:
        if self.attack not in OMNISCIENT:
            return vectors
        ids = torch.tensor(self.workers, device=vectors.device)
        byzantine = torch.isin(workers.to(vectors.device), ids)
        honest = ~byzantine
        if not byzantine.any() or not honest.any():
            return vectors
        honest_weights = weights.to(vectors.device)[honest]
        if honest_weights.sum() <= 0:
            return vectors
        mean, std = weighted_mean_std(vectors[honest], honest_weights)
        if self.attack == "alie":
            if self.z is None:
                raise ValueError("alie: z unknown; call setup_faults(num_workers, seed) or pass z=")
            row = mean - self.z * std
        else:
            row = -self.eps * mean
        self.counts["server_attacks"] += 1
        return torch.where(byzantine[:, None], row[None, :], vectors)
