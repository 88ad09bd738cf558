"""Flag Aggregator (FA), weighted, solved by IRLS entirely in n-space (n = number of workers).

Source: seed ``flag-aggregator.txt`` (eq. 5, Algorithm 1, "Implementation Details"); the IRLS is the
flag-median iteration of Mankovich et al., "The Flag Median and FlagIRLS" (CVPR 2022). FA finds an
orthonormal ``Y`` (d×m) minimising, with this project's per-worker weights ``w_i`` (summing to 1)::

    A(Y) = Σ_i w_i sqrt(1 − ||Yᵀx_i||²/||x_i||²)  +  lam · R(Y)
    R(Y) = Σ_{i≠j} w_i w_j / (1 − Σ_k w_k²) · sqrt(1 − ||Yᵀ(x_i − x_j)||² / ||x_i − x_j||²)

For uniform weights ``A`` is the paper's eq. 5 divided by n, with the seed's data-dependent regulariser
(its 1/(p−1) pairwise sum); so ``lam`` is the paper's λ (it suggests λ = Θ(n)). ``lam`` is this
regulariser's weight, NOT a Byzantine budget as in the other rules. ``x_i`` are the raw inputs g_i in
``normalize="none"`` and the unit directions ĝ_i = g_i/||g_i|| otherwise (the data term is the same
either way; only the pair differences change). Algorithm 1's line 5 writes the regulariser as a shift
of G by λ∇R; we instead minimise eq. 5 itself, treating each unit pair difference as one more
reweighted atom (below), which keeps the monotone-descent guarantee.

IRLS (a majorise–minimise scheme). Every term is ω_k sqrt(1 − v_k) for a unit "atom" a_k (the ĝ_i
with ω_i = w_i, the unit pair differences with their regulariser weights) and v_k = ||Yᵀa_k||².
Since sqrt is concave, each step maximises Σ_k ω_k (|1 − v_k| + ε)^(−1/2) ||Yᵀa_k||² at the previous
v_k: Y = top-m eigenvectors of Σ_k c_k a_k a_kᵀ, i.e. the top-m left singular vectors of the atom
matrix with column k scaled by sqrt(ω_k)(|1 − v_k| + ε)^(−1/4). The smoothed objective
Σ_k ω_k sqrt(|1 − v_k| + ε) never increases (kept in ``FlagSolution.objective``). Start: v = 0
(weighted PCA of the atoms). Stop after ``iters`` updates or when the objective drops by ≤ ``tol``.

Everything in n-space. Let X̂ (n×d) hold the ĝ_i, K̂ = X̂X̂ᵀ (one float64 pass over the data; one more
when some norm would under- or overflow, see :func:`unit_gram`), and
K̂ = E Σ Eᵀ restricted to its numerical range (eigenvalues > n·eps(dtype)·max, r of them). Then
Q = X̂ᵀ E Σ^(−1/2) is an orthonormal basis of span{g_i}, and every atom is a_k = X̂ᵀ C_k for a
coefficient column C_k (e_i, or (s_i e_i − s_j e_j)/||x_i − x_j|| with s the norms or ones), so
Qᵀa_k = Σ^(1/2) Eᵀ C_k =: F_k (r-vector). Writing Y = Q V (V r×m orthonormal):

    Σ_k c_k a_k a_kᵀ = Q (Σ_k c_k F_k F_kᵀ) Qᵀ  =>  V = top-m eigenvectors of T = F diag(c) Fᵀ (r×r)
    Yᵀa_k = Vᵀ F_k,   so v_k = ||Vᵀ F_k||²,
    Y Yᵀ X̂ᵀ c = X̂ᵀ E Σ^(−1/2) V Vᵀ Σ^(1/2) Eᵀ c.

This is the brief's G̃ = ĜD form (Y = G̃ V' Λ^(−1/2) with (V', Λ) the top eigenpairs of D(ĜᵀĜ)D)
expressed in the fixed basis Q, which keeps YᵀY = I exact even when a reweighted column vanishes.
One more pass forms the output Σ_i β_i g_i. Cost: d·n² for the Gram, n-space work per iteration
(r³ + r·q with q atoms), d·n for the output; never a d×d matrix, never an SVD of the d×n matrix.

Output scale (a choice of ours, the paper leaves it open): with u = YYᵀ Σ_i w_i ĝ_i,
  ``"none"``:   YYᵀ Σ_i w_i g_i, the paper's (1/p)YYᵀG1 (with m ≥ rank G: the weighted mean);
  ``"unit"``:   u. The released FA code returns Σ_i YYᵀĝ_i / m = (n/m)·u for uniform weights; we drop the
                constant n/m (a learning rate absorbs it) so integer weights still act as repetitions;
  ``"median"``: ν·u, ν the weighted (lower) median of the ||g_i||: gradient scale is kept, and when all
                norms agree and m ≥ rank it is the weighted mean. Default.

Edge cases (all defined, never NaN): a zero vector is explained by every subspace (term 0, direction
none, still counted in the weights, norms and the mean); duplicated vectors are one atom with their
weights added, their pair terms are 0/0 and dropped (so are pairs closer than rounding); m larger than
the numerical rank r of K̂ uses Y = the whole span (output: the projection is the identity); n = 1, 2
have m = n (default) ≥ r, so "none" returns the weighted mean; all-zero input returns zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_byz.aggregators.base import (
    Aggregator,
    check_inputs,
    combine,
    gram,
    register,
    row_scales,
    weighted_lower_median,
)

NORMALIZE_MODES = ("median", "unit", "none")
# Squared norms outside [_TINY, _HUGE] may have under- or overflowed in the plain Gram matrix.
_TINY, _HUGE = 2.0**-900, 2.0**900


def _reciprocal(norms: Tensor) -> Tensor:
    """``1/norms``, and 0 for zero rows (they have no direction), never inf."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def unit_gram(X: Tensor) -> tuple[Tensor, Tensor]:
    """Cosines ``K̂`` (n×n, float64, 0 for zero rows) and norms of the rows of ``X``, at any finite
    magnitude: from the plain Gram matrix (one pass) unless some squared norm is non-finite or
    outside [_TINY, _HUGE] (zero rows included), then from the Gram matrix of the rows scaled by
    powers of two (:func:`row_scales`, one more pass), whose norms are exact."""
    scale = None
    K = gram(X, center=False)
    sq = torch.diagonal(K)
    if not bool(((sq >= _TINY) & (sq <= _HUGE)).all()):
        scale = row_scales(X)
        K = gram(X, center=False, scale=scale)
    norms = torch.diagonal(K).clamp_min(0.0).sqrt()
    inv = _reciprocal(norms)
    return inv[:, None] * K * inv[None, :], norms if scale is None else norms / scale


