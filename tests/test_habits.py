"""A LightningModule that trains under Lightning's default strategy trains under AsyncPSStrategy
unchanged: any optimizer and scheduler (stepped on the server), and the everyday habits of a
Lightning script (checkpoints with a monitor, early stopping, ``max_time``, evaluation after fit
with ``ckpt_path``, torchmetrics, ``sync_dist``), simulated and under real ``mpirun``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from conftest import SCRIPTS
from lightning_byz import AsyncPSStrategy
from lightning_byz.launcher import launch

sys.path.insert(0, str(SCRIPTS))
import habits  # noqa: E402
from user_mlp import loaders  # noqa: E402

HABITS = str(SCRIPTS / "habits.py")


def _trainer(strategy, steps: int, **kw) -> L.Trainer:
    return L.Trainer(strategy=strategy, accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    (path,) = log_dir.glob("logs/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


# -- any optimizer, any scheduler -------------------------------------------------------------------
VOCAB, LENGTH = 24, 16


def _tokens(n: int, seed: int) -> TensorDataset:
    """Sequences of a noisy grammar: the next token is (3·t + 1) mod V, or a random one (10%)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(n, LENGTH + 1, dtype=torch.long)
    x[:, 0] = torch.randint(VOCAB, (n,), generator=gen)
    for i in range(LENGTH):
        noise = torch.rand(n, generator=gen) < 0.1
        x[:, i + 1] = torch.where(noise, torch.randint(VOCAB, (n,), generator=gen), (3 * x[:, i] + 1) % VOCAB)
    return TensorDataset(x[:, :-1], x[:, 1:])


class SmallVocabTransformer(LightningTransformer):
    """Lightning's demo Transformer LM (embeddings, dropout, encoder-decoder) as a user adapts it:
    AdamW, a held-out loss, and synthetic tokens instead of the WikiText-2 download."""

    def __init__(self):
        super().__init__(vocab_size=VOCAB)

    def prepare_data(self) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_tokens(2048, seed=0), batch_size=16, shuffle=True)

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", torch.nn.functional.nll_loss(self(inputs, target), target.view(-1)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4, weight_decay=0.01)


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~30 s quiet; 123 s measured with a busy loop beside it on 2 cores
def test_transformer_lm_with_adamw_learns_as_under_the_default_strategy():
    held_out = DataLoader(_tokens(256, seed=1), batch_size=64)

    def held_out_loss(strategy) -> tuple[float, float]:
        torch.manual_seed(0)
        model = SmallVocabTransformer()
        trainer = _trainer(strategy, 200)
        before = trainer.validate(model, held_out, verbose=False)[0]["val_loss"]
        trainer.fit(model)
        return before, trainer.validate(model, held_out, verbose=False)[0]["val_loss"]

    start, default = held_out_loss("auto")
    _, robust = held_out_loss(AsyncPSStrategy(aggregator="cwmed", transport="simulated", num_workers=4))
    # measured: 3.34 -> default 0.0004, async w-CWMed 0.005 (AdamW at lr 1e-3 instead: async plateaus at 2.4,
    # asynchrony reuses every gradient ~N times, so it needs the smaller lr a Transformer wants anyway)
    assert default < 0.05 * start
    assert robust < 0.05 * start, (start, default, robust)


