"""Coordinate-wise weighted rules: ``mean``, ``cwmed``, ``cwtm``, ``meamed``, ``phocas``.

Every rule here works on each coordinate alone. Per coordinate, sort the n values ascending and lay
their normalised weights end to end on [0, 1]: value k occupies ``(C_{k-1}, C_k]`` where ``C`` is
the cumulative sorted weight. A rule is then a statement about which part of [0, 1] it keeps, so
an integer weight acts exactly like that many copies of the row (the weighted rules of Dahan &
Levy, "Weight for Robustness", NeurIPS 2024), and uniform weights with ``lam = f/n`` give the
classic count-based rule with f exactly.

Two implementations of the same maths: on CPU (up to ``KERNEL_MAX_N`` rows) a fused numba kernel
(:mod:`~lightning_byz.aggregators.coordinate_cpu`) sorts cache-sized blocks of columns with a Batcher
network, 5-12x a mean at n = 17 whether weighted or not; elsewhere (CUDA, many rows) ``torch.sort``
does the sorting and torch ops the rest. Both use the networks, cut-point snapping and tie rules
defined here, and the tests hold them to each other.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch
from torch import Tensor

from lightning_byz.aggregators import coordinate_cpu
from lightning_byz.aggregators.base import Aggregator, check_lam, combine, register

# The CPU kernel's network grows as n log^2 n, yet at n = 128 / 256 / 512 (d = 1e5, weighted median) it
# still ran 16x / 22x / 17x faster than the torch.sort path; the cap only bounds its per-block buffers.
KERNEL_MAX_N = 1024
_KERNEL_LOCK = threading.Lock()
BLOCK_COLUMNS = 1 << 16  # columns per block of the torch path on CPU: bounds its temporary memory


# ----------------------------------------------------------------------------- sorting networks
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
def _pair_array(network: tuple[tuple[int, int], ...]) -> np.ndarray:
    return np.array(network, dtype=np.int64).reshape(-1, 2)


def snap_tolerance(n: int, dtype: torch.dtype) -> float:
    """How near a cumulative weight must come to a cut point to be snapped onto it (see _cumulative)."""
    return 8 * n * torch.finfo(dtype).eps


def _is_uniform(w: Tensor) -> bool:
    return bool((w == w[0]).all())


# ----------------------------------------------------------------------------- CPU kernel path
def _uses_kernel(X: Tensor) -> bool:
    return X.device.type == "cpu" and X.shape[0] <= KERNEL_MAX_N


def _kernel(X: Tensor, w: Tensor, center: int, lam: float = 0.0, keep: float = 0.0) -> Tensor:
    """Run :func:`coordinate_cpu.coordinate_rule` on CPU tensors with torch's thread count.

    Numba's OpenMP pool shares torch's OpenMP runtime, and starting it sets the runtime's thread count
    to numba's (all cores): torch, set to one thread, then ran on two. A simulated run with w-CWMed
    on one thread used 2.1x the CPU time (8.7 s vs 4.1 s) and its wall time doubled on a busy machine;
    so torch's count is put back."""
    n = X.shape[0]
    X = X.detach().contiguous()
    out = torch.empty(X.shape[1], dtype=X.dtype)
    dtype = out.numpy().dtype
    consts = np.array([lam, 1.0 - lam, 1.0 - 2.0 * lam, keep, snap_tolerance(n, X.dtype), 0.5, 0.0], dtype=dtype)
    bits = np.empty(0, dtype=f"int{8 * dtype.itemsize}")
    with _KERNEL_LOCK:  # numba's threading layers need not support concurrent launches (shard threads)
        torch_threads = torch.get_num_threads()
        numba.set_num_threads(min(torch_threads, numba.config.NUMBA_NUM_THREADS))
        coordinate_cpu.coordinate_rule(X.numpy(), w.detach().contiguous().numpy(), not _is_uniform(w),
                                       _pair_array(sorting_network(n)), _pair_array(bitonic_merger(n)),
                                       center, consts, bits, out.numpy())
        if torch.get_num_threads() != torch_threads:  # numba's first launch of its OpenMP pool resets it
            torch.set_num_threads(torch_threads)
    return out


# ----------------------------------------------------------------------------- torch path
def _cumulative(W: Tensor, cuts: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Cumulative sorted weight C and C shifted down one row (C_prev, starting at 0), [n, c] each.

    Normalised weights are rounded, so ``k/n`` summed k times may miss a cut point such as ``lam``
    by an ulp and leave a sliver of an outlier's weight inside the kept mass; values within a few
    ulps of a cut are snapped onto it, which makes the repetition law and the classic equivalence
    exact. The sum runs row by row in W's dtype, as the CPU kernel's does.
    """
    n = W.shape[0]
    C_prev = torch.empty((n + 1,) + W.shape[1:], dtype=W.dtype, device=W.device)
    C_prev[0] = 0.0
    for k in range(n):
        torch.add(C_prev[k], W[k], out=C_prev[k + 1])
    C = C_prev[1:]
    tol = snap_tolerance(n, W.dtype)
    for p in cuts:
        C.masked_fill_((C - p).abs_() <= tol, p)
    return C, C_prev[:-1]


def _sorted_weighted(block: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Column-sorted values V and the weights W that travel with them, [n, c] each."""
    V, idx = torch.sort(block, dim=0, stable=True)
    return V, w[idx]


def _by_distance(V: Tensor, W: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """Reorder column-sorted V (with weights W) by distance to ``center``, the lower value first at
    equal distance: values above the centre get their distance raised by one ulp, so that ties by
    rounding also go to the lower value, then a stable sort keeps sorted order among equals."""
    D = (V - center).abs()
    D = torch.where(V > center, torch.nextafter(D, torch.full_like(D, torch.inf)), D)
    order = torch.sort(D, dim=0, stable=True).indices
    return V.gather(0, order), W.gather(0, order)


def _apply(X: Tensor, fn) -> Tensor:
    """``fn(block) -> [c]`` over column blocks of X (bounded on CPU, whole elsewhere), into one [d] vector."""
    step = BLOCK_COLUMNS if X.device.type == "cpu" else X.shape[1]
    out = torch.empty(X.shape[1], dtype=X.dtype, device=X.device)
    for start in range(0, X.shape[1], step):
        cols = slice(start, start + step)
        out[cols] = fn(X[:, cols])
    return out


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


# ----------------------------------------------------------------------------- public functions
def weighted_median(X: Tensor, w: Tensor) -> Tensor:
    """w-CWMed of validated ``X`` [n, d] with weights ``w`` summing to 1 (see :class:`CWMed`)."""
    if _uses_kernel(X):
        return _kernel(X, w, coordinate_cpu.MEDIAN)

    def fn(block: Tensor) -> Tensor:
        V, W = _sorted_weighted(block, w)
        C, _ = _cumulative(W, (0.5,))
        return _weighted_median_sorted(V, C)

    return _apply(X, fn)


def weighted_trimmed_mean(X: Tensor, w: Tensor, lam: float) -> Tensor:
    """w-CWTM of validated ``X`` [n, d], weights ``w`` summing to 1, trimming mass ``lam`` per end."""
    lam = check_lam(lam, rule="cwtm")
    if _uses_kernel(X):
        return _kernel(X, w, coordinate_cpu.TRIMMED, lam)

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
    if _uses_kernel(X):
        return _kernel(X, w, coordinate_cpu.MEDIAN if center == "median" else coordinate_cpu.TRIMMED, lam, keep)

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

    byzantine_budget = 0.0

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
