"""The omniscient attacks a reviewer would try: min-max / min-sum (Shejwalkar & Houmansadr, NDSS
2021), mimic (Karimireddy, He & Jaggi, ICLR 2022), and the ``scale`` variants of every omniscient
attack. Formulas checked against their definitions, computed independently in numpy."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from conftest import callbacks_from_yaml

from lightning_byz import AsyncPSStrategy
from lightning_byz.faults import ByzantineWorkers
from lightning_byz.faults.attacks import OMNISCIENT, PERTURBATIONS

# 5 honest workers (1..5) with uneven weights, then Byzantine workers 6 and 7
HONEST = torch.tensor(
    [[1.0, 2.0, -1.0, 0.5], [3.0, 0.0, 1.0, 2.0], [-2.0, 4.0, 0.0, 1.0], [0.5, 1.5, 2.5, -1.0],
     [2.0, 2.0, 0.0, 0.0]],
    dtype=torch.float64,
)
VECTORS = torch.cat([HONEST, torch.tensor([[9.0, 9.0, 9.0, 9.0], [-7.0, 0.0, 7.0, 1.0]],
                                          dtype=torch.float64)])
WEIGHTS = torch.tensor([0.1, 0.3, 0.15, 0.05, 0.1, 0.2, 0.1], dtype=torch.float64)
WORKERS = torch.arange(1, 8)
BYZANTINE = [6, 7]


def attack(name: str, **options) -> ByzantineWorkers:
    fault = ByzantineWorkers(BYZANTINE, name, **options)
    fault.setup_faults(7, 0)
    return fault


def honest_stats() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Honest rows, normalised weights, weighted mean and population std."""
    x, w = HONEST.numpy(), WEIGHTS[:5].numpy() / WEIGHTS[:5].sum().item()
    mean = w @ x
    return x, w, mean, np.sqrt(w @ (x - mean) ** 2)


def paper_perturbation(kind: str, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return {"unit": -mean / np.linalg.norm(mean), "std": -std, "sign": -np.sign(mean)}[kind]


def max_distance(m, x, w):
    return np.linalg.norm(x - m, axis=1).max()


def sum_of_squares(m, x, w):
    return w @ ((x - m) ** 2).sum(1)


def min_max_bound(x, w):
    return max(max_distance(row, x, w) for row in x)


def min_sum_bound(x, w):
    return max(sum_of_squares(row, x, w) for row in x)


CRITERIA = {"min_max": (max_distance, min_max_bound), "min_sum": (sum_of_squares, min_sum_bound)}


def algorithm_1(criterion, bound, mean, p, gamma_init=10.0, tau=1e-5):
    """Shejwalkar & Houmansadr's Algorithm 1 (AGR-agnostic): halve the step until γ moves < τ."""
    gamma, step, success = gamma_init, gamma_init / 2, 0.0
    while abs(success - gamma) > tau:
        if criterion(mean + gamma * p) <= bound:
            success, gamma = gamma, gamma + step
        else:
            gamma = gamma - step
        step /= 2
    return success


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_min_max_min_sum_push_the_mean_as_far_as_the_criterion_allows(name, kind):
    before = VECTORS.clone()
    out = attack(name, perturbation=kind).server_attack(VECTORS, WEIGHTS, WORKERS)
    x, w, mean, std = honest_stats()
    p = paper_perturbation(kind, mean, std)
    criterion, bound = CRITERIA[name]
    m = out[5].numpy()
    gamma = (m - mean) @ p / (p @ p)
    np.testing.assert_allclose(m, mean + gamma * p, rtol=1e-12, atol=1e-12)  # m = μ + γp
    assert gamma > 0
    limit = bound(x, w)
    assert criterion(m, x, w) == pytest.approx(limit, rel=1e-12)  # the constraint is tight
    assert criterion(mean + 1.01 * gamma * p, x, w) > limit  # so γ is the largest allowed
    reference = algorithm_1(lambda y: criterion(y, x, w), limit, mean, p)
    assert reference <= gamma + 1e-12 and gamma - reference < 2e-5  # their search's limit
    assert torch.equal(out[6], out[5]) and torch.equal(out[:5], HONEST)
    assert torch.equal(VECTORS, before)


def test_mimic_copies_the_honest_row_farthest_along_the_top_principal_direction():
    x, w, mean, _ = honest_stats()
    _, eigenvectors = np.linalg.eigh((w[:, None] * (x - mean)).T @ (x - mean))
    chosen = np.abs((x - mean) @ eigenvectors[:, -1]).argmax()
    out = attack("mimic").server_attack(VECTORS, WEIGHTS, WORKERS)
    assert torch.equal(out[5], HONEST[chosen]) and torch.equal(out[6], HONEST[chosen])
    assert torch.equal(out[:5], HONEST)
    # hand-built: the honest rows spread along the first axis; the outermost one is copied
    line = torch.tensor([[-3.0, 0.0], [1.0, 0.2], [2.0, -0.2], [0.0, 0.0], [5.0, 5.0]])
    out = attack("mimic").server_attack(line, torch.ones(5), torch.tensor([1, 2, 3, 6, 7]))
    assert torch.equal(out[3:], line[[0, 0]])
    # weights decide the principal direction: the spread along x (uniform) or along y (weighted)
    cross = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 2.0], [0.0, -2.0], [9.0, 9.0]])
    ids = torch.tensor([1, 2, 3, 4, 6])
    assert torch.equal(attack("mimic").server_attack(cross, torch.ones(5), ids)[4], cross[0])
    weighted = torch.tensor([0.05, 0.05, 0.45, 0.45, 0.2])
    assert torch.equal(attack("mimic").server_attack(cross, weighted, ids)[4], cross[2])


