"""Gram-space rules (gm/rfa, krum, multikrum, bulyan, cclip, nnm, ctma, pre="nnm") against literal
references, the repetition law, permutation invariance, breakdown and bad input."""

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from lightning_byz.aggregators import get_aggregator
from lightning_byz.aggregators.base import gram

F64 = torch.float64

# (name, kwargs) of every rule in this module, each with a budget that fits 10 unit-weight vectors.
RULES = [
    ("gm", {"tol": 0.0, "iters": 300}),
    ("rfa", {}),
    ("krum", {"lam": 0.2}),
    ("multikrum", {"lam": 0.2}),
    ("multikrum", {"lam": 0.2, "m": 3}),
    ("bulyan", {"lam": 0.1}),
    ("cclip", {"tau": 0.5, "iters": 5}),
    ("cclip", {"tau": 0.5, "start": "mean"}),
    ("nnm", {"lam": 0.2}),
    ("ctma", {"base": "gm", "lam": 0.2, "tol": 0.0, "iters": 300}),
    ("ctma", {"base": "krum", "lam": 0.2}),
    ("ctma", {"base": "cwmed", "lam": 0.2}),
    ("krum", {"lam": 0.2, "pre": "nnm"}),
    ("cwmed", {"lam": 0.2, "pre": "nnm"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for name, kw in RULES]


def data(n, d, seed, dtype=F64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name,kw", RULES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_weights_are_repeated_rows(name, kw, seed):
    X = data(6, 4, seed)
    counts = torch.tensor([1, 2, 1, 3, 1, 2])  # n_eff = 10
    agg = get_aggregator(name, **kw)
    repeated = X.repeat_interleave(counts, dim=0)
    torch.testing.assert_close(agg(X, counts.to(F64)), agg(repeated), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name,kw", RULES, ids=IDS)
def test_permutation_invariance(name, kw):
    X, w = data(9, 5, 3), torch.rand(9, generator=torch.Generator().manual_seed(4), dtype=F64) + 0.5
    w[2] = 0.5  # the unit weight
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    agg = get_aggregator(name, **kw)
    torch.testing.assert_close(agg(X[perm], w[perm]), agg(X, w), rtol=1e-7, atol=1e-7)


def test_gm_matches_direct_minimisation():
    X, w = data(7, 3, 6), torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 0.2, 1.5], dtype=F64)
    out = get_aggregator("gm", nu=1e-12, tol=0.0, iters=2000)(X, w)
    Xn, wn = X.numpy(), w.numpy()
    ref = minimize(lambda y: wn @ np.linalg.norm(Xn - y, axis=1), Xn.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}).x
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-6)


def literal_krum_scores(X, f):
    n = len(X)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(D[i], i))[: n - f - 2].sum() for i in range(n)])


@pytest.mark.parametrize("n,f", [(7, 1), (10, 3), (13, 5)])
def test_krum_and_multikrum_are_classic_at_lam_f_over_n(n, f):
    X = data(n, 6, n)
    scores = literal_krum_scores(X.numpy(), f)
    np.testing.assert_allclose(get_aggregator("krum", lam=f / n)(X).numpy(), X.numpy()[np.argmin(scores)])
    for m in (None, 2):
        best = np.argsort(scores)[: (n - f) if m is None else m]
        out = get_aggregator("multikrum", lam=f / n, m=m)(X)
        np.testing.assert_allclose(out.numpy(), X.numpy()[best].mean(0), atol=1e-12)


def literal_bulyan(X, f):
    """El Mhamdi et al. 2018 with one neighbour at least and the documented tie-break."""
    n = len(X)
    D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    remaining, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        k = max(len(remaining) - f - 2, 1)
        score = {i: np.sort([D[i, j] for j in remaining if j != i])[:k].sum() for i in remaining}
        best = min(score.values())
        ties = [i for i in remaining if score[i] <= best * (1 + 1e-9)]
        i = min(ties, key=lambda t: D[t, remaining].sum())
        chosen.append(i)
        remaining.remove(i)
    S = X[chosen]
    beta = len(chosen) - 2 * f
    closest = np.argsort(np.abs(S - np.median(S, axis=0)), axis=0, kind="stable")[:beta]
    return np.take_along_axis(S, closest, axis=0).mean(0)


@pytest.mark.parametrize("n,f", [(7, 1), (11, 2), (15, 3)])
def test_bulyan_is_classic_at_lam_f_over_n(n, f):
    X = data(n, 5, n + 1)
    out = get_aggregator("bulyan", lam=f / n)(X)
    np.testing.assert_allclose(out.numpy(), literal_bulyan(X.numpy(), f), atol=1e-12)


