"""Byzantine workers: the attacks of both seeds and those a reviewer would try, as one callback.

Worker-side attacks, on the vector v a Byzantine worker is about to send:

- ``label_flip`` (data level): labels y -> C − 1 − y on the Byzantine workers' batches.
- ``sign_flip``: the worker sends −scale·v instead of its vector v.
- ``random``: the worker sends i.i.d. Gaussian entries of std ``scale`` (zero mean).
- ``random_uniform``: i.i.d. entries uniform in [0, ``scale``): the Flag Aggregator's released code's
  "random gradients" (``torch.rand``, scale 1), whose shared positive mean is harder to filter.
- ``drop``: the worker sends nothing (the hook returns ``None``).

Omniscient attacks, which replace every Byzantine row with one malicious vector m computed from the
honest rows (μ and σ their per-coordinate weighted mean and standard deviation):

- ``alie`` ("a little is enough", Baruch et al., NeurIPS 2019): m = μ − z·σ. Unless given, z follows
  ``z_rule``: ``"weights"`` (the default; Dahan & Levy's released async code, which puts the
  iteration counts in place of worker counts: s = ⌊T/2 + 1⌋ − B, z = Φ⁻¹((T − B − s)/(T − B)) for
  T updates of which B Byzantine; after a few updates that is z = Φ⁻¹(1 / (2(1 − λ))) with λ the
  Byzantine share of the server's weights, recomputed at each update: 0.67 at λ = 1/3) or
  ``"workers"`` (the paper's §4: s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n) for n workers, f
  Byzantine: 1.57 at n = 17, f = 8). At λ ≥ 1/2 the weights rule caps z at Φ⁻¹(0.999) ≈ 3.1.
- ``ipm`` ("fall of empires", inner-product manipulation, Xie et al., UAI 2019): m = −eps·μ
  (eps = 0.1 as in Dahan & Levy's "empire").
- ``min_max`` / ``min_sum`` (Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model
  Poisoning Attacks and Defenses for Federated Learning", NDSS 2021, the AGR-agnostic attacks of
  their §IV): m = μ + γ·p with p = −μ/‖μ‖ (``perturbation="unit"``, their default), −σ (``"std"``)
  or −sign(μ) (``"sign"``), and γ the largest value such that the largest distance of m to an
  honest row (min_max) is at most the largest distance between two honest rows, or the weighted sum
  of squared distances of m to the honest rows (min_sum) is at most the largest such sum of an
  honest row (the paper's Eq. 4; their released code bounds min-sum by the smallest such sum).
  Their Algorithm 1 searches γ by halving steps from γ_init; both constraints are quadratic in γ,
  so γ is computed exactly here (what that search converges to, with no cap at 2·γ_init): see
  :func:`min_max_gamma` and :func:`min_sum_gamma`. σ for ``"std"`` is the weighted σ below.
- ``mimic`` (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
  Bucketing", ICLR 2022, §5): m is one honest worker's vector, ``target_worker`` if given, else the
  honest row farthest from μ along the top principal direction of the honest rows (the worker that
  adds the most variance in that direction; see :func:`mimic_index`). Their attacker estimates the
  direction online during a warm-up and then fixes the worker; here the direction is exact for the
  current honest rows and the choice is made afresh at each update (``target_worker`` fixes it).

``scale`` makes magnitude-scaled variants of the omniscient attacks: m = μ + scale·(m − μ), so
scale = 1 (the default) is the paper's attack and scale = 0 sends the honest mean.

The omniscient attacks run in the server's attack slot over the latest vector of each worker,
weighted as the server weighs them (async: s_i / Σ s_j), so they use the WEIGHTED honest
statistics; σ² = Σ w_i (x_i − μ)² / Σ w_i over honest rows (the population form), and honest rows
of weight 0 count as absent. Distances and principal directions are computed in float64. On a sharded
server each server attacks its own slice; the statistics that span coordinates (‖μ‖, distances,
Gram matrices) are summed across the shards (:mod:`lightning_byz.sharding`), so the attack is the
same as on one server.

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
from lightning_byz.faults.common import WorkerFault, check_worker_ids
from lightning_byz.sharding import shard_rank, shard_sum

ATTACKS = (
    "label_flip", "sign_flip", "random", "random_uniform", "drop", "alie", "ipm", "min_max", "min_sum", "mimic"
)
WORKER_SIDE = ("sign_flip", "random", "random_uniform", "drop")
OMNISCIENT = ("alie", "ipm", "min_max", "min_sum", "mimic")
PERTURBATIONS = ("unit", "std", "sign")
Z_RULES = ("weights", "workers")
ALIE_CDF_CAP = 0.999  # z of the weights rule when the Byzantine hold half the weight or more


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


def alie_z_weighted(byzantine_share: float) -> float:
    """The released async code's z for a Byzantine share λ of the weights: Φ⁻¹(1 / (2(1 − λ)))
    (capped at Φ⁻¹(0.999) for λ ≥ 1/2)."""
    cdf = ALIE_CDF_CAP if byzantine_share >= 0.5 else min(0.5 / (1.0 - byzantine_share), ALIE_CDF_CAP)
    return float(torch.special.ndtri(torch.tensor(cdf, dtype=torch.float64)))


def weighted_mean_std(vectors: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per-coordinate weighted mean and (population) standard deviation of the rows."""
    w = (weights / weights.sum()).to(vectors.dtype)[:, None]
    mean = (w * vectors).sum(0)
    var = (w * (vectors - mean).square()).sum(0)
    return mean, var.sqrt()