class _OneCycle(habits.DigitsMLP):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=self.hparams.max_steps)
        self.momenta = []
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, *args):
        self.momenta.append(self.trainer.optimizers[0].param_groups[0]["momentum"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_scheduler_that_cycles_momentum_trains_as_under_the_default_strategy(mode):
    """OneCycleLR cycles SGD's momentum (0.95 -> 0.85 -> 0.95) with the lr; the server's optimizer
    is the one stepped, so every update uses the scheduled pair (once, the workers kept 0.95)."""
    train, test = loaders()

    def accuracy(strategy) -> tuple[float, list[float]]:
        torch.manual_seed(0)
        model = _OneCycle(400)
        trainer = _trainer(strategy, 400)
        trainer.fit(model, train)
        return trainer.test(model, test, verbose=False)[0]["test_acc"], model.momenta

    default, _ = accuracy("auto")
    robust, momenta = accuracy(AsyncPSStrategy(aggregator="cwmed", mode=mode, transport="simulated", num_workers=3))
    assert min(momenta) == pytest.approx(0.85, abs=1e-3) and momenta[-1] == pytest.approx(0.95, abs=1e-3)
    # measured (macro accuracy): default 0.906, async w-CWMed 0.885, sync 0.93
    assert robust >= default - 0.05, (default, robust)


def test_momentum_on_both_sides_is_a_clear_error():
    strategy = AsyncPSStrategy(transport="simulated", num_workers=2, worker_momentum=0.9)
    with pytest.raises(ValueError, match="momentum on both sides"):
        _trainer(strategy, 2).fit(_OneCycle(2), loaders()[0])


# -- Lightning habits ---------------------------------------------------------------------------------
def _run_simulated(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result"
    habits.main(["--out", str(out), "--transport", "simulated", "--num-workers", "3", *args])
    return json.loads(Path(f"{out}.0").read_text())


def _check_evaluation_after_fit(result: dict, rows: list[dict[str, str]]) -> None:
    """validate/test(ckpt_path="best") evaluate the best checkpoint, whose score ModelCheckpoint kept."""
    assert result["validate_best"][0]["val_acc"] == pytest.approx(result["best_model_score"])
    assert result["test_best"][0]["test_acc"] == pytest.approx(result["best_model_score"])
    assert result["best_model_score"] == pytest.approx(max(_column(rows, "val_acc")))
    assert len(result["top_k"]) == 2 and Path(result["best_model_path"]).name in result["top_k"]
    lrs, momenta = _column(rows, "lr-SGD"), _column(rows, "lr-SGD-momentum")
    assert max(lrs) > 10 * min(lrs) and max(momenta) > min(momenta)  # LearningRateMonitor saw OneCycleLR


@pytest.mark.slow
def test_habits_simulated_should_stop_checkpoints_and_evaluation(tmp_path):
    result = _run_simulated(tmp_path, "--stop", "should_stop")
    assert 60 <= result["global_step"] <= 62 and result["version"] == result["global_step"]
    _check_evaluation_after_fit(result, _metrics(tmp_path))
    assert result["predict"] == 1000


@pytest.mark.slow
def test_a_simulated_run_stopped_by_sigterm_checkpoints_and_exits_143(tmp_path):
    """The same preemption as under MPI, in one process: the checkpoint is written, the exit is 143."""
    proc = subprocess.run([sys.executable, HABITS, "--out", str(tmp_path / "result"), "--transport", "simulated",
                           "--num-workers", "3", "--stop", "sigterm", "--steps", "100000"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert torch.load(tmp_path / "preempted" / "on_exception.ckpt", weights_only=False)["global_step"] >= 30


def test_scheduled_worker_hyperparameters_reach_simulated_workers(tmp_path):
    result = _run_simulated(tmp_path, "--optimizer", "mu2sgd", "--stop", "should_stop")
    assert result["betas"] == [0.5, 0.5, 0.5]  # set on the server's optimizer at step 20 only


def _run_mpi(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "result"
    proc = launch(2, [HABITS, "--out", str(out), *args], timeout=240, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(3)]


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_habits_under_mpirun_early_stopping_and_evaluation_once_on_the_server(tmp_path):
    server, *workers = _run_mpi(tmp_path, "--stop", "early_stopping")
    assert server["global_step"] < 400 and server["best_model_score"] >= 0.8  # EarlyStopping's threshold
    _check_evaluation_after_fit(server, _metrics(tmp_path))
    assert server["predict"] == 1000
    for worker in workers:  # the server's results, its checkpoint path; predictions stay on the server
        for key in ("validate_best", "test_best", "test_last", "best_model_path"):
            assert worker[key] == server[key], key
        assert worker["predict"] is None


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_max_time_stops_every_rank_and_scheduled_hyperparameters_reach_mpi_workers(tmp_path):
    server, *workers = _run_mpi(tmp_path, "--stop", "max_time", "--optimizer", "mu2sgd", "--steps", "100000")
    assert 20 < server["global_step"] < 100000
    assert [w["betas"] for w in workers] == [[0.5], [0.5]]  # travelled in the reply header


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", ["sigterm", "sigterm_worker"])
def test_preemption_sigterm_checkpoints_stops_every_rank_and_resumes(stop, tmp_path):
    """SIGTERM on every rank (Slurm preemption), or on one worker only: the server saves its state
    (OnExceptionCheckpoint), stops every worker and the whole job ends with 143 (128 + SIGTERM: the
    job did not finish); the checkpoint resumes the run."""
    out = tmp_path / "result"
    start = time.monotonic()
    proc = launch(2, [HABITS, "--out", str(out), "--stop", stop, "--steps", "100000"], timeout=120,
                  capture_output=True)
    assert proc.returncode == 143, proc.stderr[-4000:]
    assert time.monotonic() - start < 90
    checkpoint = tmp_path / "preempted" / "on_exception.ckpt"
    saved_at = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 30 <= saved_at < 100, saved_at  # the rank(s) signal themselves at their step 30
    assert not list(tmp_path.glob("result.*"))  # fit raised on every rank: nothing after it ran
    if stop == "sigterm_worker":
        assert "worker 2 received SIGTERM: stopping the job" in proc.stderr
        return
    server, *_ = _run_mpi(tmp_path, "--stop", "should_stop", "--resume", str(checkpoint))
    assert server["global_step"] > saved_at and server["version"] == server["global_step"]
