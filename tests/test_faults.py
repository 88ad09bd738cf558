"""Unit tests of lightning_byz.faults: exact formulas, binomial bounds, determinism, bad config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import callbacks_from_yaml
from scipy.integrate import solve_ivp
from scipy.stats import norm

from lightning_byz.faults import (
    ByzantineWorkers,
    Crash,
    NonlinearAugmentation,
    PacketLoss,
    Straggler,
    alie_z,
    alie_z_weighted,
    byzantine_fraction,
    cat_map_period,
    workers_for_fraction,
)
from lightning_byz.faults.augmentation import cat_map_permutation, flow_grid, lotka_volterra_field
from lightning_byz.faults.common import seeded_generator
from lightning_byz.faults.network import packet_loss_mask


def setup(fault, num_workers=9, seed=0):
    fault.setup_faults(num_workers, seed)
    return fault


# ---------------------------------------------------------------- worker-side attacks


def test_sign_flip_is_minus_scale_times_v():
    v = torch.tensor([1.0, -2.0, 0.5])
    attack = setup(ByzantineWorkers([2], "sign_flip", scale=3.0))
    assert torch.equal(attack.on_worker_message(2, 0, v), torch.tensor([-3.0, 6.0, -1.5]))
    assert attack.on_worker_message(1, 0, v) is v
    assert attack.metrics() == {"byzantine/messages_attacked": 1.0}


def test_random_is_seeded_gaussian_of_std_scale():
    v = torch.zeros(200_000, dtype=torch.float64)
    attack = setup(ByzantineWorkers([2, 3], "random", scale=100.0), seed=7)
    out = attack.on_worker_message(3, 5, v)
    expected = torch.randn(200_000, generator=seeded_generator(7, "byzantine", 3, 5),
                           dtype=torch.float64) * 100
    assert torch.equal(out, expected)
    assert torch.equal(attack.on_worker_message(3, 5, v), out)  # same (seed, worker, step)
    assert not torch.equal(attack.on_worker_message(3, 6, v), out)
    assert not torch.equal(attack.on_worker_message(2, 5, v), out)
    # sample std within ~6 standard errors of 100 (se of the std ≈ 100 / sqrt(2n))
    assert abs(out.std().item() - 100) < 6 * 100 / math.sqrt(2 * 200_000)
    assert abs(out.mean().item()) < 6 * 100 / math.sqrt(200_000)


def test_random_uniform_is_seeded_uniform_on_zero_to_scale():
    v = torch.zeros(200_000, dtype=torch.float64)
    attack = setup(ByzantineWorkers([2], "random_uniform", scale=2.0), seed=7)
    out = attack.on_worker_message(2, 5, v)
    expected = torch.rand(200_000, generator=seeded_generator(7, "byzantine", 2, 5), dtype=torch.float64) * 2
    assert torch.equal(out, expected) and 0 <= out.min() and out.max() < 2.0
    assert abs(out.mean().item() - 1.0) < 6 * (2 / math.sqrt(12)) / math.sqrt(200_000)  # U[0, 2): mean 1
    assert torch.equal(attack.on_worker_message(1, 5, v), v)  # an honest worker's vector is untouched


def test_drop_sends_nothing():
    attack = setup(ByzantineWorkers([4], "drop"))
    v = torch.ones(3)
    assert attack.on_worker_message(4, 1, v) is None
    assert attack.on_worker_message(5, 1, v) is v


def test_label_flip_on_tuple_list_and_dict_batches():
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 3, 9, 5])
    attack = setup(ByzantineWorkers([1], "label_flip", num_classes=10))
    out = attack.on_worker_batch(1, 0, (x, y))
    assert isinstance(out, tuple) and out[0] is x
    assert torch.equal(out[1], torch.tensor([9, 6, 0, 4]))
    assert isinstance(attack.on_worker_batch(1, 0, [x, y]), list)
    as_dict = ByzantineWorkers([1], "label_flip", num_classes=10, target_key="label")
    out = as_dict.on_worker_batch(1, 0, {"image": x, "label": y})
    assert torch.equal(out["label"], 9 - y) and out["image"] is x
    assert attack.on_worker_batch(2, 0, (x, y))[1] is y  # honest worker untouched
    with pytest.raises(ValueError, match="labels outside"):
        attack.on_worker_batch(1, 0, (x, torch.tensor([10])))
    with pytest.raises(ValueError, match="unsupported batch type"):
        attack.on_worker_batch(1, 0, y)


# ---------------------------------------------------------------- omniscient attacks

VECTORS = torch.tensor(
    [[1.0, 2.0, -1.0], [3.0, 0.0, 1.0], [-2.0, 4.0, 0.0], [5.0, 5.0, 5.0], [0.5, -1.0, 2.0]],
    dtype=torch.float64,
)
WEIGHTS = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64)
WORKERS = torch.tensor([1, 2, 3, 4, 5])  # workers 4 and 5 are Byzantine below


def weighted_honest_stats():
    x, w = VECTORS[:3].numpy(), WEIGHTS[:3].numpy() / WEIGHTS[:3].sum().item()
    mean = (w[:, None] * x).sum(0)
    std = np.sqrt((w[:, None] * (x - mean) ** 2).sum(0))
    return mean, std


def test_alie_replaces_byzantine_rows_with_weighted_mean_minus_z_std():
    attack = setup(ByzantineWorkers([4, 5], "alie", z=1.5), num_workers=5)
    before = VECTORS.clone()
    out = attack.server_attack(VECTORS, WEIGHTS, WORKERS)
    mean, std = weighted_honest_stats()
    np.testing.assert_allclose(out[3].numpy(), mean - 1.5 * std, rtol=1e-12)
    np.testing.assert_allclose(out[4].numpy(), mean - 1.5 * std, rtol=1e-12)
    assert torch.equal(out[:3], VECTORS[:3]) and torch.equal(VECTORS, before)
    # weights matter: integer weights act like repeated honest rows
    repeated = VECTORS[[0, 1, 1, 1, 1, 2, 2, 3, 4]]
    ids = torch.tensor([1, 2, 2, 2, 2, 3, 3, 4, 5])
    flat = attack.server_attack(repeated, torch.ones(9, dtype=torch.float64), ids)
    torch.testing.assert_close(flat[-1], out[-1], rtol=1e-12, atol=1e-12)
    unweighted = attack.server_attack(VECTORS, torch.ones(5, dtype=torch.float64), WORKERS)
    assert not torch.allclose(unweighted[-1], out[-1])


def test_alie_z_rule_workers_follows_baruch_et_al():
    for n, f in [(17, 8), (9, 4), (15, 3), (50, 24)]:
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), rel=1e-12)
    assert alie_z(17, 8) == pytest.approx(1.565, abs=1e-3)
    attack = setup(ByzantineWorkers([4, 5], "alie", z_rule="workers"), num_workers=5)
    assert attack.z == pytest.approx(norm.ppf(4 / 5))  # n=5, f=2: s=1
    with pytest.raises(ValueError, match="z is undefined"):
        setup(ByzantineWorkers([1, 2, 3, 4], "alie", z_rule="workers"), num_workers=5)


def released_code_z(total: int, byzantine: int) -> float:
    """z of Dahan & Levy's released async ALIE, from iteration counts T and B (their formula)."""
    s = math.floor(total / 2 + 1) - byzantine
    return float(norm.ppf((total - byzantine - s) / (total - byzantine)))


