"""AsyncPSStrategy in one process (simulated workers) and its configuration errors."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch

from lightning_byz import AsyncPSStrategy
from lightning_byz.faults import Crash
from lightning_byz.optim import Mu2SGD
from lightning_byz.arrivals import ArrivalClock, arrival_probabilities

from conftest import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
import user_mlp  # noqa: E402  (the user-style script doubles as the test model)


def run(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / name
    user_mlp.main(["--out", str(out), "--transport", "simulated", "--num-workers", "3", *args])
    return json.loads((tmp_path / f"{name}.0").read_text())


@pytest.mark.slow
def test_simulated_training_learns_and_is_deterministic(tmp_path):
    a = run(tmp_path, "a", "--steps", "400")
    b = run(tmp_path, "b", "--steps", "400")
    assert a["acc"] >= 0.85
    assert a["params"] == b["params"] and a["counts"] == b["counts"]
    assert a["global_step"] == a["version"] == 400


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [
    ["--optimizer", "sgd"], ["--optimizer", "mu2sgd"],
    ["--optimizer", "adamw"], ["--momentum", "0.9"],  # the server's optimizer state: Lightning's checkpoint
    ["--worker-momentum", "0.9"],  # the workers' momenta: the strategy's state
    ["--optimizer", "adamw", "--num-servers", "3", "--aggregator", "gm"],  # 3 server shards (issue 17)
], ids=["sgd", "mu2sgd", "adamw", "server_momentum", "worker_momentum", "adamw_3_servers"])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, optimizer):
    straight = run(tmp_path, "straight", "--steps", "100", *optimizer)
    ckpt = tmp_path / "ckpt"
    run(tmp_path, "first", "--steps", "50", *optimizer, "--ckpt-dir", str(ckpt))
    resumed = run(tmp_path, "resumed", "--steps", "100", *optimizer, "--resume", str(ckpt / "last.ckpt"))
    assert resumed["params"] == straight["params"]
    assert resumed["counts"] == straight["counts"]


@pytest.mark.slow
def test_sync_mode_rounds_take_every_worker(tmp_path):
    result = run(tmp_path, "sync", "--steps", "40", "--mode", "sync", "--aggregator", "mean")
    assert result["counts"] == [40, 40, 40]


def test_arrival_distribution_drives_who_arrives():
    q = arrival_probabilities("id2", 4)
    assert torch.allclose(q, torch.tensor([1.0, 4, 9, 16], dtype=torch.float64) / 30)
    clock = ArrivalClock(q, step_time=0.05, seed=0)
    clock.start(lambda w, s: 0.0)
    seen = torch.zeros(4)
    for step in range(6000):
        w = clock.next()
        seen[w - 1] += 1
        clock.schedule(w, step, lambda w, s: 0.0)
    assert torch.allclose(seen / seen.sum(), q.float(), atol=0.02)


def _arrivals(clock: ArrivalClock, count: int) -> list[int]:
    clock.start(lambda w, s: 0.0)
    seen = []
    for step in range(count):
        seen.append(clock.next())
        clock.schedule(seen[-1], step, lambda w, s: 0.0)
    return seen


@pytest.mark.parametrize("schedule, share, expected", [("random", 0.4, 0.4), ("interleave", 0.4, 1 / 3),
                                                        ("interleave", 0.25, 0.25)])
def test_a_fixed_byzantine_share_of_arrivals_whatever_their_speed(schedule, share, expected):
    """Workers 1, 2 (the slowest under id2: λ = 5/30 by speed) are Byzantine; the clock gives them
    the share λ of the arrivals (interleave: every ⌈1/λ⌉-th), and within each group arrivals
    still follow id2."""
    clock = ArrivalClock(arrival_probabilities("id2", 4), step_time=0.05, seed=1)
    clock.set_byzantine_share([1, 2], share, schedule)
    seen = torch.tensor(_arrivals(clock, 6000))
    realised = float(torch.isin(seen, torch.tensor([1, 2])).double().mean())
    assert realised == pytest.approx(expected, abs=0.02 if schedule == "random" else 1e-3)
    if schedule == "interleave":
        period = round(1 / expected)
        assert all(int(w) in (1, 2) for w in seen[::period])  # the released code's pattern
    honest = seen[seen > 2]
    assert float((honest == 4).double().mean()) == pytest.approx(16 / 25, abs=0.03)  # id2 within {3, 4}
    with pytest.raises(ValueError, match="byzantine_schedule must be one of"):
        clock.set_byzantine_share([1], 0.5, "bursty")


def test_byzantine_share_reaches_the_server_weights_in_a_simulated_fit():
    from lightning_byz.faults import ByzantineWorkers

    strategy = AsyncPSStrategy(aggregator="mean", transport="simulated", num_workers=6, arrival="id2",
                               byzantine_share=0.4, seed=0)
    trainer = _trainer(strategy, max_steps=600, callbacks=[ByzantineWorkers([1, 2], "sign_flip", scale=0.0)])
    trainer.fit(_Model(), _loader())
    counts = strategy.server.counts.double()
    assert float(counts[:2].sum() / counts.sum()) == pytest.approx(0.4, abs=0.05)  # by speed: 5/91 = 0.05
    for bad, message in [({"byzantine_share": 1.0}, "byzantine_share must lie in"),
                         ({"byzantine_schedule": "x"}, "byzantine_schedule must be one of")]:
        with pytest.raises(ValueError, match=message):
            AsyncPSStrategy(transport="simulated", num_workers=3, **bad)
    with pytest.raises(ValueError, match="needs Byzantine workers"):
        _trainer(AsyncPSStrategy(transport="simulated", num_workers=3, byzantine_share=0.3), max_steps=5).fit(
            _Model(), _loader())


class _Model(L.LightningModule):
    def __init__(self, optimizer=torch.optim.SGD):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=0.1)


def _loader():
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _trainer(strategy, **kw):
    return L.Trainer(strategy=strategy, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_registered_by_name_and_crashed_worker_is_left_out():
    trainer = _trainer("async_ps", max_steps=60, callbacks=[Crash(workers=[2], at_step=3)])
    assert isinstance(trainer.strategy, AsyncPSStrategy)
    trainer.strategy.worker_timeout = 0.5  # virtual seconds: ~10 of the others' steps
    trainer.fit(_Model(), _loader())
    server = trainer.strategy.server
    assert server.counts[1] == 3 and int(server.counts.sum()) == server.min_workers + 59  # the warm-up: one each
    assert 2 in server.silent  # reported and left out of the aggregate


def test_second_order_optimizer_is_a_clear_error():
    trainer = _trainer(AsyncPSStrategy(transport="simulated", num_workers=2), max_steps=2)
    with pytest.raises(ValueError, match="cannot run LBFGS"):
        trainer.fit(_Model(torch.optim.LBFGS), _loader())


def test_gradient_accumulation_is_a_clear_error():
    trainer = _trainer(AsyncPSStrategy(transport="simulated", num_workers=2), max_steps=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 is not supported"):
        trainer.fit(_Model(), _loader())


@pytest.mark.parametrize("optimizer, evaluations", [(torch.optim.SGD, 10), (Mu2SGD, 18)])
def test_gradient_clipping_and_hooks_apply_to_every_worker_gradient(optimizer, evaluations):
    """Sync, 2 workers, 5 rounds: on_before_optimizer_step runs after each gradient evaluation (10;
    STORM adds one at x_{t-1} from each worker's second step on: 18) and gradient_clip_val clips
    each, so with the mean one SGD step moves the parameters by at most lr·clip."""
    lr, clip = 0.1, 1e-3  # _Model's lr

    def run_steps(**kw) -> tuple[float, int]:
        torch.manual_seed(0)
        model, moves, hooks = _Model(optimizer), [], []
        params = lambda: torch.cat([p.detach().flatten().clone() for p in model.parameters()])  # noqa: E731
        record = L.pytorch.callbacks.LambdaCallback(
            on_train_batch_start=lambda *a: moves.append(params()),
            on_train_batch_end=lambda *a: moves.append((params() - moves.pop()).norm().item()),
            on_before_optimizer_step=lambda *a: hooks.append(1),
        )
        strategy = AsyncPSStrategy(transport="simulated", num_workers=2, aggregator="mean", mode="sync")
        _trainer(strategy, max_steps=5, callbacks=[record], **kw).fit(model, _loader())
        return max(moves), len(hooks)

    clipped, calls = run_steps(gradient_clip_val=clip)
    unclipped, _ = run_steps()
    assert calls == evaluations
    assert clipped < 0.01 * unclipped
    if optimizer is torch.optim.SGD:
        assert clipped <= lr * clip * (1 + 1e-5)


def test_loss_scaling_is_a_clear_error():
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = _trainer(AsyncPSStrategy(transport="simulated", num_workers=2), max_steps=2, plugins=[plugin])
    with pytest.raises(ValueError, match="loss scaling"):
        trainer.fit(_Model(), _loader())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"transport": "simulated"}, "needs num_workers"),
        ({"transport": "carrier-pigeon"}, "transport must be one of"),
        ({"mode": "semi"}, "mode must be 'async' or 'sync'"),
        ({"num_workers": 3, "arrival": [0.5, 0.5]}, "need 3 values"),
        ({"num_workers": 3, "arrival": "zipf"}, "arrival must be"),
        ({"num_workers": 0, "transport": "simulated"}, "num_workers must be >= 1"),
        ({"worker_timeout": 0}, "worker_timeout must be > 0"),
        ({"server_timeout": -1.0}, "server_timeout must be > 0"),
        ({"server_timeout": "5"}, "server_timeout must be > 0"),
        ({"aggregator": "median-of-means"}, "unknown aggregator"),
        ({"aggregator": "cwtm", "lam": 0.7}, "lam must lie in"),
    ],
)
def test_bad_configuration_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AsyncPSStrategy(**kwargs)


@pytest.mark.parametrize("min_workers, bound", [(None, 5.0), (1, None)])
def test_fastest_byzantine_workers_cannot_own_the_first_update(min_workers, bound):
    """3 of 9 workers send random vectors (std 100) and arrive 50x as often: without the warm-up the
    first update is theirs alone; with it, the weighted median of all nine barely moves the model."""
    from lightning_byz.faults import ByzantineWorkers

    torch.manual_seed(0)
    model = user_mlp.MLP()
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    attack = ByzantineWorkers(workers=[1, 2, 3], attack="random", scale=100.0, flood=50.0)
    strategy = AsyncPSStrategy(aggregator="cwmed", transport="simulated", num_workers=9, min_workers=min_workers)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[attack])
    trainer.fit(model, user_mlp.loaders()[0])
    moved = float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start).norm())
    if bound is None:
        assert moved > 1000.0  # lr 0.1 × a random vector of std 100 in 50,890 dimensions
    else:
        assert moved < bound


def test_checkpoints_load_with_weights_only_and_hold_only_plain_data(tmp_path):
    """The server's and the simulation's saved state (and the faults') are tensors, numbers, strings
    and containers of them, so a checkpoint loads with ``torch.load(weights_only=True)``."""
    run(tmp_path, "w", "--steps", "60", "--optimizer", "mu2sgd", "--straggler", "2", "--delay", "0.01",
        "--ckpt-dir", str(tmp_path / "ckpt"))
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))

    state = checkpoint["callbacks"]["AsyncPSStrategy"]
    assert {"server", "query", "clock", "streams", "rules"} <= set(state)
    assert plain(state) and plain({k: v for k, v in checkpoint["callbacks"].items()})


@pytest.mark.parametrize("byzantine, over", [([4], True), ([1], False)])
def test_byzantine_weight_beyond_the_rules_budget_is_said_once_and_logged(byzantine, over, recwarn):
    """id2 arrivals over 4 workers: worker 4 sends 16/30 of the messages, over w-CWMed's 1/2; worker 1
    sends 1/30. The server knows who is Byzantine from the configuration and logs the realised share."""
    from lightning_byz.faults import ByzantineWorkers

    shares = []
    record = L.pytorch.callbacks.LambdaCallback(
        on_train_batch_end=lambda trainer, *a: shares.append(float(trainer.callback_metrics["ps/byzantine_weight"]))
        if "ps/byzantine_weight" in trainer.callback_metrics else None)
    strategy = AsyncPSStrategy(transport="simulated", num_workers=4, arrival="id2", aggregator="cwmed")
    trainer = _trainer(strategy, max_steps=300, log_every_n_steps=10,
                       callbacks=[ByzantineWorkers(workers=byzantine, attack="sign_flip"), record])
    trainer.fit(_Model(), _loader())
    said = [w for w in recwarn if "of the weight" in str(w.message)]
    assert len(said) == (1 if over else 0), [str(w.message) for w in said]
    expected = (16 if over else 1) / 30
    assert shares and abs(shares[-1] - expected) < 0.1, shares[-5:]
    if over:
        assert f"workers {byzantine} hold" in str(said[0].message) and "budget 0.5" in str(said[0].message)
