"""Coordinate-wise weighted rules: ``mean``, ``cwmed``, ``cwtm``, ``meamed``, ``phocas``.

Every rule here works on each coordinate alone. Per coordinate, sort the n values ascending and lay
their normalised weights end to end on [0, 1]: value k occupies ``(C_{k-1}, C_k]`` where ``C`` is
the cumulative sorted weight. A rule is then a statement about which part of [0, 1] it keeps, so
an integer weight acts exactly like that many copies of the row (the weighted rules of Dahan &
Levy, "Weight for Robustness", NeurIPS 2024), and uniform weights with ``lam = f/n`` give the
classic count-based rule with f exactly.

Speed: on CPU the columns are cut into cache-sized blocks and sorted by a Batcher network of
elementwise min/max, which beats ``torch.sort``/``torch.median`` several times for small n.
Uniform weights take a fast path: the network is pruned to the order statistics the classic rule
reads and nothing else is formed. Other weights ride through the full network beside the values,
then cumulate. On CUDA, or for many rows, ``torch.sort`` does the sorting.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lightning_byz.aggregators.base import Aggregator, check_lam, combine, register

# Columns per CPU block: the n rows of a block stay near the L2 cache, and each elementwise op is
# large enough for torch to split over its threads. (Tried: 32768 columns with the blocks shared
# among Python threads, one per core: slower, the threads contend for the GIL between ops.)
BLOCK_COLUMNS = 1 << 16
NETWORK_MAX_N = 128  # min/max network up to this many rows: ~6x faster than torch.sort at n = 60, 128


# ----------------------------------------------------------------------------- sorting machinery
@functools.lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort network on n wires (Knuth, TAOCP 3, 5.3.4, Algorithm M).

    Built for the next power of two; comparators that touch a wire >= n are dropped, which is valid
    because the missing wires would hold +inf and never move.
    """
    p = 1 << max(n - 1, 0).bit_length()
    pairs = []
    P = p // 2
    while P > 0:
        q, r, dist = p // 2, 0, P
        while dist > 0:
            pairs += [(i, i + dist) for i in range(p - dist) if i & P == r and i + dist < n]
            dist, q, r = q - P, q // 2, P
        P //= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=None)
