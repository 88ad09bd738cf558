"""Distance-based weighted rules computed in Gram space: GM/RFA, Krum, Multi-Krum, Bulyan, centered
clipping, nearest-neighbour mixing (NNM) and the CTMA meta-aggregator.

Every rule here only needs inner products between the n inputs and (except Bulyan's coordinate-wise
second phase) outputs a combination ``Σ c_i x_i`` of them. So one pass builds the centred n×n Gram
matrix (:func:`~lightning_byz.aggregators.base.gram`), the rule runs in n-space on the host in float64
(a few n×n operations per iteration, no device syncs inside loops, one n×n transfer when X lives on a
GPU) and one more pass forms the output (:func:`combine`). Cost: about three reads of X, independent
of the number of iterations.

Any finite magnitude. The fast Gram matrix is centred at the mean in X's dtype; a few huge rows
(Byzantine ones, say) drag the mean along and overflow it or drown the honest distances in rounding.
:func:`centred_gram` checks that in n-space and then, and only then, rebuilds the Gram matrix in
float64 about a point among the honest rows: the medoid row, or where rows at nested magnitudes hide
it, the weighted coordinate-wise median (computed block by block in the same pass). Either costs one
more read of X. A row still too far to square in float64 is *infinitely far*: every rule gives it coefficient 0 (as its distance → ∞ would), counts its weight where a rule
counts mass, and never multiplies an infinity by 0. Every loop has a hard bound.

Weights. All rules are weighted; ``w`` is normalised to sum 1 and ``lam`` is the weight fraction that
may be Byzantine (0 <= lam < 1/2). Count-based rules (Krum, Multi-Krum, Bulyan) read the weights as
multiplicities: the lightest positive row counts as one vector (the *unit* ``u``), a row of weight
``k·u`` as k identical vectors, so ``n_eff = 1/u`` vectors of which ``f = lam·n_eff`` may be Byzantine.
With uniform weights and ``lam = f/n`` every rule is the classic count-based rule with f exactly, and
integer weights (with a 1 among them) act exactly as repeated rows.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from lightning_byz.aggregators.base import (
    Aggregator,
    check_lam,
    combine,
    gram,
    pairwise_sq_dists,
    register,
    registered,
    weighted_lower_median,
)
from lightning_byz.aggregators.coordinate import closest_to_center_mean, weighted_median
from lightning_byz.sharding import shard_sum

_EPS = 1e-12  # slack for comparing weight masses computed in float64
# A row whose squared distance from the centre exceeds this is infinitely far: below it, sums of two
# squared distances and Gram entries of two such rows stay finite in float64.
_FAR = torch.finfo(torch.float64).max / 8
# The fast Gram matrix is kept while (typical squared distance of a row to the mean) · eps(dtype) ·
# _RESOLUTION <= (typical squared distance between rows): its rounding (a few eps of ||x_i − mean||²
# per entry) then stays under 1e-3 of the distances that the rules compare.
_RESOLUTION = 2.0**17


def take_prefix(avail: Tensor, budget: Tensor | float, dim: int = -1) -> Tensor:
    """Masses taken from ``avail`` (already in priority order along ``dim``) until ``budget`` is spent.

    Greedy and fractional: whole entries while they fit, the boundary entry partly, zeros after. Room
    under ``_EPS`` counts as none: masses that add up to the budget in exact arithmetic but miss it by
    rounding would otherwise hand the next entry a sliver, and a sliver of a row at 1e19 is not small.
    """
    before = avail.cumsum(dim) - avail
    room = budget - before
    return torch.minimum(room.masked_fill(room <= _EPS, 0.0), avail)


def unit_weight(w: Tensor) -> float:
    """The weight of one vector for count-based rules: the lightest positive weight (see module doc)."""
    return float(w[w > 0].min())


def _host(G: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Gram matrix and weights as float64 on the host: the n-space work is tiny and sync-free there.

    The weights are renormalised in float64, so float32 uniform weights become 1/n to float64
    precision (count bounds such as Bulyan's n >= 4f + 3 are then exact at lam = f/n)."""
    w = w.to("cpu", torch.float64)
    return G.to("cpu", torch.float64), w / w.sum()


