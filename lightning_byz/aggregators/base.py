"""Shared machinery of every aggregation rule: input validation, the weight budget, the registry.

An aggregator is a callable ``agg(vectors: Tensor[n, d], weights: Tensor[n] | None) -> Tensor[d]``.
Subclasses of :class:`Aggregator` implement ``_aggregate(X, w)`` and receive inputs that are already
validated: ``X`` is a 2-D floating tensor (float32/float64) with finite entries and ``w`` is a
non-negative weight vector of the same dtype and device that sums to 1.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from lightning_byz.sharding import shard_max, shard_sum

AggregatorFn = Callable[..., Tensor]

_REGISTRY: dict[str, type["Aggregator"]] = {}


def register(name: str, *aliases: str):
    """Class decorator: make an :class:`Aggregator` subclass available to :func:`get_aggregator`."""

    def deco(cls: type[Aggregator]) -> type[Aggregator]:
        for key in (name, *aliases):
            if key in _REGISTRY:
                raise RuntimeError(f"aggregator name {key!r} registered twice")
            _REGISTRY[key] = cls
        cls.name = name
        return cls

    return deco


def registered(name: str) -> type["Aggregator"]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregator {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def available_aggregators() -> list[str]:
    """Names accepted by :func:`get_aggregator` (aliases included), sorted."""
    return sorted(_REGISTRY)


def nonzero_rows(mask: Tensor, limit: int = 10) -> str:
    rows = torch.nonzero(mask).flatten().tolist()
    more = f" (and {len(rows) - limit} more)" if len(rows) > limit else ""
    return ", ".join(map(str, rows[:limit])) + more


def nonfinite_rows(X: Tensor) -> Tensor:
    """Boolean mask of the rows of ``X`` [n, d] that hold a NaN/Inf.

    A row sum is NaN/Inf whenever the row holds one; only then (or on a finite overflow) look
    closer. The row sums cost half a read of X, the element-wise check twenty.
    """
    sums_finite = torch.isfinite(X.sum(dim=1))
    if bool(sums_finite.all()):
        return ~sums_finite
    return ~torch.isfinite(X).all(dim=1)


def check_inputs(vectors: Tensor, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """Validate ``(vectors, weights)``; return them with weights normalised to sum 1.

    Raises ``ValueError`` naming the problem: wrong rank or dtype, empty input, weights of the wrong
    length, negative / all-zero / non-finite weights, non-finite rows of ``vectors`` (by index).
    """
    if not isinstance(vectors, Tensor):
        raise ValueError(f"vectors must be a torch.Tensor of shape [n, d], got {type(vectors).__name__}")
    if vectors.dim() != 2:
        raise ValueError(f"vectors must have shape [n, d], got shape {tuple(vectors.shape)}")
    n, d = vectors.shape
    if n == 0 or d == 0:
        raise ValueError(f"vectors must be non-empty, got shape {tuple(vectors.shape)}")
    if vectors.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"vectors must be float32 or float64, got {vectors.dtype}")
    bad = nonfinite_rows(vectors)
    if bool(bad.any()):
        raise ValueError(f"vectors contain NaN/Inf in rows {nonzero_rows(bad)}")
    if weights is None:
        w = torch.full((n,), 1.0 / n, dtype=vectors.dtype, device=vectors.device)
        return vectors, w
    w = torch.as_tensor(weights, device=vectors.device).to(vectors.dtype)
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"weights must have shape [{n}] to match vectors, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights contain NaN/Inf at rows {nonzero_rows(~torch.isfinite(w))}")
    if bool((w < 0).any()):
        raise ValueError(f"weights must be non-negative; negative at rows {nonzero_rows(w < 0)}")
    total = w.sum()
    if not bool(total > 0):
        raise ValueError("weights must not all be zero")
    return vectors, w / total


def check_lam(lam: float, *, upper: float = 0.5, inclusive: bool = False, rule: str = "") -> float:
    """Validate a Byzantine weight budget ``lam`` in ``[0, upper)`` (``[0, upper]`` if inclusive)."""
    lam = float(lam)
    ok = 0.0 <= lam and (lam <= upper if inclusive else lam < upper)
    if not ok or math.isnan(lam):
        bound = f"[0, {upper}]" if inclusive else f"[0, {upper})"
        raise ValueError(f"{rule or 'aggregator'}: lam must lie in {bound}, got {lam}")
    return lam


class Aggregator:
    """Base class: ``__call__`` validates, then delegates to ``_aggregate(X, w)`` (``w`` sums to 1)."""

    name: str = "aggregator"
    lam_is_budget: bool = True  # a ``lam`` argument is the Byzantine weight budget (not so for flag)

    @property
    def byzantine_budget(self) -> float | None:
        """The Byzantine weight share this rule is built to tolerate: its ``lam`` where that is the
        budget, else 1/2 (the medians' breakdown point); 0 for rules that are not robust (the mean),
        None where the rule states no budget (flag). The server warns when a run exceeds it."""
        lam = getattr(self, "lam", None)
        return lam if lam is not None and self.lam_is_budget else 0.5

    def __call__(self, vectors: Tensor, weights: Tensor | None = None) -> Tensor:
        X, w = check_inputs(vectors, weights)
        return self._aggregate(X, w)

    def aggregate_checked(self, X: Tensor, w: Tensor) -> Tensor:
        """The rule on inputs the caller has already validated (finite rows, ``w`` >= 0 summing to 1).

        The parameter server checks every message as it arrives, so it skips a second read of all
        n×d values per update here.
        """
        return self._aggregate(X, w)

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def gram(X: Tensor, center: bool | Tensor | Callable[[Tensor], Tensor] = False,
         scale: Tensor | None = None) -> Tensor:
    """The n×n Gram matrix of the rows of ``X`` as float64, after subtracting a centre: their mean if
    ``center`` is True, the point ``center`` if it is a [d] tensor, ``center(block)`` from each
    column block if it is a function (a coordinate-wise centre, computed in the same pass); rows are
    then multiplied by ``scale`` [n] if given.

    One pass (two with the mean), no n×d temporary: column blocks (about 2 MB on CPU, cache-resident;
    32 MiB elsewhere) are formed in one reused buffer and their products summed in float64. Rows
    centred at their mean keep small pairwise distances exact in X's dtype (no cancellation between
    large ||x_i||²; distances follow as ``G_ii + G_jj − 2 G_ij``), so their blocks stay in it (the
    fast path; it overflows or loses the distances when some rows are huge, which
    :func:`~lightning_byz.aggregators.distance.centred_gram` detects). Every other block is formed in
    float64, which keeps inner products exact to float64 rounding and cannot overflow on float32 input.
    """
    n, d = X.shape
    if X.device.type == "cpu":
        block = max(1, 2**19 // (1024 * n)) * 1024  # a multiple of 1024: unaligned blocks run 30x slower
    else:
        block = max(1, 2**22 // n)
    fast = center is True and scale is None
    mean = X.mean(dim=0) if center is True else None
    G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
    buffer = torch.empty(n, min(block, d), dtype=X.dtype if fast else torch.float64,
                         device=X.device)  # reused: no page faults
    for start in range(0, d, block):
        cols = slice(start, start + block)
        B = buffer[:, : min(block, d - start)]
        if fast:
            torch.sub(X[:, cols], mean[cols], out=B)
        else:
            B.copy_(X[:, cols])
            if center is True:
                B.sub_(mean[cols])
            elif isinstance(center, Tensor):
                B.sub_(center[cols])
            elif callable(center):
                B.sub_(center(X[:, cols]))
            if scale is not None:
                B.mul_(scale[:, None])
        G += B @ B.T
    return shard_sum(G)


def row_scales(X: Tensor) -> Tensor:
    """Per row of ``X``, the power of two (float64) that brings its largest entry into [1/2, 1).

    Multiplying by a power of two is exact, so a Gram matrix of the scaled rows holds the rows'
    cosines at full precision whatever their magnitudes (1e-300 or 1e300; zero rows keep scale 1).
    One pass over X.
    """
    top = shard_max(X.abs().amax(dim=1).to(torch.float64))
    return torch.ldexp(torch.ones_like(top), -torch.frexp(top).exponent).masked_fill_(top == 0, 1.0)


def pairwise_sq_dists(G: Tensor) -> Tensor:
    """Squared Euclidean distances between rows from their Gram matrix (clamped at 0).

    A row marked infinitely far (``G_ii = +inf``, zeros elsewhere in its row and column, see
    :func:`~lightning_byz.aggregators.distance.centred_gram`) is at ``inf`` from every other row.
    """
    diag = torch.diagonal(G)
    D = (diag[:, None] + diag[None, :] - 2.0 * G).clamp_min_(0.0)
    D.diagonal().zero_()
    return D


def weighted_lower_median(values: Tensor, w: Tensor) -> Tensor:
    """Along the last dim: the smallest value whose cumulative weight (values sorted ascending)
    reaches half the total. ``w`` has the shape of ``values`` or broadcasts to it; ``inf`` values
    sort last."""
    order = torch.argsort(values, dim=-1)
    cum = torch.cumsum(w.expand_as(values).gather(-1, order), dim=-1)
    total = cum[..., -1:]
    slack = total * (1e-12 * values.shape[-1])  # rounding in the cumulative sum of equal weights
    idx = (cum < 0.5 * total - slack).sum(-1, keepdim=True).clamp_max(values.shape[-1] - 1)
    return values.gather(-1, order.gather(-1, idx)).squeeze(-1)


def combine(coeffs: Tensor, X: Tensor) -> Tensor:
    """``Σ_i coeffs_i x_i`` in X's dtype: the one pass that forms a Gram-space rule's output."""
    return coeffs.to(X.dtype) @ X
