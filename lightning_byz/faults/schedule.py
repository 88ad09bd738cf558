"""How the Byzantine fraction λ of updates follows from the arrival schedule (simulated mode).

In simulated mode the strategy draws who arrives next i.i.d. from P(worker i), i = 1..N, with
P(i) ∝ 1 (``"uniform"``), i (``"id"``) or i² (``"id2"``), or from a given list of N non-negative
weights (as in Dahan & Levy 2024, where faster workers send more often; the distribution is
:func:`lightning_byz.arrivals.arrival_probabilities`). Byzantine workers B then
send a fraction λ = Σ_{i∈B} P(i) of all updates, in expectation. So λ is set by which workers are
Byzantine: e.g. 17 workers with P ∝ i², B = {1..8} gives λ = 204/1785 ≈ 0.114, while B = {10..17}
gives λ = 1500/1785 ≈ 0.84. :func:`byzantine_fraction` computes λ; :func:`workers_for_fraction` finds the f
workers whose λ is closest to a target. (The server's async weights s_i / Σ s_j converge to P(i).)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from lightning_byz.faults.common import check_worker_ids
from lightning_byz.arrivals import arrival_probabilities

MAX_COMBINATIONS = 1_000_000


def byzantine_fraction(
    arrival: str | Sequence[float], num_workers: int, workers: Sequence[int]
) -> float:
    """Expected fraction λ of updates sent by ``workers`` under the arrival schedule."""
    workers = check_worker_ids(workers)
    if max(workers) > num_workers:
        raise ValueError(f"workers {list(workers)} out of range 1..{num_workers}")
    probs = arrival_probabilities(arrival, num_workers)
    return float(probs[[i - 1 for i in workers]].sum())


def workers_for_fraction(
    arrival: str | Sequence[float], num_workers: int, num_byzantine: int, lam: float
) -> tuple[int, ...]:
    """The ``num_byzantine`` worker ids whose λ is closest to ``lam`` (smallest ids on ties),
    by exhaustive search over the combinations (up to a million of them)."""
    if not 0 < num_byzantine <= num_workers:
        raise ValueError(f"num_byzantine must be in 1..{num_workers}, got {num_byzantine}")
    if not 0 <= lam <= 1:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if math.comb(num_workers, num_byzantine) > MAX_COMBINATIONS:
        raise ValueError(
            f"C({num_workers}, {num_byzantine}) combinations is too many to search; choose the "
            "workers yourself and check them with byzantine_fraction"
        )
    probs = arrival_probabilities(arrival, num_workers).tolist()
    best = min(
        itertools.combinations(range(1, num_workers + 1), num_byzantine),
        key=lambda ids: (round(abs(sum(probs[i - 1] for i in ids) - lam), 12), ids),
    )
    return best