def bitonic_merger(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's bitonic merger on n wires: sorts any sequence that falls then rises (V-shaped).

    Half-cleaners at distances p/2, p/4, ..., 1 for p the next power of two; wires >= n would hold
    +inf at the rising end, so comparators touching them are dropped.
    """
    p = 1 << max(n - 1, 0).bit_length()
    pairs, dist = [], p // 2
    while dist > 0:
        pairs += [(i, i + dist) for i in range(n - dist) if i & dist == 0]
        dist //= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=None)
def _pruned(network: tuple[tuple[int, int], ...], outputs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of ``network`` that the sorted values at ``outputs`` depend on."""
    needed, kept = set(outputs), []
    for i, j in reversed(network):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


@functools.lru_cache(maxsize=None)
def _liveness(network: tuple[tuple[int, int], ...], read: tuple[int, ...]) -> tuple[tuple[bool, bool], ...]:
    """Per comparator, whether its min and its max are read afterwards: by a later comparator, or
    at the end (the rows in ``read``). An output nobody reads is not formed."""
    live, flags = set(read), []
    for i, j in reversed(network):
        flags.append((i in live, j in live))
        if i in live or j in live:
            live |= {i, j}
    return tuple(reversed(flags))


def _run_network(network, keys: Tensor, *payloads: Tensor, read: tuple[int, ...] | None = None
                 ) -> list[list[Tensor]]:
    """Apply a min/max comparator network along dim 0 of ``keys`` [n, c], moving ``payloads`` along.

    Returns, per tensor (keys first), its n rows after the network; with ``read`` (keys alone) only
    those rows are meant to be read, and comparator outputs that they do not depend on are skipped. The
    inputs are never written: a comparator writes its min into a free scratch row and its max over
    the upper wire's scratch row (a fresh one on its first touch), so no copy pass and no allocation
    inside the loop. Payloads follow by ``lerp`` with a 0/1 swap flag, exact at 0 and 1 and several
    times faster than ``where`` on CPU.
    """
    n = keys.shape[0]
    sources = (keys, *payloads)
    scratch = keys.new_empty((len(sources), n + 1) + keys.shape[1:])
    slot: list[int | None] = [None] * n  # wire -> scratch row holding its value; None: input row
    free = list(range(n + 1))
    swap = torch.empty_like(keys[0])

    def row(t: int, wire: int) -> Tensor:
        return sources[t][wire] if slot[wire] is None else scratch[t, slot[wire]]

    wanted = [(True, True)] * len(network) if read is None else _liveness(network, read)
    for (i, j), (want_min, want_max) in zip(network, wanted):
        a, b = row(0, i), row(0, j)
        if want_min:  # a dead output's wire keeps a stale value: nothing reads it
            lo = free.pop()
            torch.minimum(a, b, out=scratch[0, lo])
        if want_max:
            hi = free.pop() if slot[j] is None else slot[j]
        if payloads:
            torch.gt(a, b, out=swap)
        for t in range(1, len(sources)):
            pa, pb = row(t, i), row(t, j)
            torch.lerp(pa, pb, swap, out=scratch[t, lo])
            torch.lerp(pb, pa, swap, out=scratch[t, hi])
        if want_max:
            torch.maximum(a, b, out=scratch[0, hi])
            slot[j] = hi
        if want_min:
            if slot[i] is not None:
                free.append(slot[i])
            slot[i] = lo
    return [[row(t, k) for k in range(n)] for t in range(len(sources))]


def _uses_network(block: Tensor) -> bool:
    return block.device.type == "cpu" and block.shape[0] <= NETWORK_MAX_N


def _blocks(X: Tensor):
    """Column slices of X: cache-sized blocks on CPU, the whole matrix elsewhere."""
    step = BLOCK_COLUMNS if X.device.type == "cpu" else X.shape[1]
    return [slice(s, s + step) for s in range(0, X.shape[1], step)]


def _order_statistics(block: Tensor, exact: tuple[int, ...], read: tuple[int, ...] | None = None
                      ) -> list[Tensor]:
    """The n rows of ``block`` sorted per column, as far as needed: rows at ``exact`` hold those order
    statistics; the others hold the remaining values in some order (so a run of rows between exact
    ones holds the right set, enough for a sum). Only the rows in ``read`` (default: all) are valid."""
    if _uses_network(block):
        return _run_network(_pruned(sorting_network(block.shape[0]), exact), block, read=read)[0]
    return list(torch.sort(block, dim=0).values)


@functools.lru_cache(maxsize=None)
def _exact_rows(n: int, coeffs: tuple[float, ...]) -> tuple[int, ...]:
    """Which order statistics to compute exactly for ``Σ_k coeffs_k · (k-th smallest)``: the rows
    used, or, when cheaper and the used rows form a run of equal coefficients, everything outside
    the run (then the run is known as a set, which is all an equally weighted sum needs)."""
    used = tuple(k for k, c in enumerate(coeffs) if c != 0.0)
    options = [used]
    if used == tuple(range(used[0], used[-1] + 1)) and len({coeffs[k] for k in used}) == 1:
        options.append(tuple(k for k in range(n) if not used[0] <= k <= used[-1]))
    def operations(rows: tuple[int, ...]) -> int:
        return sum(map(sum, _liveness(_pruned(sorting_network(n), rows), used)))

    return min(options, key=operations)


def _cumulative(W: Tensor, cuts: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Cumulative sorted weight C and C shifted down one row (C_prev, starting at 0), [n, c] each.

    Normalised weights are rounded, so ``k/n`` summed k times may miss a cut point such as ``lam``
    by an ulp and leave a sliver of an outlier's weight inside the kept mass; values within a few
    ulps of a cut are snapped onto it, which makes the repetition law and the classic equivalence
    exact. (A running sum over rows: ``cumsum`` along dim 0 is several times slower on CPU.)
    """
    n = W.shape[0]
    C_prev = torch.empty((n + 1,) + W.shape[1:], dtype=W.dtype, device=W.device)
    C_prev[0] = 0.0
    for k in range(n):
        torch.add(C_prev[k], W[k], out=C_prev[k + 1])
    C = C_prev[1:]
    tol = 8 * n * torch.finfo(W.dtype).eps
    for p in cuts:
        C.masked_fill_((C - p).abs_() <= tol, p)
    return C, C_prev[:-1]


def _sorted_weighted(block: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Column-sorted values V and the weights W that travel with them, [n, c] each."""
    if _uses_network(block):
        V, W = _run_network(sorting_network(block.shape[0]), block, w[:, None].expand_as(block))
        return torch.stack(V), torch.stack(W)
    V, idx = torch.sort(block, dim=0, stable=True)
    return V, w[idx]


def _by_distance(V: Tensor, W: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder column-sorted V (with weights W) by distance to ``center``, the lower value first at
    equal distance. Distances along sorted V fall then rise, so on CPU a bitonic merger suffices;
    values above the center get their distance raised by one ulp to put them second at ties."""
    D = (V - center).abs()
    if _uses_network(V):
        D = torch.where(V > center, torch.nextafter(D, torch.full_like(D, math.inf)), D)
        _, V, W = _run_network(bitonic_merger(V.shape[0]), D, V, W)
        return torch.stack(V), torch.stack(W)
    order = torch.sort(D, dim=0, stable=True).indices
    return V.gather(0, order), W.gather(0, order)


def _is_uniform(w: Tensor) -> bool:
    return bool((w == w[0]).all())


def _count(lam: float, n: int) -> int | None:
    """``f`` when ``lam * n`` is (within rounding) the integer f, else None."""
    f = round(lam * n)
    return f if math.isclose(lam * n, f, rel_tol=0.0, abs_tol=1e-9) else None


def _apply(X: Tensor, fn) -> Tensor:
    """``fn(block) -> [c]`` over the column blocks of X, gathered into one [d] vector."""
    out = torch.empty(X.shape[1], dtype=X.dtype, device=X.device)
    for cols in _blocks(X):
        out[cols] = fn(X[:, cols])
    return out


# ----------------------------------------------------------------------------- order statistics
@functools.lru_cache(maxsize=None)
def _trim_coefficients(n: int, lam: float) -> tuple[float, ...]:
    """Weight of each order statistic in the uniform w-CWTM: the overlap of ((k-1)/n, k/n] with
    [lam, 1 - lam], divided by 1 - 2 lam (so lam = f/n gives 1/(n-2f) on the middle n-2f)."""
    lo, hi = lam, 1.0 - lam
    def edge(k: int) -> float:  # k/n, or the cut it equals up to rounding
        return next((cut for cut in (lo, hi) if math.isclose(k / n, cut, abs_tol=1e-12)), k / n)

    edges = [edge(k) for k in range(n + 1)]
    return tuple(max(min(edges[k + 1], hi) - max(edges[k], lo), 0.0) / (hi - lo) for k in range(n))


def _uniform_order_combination(X: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """Σ_k coeffs_k · (k-th smallest value) per coordinate, reading only the order statistics used."""
    used = tuple(k for k, c in enumerate(coeffs) if c != 0.0)
    exact = _exact_rows(X.shape[0], coeffs)

    def fn(block: Tensor) -> Tensor:
        rows = _order_statistics(block, exact, used)
        out = rows[used[0]] * coeffs[used[0]]
        for k in used[1:]:
            out.add_(rows[k], alpha=coeffs[k])
        return out

    return _apply(X, fn)


def _median_coefficients(n: int) -> tuple[float, ...]:
    """Uniform weighted median: the middle value, or the midpoint of the two middle values."""
    coeffs = [0.0] * n
    coeffs[(n - 1) // 2] += 0.5
    coeffs[n // 2] += 0.5
    return tuple(coeffs)


def _weighted_median_sorted(V: Tensor, C: Tensor) -> Tensor:
    """Weighted median of sorted columns: where C first reaches 1/2; an exact tie at 1/2 gives the
    midpoint of the value ending there and the next value of positive weight."""
    lo = V.gather(0, (C < 0.5).sum(0, keepdim=True))
    hi = V.gather(0, (C <= 0.5).sum(0, keepdim=True).clamp_max_(V.shape[0] - 1))
    return (0.5 * (lo + hi)).squeeze(0)


def _trimmed_sorted(V: Tensor, C: Tensor, C_prev: Tensor, lam: float) -> Tensor:
    """Weighted mean of the mass of sorted columns inside [lam, 1 - lam] (boundary split)."""
    kept = (C.clamp_max(1.0 - lam) - C_prev.clamp_min(lam)).clamp_min_(0.0)
    return (kept * V).sum(0) / (1.0 - 2.0 * lam)


def _closest_mass_mean(V: Tensor, W: Tensor, center: Tensor, keep: float) -> Tensor:
    """Weighted mean of the weight mass ``keep`` of values closest to ``center`` (per column).

    Values are taken closest first (the lower value first at equal distance); the boundary value
    contributes only the mass still missing.
    """
    V, W = _by_distance(V, W, center)
    C, C_prev = _cumulative(W, (keep,))
    kept = (C.clamp_max(keep) - C_prev).clamp_min_(0.0)
    return (kept * V).sum(0) / keep


def _window_mean(V: list[Tensor], center: Tensor, k: int) -> Tensor:
    """Classic rule: mean of the k values closest to ``center`` (the lower first at equal distance),
    from the rows ``V`` sorted at least at positions j < g and j >= k, g = n - k the values dropped
    (a run of rows between those need only hold the right set: it is summed).

    The kept values form a window V[a : a + k] with a in 0..g, and sliding it past j helps iff V[j]
    is strictly farther from the center than V[j + k]; along sorted rows that holds for j < a and
    fails after, so a counts the j < g where it holds. When less than half is dropped (g < k) the
    window is the middle V[g : k] plus, for each j < g, the closer of V[j] and V[j + k]: g
    selections, no sums of excluded outliers. Otherwise the k rows from a are gathered."""
    n = len(V)
    g = n - k
    farther = [center - V[j] > V[j + k] - center for j in range(g)]
    if g >= k:
        start = torch.stack(farther).sum(0)
        return torch.stack(V).gather(0, start + torch.arange(k, device=start.device)[:, None]).mean(0)
    total = V[g].clone()
    for row in V[g + 1 : k]:
        total += row
    for j in range(g):
        total += torch.where(farther[j], V[j + k], V[j])
    return total / k


# ----------------------------------------------------------------------------- public functions
def weighted_median(X: Tensor, w: Tensor) -> Tensor:
    """w-CWMed of validated ``X`` [n, d] with weights ``w`` summing to 1 (see :class:`CWMed`)."""
    n = X.shape[0]
    if _is_uniform(w):
        return _uniform_order_combination(X, _median_coefficients(n))

    def fn(block: Tensor) -> Tensor:
        V, W = _sorted_weighted(block, w)
        C, _ = _cumulative(W, (0.5,))
        return _weighted_median_sorted(V, C)

    return _apply(X, fn)


def weighted_trimmed_mean(X: Tensor, w: Tensor, lam: float) -> Tensor:
    """w-CWTM of validated ``X`` [n, d], weights ``w`` summing to 1, trimming mass ``lam`` per end."""
    lam = check_lam(lam, rule="cwtm")
    if _is_uniform(w):
        return _uniform_order_combination(X, _trim_coefficients(X.shape[0], lam))

    def fn(block: Tensor) -> Tensor:
        V, W = _sorted_weighted(block, w)
        C, C_prev = _cumulative(W, (lam, 1.0 - lam))
        return _trimmed_sorted(V, C, C_prev, lam)

    return _apply(X, fn)


CENTERS = ("median", "trimmed")


def closest_to_center_mean(X: Tensor, w: Tensor, keep: float, center: str = "median",
                           lam: float = 0.0) -> Tensor:
    """Per coordinate, the weighted mean of the weight mass ``keep`` (in (0, 1]) closest to a centre:
    the w-CWMed (``center="median"``, Meamed and Bulyan's second phase) or the w-CWTM with budget
    ``lam`` (``"trimmed"``, Phocas), for validated ``X`` [n, d] and ``w`` summing to 1.

    Values are taken closest first, the lower value first at equal distance; the boundary value
    contributes only the mass still missing. Uniform weights with ``keep = k/n`` keep exactly the
    k values closest to the classic centre, any k (more than half may be dropped).
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    lam = check_lam(lam, rule="trimmed centre")
    n = X.shape[0]
    k, f = _count(keep, n), _count(lam, n)
    if _is_uniform(w) and k is not None and (center == "median" or f is not None):
        # Exact: the rows the window compares (all of them when more than half is dropped) and
        # the centre's: the median, or the f lowest and f highest around a trimmed middle that is
        # only summed.
        middle = ((n - 1) // 2, n // 2) if center == "median" else ()
        exact = tuple(j for j in range(n) if j < n - k or j >= k or j in middle
                      or (center == "trimmed" and not f <= j < n - f))

        def fn(block: Tensor) -> Tensor:
            V = _order_statistics(block, exact)
            if center == "median":
                mid = 0.5 * (V[middle[0]] + V[middle[1]])
            else:
                mid = sum(V[f : n - f]) / (n - 2 * f)
            return _window_mean(V, mid, k)

        return _apply(X, fn)

    def fn(block: Tensor) -> Tensor:
        V, W = _sorted_weighted(block, w)
        C, C_prev = _cumulative(W, (0.5,) if center == "median" else (lam, 1.0 - lam))
        mid = _weighted_median_sorted(V, C) if center == "median" else _trimmed_sorted(V, C, C_prev, lam)
        return _closest_mass_mean(V, W, mid, keep)

    return _apply(X, fn)


# ----------------------------------------------------------------------------- registered rules
@register("mean")
class Mean(Aggregator):
    """Weighted mean Σ w_i x_i: weights are the share of each row. Not robust (breakdown 0)."""

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return combine(w, X)


@register("cwmed")
class CWMed(Aggregator):
    """w-CWMed (Dahan & Levy, NeurIPS 2024; Yin et al., ICML 2018 when unweighted).

    Per coordinate, the value at which the cumulative weight of the sorted values reaches 1/2; when
    it reaches 1/2 exactly at the end of a value, the midpoint of that value and the next one, which
    is the classic even-n median and keeps integer weights equal to repeated rows. Weights are the
    mass of each row; robust while the Byzantine weight stays below 1/2.
    """

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return weighted_median(X, w)


class _Trimming(Aggregator):
    """Rules with a Byzantine weight budget ``lam`` in [0, 1/2)."""

    def __init__(self, lam: float = 0.0):
        self.lam = check_lam(lam, rule=self.name)


@register("cwtm")
class CWTM(_Trimming):
    """w-CWTM (Dahan & Levy, NeurIPS 2024; Yin et al., ICML 2018 when unweighted).

    Per coordinate, drop weight mass ``lam`` from each end of the sorted values (a value across the
    cut keeps the part of its weight inside) and return the weighted mean of the rest. Uniform
    weights with ``lam = f/n`` trim exactly f values per side. ``lam`` < 1/2 always leaves mass
    1 - 2 lam > 0, so any n works.
    """

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return weighted_trimmed_mean(X, w, self.lam)


@register("meamed")
class Meamed(_Trimming):
    """Weighted MeaMed (Xie, Koyejo & Gupta, "Generalized Byzantine-tolerant SGD", 2018).

    Per coordinate, take values closest to the weighted median until their weight reaches
    1 - ``lam`` (the boundary value fractionally, the lower value first at equal distance) and
    return their weighted mean. Uniform weights with ``lam = f/n`` keep the classic n - f values.
    """

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return closest_to_center_mean(X, w, 1.0 - self.lam)


@register("phocas")
class Phocas(_Trimming):
    """Weighted Phocas (Xie, Koyejo & Gupta, "Phocas: dimensional Byzantine-resilient SGD", 2018).

    As :class:`Meamed` but centred on the w-CWTM with the same ``lam``: the weighted mean of the
    mass 1 - ``lam`` closest to the trimmed mean. Uniform weights with ``lam = f/n`` give the
    classic Phocas_f (mean of the n - f values nearest to Trmean_f).
    """

    def _aggregate(self, X: Tensor, w: Tensor) -> Tensor:
        return closest_to_center_mean(X, w, 1.0 - self.lam, "trimmed", self.lam)