def test_alie_default_z_is_the_released_codes_from_the_byzantine_weight_share():
    for lam in (0.1, 0.25, 1 / 3, 0.45):
        total = 10**7
        assert alie_z_weighted(lam) == pytest.approx(released_code_z(total, round(lam * total)), abs=1e-5)
    assert alie_z_weighted(1 / 3) == pytest.approx(0.674, abs=1e-3) and alie_z_weighted(0.0) == 0.0
    assert alie_z_weighted(0.5) == alie_z_weighted(0.9) == pytest.approx(norm.ppf(0.999))
    attack = setup(ByzantineWorkers([4, 5], "alie"), num_workers=5)  # default rule: weights; λ = 0.3 here
    assert attack.z is None
    out = attack.server_attack(VECTORS, WEIGHTS, WORKERS)
    mean, std = weighted_honest_stats()
    np.testing.assert_allclose(out[3].numpy(), mean - norm.ppf(0.5 / 0.7) * std, rtol=1e-10)
    with pytest.raises(ValueError, match="z_rule must be one of"):
        ByzantineWorkers([1], "alie", z_rule="paper")


def test_ipm_is_minus_eps_weighted_honest_mean():
    attack = setup(ByzantineWorkers([4, 5], "ipm"), num_workers=5)
    out = attack.server_attack(VECTORS, WEIGHTS, WORKERS)
    mean, _ = weighted_honest_stats()
    np.testing.assert_allclose(out[3:].numpy(), np.stack([-0.1 * mean] * 2), rtol=1e-12)
    assert torch.equal(out[:3], VECTORS[:3])
    # rows of workers that have not sent yet are absent: nothing Byzantine, nothing changes
    honest_only = VECTORS[:3]
    assert attack.server_attack(honest_only, WEIGHTS[:3], WORKERS[:3]) is honest_only
    assert attack.metrics() == {"byzantine/server_attacks": 1.0}