@dataclass(frozen=True)
class FlagSolution:
    """What :meth:`FlagAggregator.solve` found (n-space quantities are float64).

    ``output = coefficients @ vectors``; the subspace is ``Y = vectors.T @ basis`` (min(m, r)
    orthonormal columns, r the numerical rank); ``objective[t]`` is the smoothed objective after the (t+1)-th subspace update.
    """

    output: Tensor
    coefficients: Tensor
    basis: Tensor
    objective: Tensor


@register("flag", "fa")
class FlagAggregator(Aggregator):
    """Weighted Flag Aggregator (see the module docstring for the objective, the IRLS and scaling).

    Args:
        m: subspace dimension, 1 ≤ m ≤ n; default ceil((n + 1)/2) as in the seed.
        lam: weight of the pairwise regulariser R (0 = none); not a Byzantine budget.
        iters: maximum number of IRLS subspace updates (seed: 5).
        tol: stop once the objective decreases by at most this much (seed: 1e-10).
        normalize: "median" (default), "unit" or "none": how the output is scaled.
        eps: IRLS smoothing ε in (|1 − v| + ε)^(−1/2); keeps the reweighting finite.
    Weights w_i multiply worker i's term in the objective and its vector in the output mean.
    With ``pre="nnm"``, NNM's Byzantine budget must be given as ``pre_lam``.
    """

    lam_is_budget = False
    byzantine_budget = None  # robustness measured, not stated as a weight share

    def __init__(self, m: int | None = None, lam: float = 0.0, iters: int = 5, tol: float = 1e-10,
                 normalize: str = "median", eps: float = 1e-8):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"flag: m must be a positive int or None, got {m!r}")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"flag: iters must be an int >= 1, got {iters!r}")
        for name, value, positive in (("lam", lam, False), ("tol", tol, False), ("eps", eps, True)):
            value = float(value)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"flag: {name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"flag: normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        self.m, self.lam, self.iters, self.tol = m, float(lam), iters, float(tol)
        self.normalize, self.eps = normalize, float(eps)

    def solve(self, vectors: Tensor, weights: Tensor | None = None) -> FlagSolution:
        """Validate, run the IRLS and return the output with the subspace and objective trace."""
        X, w = check_inputs(vectors, weights)
        return self._solve(X, w)

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return self._solve(X, w).output

    def _subspace_dim(self, n: int) -> int:
        m = math.ceil((n + 1) / 2) if self.m is None else self.m
        if m > n:
            raise ValueError(f"flag: m={m} exceeds the number of vectors n={n}")
        return m

    def _atoms(self, Kh: Tensor, scale: Tensor, w: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
        """Coefficients C (n×q, in the ĝ basis) and weights ω (q) of the unit atoms of the objective."""
        n = Kh.shape[0]
        nonzero = scale > 0
        C, omega = torch.eye(n, dtype=Kh.dtype, device=Kh.device), w.to(Kh.dtype) * nonzero
        pair_norm = 1.0 - (w.to(Kh.dtype) ** 2).sum()
        if self.lam == 0.0 or n < 2 or not bool(pair_norm > 0):
            return C, omega
        i, j = torch.triu_indices(n, n, 1, device=Kh.device)
        si, sj = scale[i], scale[j]
        sq_i, sq_j = si * si * Kh[i, i], sj * sj * Kh[j, j]
        dist2 = sq_i + sq_j - 2.0 * si * sj * Kh[i, j]
        distinct = dist2 > (sq_i + sq_j) * rtol
        dist = torch.where(distinct, dist2, torch.ones_like(dist2)).sqrt()
        pairs = torch.zeros(n, i.numel(), dtype=Kh.dtype, device=Kh.device)
        cols = torch.arange(i.numel(), device=Kh.device)
        pairs[i, cols] = si / dist
        pairs[j, cols] = -sj / dist
        pair_omega = 2.0 * self.lam * (w[i] * w[j]).to(Kh.dtype) / pair_norm * distinct
        return torch.cat([C, pairs], dim=1), torch.cat([omega, pair_omega])

    def _solve(self, X: Tensor, w: Tensor) -> FlagSolution:
        n = X.shape[0]
        m = self._subspace_dim(n)
        Kh, norms = unit_gram(X)
        inv = _reciprocal(norms)
        evals, E = torch.linalg.eigh(Kh)
        rtol = n * torch.finfo(X.dtype).eps
        keep = evals > evals[-1].clamp_min(0.0) * rtol
        if not bool(keep.any()):  # all vectors are zero
            zeros = torch.zeros(n, dtype=torch.float64, device=X.device)
            return FlagSolution(torch.zeros_like(X[0]), zeros, zeros[:, None][:, :0], zeros[:0])
        root, E = evals[keep].sqrt(), E[:, keep]

        unit_scale = (norms > 0).to(torch.float64)
        # Pair atoms are unit vectors: dividing the norms by a power of two near the largest is exact
        # where nothing overflows and keeps the squared pair distances finite where it would.
        top = norms.max()
        relative = norms / torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent) if top > 0 else norms
        C, omega = self._atoms(Kh, relative if self.normalize == "none" else unit_scale, w, rtol)
        F = root[:, None] * (E.T @ C)  # Qᵀ a_k, r×q
        V, history = self._irls(F, omega, min(m, root.numel()))

        wd = w.to(torch.float64)
        mean_coef = {"none": wd * norms, "unit": wd * unit_scale,
                     "median": wd * unit_scale * weighted_lower_median(norms, wd)}[self.normalize]
        P = E @ (V / root[:, None])  # Y = X̂ᵀ P
        beta_hat = P @ (V.T @ (root * (E.T @ mean_coef)))
        coefficients = inv * beta_hat
        return FlagSolution(combine(coefficients, X), coefficients, inv[:, None] * P, history)

    def _irls(self, F: Tensor, omega: Tensor, m: int) -> tuple[Tensor, Tensor]:
        """Flag-median IRLS on the atoms' basis coordinates F (r×q): V (r×m) and the objective trace."""
        explained = torch.zeros_like(omega)
        history: list[Tensor] = []
        for _ in range(self.iters):
            c = omega * ((1.0 - explained).abs() + self.eps).rsqrt()
            V = torch.linalg.eigh((F * c) @ F.T)[1][:, -m:]
            explained = ((V.T @ F) ** 2).sum(dim=0)
            history.append((omega * ((1.0 - explained).abs() + self.eps).sqrt()).sum())
            if len(history) > 1 and bool(history[-2] - history[-1] <= self.tol):
                break
        return V, torch.stack(history)
