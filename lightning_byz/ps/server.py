"""The parameter server's state machine, independent of how messages travel.

The server holds the model point ``x`` (a flat vector), the latest accepted vector of every worker,
how many updates each worker contributed (``counts``: the async weights s_i / Σ s_j of Dahan & Levy),
and what it rejected. The serve loop (:mod:`lightning_byz.ps.serve`) feeds it :class:`Message`
objects from a transport; it validates each one, and in ``async`` mode every accepted arrival
triggers an update; in ``sync`` mode an update happens once ``quorum`` workers have contributed to
the current round.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Callable

import torch
from torch import Tensor

from lightning_byz.aggregators import Aggregator, check_inputs
from lightning_byz.aggregators.base import nonfinite_rows
from lightning_byz.aggregators.coordinate import weighted_median
from lightning_byz.ps.messages import Message

log = logging.getLogger(__name__)

Attack = Callable[[Tensor, Tensor, Tensor], Tensor]


class ParameterServer:
    """Validates messages, keeps per-worker state, aggregates robustly and applies the server rule.

    Args:
        params: the model point ``x`` (flat, on the server's device); updated in place.
        num_workers: workers are numbered 1..num_workers.
        aggregator: ``agg(vectors[k, d], weights[k]) -> [d]``.
        server_rule: an object with ``step(params: list[Tensor], direction: list[Tensor], lr)``.
        lr: a callable returning the current learning rate (schedulers change it between steps).
        mode: ``"async"`` (update on every accepted arrival) or ``"sync"`` (rounds of ``quorum``).
        quorum: workers per sync round (default: all).
        worker_timeout: seconds of silence after which a worker is left out of the aggregate.
        attack: the omniscient-attack slot ``attack(vectors, weights, workers) -> vectors``.
        buffers_numel: size of the buffer part of messages (0: none).
        clock: time source (``time.monotonic``; the simulation passes its virtual clock).
    """

    def __init__(
        self,
        params: Tensor,
        num_workers: int,
        aggregator: Callable[..., Tensor],
        server_rule,
        lr: Callable[[], float],
        mode: str = "async",
        quorum: int | None = None,
        worker_timeout: float = math.inf,
        attack: Attack | None = None,
        buffers_numel: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if num_workers < 1:
            raise ValueError(f"need at least one worker, got num_workers={num_workers}")
        quorum = num_workers if quorum is None else int(quorum)
        if not 1 <= quorum <= num_workers:
            raise ValueError(f"sync_quorum must lie in [1, {num_workers}], got {quorum}")
        if not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds, got {worker_timeout}")
        self.params = params
        self.num_workers = num_workers
        self.aggregator = aggregator
        self.server_rule = server_rule
        self.lr = lr
        self.mode = mode
        self.quorum = quorum
        self.worker_timeout = float(worker_timeout)
        self.attack = attack
        self.clock = clock
        d, dev, dt = params.numel(), params.device, params.dtype
        self.latest = torch.zeros(num_workers, d, dtype=dt, device=dev)
        self.latest_buffers = torch.zeros(num_workers, buffers_numel, dtype=dt, device=dev)
        self.counts = torch.zeros(num_workers, dtype=torch.long)
        self.last_heard = [math.nan] * num_workers
        self.silent: set[int] = set()
        self.round: set[int] = set()
        self.version = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_by_worker: Counter[int] = Counter()
        self.lost = 0
        self.staleness: list[int] = []

    # -- messages -----------------------------------------------------------------------------
    def receive(self, msg: Message) -> bool:
        """Validate and store ``msg``; return True when an update is due (call :meth:`update`)."""
        reason = self._invalid(msg)
        if reason is not None:
            self.reject(msg.worker, reason)
            return False
        i = msg.worker - 1
        self.last_heard[i] = self.clock()
        if msg.worker in self.silent:
            self.silent.discard(msg.worker)
            log.warning("worker %d is back after a silence; counted again", msg.worker)
        if msg.vector is None:
            self.lost += 1
            return False
        self.latest[i].copy_(msg.vector, non_blocking=True)
        if self.latest_buffers.shape[1] and msg.buffers is not None:
            self.latest_buffers[i].copy_(msg.buffers, non_blocking=True)
        self.counts[i] += 1
        self.staleness.append(self.version - msg.version)
        if self.mode == "async":
            return True
        self.round.add(msg.worker)
        return self.round_complete()

    def round_complete(self) -> bool:
        """Sync: the round has ``quorum`` contributors (fewer when workers went silent)."""
        self.active_workers()
        return len(self.round) >= min(self.quorum, self.num_workers - len(self.silent))

    def reject(self, worker, reason: str) -> None:
        """Count a rejected message (by reason and sender) and say so in the log (3 times a sender)."""
        key = reason.split(":")[0]
        self.rejected[key] += 1
        self.rejected_by_worker[worker] += 1
        if self.rejected_by_worker[worker] <= 3:
            log.warning("server rejected a message from worker %s: %s", worker, reason)

    def _invalid(self, msg: Message) -> str | None:
        if not isinstance(msg.worker, int) or not 1 <= msg.worker <= self.num_workers:
            return f"unknown sender {msg.worker!r}"
        if msg.vector is None:
            return None
        if msg.vector.dim() != 1 or msg.vector.numel() != self.params.numel():
            return f"wrong size: {tuple(msg.vector.shape)} instead of ({self.params.numel()},)"
        if bool(nonfinite_rows(msg.vector[None]).any()):
            return "non-finite values (NaN/Inf) in the update"
        if msg.buffers is not None and self.latest_buffers.shape[1]:
            if msg.buffers.numel() != self.latest_buffers.shape[1]:
                return f"wrong buffer size: {msg.buffers.numel()} instead of {self.latest_buffers.shape[1]}"
            if bool(nonfinite_rows(msg.buffers[None]).any()):
                return "non-finite values (NaN/Inf) in the buffers"
        if msg.version > self.version:
            return f"version {msg.version} from the future (server is at {self.version})"
        return None

    # -- aggregation --------------------------------------------------------------------------
    def active_workers(self) -> Tensor:
        """Worker ids (1-based) that have contributed and are not silent beyond the timeout."""
        now = self.clock()
        for i, t in enumerate(self.last_heard):
            wid = i + 1
            if wid not in self.silent and now - t > self.worker_timeout:
                self.silent.add(wid)
                log.warning("worker %d silent for %.1fs: left out of the aggregate", wid, now - t)
        heard = self.counts > 0
        if self.silent:
            heard[[w - 1 for w in self.silent]] = False
        if self.mode == "sync":
            heard = torch.zeros_like(heard)
            heard[[w - 1 for w in self.round]] = True
        return torch.nonzero(heard).flatten() + 1

    def weights(self, workers: Tensor) -> Tensor:
        """Async: s_i / Σ s_j over ``workers``; sync: uniform over the round."""
        if self.mode == "sync":
            w = torch.ones(len(workers), dtype=self.params.dtype)
        else:
            w = self.counts[workers - 1].to(self.params.dtype)
        return (w / w.sum()).to(self.params.device)

    def update(self) -> Tensor:
        """Aggregate the active workers' latest vectors, step the server rule; return the workers used."""
        workers = self.active_workers()
        if len(workers) == 0:
            raise RuntimeError("no active worker to aggregate (all silent)")
        w = self.weights(workers)
        vectors = self.latest if len(workers) == self.num_workers else self.latest[workers - 1]
        if self.attack is not None:
            vectors = self.attack(vectors, w, workers)
        if isinstance(self.aggregator, Aggregator):  # rows were validated on arrival
            direction = self.aggregator.aggregate_checked(vectors, w)
        else:
            direction = self.aggregator(vectors, w)
        self.server_rule.step([self.params], [direction], self.lr())
        self.version += 1
        self.round.clear()
        return workers

    def buffers(self) -> Tensor | None:
        """Coordinate-wise weighted median of the active workers' buffers (robust to a few liars)."""
        if not self.latest_buffers.shape[1] or not bool((self.counts > 0).any()):
            return None
        workers = torch.nonzero(self.counts > 0).flatten()
        X, w = check_inputs(self.latest_buffers[workers], self.counts[workers].to(self.params.dtype))
        return weighted_median(X, w)

    # -- reporting and checkpoints --------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Staleness since the last call, weights, rejections: what the strategy logs."""
        out: dict[str, float] = {"rejected": float(sum(self.rejected.values())), "lost": float(self.lost)}
        if self.staleness:
            out["staleness_mean"] = sum(self.staleness) / len(self.staleness)
            out["staleness_max"] = float(max(self.staleness))
            self.staleness.clear()
        total = float(self.counts.sum())
        if total:
            for i, c in enumerate(self.counts.tolist()):
                out[f"weight/worker_{i + 1}"] = c / total
        out["silent_workers"] = float(len(self.silent))
        return out

    def state_dict(self) -> dict:
        return {
            "params": self.params.detach().cpu().clone(),
            "latest": self.latest.cpu().clone(),
            "latest_buffers": self.latest_buffers.cpu().clone(),
            "counts": self.counts.clone(),
            "version": self.version,
            "rejected": dict(self.rejected),
            "lost": self.lost,
            "server_rule": self.server_rule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["latest"].shape != self.latest.shape:
            raise ValueError(
                f"checkpoint holds {tuple(state['latest'].shape)} worker vectors, this server expects "
                f"{tuple(self.latest.shape)}: same model and number of workers needed to resume"
            )
        self.params.copy_(state["params"])
        self.latest.copy_(state["latest"])
        self.latest_buffers.copy_(state["latest_buffers"])
        self.counts.copy_(state["counts"])
        self.version = int(state["version"])
        self.rejected = Counter(state["rejected"])
        self.lost = int(state["lost"])
        self.server_rule.load_state_dict(state["server_rule"])
        self.last_heard = [self.clock()] * self.num_workers
