"""Evaluation under MPI runs once, on the server; every worker rank returns the server's results.

The server holds the model (its point, its checkpoints, its loggers), so ``trainer.validate``,
``trainer.test`` and ``trainer.predict`` (with a model, or ``ckpt_path="best" | "last" | path``)
evaluate on rank 0 only; the workers do not go over the data again. A worker's evaluation loop
instead waits for the server's results (JSON: metric names and floats, never a pickle) and returns
them, so a script that reads ``trainer.test(...)[0]["test_acc"]`` on every rank works unchanged.
``predict`` returns ``None`` on the workers: the predictions stay on the server (write them there,
e.g. with a ``BasePredictionWriter``).

``ckpt_path="best"`` needs a checkpoint callback on every rank. Workers save no checkpoints, so at
the end of ``fit`` the server sends its first checkpoint callback's best and last paths (and whether
a stop request interrupted its fit, so the workers' fit ends the same way) and each worker holds
them in a :class:`ServerCheckpoints` stand-in. What a worker then restores is not used
(it does not evaluate); where the file is not on the worker's node it is not read
(:func:`restore_on_worker`).

Lightning's evaluation loops are the public ``trainer.validate_loop`` / ``test_loop`` /
``predict_loop``; their ``run`` is shadowed on the instance, once per loop.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)


def replace_callback(trainer: pl.Trainer, kind: type, callback: Callback | None = None) -> None:
    """Drop the callbacks of type ``kind`` (a strategy's own, from an earlier fit); add ``callback``."""
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if type(cb) is not kind] + ([callback] if callback else [])


class ServerCheckpoints(Checkpoint):
    """A worker's stand-in for the server's checkpoint callback: its paths, nothing saved."""

    def __init__(self, best_model_path: str = "", last_model_path: str = ""):
        self.best_model_path = best_model_path
        self.last_model_path = last_model_path


def send_fit_end(trainer: pl.Trainer, comm, interrupted: bool) -> None:
    """Server, at the end of fit: how it ended (``interrupted``: by a stop request such as SIGTERM)
    and its checkpoint paths, to every worker."""
    from lightning_byz.transport import mpi

    cb = trainer.checkpoint_callback
    paths = {} if cb is None else {"best_model_path": str(getattr(cb, "best_model_path", "") or ""),
                                   "last_model_path": str(getattr(cb, "last_model_path", "") or "")}
    mpi.send_text(comm, json.dumps({"interrupted": interrupted, "checkpoints": paths}))


def receive_fit_end(trainer: pl.Trainer, comm) -> bool:
    """Worker, at the end of fit: hold the server's checkpoint paths (when it has a checkpoint
    callback); True when the server's fit was interrupted (the worker's then ends the same way)."""
    from lightning_byz.transport import mpi

    end = json.loads(mpi.recv_text(comm))
    paths = end["checkpoints"]
    replace_callback(trainer, ServerCheckpoints, ServerCheckpoints(**{k: str(v) for k, v in paths.items()}) if paths else None)
    return bool(end["interrupted"])


def restore_on_worker(path: str, module: pl.LightningModule) -> dict[str, Any] | None:
    """The checkpoint a worker loads to evaluate: None (read the file) where it exists, else the
    worker's own state, so a node without the server's file still follows the server's evaluation."""
    if get_filesystem(path).exists(path):
        return None
    log.info("checkpoint %s is not on this node; the worker does not evaluate, so it keeps its weights", path)
    return {"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__}


def relay_evaluation(trainer: pl.Trainer, is_server: bool, comm) -> None:
    """Make this stage's evaluation loop run once, on the server, and hand its results to every worker."""
    loops = {TrainerFn.VALIDATING: trainer.validate_loop, TrainerFn.TESTING: trainer.test_loop,
             TrainerFn.PREDICTING: trainer.predict_loop}
    loop = loops.get(trainer.state.fn)
    if loop is None or "run" in vars(loop):
        return
    from lightning_byz.transport import mpi

    own_run = loop.run
    predicting = trainer.state.fn == TrainerFn.PREDICTING

    def server_run():
        results = own_run()
        mpi.send_text(comm, "null" if predicting else json.dumps(results, default=float))
        return results

    def worker_run():
        return json.loads(mpi.recv_text(comm))

    loop.run = server_run if is_server else worker_run