# ---------------------------------------------------------------- packet loss


def test_packet_loss_fraction_positions_and_determinism():
    packets, per_packet = 4000, 1408 // 4
    v = torch.arange(1, packets * per_packet + 1, dtype=torch.float32)
    loss = setup(PacketLoss([1, 2, 3], rate=0.1), seed=3)
    out = loss.on_worker_message(2, 11, v)
    by_packet = out.view(packets, per_packet)
    lost = (by_packet == 0).all(1)
    kept = (by_packet == v.view(packets, per_packet)).all(1)
    assert torch.equal(lost, ~kept)  # every packet is either all zeros or all intact
    generator = seeded_generator(3, "packet_loss", 2, 11)
    expected, _ = packet_loss_mask(v.numel(), 4, 1408, 0.1, generator)
    assert torch.equal(lost, expected)
    # binomial(4000, 0.1): mean 400, sd 19; allow 5 sd
    assert abs(int(lost.sum()) - 400) < 5 * math.sqrt(4000 * 0.1 * 0.9)
    assert torch.equal(loss.on_worker_message(2, 11, v), out)
    other_seed = setup(PacketLoss([2], rate=0.1), seed=4)
    assert not torch.equal(other_seed.on_worker_message(2, 11, v), out)
    assert loss.on_worker_message(4, 11, v) is v  # not a lossy link
    m = loss.metrics()
    assert m["packet_loss/packets"] == 2 * packets and m["packet_loss/messages"] == 2
    assert m["packet_loss/packets_lost"] == 2 * int(lost.sum())
    assert m["packet_loss/lost_fraction"] == pytest.approx(int(lost.sum()) / packets)


def test_packet_loss_partial_last_packet_and_float64():
    v = torch.ones(176 * 3 + 5, dtype=torch.float64)  # 3 full packets of 176 doubles + 5 elements
    loss = setup(PacketLoss([1], rate=0.5), seed=1)
    out = loss.on_worker_message(1, 0, v)
    lost, _ = packet_loss_mask(v.numel(), 8, 1408, 0.5, seeded_generator(1, "packet_loss", 1, 0))
    assert lost.numel() == 4 and out.dtype == torch.float64
    zeros = out == 0
    assert torch.equal(zeros, lost.repeat_interleave(176)[: v.numel()])


def test_message_mode_loses_whole_messages_at_rate():
    loss = setup(PacketLoss([1], rate=0.25, mode="message"), seed=0)
    v = torch.ones(10)
    results = [loss.on_worker_message(1, step, v) for step in range(2000)]
    lost = sum(r is None for r in results)
    assert all(r is v for r in results if r is not None)
    assert abs(lost - 500) < 5 * math.sqrt(2000 * 0.25 * 0.75)
    assert loss.metrics()["packet_loss/lost_fraction"] == pytest.approx(lost / 2000)
    state = loss.state_dict()
    fresh = PacketLoss([1], rate=0.25, mode="message")
    fresh.load_state_dict(state)
    assert fresh.metrics() == loss.metrics()


# ---------------------------------------------------------------- stragglers and crashes


def test_straggler_delays():
    fixed = setup(Straggler([2], delay=0.5))
    assert fixed.worker_delay(2, 3) == 0.5 and fixed.worker_delay(1, 3) == 0.0
    ranged = setup(Straggler([2, 3], delay=(0.1, 0.3)), seed=5)
    delays = [ranged.worker_delay(3, step) for step in range(200)]
    assert all(0.1 <= d <= 0.3 for d in delays)
    assert delays == [ranged.worker_delay(3, step) for step in range(200)]
    assert abs(np.mean(delays) - 0.2) < 6 * 0.2 / math.sqrt(12 * 200)
    assert ranged.metrics()["straggler/delays"] == 400