def _resolved(G: Tensor, w: Tensor, dtype: torch.dtype) -> bool:
    """Whether the centred Gram matrix ``G`` (host float64, blocks formed in ``dtype``) resolves the
    rows' distances: finite, and the typical row so close to the centre that rounding stays far below
    the typical distance.

    "Typical" is a weighted median, which rows of less than half the weight cannot move: the distance
    of a row to the centre, and over rows, the distance to the nearest half of the other rows' weight.
    """
    if not bool(torch.isfinite(_finite_part(G)).all()):  # rows marked infinitely far may stay
        return False
    others = w.expand_as(G).clone()
    others.diagonal().zero_()
    spread = float(weighted_lower_median(weighted_lower_median(pairwise_sq_dists(G), others), w))
    offset = float(weighted_lower_median(torch.diagonal(G), w))
    return math.isfinite(offset) and offset * torch.finfo(dtype).eps * _RESOLUTION <= spread


def _mark_far(G: Tensor, far: Tensor | None = None) -> Tensor:
    """``G`` with the rows ``far`` (default: squared norm above ``_FAR``, or not a number) made
    infinitely far: ``G_ii = +inf`` and zeros in the rest of their row and column."""
    if far is None:
        far = ~(torch.diagonal(G) <= _FAR)
    if bool(far.any()):
        G = G.masked_fill(far[:, None] | far[None, :], 0.0)
        G.diagonal()[far] = math.inf
    return G


def _finite_part(G: Tensor) -> Tensor:
    """``G`` with the infinite diagonal entries of infinitely far rows replaced by 0."""
    far = torch.isinf(torch.diagonal(G))
    if bool(far.any()):
        G = G.clone()
        G.diagonal()[far] = 0.0
    return G