def test_bulyan_float32_at_the_bound_n_equals_4f_plus_3():
    """Float32 weights are renormalised in float64: lam = f/n with n = 4f + 3 is accepted, every
    selected row keeps one equal unit (the uniform phase 2, which drops more than half here)."""
    X = data(11, 5, 12)
    out = get_aggregator("bulyan", lam=2 / 11)(X.float())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), literal_bulyan(X.numpy(), 2), atol=1e-5)


def test_ctma_matches_sort_and_trim():
    X, w = data(8, 4, 7), torch.tensor([0.1, 0.3, 0.05, 0.2, 0.1, 0.1, 0.1, 0.05], dtype=F64)
    lam = 0.27
    x0 = get_aggregator("cwmed")(X, w).numpy()
    order = np.argsort(np.linalg.norm(X.numpy() - x0, axis=1))
    kept, total = np.zeros(8), 0.0
    for i in order:  # closest first until the weight reaches 1 - lam, boundary row fractionally
        kept[i] = min(w[i].item(), 1 - lam - total)
        total += kept[i]
        if total >= 1 - lam:
            break
    ref = kept @ X.numpy() / kept.sum()
    out = get_aggregator("ctma", base="cwmed", lam=lam)(X, w)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("n,f", [(7, 2), (10, 3)])
def test_nnm_mixes_each_row_with_its_n_minus_f_nearest(n, f):
    X = data(n, 4, 8)
    D = torch.cdist(X, X)
    mixed = torch.stack([X[torch.argsort(D[i], stable=True)[: n - f]].mean(0) for i in range(n)])
    torch.testing.assert_close(get_aggregator("nnm", lam=f / n)(X), mixed.mean(0))
    for rule, kw in (("cwmed", {}), ("gm", {}), ("krum", {"lam": f / n})):
        expected = get_aggregator(rule, **kw)(mixed)
        torch.testing.assert_close(get_aggregator(rule, pre="nnm", lam=f / n)(X), expected)


def nnm_mixed(X, f):
    """Each row replaced by the mean of its n − f nearest rows (itself included), literally."""
    order = torch.argsort(torch.cdist(X, X), dim=1, stable=True)[:, : len(X) - f]
    return X[order].mean(1)


def test_pre_lam_is_nnm_budget_apart_from_the_rule_lam():
    """NNM mixes with pre_lam; the rule keeps its own lam (a budget, or flag's regulariser weight)."""
    X = data(10, 4, 17)
    krum = get_aggregator("krum", pre="nnm", lam=0.2, pre_lam=0.3)
    torch.testing.assert_close(krum(X), get_aggregator("krum", lam=0.2)(nnm_mixed(X, 3)))
    # Default: a rule whose lam is a Byzantine budget shares it with NNM (krum's default 0.1 here).
    torch.testing.assert_close(get_aggregator("krum", pre="nnm")(X),
                               get_aggregator("krum")(nnm_mixed(X, 1)))
    flag = get_aggregator("flag", pre="nnm", lam=5.0, pre_lam=0.2)
    assert flag.rule.lam == 5.0 and flag.lam == 0.2
    torch.testing.assert_close(flag(X), get_aggregator("flag", lam=5.0)(nnm_mixed(X, 2)))


@pytest.mark.parametrize(
    "name,kw,message",
    [
        ("flag", {"pre": "nnm", "lam": 5.0}, r"flag: its lam is not a Byzantine budget; .*pre_lam="),
        ("cwmed", {"pre": "nnm"}, r"pre='nnm' needs a Byzantine budget: pass pre_lam="),
        ("krum", {"pre_lam": 0.2}, r"pre_lam .* needs pre='nnm'"),
        ("krum", {"pre": "nnm", "pre_lam": 0.0}, r"nnm: lam must be > 0"),
    ],
)
def test_pre_lam_errors(name, kw, message):
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **kw)


def test_cclip_one_big_radius_step_from_mean_is_mean_and_clipping_moves_at_most_tau():
    X, w = data(9, 4, 9), torch.rand(9, generator=torch.Generator().manual_seed(1), dtype=F64)
    mean = (w / w.sum()) @ X
    torch.testing.assert_close(get_aggregator("cclip", tau=1e9, start="mean")(X, w), mean)
    medoid = get_aggregator("cclip", tau=1e-3, iters=1)(X, w)
    start = get_aggregator("cclip", tau=1e-9, iters=1)(X, w)  # an exact input row: the medoid
    assert torch.isclose(X, start).all(dim=1).any()
    assert float(torch.linalg.vector_norm(medoid - start)) <= 1e-3 + 1e-12


BREAKDOWN = [
    ("gm", {}), ("krum", {"lam": 0.25}), ("multikrum", {"lam": 0.25}), ("bulyan", {"lam": 0.2}),
    ("cclip", {"tau": 1.0}), ("ctma", {"base": "gm", "lam": 0.25}),
    ("ctma", {"base": "cwmed", "lam": 0.25}), ("krum", {"pre": "nnm", "lam": 0.25}),
]