def centered_rows(rows: Tensor, mean: Tensor) -> Tensor:
    """The rows minus their mean, in float64 (distances and Gram matrices are taken from these)."""
    return rows.to(torch.float64) - mean.to(torch.float64)


def perturbation_direction(kind: str, mean: Tensor, std: Tensor) -> Tensor:
    """Shejwalkar & Houmansadr's perturbation p: −μ/‖μ‖ ("unit"), −σ ("std") or −sign(μ) ("sign");
    zero where it is undefined (μ = 0 for "unit")."""
    if kind == "std":
        return -std
    if kind == "sign":
        return -mean.sign()
    norm = float(shard_sum(mean.to(torch.float64).square().sum()).sqrt())
    return -mean / norm if norm > 0 else torch.zeros_like(mean)


def min_max_gamma(centered: Tensor, p: Tensor) -> float:
    """The largest γ >= 0 with max_i ‖μ + γp − x_i‖ <= max_ij ‖x_i − x_j‖ (``centered``: rows x_i − μ).

    With c_i = x_i − μ the constraint of row i is γ²‖p‖² − 2γ⟨c_i, p⟩ + ‖c_i‖² − D² <= 0 (D the
    largest honest distance). γ = 0 satisfies it (μ lies in the rows' convex hull), so each row
    allows γ up to the larger root of its quadratic; γ is the smallest of those roots.
    """
    a = shard_sum(p.dot(p))
    if a <= 0:
        return 0.0
    gram = shard_sum(centered @ centered.T)
    norms = gram.diagonal()
    largest = (norms[:, None] + norms[None, :] - 2 * gram).max()
    b = shard_sum(centered @ p)
    c = (norms - largest).clamp_max(0)  # <= 0 in exact arithmetic
    s = (b.square() - a * c).sqrt()
    # larger root (b + s)/a, written without cancellation when b < 0
    roots = torch.where(b >= 0, (b + s) / a, -c / (s - b))
    return roots.min().item()


def min_sum_gamma(centered: Tensor, p: Tensor) -> float:
    """The largest γ >= 0 with Σ_j w_j ‖μ + γp − x_j‖² <= max_i Σ_j w_j ‖x_i − x_j‖².

    μ being the weighted mean, Σ_j w_j ‖y − x_j‖² = ‖y − μ‖² + V for any y (V = Σ_j w_j ‖x_j − μ‖²,
    weights summing to 1), so the constraint reads γ²‖p‖² <= max_i ‖x_i − μ‖².
    """
    a = shard_sum(p.dot(p))
    if a <= 0:
        return 0.0
    return (shard_sum(centered.square().sum(1)).max() / a).sqrt().item()


