"""Every robust rule at every finite magnitude: Byzantine rows from 1 up to float32's 3.4e38 and
float64's 1e300 leave the output finite and within the rule's breakdown bound (the bound of
``test_aggregators_distance.test_breakdown_below_bound``: within twice the honest spread of the
honest mean), in bounded time, on the CPU kernel path and the torch path of the coordinate-wise code.

The attacker spends the whole budget (Byzantine weight = ``lam`` exactly) and tries: all rows on one
point (either sign), split between two opposite points, random signs per entry, one row on the edge
of the honest cloud with the rest huge, and rows at nested magnitudes (M, √M, M^¼, ...), which would
fool a centre picked at one scale. ``mean`` and standalone ``nnm`` claim no robustness and are not
held to it; ``flag`` is held to its own measured robustness (``test_flag``) at every magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_byz.aggregators import coordinate, get_aggregator
from lightning_byz.aggregators.base import pairwise_sq_dists
from lightning_byz.aggregators.distance import centred_gram

pytestmark = pytest.mark.timeout(60)  # bounded time: Bulyan's selection used to spin forever

N, F, D, LAM = 20, 4, 50, 0.2  # Byzantine weight F/N = LAM: the attacker sits on the budget
RULES = [
    ("gm", {}),
    ("krum", {"lam": LAM}),
    ("multikrum", {"lam": LAM}),
    ("bulyan", {"lam": LAM}),
    ("cclip", {"tau": 1.0}),
    ("cwmed", {}),
    ("cwtm", {"lam": LAM}),
    ("meamed", {"lam": LAM}),
    ("phocas", {"lam": LAM}),
    ("ctma", {"base": "gm", "lam": LAM}),
    ("ctma", {"base": "krum", "lam": LAM}),
    ("ctma", {"base": "cclip", "lam": LAM}),
    ("ctma", {"base": "bulyan", "lam": LAM}),
    ("ctma", {"base": "cwmed", "lam": LAM}),
    ("krum", {"lam": LAM, "pre": "nnm"}),
    ("gm", {"lam": LAM, "pre": "nnm"}),
    ("cwtm", {"lam": LAM, "pre": "nnm"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in RULES]
MAGNITUDES = {
    torch.float32: [1.0, 1e5, 1e15, 1e19, 1e30, 3.4e38],
    torch.float64: [1.0, 1e5, 1e15, 1e19, 1e30, 3.4e38, 1e100, 1e200, 1e300],
}
CASES = [(dtype, m) for dtype, ms in MAGNITUDES.items() for m in ms]
CASE_IDS = [f"{str(dtype)[6:]}-{m:g}" for dtype, m in CASES]
ATTACKS = ("same", "negated", "split", "random", "edge", "nested")
# Weighted: honest weights 1, 2, 3, 2, ... (sum 32) and Byzantine 2 each (sum 8): 8/40 = LAM again.
WEIGHTS = torch.tensor([2.0] * F + [1.0, 2.0, 3.0, 2.0] * ((N - F) // 4), dtype=torch.float64)


def honest_rows(seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N - F, D, generator=gen, dtype=torch.float64) * 0.1 + 1.0


def byzantine_rows(attack: str, magnitude: float, honest: torch.Tensor, seed: int = 12) -> torch.Tensor:
    """F rows of entries up to ``magnitude`` (float64; exact in float32 up to rounding)."""
    ones = torch.ones(F, D, dtype=torch.float64)
    if attack == "same":
        return magnitude * ones
    if attack == "negated":
        return -magnitude * ones
    if attack == "split":
        return magnitude * ones * torch.tensor([1.0, -1.0] * (F // 2), dtype=torch.float64)[:, None]
    if attack == "random":
        signs = torch.randn(F, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).sign()
        return magnitude * signs
    mu = honest.mean(0)
    if attack == "edge":  # one row just outside the honest cloud, the others huge
        far = honest[torch.linalg.vector_norm(honest - mu, dim=1).argmax()]
        return torch.cat([(mu + 1.01 * (far - mu))[None], magnitude * ones[1:]])
    if attack == "nested":  # M, sqrt(M), M^(1/4), ... above the honest rows
        return torch.stack([mu + magnitude ** (0.5**k) for k in range(F)])
    raise ValueError(attack)


def deviation(out: torch.Tensor, honest: torch.Tensor) -> float:
    """Distance of the output to the honest mean, in units of the honest spread."""
    mu = honest.mean(0)
    spread = float(torch.linalg.vector_norm(honest - mu, dim=1).max())
    return float(torch.linalg.vector_norm(out.double() - mu)) / spread


@pytest.fixture(params=["kernel", "torch"])
def coordinate_path(request, monkeypatch):
    """The CPU numba kernel (default on CPU) or the torch.sort path (CUDA's) of the coordinate code,
    which serves the coordinate-wise rules, Bulyan's second phase and the robust Gram centre."""
    if request.param == "torch":
        monkeypatch.setattr(coordinate, "KERNEL_MAX_N", 0)
    return request.param


@pytest.mark.parametrize("dtype,magnitude", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("name,kw", RULES, ids=IDS)
def test_robust_rules_stay_within_bound_at_any_magnitude(name, kw, dtype, magnitude, coordinate_path):
    honest = honest_rows()
    agg = get_aggregator(name, **kw)
    for attack in ATTACKS:
        X = torch.cat([byzantine_rows(attack, magnitude, honest), honest]).to(dtype)
        assert bool(torch.isfinite(X).all())
        for weights in (None, WEIGHTS.to(dtype)):
            out = agg(X, weights)
            assert out.dtype == dtype and bool(torch.isfinite(out).all()), (attack, weights is None)
            assert deviation(out, honest) < 2.0, (attack, weights is None, deviation(out, honest))


@settings(max_examples=60, deadline=None)
@given(rule=st.sampled_from(range(len(RULES))), double=st.booleans(), exponent=st.floats(0.0, 1.0),
       attack=st.sampled_from(ATTACKS), sign=st.sampled_from([1.0, -1.0]), seed=st.integers(0, 2**16))
def test_property_any_magnitude_any_attack(rule, double, exponent, attack, sign, seed):
    """Magnitudes drawn log-uniformly over the whole finite range of the dtype."""
    dtype = torch.float64 if double else torch.float32
    top = 300.0 if double else math.log10(3.4e38)
    honest = honest_rows(seed)
    bad = sign * byzantine_rows(attack, 10.0 ** (exponent * top), honest, seed + 1)
    if attack == "edge":  # keep its edge row where it was, on the honest side
        bad[0] = byzantine_rows(attack, 1.0, honest)[0]
    X = torch.cat([bad, honest]).to(dtype)
    out = get_aggregator(RULES[rule][0], **RULES[rule][1])(X)
    assert bool(torch.isfinite(out).all())
    assert deviation(out, honest) < 2.0


def flag_setting(magnitude: float, attack: str, dtype: torch.dtype):
    """test_flag's measured setting (n = 15, 3 Byzantine, d = 2000) with the Byzantine rows at
    ``magnitude``: random signs (where FA is measured robust) or all on one point."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2000, generator=gen, dtype=torch.float64)
    honest = mu + torch.randn(12, 2000, generator=gen, dtype=torch.float64)
    signs = torch.randn(3, 2000, generator=gen, dtype=torch.float64).sign()
    bad = magnitude * (signs if attack == "random" else -torch.ones(3, 2000, dtype=torch.float64))
    return torch.cat([honest, bad]).to(dtype), honest.mean(0)


@pytest.mark.parametrize("attack", ["random", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flag_keeps_its_measured_robustness_at_any_magnitude(dtype, attack):
    """FA reads directions and the median norm only: past the honest scale its output no longer
    depends on how large the Byzantine rows are, so test_flag's cosine > 0.9 (random outliers 100x
    the honest rows) holds at every magnitude, and one-point outliers do no worse than at 1e3."""
    agg = get_aggregator("flag")
    reference, honest_mean = flag_setting(1e3, attack, dtype)
    expected = agg(reference)
    for magnitude in MAGNITUDES[dtype]:
        if magnitude < 1e3:
            continue
        X, _ = flag_setting(magnitude, attack, dtype)
        out = agg(X)
        assert bool(torch.isfinite(out).all()), magnitude
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
        if attack == "random":
            cosine = torch.nn.functional.cosine_similarity(out.double(), honest_mean, dim=0)
            assert float(cosine) > 0.9, magnitude


@pytest.mark.parametrize("name,kw", [("mean", {}), ("nnm", {"lam": LAM}), ("cclip", {"start": "mean"}),
                                     ("flag", {"normalize": "none"})])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 3.4e38), (torch.float64, 1e300)])
def test_rules_without_a_robustness_claim_are_still_finite_and_never_hang(name, kw, dtype, magnitude):
    honest = honest_rows()
    for attack in ("same", "split", "random"):
        X = torch.cat([byzantine_rows(attack, magnitude / N, honest), honest]).to(dtype)
        assert bool(torch.isfinite(get_aggregator(name, **kw)(X)).all()), attack


def test_rows_too_far_to_square_are_infinitely_far_never_nan():
    """At 1e300 (float64) squared distances overflow: such rows are marked infinitely far (diagonal
    +inf, zeros elsewhere), pairwise distances to them are inf, never NaN; honest geometry is exact."""
    honest = honest_rows()
    X = torch.cat([byzantine_rows("split", 1e300, honest), honest])
    G, w = centred_gram(X, torch.full((N,), 1.0 / N, dtype=torch.float64))
    assert torch.isinf(torch.diagonal(G)[:F]).all() and torch.isfinite(torch.diagonal(G)[F:]).all()
    D2 = pairwise_sq_dists(G)
    assert not torch.isnan(D2).any() and torch.isinf(D2[:F, F:]).all()
    torch.testing.assert_close(D2[F:, F:], torch.cdist(honest, honest) ** 2, rtol=1e-10, atol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_honest_distances_are_exact_under_huge_rows(dtype):
    """The mean-centred Gram matrix drowns honest distances under rows at 1e15; the rebuilt one about
    the coordinate-wise median keeps them to the dtype's rounding of the inputs."""
    honest = honest_rows().to(dtype).double()
    X = torch.cat([byzantine_rows("same", 1e15, honest), honest]).to(dtype)
    G, _ = centred_gram(X, torch.full((N,), 1.0 / N, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    exact = torch.cdist(honest, honest) ** 2
    torch.testing.assert_close(pairwise_sq_dists(G)[F:, F:], exact, rtol=tol, atol=tol)