def centred_gram(X: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Centred Gram matrix and weights as float64 on the host, exact at any finite magnitude.

    Fast path: centred at the mean in X's dtype (:func:`gram`). If that does not resolve the rows'
    distances (:func:`_resolved`), it still tells the far rows from the rest: rebuilt in float64 about
    its medoid row, one more read of X. Should that not resolve them either (rows at nested magnitudes,
    each hiding the next in rounding) or the fast matrix have overflowed, rebuilt instead about the
    weighted coordinate-wise median, which lies inside the honest rows at every scale (computed block
    by block in the same read). Rows too far to square in float64 are marked infinitely far.
    """
    G, wh = _host(gram(X, center=True), w)
    if _resolved(G, wh, X.dtype):
        return G, wh
    if bool(torch.isfinite(G).all()):
        row = int(torch.argmax(_medoid(G, wh)))
        G = _mark_far(_host(gram(X, center=X[row]), w)[0])
        if _resolved(G, wh, torch.float64):
            return G, wh
    return _mark_far(_host(gram(X, center=lambda block: weighted_median(block, w)), w)[0]), wh


def _sq_dists_to(c: Tensor, G: Tensor) -> Tensor:
    """``||y − x_j||²`` for ``y = Σ c_i x_i`` with ``Σ c_i = 1``: ``cᵀGc − 2(Gc)_j + G_jj``.

    An infinitely far row is at ``inf``; a ``y`` that leans on one is at ``inf`` from every row.
    """
    diag = torch.diagonal(G)
    far = torch.isinf(diag)
    if bool((c[far] != 0).any()):
        return torch.full_like(c, math.inf)
    Gc = _finite_part(G) @ c
    return (c @ Gc - 2.0 * Gc + diag).clamp_min_(0.0)


def _near_mean(w: Tensor, G: Tensor) -> Tensor:
    """Coefficients of the weighted mean of the rows that are not infinitely far."""
    c = w.masked_fill(torch.isinf(torch.diagonal(G)), 0.0)
    return c / c.sum()


def _medoid(G: Tensor, w: Tensor) -> Tensor:
    """Coefficients (one-hot) of the weighted medoid: the input of positive weight minimising
    ``Σ_j w_j ||x_i − x_j||``, robust up to weight 1/2; infinitely far rows neither count nor compete.

    The costs are compared as differences to the row r nearest the centre, ``Σ_j w_j (d_ij − d_rj)``
    with ``d_ij − d_rj = (D_ij − D_rj)/(d_ij + d_rj)`` taken from the Gram matrix: the sums themselves
    would let one row at 1e30 drown every difference between honest candidates in rounding.
    """
    far = torch.isinf(torch.diagonal(G))
    finite = _finite_part(G)
    sq = torch.diagonal(finite)
    dist = pairwise_sq_dists(G).sqrt_()
    r = int(torch.argmin(torch.diagonal(G)))
    gap_sq = sq[:, None] - sq[r] - 2.0 * (finite - finite[r])  # D_ij − D_rj
    sums = dist + dist[r]
    gaps = torch.where(sums > 0, gap_sq / sums, 0.0)  # 0 towards infinitely far rows
    cost = (gaps @ w).masked_fill_((w <= 0) | far, math.inf)
    c = torch.zeros_like(w)
    c[torch.argmin(cost)] = 1.0
    return c


def _mass_order_mean(keys: Tensor, w: Tensor, mass: float) -> Tensor:
    """Coefficients of the weighted mean of the ``mass`` of rows with the smallest ``keys``."""
    order = torch.argsort(keys, stable=True)
    c = torch.zeros_like(w)
    c[order] = take_prefix(w[order], mass)
    return c / c.sum()


def _check_count_bound(rule: str, lam: float, u: float, k: int, extra: int, strict: bool) -> None:
    """Raise unless ``k·f + extra < n`` (``<=`` unless strict) in weight form: ``lam < (1 − extra·u)/k``."""
    bound = (1.0 - extra * u) / k
    if lam > bound - _EPS if strict else lam > bound + _EPS:
        op, rel = ("<", "<") if strict else ("<=", "<=")
        raise ValueError(
            f"{rule} needs {k}f + {extra} {op} n, i.e. lam {rel} (1 - {extra}/n)/{k} = {bound:.6g} for "
            f"n = {1.0 / u:.6g} unit-weight vectors; got lam = {lam}"
        )


class GramRule(Aggregator):
    """A rule whose output is ``Σ c_i x_i`` with ``c`` computed from the Gram matrix alone."""

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        """``c`` (float64, host) from the float64 host Gram matrix ``G`` and weights ``w``."""
        raise NotImplementedError

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return combine(self.coefficients(*centred_gram(X, w)).to(X.device), X)


@register("gm", "rfa")
class GeometricMedian(GramRule):
    """w-GM: ``argmin_y Σ w_i ||y − x_i||`` by smoothed weighted Weiszfeld, run in n-space.

    Each step sets ``y = Σ β_i x_i / Σ β_i`` with ``β_i = w_i / max(nu, ||y − x_i||)`` (Pillutla,
    Kakade & Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022, Alg. 2; weighted
    version: Dahan & Levy, NeurIPS 2024). It starts from the weighted mean of the half of the weight
    nearest the weighted medoid (robust: from the plain mean, rows at 1e100 take hundreds of steps to
    leave behind) and stops after ``iters`` steps or once a step moves y by at most ``tol`` times the
    weighted median distance from y to the inputs (a relative decrease of the objective cannot serve:
    far rows make the objective huge and every decrease look like 0). Weights are the multiplicities
    of the objective, so integer weights are exactly repeated rows. Breakdown: weight 1/2.
    """

    def __init__(self, nu: float = 1e-6, iters: int = 100, tol: float = 1e-7):
        if not nu > 0:
            raise ValueError(f"gm: nu (smoothing) must be > 0, got {nu}")
        if int(iters) != iters or iters < 1:
            raise ValueError(f"gm: iters must be a positive integer, got {iters}")
        if not tol >= 0:
            raise ValueError(f"gm: tol must be >= 0, got {tol}")
        self.nu, self.iters, self.tol = float(nu), int(iters), float(tol)

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:
        c, finite = _mass_order_mean(_sq_dists_to(_medoid(G, w), G), w, 0.5), _finite_part(G)
        for _ in range(self.iters):
            dist = _sq_dists_to(c, G).sqrt_()
            beta = w / dist.clamp_min(self.nu)
            step = beta / beta.sum() - c
            c = c + step
            if float(step @ finite @ step) <= (self.tol * float(weighted_lower_median(dist, w))) ** 2:
                break
        return c


def krum_scores(D2: Tensor, w: Tensor, neighbour_mass: float, u: float) -> Tensor:
    """Weighted Krum scores: ``score_i = Σ_j m_ij ||x_i − x_j||²`` over the ``neighbour_mass`` nearest x_i.

    Row i's own other copies (mass ``w_i − u``, distance 0) come first, then the other rows by
    distance, the boundary row fractionally. Rows of zero weight score ``inf`` (they are not candidates);
    so does a row whose neighbourhood reaches an infinitely far row (an untaken one adds 0, not NaN).
    """
    avail = w.expand_as(D2).clone()
    avail.diagonal().sub_(u).clamp_min_(0.0)
    order = torch.argsort(D2, dim=1, stable=True)
    taken = take_prefix(avail.gather(1, order), neighbour_mass)
    scores = torch.where(taken > 0, taken * D2.gather(1, order), 0.0).sum(1)
    return scores.masked_fill(w <= 0, math.inf)


class _KrumFamily(GramRule):
    """Shared by Krum and Multi-Krum: the weight budget and the scores of Blanchard et al. (2017)."""

    def __init__(self, lam: float):
        self.lam = check_lam(lam, rule=self.name)

    def _scores(self, G: Tensor, w: Tensor) -> tuple[Tensor, float]:
        u = unit_weight(w)
        _check_count_bound(self.name, self.lam, u, 2, 2, strict=True)
        neighbours = 1.0 - self.lam - 2.0 * u
        return krum_scores(pairwise_sq_dists(G), w, neighbours, u), u


@register("krum")
class Krum(_KrumFamily):
    """Weighted Krum: the input with the smallest sum of squared distances to its n − f − 2 neighbours.

    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017. Weights are multiplicities (module doc): neighbour sets are taken
    by weight mass ``1 − lam − 2u`` instead of by count, a row's own extra copies counting first.
    Requires ``2f + 2 < n``, i.e. ``lam < 1/2 − u``.
    """

    def __init__(self, lam: float = 0.1):
        super().__init__(lam)

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:
        scores, _ = self._scores(G, w)
        c = torch.zeros_like(w)
        c[torch.argmin(scores)] = 1.0
        return c


@register("multikrum")
class MultiKrum(_KrumFamily):
    """Weighted Multi-Krum: the weighted mean of the m inputs with the best Krum scores.

    El Mhamdi, Guerraoui & Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium",
    ICML 2018 (m = n − f by default; m = 1 is Krum). Weights are multiplicities: the rows with the
    lowest scores are kept until their weight reaches ``m·u`` (default ``1 − lam``), the boundary row
    fractionally.
    """

    def __init__(self, lam: float = 0.1, m: int | None = None):
        super().__init__(lam)
        if m is not None and (int(m) != m or m < 1):
            raise ValueError(f"multikrum: m must be a positive integer or None, got {m}")
        self.m = None if m is None else int(m)

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:
        scores, u = self._scores(G, w)
        mass = 1.0 - self.lam if self.m is None else self.m * u
        if mass > 1.0 + _EPS:
            raise ValueError(f"multikrum: m = {self.m} exceeds the n = {1.0 / u:.6g} unit-weight vectors")
        return _mass_order_mean(scores, w, min(mass, 1.0))


@register("bulyan")
class Bulyan(Aggregator):
    """Weighted Bulyan over Krum (El Mhamdi, Guerraoui & Rouault, ICML 2018), requiring n >= 4f + 3.

    Phase 1 selects θ = n − 2f vectors by repeated Krum on the remaining multiset (with the same f);
    phase 2 returns, per coordinate, the mean of the β = θ − 2f selected values closest to their
    median. Weights are multiplicities (module doc): each Krum round takes one unit ``u`` of the winning
    row, so the selection is exact on integer weights (cost: about n_eff rounds of O(n² log n) host
    work); phase 2 keeps the share ``(1 − 4·lam)/(1 − 2·lam)`` of the selected mass closest to its
    weighted median, the boundary value fractionally, the lower value first at equal distance
    (:func:`~lightning_byz.aggregators.coordinate.closest_to_center_mean`). A Krum round whose
    neighbourhood would be empty (only possible in the last rounds) uses one unit of neighbours; equal
    scores (mutual nearest neighbours) go to the row with the smaller weighted sum of squared
    distances to the remaining rows, so the result is order-free. Every round takes a positive bite of
    a remaining row, so phase 1 ends within ``Σ_i ceil(w_i/u)`` rounds (a hard bound, too).
    """

    def __init__(self, lam: float = 0.1):
        self.lam = check_lam(lam, upper=0.25, rule="bulyan")

    def selection(self, G: Tensor, w: Tensor) -> Tensor:
        """Phase 1: the selected weight of each row (host float64, sums to ``1 − 2·lam``)."""
        u = unit_weight(w)
        _check_count_bound("bulyan", self.lam, u, 4, 3, strict=False)
        D2, remaining, chosen = pairwise_sq_dists(G), w.clone(), torch.zeros_like(w)
        target, total = 1.0 - 2.0 * self.lam, 0.0
        for _ in range(int(torch.ceil(w / u).sum()) + 1):
            if total >= target - _EPS:
                break
            neighbours = max(float(remaining.sum()) - self.lam - 2.0 * u, u)
            scores = krum_scores(D2, remaining, neighbours, u)
            # Mutual nearest neighbours tie when few neighbours count: prefer the more central one.
            ties = (scores <= scores.min() * (1.0 + 1e-9)) & (remaining > 0)
            central = (torch.where(remaining > 0, D2, 0.0) @ remaining).masked_fill(~ties, math.inf)
            i = int(torch.nonzero(ties & (central == central.min()))[0])
            bite = min(u, float(remaining[i]))
            if total + bite > target + _EPS:  # only a real overshoot is cut: whole units stay equal
                bite = target - total
            chosen[i] += bite
            remaining[i] -= bite
            total += bite
        return chosen

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        chosen = self.selection(*centred_gram(X, w))
        rows = torch.nonzero(chosen > 0).flatten()
        ws = (chosen[rows] / chosen.sum()).to(X.device, X.dtype)
        # Phase 2 keeps β/θ = (1 − 4 lam)/(1 − 2 lam) of the selection (it may drop more than half).
        keep = (1.0 - 4.0 * self.lam) / (1.0 - 2.0 * self.lam)
        return closest_to_center_mean(X[rows.to(X.device)], ws, keep)


@register("cclip")
class CenteredClipping(GramRule):
    """Weighted centered clipping: ``v ← v + Σ w_i (x_i − v) min(1, tau/||x_i − v||)``, ``iters`` times.

    Karimireddy, He & Jaggi, "Learning from History for Non-IID Byzantine Robust Optimization" /
    "Learning from History for Byzantine Robust Optimization", ICML 2021. The paper starts from the
    previous aggregate (momentum); this rule is stateless, so it starts from the weighted medoid
    (``start="medoid"``: the input minimising ``Σ_j w_j ||x_i − x_j||``, robust up to weight 1/2) or
    the weighted mean (``start="mean"``; not robust: it starts where the Byzantine rows pull it).
    Infinitely far rows are left out of both starts, and a step never moves towards them. Weights are
    multiplicities of the update's sum, so integer weights are exactly repeated rows.
    """

    STARTS = ("medoid", "mean")

    def __init__(self, tau: float = 10.0, iters: int = 3, start: str = "medoid"):
        if not tau > 0:
            raise ValueError(f"cclip: tau (clipping radius) must be > 0, got {tau}")
        if int(iters) != iters or iters < 1:
            raise ValueError(f"cclip: iters must be a positive integer, got {iters}")
        if start not in self.STARTS:
            raise ValueError(f"cclip: start must be one of {self.STARTS}, got {start!r}")
        self.tau, self.iters, self.start = float(tau), int(iters), start

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:
        c = _near_mean(w, G) if self.start == "mean" else _medoid(G, w)
        for _ in range(self.iters):
            dist = _sq_dists_to(c, G).sqrt_()
            a = w * torch.where(dist > self.tau, self.tau / dist, torch.ones_like(dist))
            c = c * (1.0 - a.sum()) + a
        return c


def nnm_matrix(G: Tensor, w: Tensor, lam: float) -> Tensor:
    """Row-stochastic n×n mixing matrix of weighted NNM: row i averages the ``1 − lam`` weight mass nearest x_i."""
    D2 = pairwise_sq_dists(G)
    order = torch.argsort(D2, dim=1, stable=True)
    taken = take_prefix(w.expand_as(D2).gather(1, order), 1.0 - lam)
    M = torch.zeros_like(D2).scatter_(1, order, taken)
    return M / M.sum(1, keepdim=True)


def _check_nnm_lam(lam: float) -> float:
    lam = check_lam(lam, rule="nnm")
    if lam == 0:
        raise ValueError("nnm: lam must be > 0 (with lam = 0 every row mixes into the same weighted mean)")
    return lam


@register("nnm")
class NearestNeighbourMixing(GramRule):
    """Weighted NNM followed by the weighted mean (use ``pre="nnm"`` to put NNM in front of another rule).

    Allouah, Farhadkhani, Guerraoui, Gupta, Pinot & Stephan, "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity", AISTATS 2023: each x_i is replaced by the mean of its n − f
    nearest inputs (itself included). Weighted: by the weighted mean of the ``1 − lam`` weight mass
    nearest x_i (its own weight first), the boundary row fractionally; the mixed row keeps weight w_i.
    Alone (NNM then the mean) it is not robust: the Byzantine rows stay in the mean; it is meant to sit
    in front of a robust rule, where it shrinks the heterogeneity that rule must tolerate.
    """

    byzantine_budget = 0.0  # alone it ends in the mean

    def __init__(self, lam: float = 0.1):
        self.lam = _check_nnm_lam(lam)

    def coefficients(self, G: Tensor, w: Tensor) -> Tensor:
        return w @ nnm_matrix(G, w, self.lam)


class PreAggregated(Aggregator):
    """``rule`` applied to the NNM-mixed inputs (same weights): ``rule(M X, w)``."""

    def __init__(self, rule: Aggregator, lam: float):
        self.rule, self.lam = rule, _check_nnm_lam(lam)

    @property
    def byzantine_budget(self) -> float | None:
        """The smaller of NNM's budget and the rule's (None when the rule states none)."""
        inner = self.rule.byzantine_budget
        return None if inner is None else min(self.lam, inner)

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        G, wh = centred_gram(X, w)
        M = nnm_matrix(G, wh, self.lam)
        if isinstance(self.rule, GramRule):  # Gram of the mixed rows: M G Mᵀ, no second pass over X
            return combine((self.rule.coefficients(_mixed_gram(M, G), wh) @ M).to(X.device), X)
        return self.rule._aggregate(combine(M.to(X.device), X), w)


def _mixed_gram(M: Tensor, G: Tensor) -> Tensor:
    """Gram matrix ``M G Mᵀ`` of the mixed rows; a mixed row with weight on an infinitely far row is
    infinitely far itself."""
    far = torch.isinf(torch.diagonal(G))
    return _mark_far(M @ _finite_part(G) @ M.T, (M[:, far] > 0).any(1))


def with_pre_aggregation(pre: str, rule: Aggregator, lam: float) -> Aggregator:
    """Put the pre-aggregation ``pre`` (only ``"nnm"``) in front of ``rule``; NNM uses budget ``lam``."""
    if pre != "nnm":
        raise ValueError(f"unknown pre-aggregation {pre!r}; available: 'nnm'")
    return PreAggregated(rule, lam)


@register("ctma")
class CTMA(Aggregator):
    """w-CTMA meta-aggregator over any base rule (Dahan & Levy, NeurIPS 2024, after the CTMA of Dahan &
    Levy, "Fault Tolerant ML: Efficient Meta-Aggregation and Synchronous Training", ICML 2024).

    ``x0 = base(X, w)``; rows ordered by ``||x_i − x0||``; the closest are kept until their weight
    reaches ``1 − lam`` (the boundary row fractionally); returns their weighted mean. Weights are
    multiplicities, so the repetition law holds whenever it holds for the base. ``base`` is a rule name
    (built with ``base_kwargs``, plus ``lam`` when it takes one) or an :class:`Aggregator`. Gram-space
    bases (gm, krum, multikrum, cclip, nnm) share one Gram matrix: ctma costs about what its base does.
    """

    def __init__(self, base: str | Aggregator = "gm", lam: float = 0.1, **base_kwargs):
        self.lam = check_lam(lam, rule="ctma")
        if isinstance(base, Aggregator):
            if base_kwargs:
                raise ValueError(f"ctma: arguments {sorted(base_kwargs)} given with a built base")
            self.base = base
            return
        cls = registered(base)
        if "lam" in inspect.signature(cls).parameters:
            base_kwargs = {"lam": lam, **base_kwargs}
        try:
            self.base = cls(**base_kwargs)
        except TypeError as err:
            raise ValueError(f"ctma: bad arguments for base {base!r}: {err}") from None

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        if isinstance(self.base, GramRule):
            G, wh = centred_gram(X, w)
            dist2 = _sq_dists_to(self.base.coefficients(G, wh), G)
        else:
            x0 = self.base._aggregate(X, w)
            dist2 = shard_sum(torch.linalg.vector_norm(X - x0, dim=1, dtype=torch.float64).square_()).cpu()
            wh = w.to("cpu", torch.float64)
        c = _mass_order_mean(dist2, wh, 1.0 - self.lam)
        return combine(c.to(X.device), X)
