"""Coordinate-wise rules (mean, cwmed, cwtm, meamed, phocas): the maths pinned by properties.

References are written independently here: per-coordinate Python loops with exact rational weight
arithmetic (``fractions.Fraction``) for the weighted rules, and the textbook count-based rules for
the classic equivalence.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_byz.aggregators import coordinate, coordinate_cpu, get_aggregator
from lightning_byz.aggregators.coordinate import (
    bitonic_merger,
    closest_to_center_mean,
    sorting_network,
    weighted_median,
    weighted_trimmed_mean,
)

RULES = ("mean", "cwmed", "cwtm", "meamed", "phocas")
LAM_RULES = ("cwtm", "meamed", "phocas")


# ----------------------------------------------------------------------------- references
def _pairs(col, w):
    return sorted(zip(map(float, col), map(Fraction, w)), key=lambda p: p[0])


def ref_median(col, w):
    pairs, total = _pairs(col, w), sum(map(Fraction, w))
    cum, lo, hi = Fraction(0), None, None
    for v, wi in pairs:
        cum += wi
        if lo is None and 2 * cum >= total:
            lo = v
        if hi is None and 2 * cum > total:
            hi = v
    return (Fraction(lo) + Fraction(hi)) / 2


def ref_trimmed(col, w, lam):
    pairs, total = _pairs(col, w), sum(map(Fraction, w))
    lo, hi = lam * total, (1 - lam) * total
    cum, acc = Fraction(0), Fraction(0)
    for v, wi in pairs:
        kept = max(min(cum + wi, hi) - max(cum, lo), 0)
        acc += kept * Fraction(v)
        cum += wi
    return acc / (hi - lo)


def ref_closest(col, w, center, lam, lower_first=True):
    """Mass 1 - lam closest to center, nearest first, lower value first at equal distance."""
    side = 1 if lower_first else -1
    pairs = sorted(_pairs(col, w), key=lambda p: (abs(Fraction(p[0]) - center), side * p[0]))
    total = sum(map(Fraction, w))
    need, acc = (1 - lam) * total, Fraction(0)
    left = need
    for v, wi in pairs:
        take = min(wi, left)
        acc += take * Fraction(v)
        left -= take
    return acc / need


def reference(name, X, w, lam, lower_first=True):
    """Per-coordinate loop reference of a weighted rule (lam a Fraction)."""
    out = []
    for col in X.T.tolist():
        if name == "mean":
            r = sum(Fraction(v) * Fraction(wi) for v, wi in zip(col, w)) / sum(map(Fraction, w))
        elif name == "cwmed":
            r = ref_median(col, w)
        elif name == "cwtm":
            r = ref_trimmed(col, w, lam)
        elif name == "meamed":
            r = ref_closest(col, w, ref_median(col, w), lam, lower_first)
        else:
            r = ref_closest(col, w, ref_trimmed(col, w, lam), lam, lower_first)
        out.append(float(r))
    return torch.tensor(out, dtype=torch.float64)


def classic(name, X, f):
    """Textbook count-based rules on the rows of X (uniform weights), numpy only."""
    A = np.sort(X.numpy(), axis=0)
    n = A.shape[0]
    if name == "mean":
        return A.mean(0)
    if name == "cwmed":
        return np.median(A, axis=0)
    if name == "cwtm":
        return A[f : n - f].mean(0)
    center = np.median(A, axis=0) if name == "meamed" else A[f : n - f].mean(0)
    out = []
    for j in range(A.shape[1]):
        col = A[:, j]
        keep = sorted(col, key=lambda v: (abs(v - center[j]), v))[: n - f]
        out.append(np.mean(keep))
    return np.array(out)


def make(name, lam):
    return get_aggregator(name, lam=float(lam)) if name in LAM_RULES else get_aggregator(name)


# ----------------------------------------------------------------------------- strategies
small_values = st.integers(-4, 4)  # ties on purpose: they are where rules are easy to get wrong


@st.composite
def weighted_problem(draw, max_n=6, max_d=3):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    X = torch.tensor(draw(st.lists(st.lists(small_values, min_size=d, max_size=d), min_size=n, max_size=n)),
                     dtype=torch.float64)
    w = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n).filter(lambda ws: sum(ws) > 0))
    total = sum(w)
    f = draw(st.integers(0, (total - 1) // 2))
    return X, w, Fraction(f, total)


# ----------------------------------------------------------------------------- properties
def test_networks_sort_every_small_n():
    """Batcher's network sorts anything and the bitonic merger sorts V-shaped columns (nearest first,
    the lower value first at equal distance), with payloads following, as the CPU kernel runs them."""
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 41):
        assert all(0 <= i < j < n for i, j in sorting_network(n) + bitonic_merger(n))
        X = torch.randint(0, 4, (n, 64), generator=gen).double()
        V, tag = X.numpy().copy(), np.repeat(np.arange(n, dtype=np.float64)[:, None], 64, axis=1)
        coordinate_cpu._sort(V, tag, True, coordinate._pair_array(sorting_network(n)), 64)
        assert np.array_equal(V, X.sort(0).values.numpy())
        assert np.array_equal(np.take_along_axis(X.numpy(), tag.astype(np.int64), 0), V)
        center = torch.randint(-1, 5, (64,), generator=gen).double().numpy()
        D = np.abs(V - center)  # falls, then rises along sorted V
        S, T = V.copy(), tag.copy()
        coordinate_cpu._merge_by_distance(D, S, T, True, coordinate._pair_array(bitonic_merger(n)), 64)
        order = np.lexsort((V, np.abs(V - center)), axis=0)  # by distance, then by value
        assert np.array_equal(S, np.take_along_axis(V, order, 0))
        assert np.array_equal(np.take_along_axis(X.numpy(), T.astype(np.int64), 0), S)


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=40, deadline=None)
@given(problem=weighted_problem())
def test_integer_weights_equal_repeated_rows_and_reference(name, problem):
    X, w, lam = problem
    agg = make(name, lam)
    repeated = X.repeat_interleave(torch.tensor(w), dim=0)
    got = agg(X, torch.tensor(w, dtype=torch.float64))
    if name != "phocas":
        torch.testing.assert_close(got, agg(repeated), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, reference(name, X, w, lam), rtol=1e-12, atol=1e-12)
        return
    # Phocas' centre is a weighted mean rounded in floating point, so a value pair at exactly
    # equal distance from it (two equally weighted values: the centre is their midpoint) is split
    # by rounding: accept either tie order, coordinate by coordinate.
    refs = torch.stack([reference(name, X, w, lam, lower_first=lf) for lf in (True, False)])
    for out in (got, agg(repeated)):
        assert ((out - refs).abs() <= 1e-12).any(0).all(), (out, refs)


@pytest.mark.parametrize("name", RULES)
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16), lam=st.floats(0.0, 0.49))
def test_real_weights_match_reference_and_permutation(name, n, seed, lam):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.05
    agg = make(name, lam)
    got = agg(X, w)
    torch.testing.assert_close(got, reference(name, X, w.tolist(), Fraction(lam)), rtol=1e-9, atol=1e-9)
    perm = torch.randperm(n, generator=gen)
    torch.testing.assert_close(agg(X[perm], w[perm] * 3.0), got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("n", [1, 2, 4, 9, 17, 40])
def test_uniform_lam_f_over_n_is_the_classic_rule(name, n):
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(n, 33, generator=gen, dtype=torch.float64)
    X[:, :3] = torch.randint(-2, 3, (n, 3), generator=gen).double()  # ties
    for f in range((n - 1) // 2 + 1):
        got = make(name, Fraction(f, n))(X)
        np.testing.assert_allclose(got.numpy(), classic(name, X, f), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 11, 17])
def test_uniform_weights_keep_any_count_even_dropping_more_than_half(n):
    """keep = k/n with uniform weights against the brute-force reference for every k,
    in particular k < n/2 (Bulyan drops 4 of 7 at n = 11, f = 2): median centre on tied integer
    values, trimmed centre on continuous ones (its rounded centre may split exact ties, so skip the
    trims that leave two values: their midpoint is equidistant from both by construction)."""
    gen = torch.Generator().manual_seed(n)
    ties = torch.randint(-3, 4, (n, 40), generator=gen).double()
    X = torch.randn(n, 40, generator=gen, dtype=torch.float64)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for k in range(1, n + 1):
        drop = Fraction(n - k, n)
        got = closest_to_center_mean(ties, w, k / n)
        want = [ref_closest(col, [1] * n, ref_median(col, [1] * n), drop) for col in ties.T.tolist()]
        torch.testing.assert_close(got, torch.tensor([float(r) for r in want], dtype=torch.float64))
        for f in (f for f in range((n - 1) // 2 + 1) if n - 2 * f != 2):
            got = closest_to_center_mean(X, w, k / n, "trimmed", f / n)
            want = [ref_closest(col, [1] * n, ref_trimmed(col, [1] * n, Fraction(f, n)), drop)
                    for col in X.T.tolist()]
            torch.testing.assert_close(got, torch.tensor([float(r) for r in want], dtype=torch.float64))


@pytest.mark.parametrize("name", LAM_RULES)
@pytest.mark.parametrize("lam", [0.1, 0.3, 0.45])
def test_uniform_weights_with_fractional_lam_match_reference(name, lam):
    """lam * n not an integer with uniform weights: boundary values count fractionally (unsorted rows)."""
    X = torch.randn(7, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = reference(name, X, [1] * 7, Fraction(lam))
    torch.testing.assert_close(make(name, lam)(X), want, rtol=1e-12, atol=1e-12)


def test_closest_to_center_mean_checks_arguments():
    X, w = torch.zeros(3, 2), torch.full((3,), 1 / 3)
    for keep in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"keep must lie in \(0, 1\]"):
            closest_to_center_mean(X, w, keep)
    with pytest.raises(ValueError, match="center must be one of"):
        closest_to_center_mean(X, w, 0.5, "mean")


def test_cwmed_is_torch_median_for_odd_n_and_midpoint_for_even_n():
    X = torch.randn(7, 100, dtype=torch.float64)
    assert torch.equal(get_aggregator("cwmed")(X), X.median(0).values)
    torch.testing.assert_close(get_aggregator("cwmed")(X[:6]), torch.quantile(X[:6], 0.5, dim=0))


def test_weighted_median_tie_at_half_is_midpoint():
    X = torch.tensor([[0.0], [10.0], [4.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # zero weight never counts
    assert get_aggregator("cwmed")(X, w).item() == 5.0
    w = torch.tensor([1.0, 0.9, 0.0], dtype=torch.float64)
    assert get_aggregator("cwmed")(X, w).item() == 0.0


def test_cwtm_splits_boundary_weight():
    X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    # lam = 1/8 of n = 4: half of the end values is trimmed, half kept.
    got = get_aggregator("cwtm", lam=0.125)(X).item()
    assert got == pytest.approx((0.5 * 0 + 1 + 2 + 0.5 * 3) / 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_matches_torch_path(monkeypatch, dtype):
    """The numba kernel (CPU, several column blocks, the last one partial) and the torch.sort path
    (CUDA, many rows; here forced on CPU with small column blocks) compute the same rules, ties,
    zero weights and snapped cut points included. Phocas' rounded centre may split exact distance
    ties either way (see above), so its tied columns are left out."""
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 11, 17):
        X = torch.randn(n, 2 * coordinate_cpu.BLOCK + 37, generator=gen, dtype=dtype)
        X[:, :10] = torch.randint(-2, 3, (n, 10), generator=gen).to(dtype)
        w = torch.randint(0, 4, (n,), generator=gen).to(dtype)
        w[0] = 1.0
        for weights in (None, w, torch.rand(n, generator=gen, dtype=dtype)):
            for name in RULES:
                cols = slice(10, None) if name == "phocas" else slice(None)
                with monkeypatch.context() as patch:
                    kernel = make(name, 3 / 11)(X, weights)
                    patch.setattr(coordinate, "KERNEL_MAX_N", 0)
                    patch.setattr(coordinate, "BLOCK_COLUMNS", 7)
                    torch_path = make(name, 3 / 11)(X, weights)
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                torch.testing.assert_close(kernel[cols], torch_path[cols], rtol=tol, atol=tol)


def test_the_kernel_keeps_torchs_thread_count():
    """In a fresh interpreter (numba's OpenMP pool not started yet) torch set to one thread stays on
    one after the kernel's first run; starting the pool used to set it to numba's count (all cores)."""
    code = ("import torch\n"
            "from lightning_byz.aggregators import get_aggregator\n"
            "torch.set_num_threads(1)\n"
            "get_aggregator('cwmed')(torch.randn(9, 600), torch.rand(9))\n"
            "print(torch.get_num_threads())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1"]


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_kept_and_input_untouched(name, dtype):
    X = torch.randn(9, 40, dtype=torch.float64)
    w = torch.rand(9, dtype=torch.float64)
    Xd, keep = X.to(dtype), X.to(dtype).clone()
    for weights in (None, w.to(dtype)):
        out = make(name, 2 / 9)(Xd, weights)
        assert out.dtype == dtype and out.shape == (40,)
        ref = make(name, 2 / 9)(X, None if weights is None else w)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(Xd, keep)


@pytest.mark.parametrize("name", ["cwmed", "cwtm", "meamed", "phocas"])
@pytest.mark.parametrize("weighted", [False, True])
def test_breakdown_f_huge_rows(name, weighted):
    """f = 8 of 17 rows at 1e6 (or weight mass < lam): output stays near the honest mean."""
    gen = torch.Generator().manual_seed(1)
    n, f, d = 17, 8, 200
    X = torch.randn(n, d, generator=gen)
    X[:f] = 1e6 * torch.sign(torch.randn(f, d, generator=gen))
    honest = X[f:]
    if weighted:  # Byzantine rows carry 0.4 of the mass, lam = 0.45 covers them
        w = torch.cat([torch.full((f,), 0.4 / f), torch.full((n - f,), 0.6 / (n - f))])
        lam = 0.45
    else:
        w, lam = None, f / n
    out = make(name, lam)(X, w)
    spread = honest.std(0).mean()
    assert (out - honest.mean(0)).norm() / d**0.5 < 3 * spread
    assert (get_aggregator("mean")(X, w) - honest.mean(0)).norm() / d**0.5 > 1e4


@pytest.mark.parametrize("name", LAM_RULES)
@pytest.mark.parametrize("lam", [-0.1, 0.5, 0.7, float("nan")])
def test_lam_out_of_range(name, lam):
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 0.5\)"):
        get_aggregator(name, lam=lam)


def test_exported_trimmed_mean_checks_lam():
    with pytest.raises(ValueError, match="lam"):
        weighted_trimmed_mean(torch.zeros(3, 2), torch.full((3,), 1 / 3), 0.5)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize(
    ("vectors", "weights", "message"),
    [
        (torch.zeros(5), None, r"shape \[n, d\]"),
        (torch.zeros(2, 3, 4), None, r"shape \[n, d\]"),
        (torch.zeros(0, 3), None, "non-empty"),
        (torch.zeros(3, 4, dtype=torch.int64), None, "float32 or float64"),
        (torch.zeros(3, 4), torch.ones(4), r"weights must have shape \[3\]"),
        (torch.zeros(3, 4), torch.ones(3, 1), r"weights must have shape \[3\]"),
        (torch.zeros(3, 4), torch.tensor([1.0, -1.0, 1.0]), "negative at rows 1"),
        (torch.zeros(3, 4), torch.zeros(3), "must not all be zero"),
        (torch.zeros(3, 4), torch.tensor([1.0, float("inf"), float("nan")]), "NaN/Inf at rows 1, 2"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [0.0, float("-inf")]]), None, "rows 1, 2"),
    ],
)
def test_bad_input_names_the_problem(name, vectors, weights, message):
    with pytest.raises(ValueError, match=message):
        make(name, 0.2)(vectors, weights)


def test_exported_functions_match_rules():
    X = torch.randn(6, 10, dtype=torch.float64)
    w = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    assert torch.equal(weighted_median(X, w), get_aggregator("cwmed")(X, w))
    torch.testing.assert_close(weighted_trimmed_mean(X, w, 0.3), get_aggregator("cwtm", lam=0.3)(X, w))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", RULES)
def test_cuda_matches_cpu(name):
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(17, 5000, generator=gen)
    w = torch.rand(17, generator=gen)
    for weights in (None, w):
        cpu = make(name, 4 / 17)(X, weights)
        gpu = make(name, 4 / 17)(X.cuda(), None if weights is None else weights.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