def test_mimic_target_worker_is_copied_exactly_once_heard_from():
    fault = attack("mimic", target_worker=4)
    out = fault.server_attack(VECTORS, WEIGHTS, WORKERS)
    assert torch.equal(out[5:], HONEST[[3, 3]]) and torch.equal(out[:5], HONEST)
    absent = [0, 1, 2, 4, 5, 6]  # worker 4 not heard from yet: rows as sent
    rows = VECTORS[absent]
    assert fault.server_attack(rows, WEIGHTS[absent], WORKERS[absent]) is rows
    assert fault.metrics() == {"byzantine/server_attacks": 1.0}


@pytest.mark.parametrize("name", ["min_max", "min_sum", "mimic"])
def test_integer_weights_act_like_repeated_rows_and_zero_weight_like_absent(name):
    fault = attack(name)
    weights = torch.tensor([1.0, 3.0, 2.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    out = fault.server_attack(VECTORS, weights, WORKERS)
    repeat = [0, 1, 1, 1, 2, 2, 3, 4, 4, 5, 6]
    flat = fault.server_attack(VECTORS[repeat], torch.ones(11, dtype=torch.float64),
                               WORKERS[repeat])
    torch.testing.assert_close(flat[-1], out[-1], rtol=1e-12, atol=1e-12)
    uniform = fault.server_attack(VECTORS, torch.ones(7, dtype=torch.float64), WORKERS)
    if name != "mimic":  # here mimic picks the same worker both ways; see the test above
        assert not torch.allclose(uniform[-1], out[-1])
    zero = weights.clone()
    zero[3] = 0.0
    without = [0, 1, 2, 4, 5, 6]
    torch.testing.assert_close(
        fault.server_attack(VECTORS, zero, WORKERS)[-1],
        fault.server_attack(VECTORS[without], weights[without], WORKERS[without])[-1],
        rtol=1e-12, atol=1e-12,
    )


@pytest.mark.parametrize("name", OMNISCIENT)
@pytest.mark.parametrize("scale", [0.0, 2.5, -1.0])
def test_scale_multiplies_the_deviation_from_the_honest_mean(name, scale):
    _, _, mean, _ = honest_stats()
    paper = attack(name, z=1.0).server_attack(VECTORS, WEIGHTS, WORKERS)
    scaled = attack(name, z=1.0, scale=scale).server_attack(VECTORS, WEIGHTS, WORKERS)
    expected = mean + scale * (paper[5:].numpy() - mean)
    np.testing.assert_allclose(scaled[5:].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(scaled[:5], HONEST)


@pytest.mark.parametrize("name", OMNISCIENT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_omniscient_attacks_are_deterministic_and_touch_only_byzantine_rows(name, dtype):
    vectors, weights = VECTORS.to(dtype), WEIGHTS.to(dtype)
    before = vectors.clone()
    fault = attack(name, z=1.0)
    out = fault.server_attack(vectors, weights, WORKERS)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(fault.server_attack(vectors, weights, WORKERS), out)
    assert torch.equal(vectors, before) and torch.equal(out[:5], vectors[:5])
    assert not torch.equal(out[5:], vectors[5:]) and torch.equal(out[5], out[6])


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_degenerate_honest_rows_give_the_mean(name, kind):
    """Identical honest rows leave no room (γ = 0); a zero mean gives no unit direction."""
    ids = torch.tensor([1, 2, 6])
    same = torch.tensor([[1.0, -2.0], [1.0, -2.0], [9.0, 9.0]])
    out = attack(name, perturbation=kind).server_attack(same, torch.ones(3), ids)
    assert torch.equal(out[2], same[0])
    if kind == "unit":
        opposite = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [9.0, 9.0]])
        out = attack(name, perturbation=kind).server_attack(opposite, torch.ones(3), ids)
        assert torch.equal(out[2], torch.zeros(2))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ByzantineWorkers([1], "min_max", perturbation="gauss"), "unknown perturbation"),
        (lambda: ByzantineWorkers([1, 2], "mimic", target_worker=2), "must be an honest worker"),
        (lambda: ByzantineWorkers([1], "mimic", target_worker=0), "parameter server"),
        (lambda: ByzantineWorkers([1], "mimic", target_worker=1.5), "integers"),
        (lambda: attack("mimic", target_worker=8), r"target_worker 8 out of range; .* 1..7"),
    ],
)
def test_bad_attack_options_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("name", ["min_max", "min_sum", "mimic"])
def test_simulated_training_runs_under_each_new_attack(name):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                         batch_size=8)
    fault = ByzantineWorkers([3, 4], name)
    model = TinyRegression()
    trainer = L.Trainer(
        strategy=AsyncPSStrategy(transport="simulated", num_workers=4, aggregator="cwmed", seed=0),
        callbacks=[fault], max_steps=20, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader)
    assert fault.metrics()["byzantine/server_attacks"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_new_options_are_configurable_from_yaml():
    min_sum, mimic = callbacks_from_yaml(
        """
        callbacks:
          - class_path: lightning_byz.faults.ByzantineWorkers
            init_args: {workers: [1, 2], attack: min_sum, perturbation: sign, scale: 2.0}
          - class_path: lightning_byz.faults.ByzantineWorkers
            init_args: {workers: [3], attack: mimic, target_worker: 4}
        """
    )
    assert (min_sum.perturbation, min_sum.scale, mimic.target_worker) == ("sign", 2.0, 4)