@pytest.mark.parametrize("attack", ["huge", "cluster", "sign"])
@pytest.mark.parametrize("name,kw", BREAKDOWN, ids=[f"{n}-{kw}" for n, kw in BREAKDOWN])
def test_breakdown_below_bound(name, kw, attack):
    n, f, d = 20, 4, 50
    honest = data(n - f, d, 11) * 0.1 + 1.0
    mu, spread = honest.mean(0), float(torch.linalg.vector_norm(honest - honest.mean(0), dim=1).max())
    bad = {"huge": data(f, d, 12) * 1e6, "cluster": mu.expand(f, d) + 1e4,
           "sign": -1e3 * mu.expand(f, d)}[attack]
    X = torch.cat([bad, honest])
    assert float(torch.linalg.vector_norm(get_aggregator("mean")(X) - mu)) > 100 * spread
    out = get_aggregator(name, **kw)(X)
    assert float(torch.linalg.vector_norm(out - mu)) < 2 * spread


@pytest.mark.parametrize("name,kw", RULES, ids=IDS)
def test_float32_agrees_with_float64(name, kw):
    X = data(10, 300, 13)
    out32 = get_aggregator(name, **kw)(X.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), get_aggregator(name, **kw)(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_blocks_match_direct_product(dtype):
    """Several column blocks, a large common offset: centred and plain Gram matrices in float64."""
    X = (data(5, 300_000, 14) + 1e3).to(dtype).double()  # exactly representable in dtype
    Xc = X - X.mean(0)
    centred, plain = gram(X.to(dtype), center=True), gram(X.to(dtype), center=False)
    assert centred.dtype == plain.dtype == torch.float64
    torch.testing.assert_close(plain, X @ X.T, rtol=1e-12, atol=0.0)  # float64 products either way
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(centred, Xc @ Xc.T, rtol=tol, atol=tol * float(Xc.square().sum(1).max()))


@pytest.mark.parametrize(
    "name,kw,message",
    [
        ("krum", {"lam": 0.45}, r"2f \+ 2 < n.*lam < \(1 - 2/n\)/2 = 0\.4 for n = 10"),
        ("krum", {"lam": 0.4}, r"lam < \(1 - 2/n\)/2 = 0\.4"),
        ("multikrum", {"lam": 0.42}, r"lam < \(1 - 2/n\)/2 = 0\.4"),
        ("bulyan", {"lam": 0.2}, r"4f \+ 3 <= n.*lam <= \(1 - 3/n\)/4 = 0\.175"),
        ("bulyan", {"lam": 0.3}, r"lam must lie in \[0, 0\.25\)"),
        ("multikrum", {"lam": 0.1, "m": 11}, r"m = 11 exceeds the n = 10"),
        ("ctma", {"lam": 0.5}, r"ctma: lam must lie in \[0, 0\.5\)"),
        ("ctma", {"base": "nope"}, r"unknown aggregator 'nope'"),
        ("ctma", {"base": "gm", "bogus": 1}, r"ctma: bad arguments for base 'gm'"),
        ("cclip", {"tau": 0.0}, r"tau .* must be > 0"),
        ("cclip", {"iters": 0}, r"iters must be a positive integer"),
        ("cclip", {"start": "zero"}, r"start must be one of"),
        ("gm", {"nu": -1.0}, r"nu .* must be > 0"),
        ("gm", {"iters": 1.5}, r"iters must be a positive integer"),
        ("gm", {"tol": -1.0}, r"tol must be >= 0"),
        ("multikrum", {"m": 0}, r"m must be a positive integer"),
        ("nnm", {"lam": 0.0}, r"nnm: lam must be > 0"),
        ("krum", {"lam": 0.2, "pre": "bucket"}, r"unknown pre-aggregation 'bucket'"),
        ("krum", {"lam": -0.1}, r"krum: lam must lie in"),
    ],
)
def test_bad_hyper_parameters(name, kw, message):
    X = data(10, 3, 15)
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **kw)(X)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kw", RULES, ids=IDS)
def test_cuda_matches_cpu(name, kw):
    X, w = data(10, 1000, 16, torch.float32), torch.arange(1.0, 11.0)
    out = get_aggregator(name, **kw)(X.cuda(), w.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), get_aggregator(name, **kw)(X, w), rtol=1e-4, atol=1e-4)


def test_finite_check_accepts_row_sums_that_overflow_and_names_bad_rows():
    X = torch.full((3, 4), 3e38)  # finite, but every row sum overflows float32
    torch.testing.assert_close(get_aggregator("krum", lam=0.0)(X), X[0])
    X[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in rows 1$"):
        get_aggregator("gm")(X)