def mimic_index(centered: Tensor, weights: Tensor) -> int:
    """The row (first on ties) with the largest |⟨x_i − μ, u⟩|, u the top eigenvector of the
    weighted covariance Σ_j w_j (x_j − μ)(x_j − μ)ᵀ.

    Computed in the k-dimensional row space: with B = diag(√w)·C (C the centered rows), u ∝ Bᵀv for
    v the top eigenvector of B Bᵀ, so the projections are ∝ C Cᵀ (√w ⊙ v). The absolute value makes
    the choice independent of the eigenvector's sign.
    """
    root = (weights / weights.sum()).sqrt()
    gram = shard_sum(centered @ centered.T)
    _, eigenvectors = torch.linalg.eigh(root[:, None] * gram * root[None, :])
    projections = gram @ (root * eigenvectors[:, -1])
    return int(projections.abs().argmax())


class ByzantineWorkers(WorkerFault):
    """Make ``workers`` Byzantine with ``attack`` (one of :data:`ATTACKS`).

    Args:
        workers: worker ids (1..num_workers).
        attack: the attack's name.
        num_classes: C for ``label_flip`` (required there).
        scale: factor of ``sign_flip``, standard deviation of ``random``, upper end of
            ``random_uniform``'s range; for the omniscient
            attacks the malicious vector becomes μ + scale·(m − μ) (1: the paper's attack).
        z: ALIE's z; default: by ``z_rule``.
        z_rule: ALIE's z when not given: ``"weights"`` (the released async code: from the Byzantine
            share of the server's weights, each update) or ``"workers"`` (Baruch et al.'s z_max for
            n = num_workers, f = len(workers)); see the module doc.
        eps: IPM's ε.
        target_key: where the labels are in a batch (position in a tuple/list, or a dict key).
        perturbation: min_max/min_sum's direction, one of :data:`PERTURBATIONS`.
        target_worker: the honest worker whose vector ``mimic`` copies; default: chosen at each
            update by :func:`mimic_index`. While it has not been heard from, rows are left as sent.
        flood: the Byzantine workers arrive this many times as often as they otherwise would (a
            rate-aware adversary buying weight s_i by speed). Simulated: their compute time is
            divided by ``flood``; MPI: each message is sent ``round(flood)`` times, without delay.
            The server's answers: the warm-up, ``max_weight`` and ``max_staleness``.
    """

    kind = "byzantine"
    counters = ('batches_attacked', 'messages_attacked', 'server_attacks')

    def __init__(
        self,
        workers: Sequence[int],
        attack: str,
        num_classes: int | None = None,
        scale: float = 1.0,
        z: float | None = None,
        eps: float = 0.1,
        target_key: int | str = 1,
        perturbation: str = "unit",
        target_worker: int | None = None,
        flood: float = 1.0,
        z_rule: str = "weights",
    ) -> None:
        super().__init__(workers)
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
        if attack == "label_flip" and (num_classes is None or num_classes < 2):
            raise ValueError(f"label_flip needs num_classes >= 2, got {num_classes!r}")
        if not math.isfinite(scale) or (attack.startswith("random") and scale < 0):
            raise ValueError(f"{attack}: scale must be finite (and >= 0 for random noise), got {scale}")
        if z_rule not in Z_RULES:
            raise ValueError(f"alie: z_rule must be one of {Z_RULES}, got {z_rule!r}")
        if z is not None and not math.isfinite(z):
            raise ValueError(f"alie: z must be finite, got {z}")
        if not math.isfinite(eps):
            raise ValueError(f"ipm: eps must be finite, got {eps}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(
                f"unknown perturbation {perturbation!r}; choose one of {', '.join(PERTURBATIONS)}"
            )
        if target_worker is not None:
            (target_worker,) = check_worker_ids([target_worker], "mimic: target_worker")
            if target_worker in self.workers:
                raise ValueError(
                    f"mimic: target_worker {target_worker} is Byzantine; it must be an honest worker"
                )
        if not (math.isfinite(flood) and flood >= 1):
            raise ValueError(f"flood must be a finite number >= 1 (times the normal arrival rate), got {flood}")
        self.flood = float(flood)
        self.attack = attack
        self.num_classes = num_classes
        self.scale = float(scale)
        self.eps = float(eps)
        self.perturbation = perturbation
        self.target_worker = target_worker
        self.target_key = target_key
        self.z = z
        self.z_rule = z_rule

    def arrival_rate(self, worker: int) -> float:
        return self.flood if worker in self.workers else 1.0

    def setup_faults(self, num_workers: int, seed: int) -> None:
        super().setup_faults(num_workers, seed)
        if self.target_worker is not None and self.target_worker > num_workers:
            raise ValueError(
                f"mimic: target_worker {self.target_worker} out of range; worker ids are "
                f"1..{num_workers}"
            )
        if self.attack == "alie" and self.z is None and self.z_rule == "workers":
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
        if self.attack not in WORKER_SIDE or not self.targets(worker):
            return vector
        self.counts["messages_attacked"] += 1
        if self.attack == "drop":
            return None
        if self.attack == "sign_flip":
            return vector * -self.scale
        draw = torch.randn if self.attack == "random" else torch.rand
        noise = draw(vector.shape, generator=self.generator(worker, step), dtype=vector.dtype)
        return noise.mul_(self.scale).to(vector.device)

    def server_attack(self, vectors: Tensor, weights: Tensor, workers: Tensor) -> Tensor:
        if self.attack not in OMNISCIENT:
            return vectors
        device = vectors.device
        workers, weights = workers.to(device), weights.to(device)
        byzantine = torch.isin(workers, torch.tensor(self.workers, device=device))
        honest = ~byzantine & (weights > 0)
        if not byzantine.any() or not honest.any():
            return vectors
        share = float(weights[byzantine].sum() / weights.sum())
        row = self.malicious_vector(vectors[honest], weights[honest], workers[honest], share)
        if row is None:
            return vectors
        if shard_rank() == 0:  # one attack, however many shards carry it out
            self.counts["server_attacks"] += 1
        return torch.where(byzantine[:, None], row[None, :], vectors)

    def malicious_vector(self, honest: Tensor, weights: Tensor, workers: Tensor,
                         byzantine_share: float = 0.0) -> Tensor | None:
        """The vector every Byzantine row becomes, from the ``honest`` rows (weights > 0) of
        ``workers`` (``byzantine_share``: the Byzantine rows' share of the weights); ``None`` when
        mimic's target has not been heard from."""
        mean, std = weighted_mean_std(honest, weights)
        if self.attack == "alie":
            if self.z is None and self.z_rule == "workers":
                raise ValueError("alie: z unknown; call setup_faults(num_workers, seed) or pass z=")
            z = self.z if self.z is not None else alie_z_weighted(byzantine_share)
            row = mean - z * std
        elif self.attack == "ipm":
            row = -self.eps * mean
        elif self.attack == "mimic":
            index = self.mimic_row(honest, mean, weights, workers)
            if index is None:
                return None
            row = honest[index]
        else:
            p = perturbation_direction(self.perturbation, mean, std)
            gamma_of = min_max_gamma if self.attack == "min_max" else min_sum_gamma
            row = mean + gamma_of(centered_rows(honest, mean), p.to(torch.float64)) * p
        if self.scale != 1.0:
            row = mean + self.scale * (row - mean)
        return row

    def mimic_row(self, honest: Tensor, mean: Tensor, weights: Tensor, workers: Tensor) -> int | None:
        """Index of the honest row mimic copies: ``target_worker``'s (``None`` if absent), else
        :func:`mimic_index`'s choice."""
        if self.target_worker is None:
            return mimic_index(centered_rows(honest, mean), weights.to(torch.float64))
        matches = torch.nonzero(workers == self.target_worker).flatten()
        return int(matches[0]) if len(matches) else None