def test_crash_stop():
    crash = setup(Crash([3], at_step=10))
    assert [crash.crashed(3, s) for s in (0, 9, 10, 50)] == [False, False, True, True]
    assert not crash.crashed(2, 50)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("n", [2, 5, 28, 32])
def test_cat_map_is_a_bijection_moving_pixels_by_the_formula(n):
    perm = cat_map_permutation(n)
    assert torch.equal(perm.sort().values, torch.arange(n * n))
    aug = NonlinearAugmentation([1], kind="cat_map")
    for x, y in [(0, 0), (1, 0), (n - 1, 1), (n // 2, n - 1)]:
        img = torch.zeros(1, 1, n, n)
        img[0, 0, y, x] = 1.0
        moved = aug.warp(img)[0, 0]
        assert moved.sum() == 1 and moved[(x + y) % n, (2 * x + y) % n] == 1


def test_cat_map_period():
    # Known periods (Dyson & Falk 1992: at most 3n, equal to 3n iff n = 2·5^k).
    sizes = (2, 3, 4, 5, 10, 50, 101, 150)
    assert [cat_map_period(n) for n in sizes] == [3, 4, 3, 10, 30, 150, 25, 300]
    n, period = 28, cat_map_period(28)
    img = torch.rand(2, 3, n, n)
    assert torch.equal(NonlinearAugmentation([1], kind="cat_map", iterations=period).warp(img), img)
    almost = NonlinearAugmentation([1], kind="cat_map", iterations=period - 1)
    assert not torch.equal(almost.warp(img), img)


def test_lotka_volterra_grid_is_the_flow_of_the_paper_field():
    h, w, t_end = 6, 5, 0.5
    grid = flow_grid("lotka_volterra", h, w, t_end)
    for i, j in [(0, 0), (2, 3), (5, 4)]:
        start = [(j + 0.5) / w, (i + 0.5) / h]
        ref = solve_ivp(lambda t, z: lotka_volterra_field(*z), (0, t_end), start, method="DOP853",
                        rtol=1e-10, atol=1e-12).y[:, -1]
        np.testing.assert_allclose(grid[i, j].numpy(), 2 * ref - 1, atol=1e-5)
    alpha, beta, gamma, delta = 2 / 3, 4 / 3, -1.0, -1.0
    dx, dy = lotka_volterra_field(np.array(0.3), np.array(0.7))
    assert (dx, dy) == pytest.approx((alpha * 0.3 - beta * 0.21, delta * 0.21 - gamma * 0.7))


@pytest.mark.parametrize("kind", ["lotka_volterra", "cat_map", "smooth_cat_map"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((8, 3, 32, 32), torch.float32), ((8, 28, 28), torch.float64), ((8, 1, 28, 28), torch.uint8)],
)
def test_augmentation_keeps_shape_dtype_range_and_is_seeded(kind, shape, dtype):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, generator=g, dtype=dtype)
    else:
        images = torch.rand(shape, generator=g, dtype=dtype) * 2 - 0.5  # range [-0.5, 1.5)
    aug = setup(NonlinearAugmentation([2], kind=kind, noise_std=(0.05, 0.2)), seed=1)
    out = aug.on_worker_batch(2, 4, (images, torch.zeros(8)))[0]
    assert out.shape == images.shape and out.dtype == images.dtype
    assert images.min() <= out.min() and out.max() <= images.max()
    assert not torch.equal(out, images)
    assert torch.equal(aug.on_worker_batch(2, 4, (images, None))[0], out)
    assert not torch.equal(aug.on_worker_batch(2, 5, (images, None))[0], out)
    assert aug.on_worker_batch(3, 4, (images, None))[0] is images


def test_augmentation_fraction_and_noise_free_warp():
    images = torch.rand(400, 1, 8, 8)
    aug = setup(NonlinearAugmentation([1], kind="lotka_volterra", fraction=0.3, input_key="image"))
    out = aug.on_worker_batch(1, 0, {"image": images, "label": 1})["image"]
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(out[changed], aug.warp(images)[changed])  # no noise: exactly the warp
    assert abs(int(changed.sum()) - 120) < 5 * math.sqrt(400 * 0.3 * 0.7)
    assert aug.metrics() == {"augmentation/images": float(changed.sum())}


# ---------------------------------------------------------------- arrival schedule and λ


def test_byzantine_fraction_from_arrival():
    assert byzantine_fraction("uniform", 9, [1, 2, 3]) == pytest.approx(1 / 3)
    assert byzantine_fraction("id", 9, [6, 9]) == pytest.approx(15 / 45)
    assert byzantine_fraction("id2", 17, range(1, 9)) == pytest.approx(204 / 1785)
    assert byzantine_fraction([0, 1, 1, 2], 4, [4]) == pytest.approx(0.5)
    ids = workers_for_fraction("id", 9, 4, 0.4)
    assert len(ids) == 4 and sum(ids) == 18
    with pytest.raises(ValueError, match="arrival must be"):
        byzantine_fraction("fast", 3, [1])
    with pytest.raises(ValueError, match="out of range"):
        byzantine_fraction("id", 3, [4])


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ByzantineWorkers([1], "gauss"), "unknown attack 'gauss'"),
        (lambda: ByzantineWorkers([0, 1], "random"), "parameter server"),
        (lambda: ByzantineWorkers([-1], "random"), "worker ids are 1..num_workers"),
        (lambda: ByzantineWorkers([], "random"), "non-empty"),
        (lambda: ByzantineWorkers(3, "random"), "non-empty list"),
        (lambda: ByzantineWorkers([2, 2], "random"), "duplicate"),
        (lambda: ByzantineWorkers([1], "label_flip"), "num_classes"),
        (lambda: ByzantineWorkers([1], "random", scale=-1), "scale"),
        (lambda: PacketLoss([1], rate=1.0), r"rate must be in \[0, 1\)"),
        (lambda: PacketLoss([1], rate=-0.1), r"rate must be in \[0, 1\)"),
        (lambda: PacketLoss([1], mode="burst"), "unknown packet loss mode"),
        (lambda: PacketLoss([0]), "links: rank 0"),
        (lambda: Straggler([1], delay=-1.0), "delay must be finite and >= 0"),
        (lambda: Straggler([1], delay=(0.5, 0.1)), "low > high"),
        (lambda: Crash([1], at_step=-2), "at_step"),
        (lambda: NonlinearAugmentation([1], kind="swirl"), "unknown augmentation kind"),
        (lambda: NonlinearAugmentation([1], fraction=1.5), "fraction"),
        (lambda: NonlinearAugmentation([1], noise_std=-0.1), "noise_std"),
    ],
)
def test_bad_config_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_worker_ids_checked_against_num_workers_at_setup():
    faults = (ByzantineWorkers([3, 10], "random"), PacketLoss([10]), Crash([10]), Straggler([10]))
    for fault in faults:
        with pytest.raises(ValueError, match=r"\[10\] out of range; worker ids are 1..9"):
            fault.setup_faults(9, 0)
    with pytest.raises(ValueError, match="square"):
        NonlinearAugmentation([1], kind="cat_map").warp(torch.zeros(1, 4, 5))


def test_faults_are_configurable_from_yaml():
    faults = callbacks_from_yaml(
        """
        callbacks:
          - class_path: lightning_byz.faults.ByzantineWorkers
            init_args: {workers: [1, 2, 3], attack: alie, z: 1.0}
          - class_path: lightning_byz.faults.Straggler
            init_args: {workers: [4], delay: [0.1, 0.3]}
          - class_path: lightning_byz.faults.PacketLoss
            init_args: {links: [5], rate: 0.1, mode: message}
          - class_path: lightning_byz.faults.NonlinearAugmentation
            init_args: {workers: [6], kind: cat_map, noise_std: [0.0, 0.1], input_key: image}
          - class_path: lightning_byz.faults.Crash
            init_args: {workers: [7], at_step: 50}
        """
    )
    assert [type(f).__name__ for f in faults] == [
        "ByzantineWorkers", "Straggler", "PacketLoss", "NonlinearAugmentation", "Crash"
    ]
    assert faults[0].z == 1.0 and (faults[1].low, faults[1].high) == (0.1, 0.3)
    assert faults[2].mode == "message" and faults[3].input_key == "image"
    assert faults[4].crashed(7, 50)
