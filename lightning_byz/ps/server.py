"""The parameter server's state machine, independent of how messages travel.

The server holds the model point ``x`` (a flat vector), the latest accepted vector of every worker,
how many updates each worker contributed (``counts``: the async weights s_i / Σ s_j of Dahan & Levy),
and what it rejected. The serve loop (:mod:`lightning_byz.ps.serve`) feeds it :class:`Message`
objects from a transport; it validates each one, and in ``async`` mode every accepted arrival
triggers an update; in ``sync`` mode an update happens once ``quorum`` workers have contributed to
the current round.

**Warm-up.** No update is applied before the server holds a first vector from ``min_workers``
distinct workers (default: all; a worker silent for ``worker_timeout`` stops counting, so a dead
rank cannot block the start). Until then nobody is answered, so each early worker counts once.
Why: the robustness of a weighted rule holds while the Byzantine share of the *heard* weight,
λ_t = Σ_{i∈B} s_i / Σ_j s_j, stays below the rule's breakdown point (λ < 1/2 for the medians and
w-CTMA). Without a warm-up the first update aggregates whoever arrived first: a Byzantine worker
that makes itself the fastest has λ_1 = 1 and owns the model at step 1, at any magnitude. With it,
λ_1 = f / |heard| ≤ f / (N − silent) for f Byzantine workers, and afterwards every accepted
message adds one to its sender's s_i only, so λ_t can grow only as fast as the Byzantine workers'
real arrival rate (bounded further by ``max_weight`` and ``max_staleness``). The released code of
Dahan & Levy likewise takes one step from every worker before training.

**Bounded influence.** ``max_staleness`` rejects (and counts) updates computed more than that many
versions ago: a flooding or lagging worker cannot push stale directions. ``max_weight`` caps every
worker's async weight s_i / Σ s_j at that fraction (the excess is shared among the others in
proportion to their weights), so no rate, however high, buys more than ``max_weight`` of an update.
It caps the share of the updates a worker *triggers* as well: an arrival from a worker that has
already triggered more than ``max(max_weight, 1/k)`` of them (k: the active workers) refreshes its row
and is answered, but triggers no update (counted as ``throttled``). Why: capping weights alone does
not stop a flood — each of the flooder's arrivals still triggers an update that re-applies the honest
workers' stale rows (measured in ``docs/attack_gallery.md``); with the trigger cap the honest workers'
rows move the model no more often than their own arrivals and the flooders' share allow.

**Defence in depth.** Rows are validated on arrival (size, NaN/Inf, version); rows written by the
omniscient-attack slot are validated too (a non-finite one is left out and counted). An update whose
aggregate is non-finite, or so large that the server step could overflow, or whose rows the rule
refuses (fewer than it needs), is skipped and counted by reason (``skipped``), logged with the
workers involved; training goes on. An empty message (a drop) is no sign of life: a worker that
only ever drops goes silent after ``worker_timeout`` and stops holding up the warm-up.

**Sharding.** With a :class:`~lightning_byz.sharding.ShardLayout` of S servers, the workers' latest
vectors are kept as column blocks, one per shard; each update aggregates every block, reducing the
few cross-shard values the rule needs (Gram matrices, the overflow guard's maximum, the attack slot's
statistics) across the shards (:mod:`lightning_byz.sharding`). In one process (the simulation) the
server holds every shard and aggregates each in its own thread; under MPI each server rank holds one
(``shards``, ``group``), and server 0's decisions reach the others through ``on_store`` and
``on_update`` (:mod:`lightning_byz.transport.sharded`). Who is in the update, the weights, the version
and every verdict are decided once, for all shards, as with one server. The server rule steps the
whole point with the direction zero off the shards held here (the server rules are element-wise, so
each slice steps as it would alone).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from torch import Tensor

from lightning_byz.aggregators import Aggregator, check_inputs
from lightning_byz.aggregators.base import nonfinite_rows
from lightning_byz.aggregators.coordinate import weighted_median
from lightning_byz.ps.messages import Message
from lightning_byz.sharding import ShardGroup, ShardLayout, across_shards, run_on_shards, shard_max

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
        min_workers: distinct workers heard before the first update (default: all).
        max_staleness: reject updates more than this many versions old (default: no limit).
        max_weight: cap on one worker's async weight, in (0, 1] (default: no cap).
        layout: how the coordinates are sharded among servers (default: one server); every shard's
            rows are kept apart and aggregated by its own thread (see "Sharding" above).
        shards: the shards this server holds (default: all of the layout); messages then carry
            these shards' slices, concatenated.
        group: the other servers' shards, for the cross-shard reductions (an MPI server rank).
        on_store: told ``(worker, step)`` whenever a message's vector is stored as the worker's row.
        on_update: told ``(workers, weights, lr)`` of every update before it is aggregated.
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
        min_workers: int | None = None,
        max_staleness: int | None = None,
        max_weight: float | None = None,
        layout: ShardLayout | None = None,
        shards: Sequence[int] | None = None,
        group: ShardGroup | None = None,
        on_store: Callable[[int, int], None] = lambda worker, step: None,
        on_update: Callable[[Tensor, Tensor, float], None] = lambda workers, weights, lr: None,
    ):
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds, got {worker_timeout}")
        ParameterServer.check_options(num_workers, quorum, min_workers, max_staleness, max_weight)
        quorum = num_workers if quorum is None else int(quorum)
        min_workers = num_workers if min_workers is None else min_workers
        self.min_workers = min_workers
        self.max_staleness = max_staleness
        self.max_weight = max_weight
        self.warm = False  # the warm-up is over (the first update happened)
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
        self.layout = ShardLayout(d, 1) if layout is None else layout
        if self.layout.numel != d:
            raise ValueError(f"the shard layout covers {self.layout.numel} parameters, the model has {d}")
        self.shards = list(range(self.layout.num_servers)) if shards is None else list(shards)
        self.group, self.on_store, self.on_update = group, on_store, on_update
        # every worker's latest vector, one [num_workers, slice] block per shard held here
        self.latest = [torch.zeros(num_workers, self.layout.size(k), dtype=dt, device=dev) for k in self.shards]
        self.local_sizes = [self.layout.size(k) for k in self.shards]
        self._pool = ThreadPoolExecutor(len(self.shards)) if len(self.shards) > 1 else None
        # with some shards elsewhere, the step takes a full-size direction, zero off the shards held here
        self._padded = None if len(self.shards) == self.layout.num_servers else torch.zeros_like(params)
        self.latest_buffers = torch.zeros(num_workers, buffers_numel, dtype=dt, device=dev)
        self.counts = torch.zeros(num_workers, dtype=torch.long)
        self.triggered = torch.zeros(num_workers, dtype=torch.long)  # async updates each worker triggered
        self.throttled = 0
        self.last_heard = [clock()] * num_workers  # a worker never heard is silent after the timeout
        self.silent: set[int] = set()
        self.round: set[int] = set()  # workers whose vectors wait for the next update (sync, warm-up)
        self.version = 0
        self.rejected: Counter[str] = Counter()
        self.rejected_by_worker: Counter[int] = Counter()
        self.lost = 0
        self.skipped: Counter[str] = Counter()
        self.staleness: list[int] = []
        self._attack_rejections: dict[int, str] = {}  # rows the attack slot broke in this update

    @staticmethod
    def check_options(num_workers: int, quorum: int | None, min_workers: int | None,
                      max_staleness: int | None, max_weight: float | None) -> None:
        """``ValueError`` for options no server could run with (checked at configuration time too)."""
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(num_workers) or num_workers < 1:
            raise ValueError(f"need at least one worker, got num_workers={num_workers!r}")
        if quorum is not None and not (is_int(quorum) and 1 <= quorum <= num_workers):
            raise ValueError(f"sync_quorum must be an integer in [1, {num_workers}], got {quorum!r}")
        if min_workers is not None and not (is_int(min_workers) and 1 <= min_workers <= num_workers):
            raise ValueError(f"min_workers must be an integer in [1, {num_workers}], got {min_workers!r}")
        if max_staleness is not None and not (is_int(max_staleness) and max_staleness >= 0):
            raise ValueError(f"max_staleness must be an integer >= 0 (versions), got {max_staleness!r}")
        if max_weight is not None and not (isinstance(max_weight, (int, float)) and 0 < max_weight <= 1):
            raise ValueError(f"max_weight must lie in (0, 1], got {max_weight!r}")

    # -- messages -----------------------------------------------------------------------------
    def receive(self, msg: Message) -> bool:
        """Validate and store ``msg``; return True when an update is due (call :meth:`update`)."""
        reason = self.invalid(msg)
        if reason is not None:
            self.reject(msg.worker, reason)
            return False
        i = msg.worker - 1
        if msg.vector is None:  # nothing arrived: no sign of a working worker (it may only ever drop)
            self.lost += 1
            return False
        self.last_heard[i] = self.clock()
        if msg.worker in self.silent:
            self.silent.discard(msg.worker)
            log.warning("worker %d is back after a silence; counted again", msg.worker)
        for rows, part in zip(self.latest, msg.vector.split(self.local_sizes)):
            rows[i].copy_(part, non_blocking=True)
        self.on_store(msg.worker, msg.step)
        if self.latest_buffers.shape[1] and msg.buffers is not None:
            self.latest_buffers[i].copy_(msg.buffers, non_blocking=True)
        if self.warm:
            self.counts[i] += 1
        else:  # warm-up: each worker counts once, however often it sends
            self.counts[i] = 1
        self.staleness.append(self.version - msg.version)
        if self.mode == "async" and self.warm:
            return self._may_trigger(i)
        self.round.add(msg.worker)
        return self.round_complete()

    def _may_trigger(self, i: int) -> bool:
        """Async: worker ``i + 1``'s arrival triggers an update unless it already triggered more than
        ``max(max_weight, 1/k)`` of them (the least-triggered active worker always may: no stall)."""
        if self.max_weight is not None:
            cap = max(self.max_weight, 1.0 / max(len(self.active_workers()), 1))
            if float(self.triggered[i]) > cap * (float(self.triggered.sum()) + 1):
                self.throttled += 1
                return False
        self.triggered[i] += 1
        return True

    def round_complete(self) -> bool:
        """The collection is complete: ``min_workers`` during the warm-up, then (sync) ``quorum``
        contributors per round; fewer when workers went silent."""
        return len(self.round) >= self.collection_target()

    def collection_target(self) -> int:
        """How many contributors the current collection (warm-up or sync round) needs now."""
        self.active_workers()
        need = self.min_workers if not self.warm else self.quorum if self.mode == "sync" else 1
        return min(need, self.num_workers - len(self.silent))

    def reject(self, worker, reason: str) -> None:
        """Count a rejected message (by reason and sender) and say so in the log (3 times a sender)."""
        key = reason.split(":")[0]
        self.rejected[key] += 1
        self.rejected_by_worker[worker] += 1
        if self.rejected_by_worker[worker] <= 3:
            log.warning("server rejected a message from worker %s: %s", worker, reason)

    def invalid(self, msg: Message) -> str | None:
        """Why ``msg`` is rejected (None: it is valid): sender, size, NaN/Inf, version, staleness."""
        if not isinstance(msg.worker, int) or not 1 <= msg.worker <= self.num_workers:
            return f"unknown sender {msg.worker!r}"
        if msg.version > self.version:
            return f"version {msg.version} from the future (server is at {self.version})"
        if msg.vector is None:
            return None
        reason = self.invalid_slice(msg)
        if reason is not None:
            return reason
        if msg.refused is not None:
            return msg.refused
        if msg.buffers is not None and self.latest_buffers.shape[1]:
            if msg.buffers.numel() != self.latest_buffers.shape[1]:
                return f"wrong buffer size: {msg.buffers.numel()} instead of {self.latest_buffers.shape[1]}"
            if bool(nonfinite_rows(msg.buffers[None]).any()):
                return "non-finite values (NaN/Inf) in the buffers"
        if self.max_staleness is not None and self.version - msg.version > self.max_staleness:
            return f"stale: computed at version {msg.version}, server at {self.version} (max_staleness {self.max_staleness})"
        return None

    def invalid_slice(self, msg: Message) -> str | None:
        """What is wrong with the vector of ``msg`` itself (size, NaN/Inf): all a server that does not
        decide checks of its slice."""
        if msg.vector is None:
            return None
        if msg.vector.dim() != 1 or msg.vector.numel() != sum(self.local_sizes):
            return f"wrong size: {tuple(msg.vector.shape)} instead of ({sum(self.local_sizes)},)"
        if bool(nonfinite_rows(msg.vector[None]).any()):
            return "non-finite values (NaN/Inf) in the update"
        return None

    # -- aggregation --------------------------------------------------------------------------
    def active_workers(self) -> Tensor:
        """Worker ids (1-based) that have contributed and are not silent beyond the timeout (a worker
        waiting for the next update is not silent: the server keeps it waiting)."""
        now = self.clock()
        for i, t in enumerate(self.last_heard):
            wid = i + 1
            if wid not in self.silent and wid not in self.round and now - t > self.worker_timeout:
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
        """Async: s_i / Σ s_j over ``workers`` (capped at ``max_weight``); sync: uniform over the round."""
        if self.mode == "sync":
            w = torch.ones(len(workers), dtype=self.params.dtype)
        else:
            w = self.counts[workers - 1].to(self.params.dtype)
        w = w / w.sum()
        if self.max_weight is not None:
            w = cap_weights(w, self.max_weight)
        return w.to(self.params.device)

    def update(self) -> Tensor:
        """Aggregate the active workers' latest vectors, step the server rule; return the workers used.

        The update is skipped (counted in ``skipped``, the version unchanged) when its aggregate is
        non-finite or so large that the step could overflow the server's state."""
        workers = self.active_workers()
        if len(workers) == 0:
            raise RuntimeError("no active worker to aggregate (all silent)")
        w = self.weights(workers)
        lr = self.lr()
        self.on_update(workers, w, lr)
        return self.apply(workers, w, lr)

    def apply(self, workers: Tensor, w: Tensor, lr: float) -> Tensor:
        """Aggregate ``workers``' rows with weights ``w`` and step at ``lr`` (skipped as :meth:`update`
        says); return the workers used. A server holding some shards of several is told this by the
        server that decides (every server applies the same update)."""
        scale = self.server_rule.step_scale(lr)
        with across_shards(self.group):
            outcomes = run_on_shards(lambda j: self._aggregate_shard(j, workers, w, scale), len(self.shards),
                                     self._pool)
        parts, used, problem = zip(*outcomes)
        workers = used[0]
        for worker, reason in self._attack_rejections.items():
            self.reject(worker, reason)
        self._attack_rejections.clear()
        if problem[0] is not None:
            self._skip(problem[0], workers)
            return workers
        if self._padded is None:
            direction = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:  # zeroed each time: a server rule may write into its direction
            direction = self._padded.zero_()
            for k, part in zip(self.shards, parts):
                direction[self.layout.slice(k)] = part
        self.server_rule.step([self.params], [direction], lr)
        self.version += 1
        self.round.clear()
        self.warm = True
        return workers

    def _skip(self, reason: str, workers: Tensor) -> None:
        """Count and log an update that is not applied; the collection goes on."""
        key = reason.split(":")[0]
        self.skipped[key] += 1
        if self.skipped[key] <= 3:
            log.error("update skipped (%s) over workers %s", reason, workers.tolist())
        self.round.clear()
        self.warm = True

    def _aggregate_shard(self, j: int, workers: Tensor, w: Tensor, scale: float):
        """The slice of the aggregate of the ``j``-th shard held here, the workers it used (the attack
        slot may leave some out) and why the update must be skipped (None: apply it). Every shard
        reaches the same verdict: it is taken from values reduced across the shards."""
        rows = self.latest[j]
        vectors = rows if len(workers) == self.num_workers else rows[workers - 1]
        if self.attack is not None:
            vectors, w, workers = self._checked_attack(self.shards[j], vectors, w, workers)
        try:
            if isinstance(self.aggregator, Aggregator):  # rows were validated on arrival
                direction = self.aggregator.aggregate_checked(vectors, w)
            else:
                direction = self.aggregator(vectors, w)
        except ValueError as exc:  # e.g. fewer rows than the rule needs (krum: n > 2f + 2)
            return None, workers, f"the rule refused the rows: {exc}"
        if direction.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr():
            direction = direction.clone()  # the server rule may modify it; the stored rows must stay
        lo, hi = torch.aminmax(direction)  # one pass, no temporary; NaN propagates
        largest = float(shard_max(torch.maximum(-lo, hi).to(torch.float64))) * scale
        if not largest < torch.finfo(self.params.dtype).max / 4:
            reason = "non-finite aggregate" if not math.isfinite(largest) else "aggregate too large for the server step"
            return None, workers, reason
        return direction, workers, None

    def _checked_attack(self, k: int, vectors: Tensor, w: Tensor, workers: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the attack slot on shard ``k``; rows it made non-finite on any shard are left out (as on
        arrival) and counted once."""
        vectors = self.attack(vectors, w, workers)
        bad = shard_max(nonfinite_rows(vectors).to(torch.float64)) > 0
        if bool(bad.any()):
            if k == 0:
                for worker in workers[bad.cpu()].tolist():
                    self._attack_rejections[worker] = "non-finite values (NaN/Inf) in the update"
            keep = ~bad
            vectors, w, workers = vectors[keep], w[keep] / w[keep].sum(), workers[keep.cpu()]
        return vectors, w, workers

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
        out: dict[str, float] = {"rejected": float(sum(self.rejected.values())), "lost": float(self.lost),
                                 "skipped_updates": float(sum(self.skipped.values())),
                                 "throttled": float(self.throttled)}
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
            "latest": torch.cat(self.latest, dim=1).cpu(),  # the shards held here (a sharded MPI server adds the others')
            "num_servers": self.layout.num_servers,
            "latest_buffers": self.latest_buffers.cpu().clone(),
            "counts": self.counts.clone(),
            "triggered": self.triggered.clone(),
            "throttled": self.throttled,
            "version": self.version,
            "rejected": dict(self.rejected),
            "lost": self.lost,
            "skipped": dict(self.skipped),
            "warm": self.warm,
            "server_rule": self.server_rule.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        expected = (self.num_workers, self.layout.numel)
        saved_servers, servers = int(state.get("num_servers", 1)), self.layout.num_servers
        if tuple(state["latest"].shape) != expected or saved_servers != servers:
            raise ValueError(
                f"checkpoint holds {tuple(state['latest'].shape)} worker vectors on {saved_servers} server(s), "
                f"this run has {expected} on {servers} server(s): resume with the same model, number of "
                "workers and num_servers"
            )
        self.params.copy_(state["params"])
        for rows, k in zip(self.latest, self.shards):
            rows.copy_(state["latest"][:, self.layout.slice(k)])
        self.latest_buffers.copy_(state["latest_buffers"])
        self.counts.copy_(state["counts"])
        self.triggered.copy_(state.get("triggered", torch.zeros_like(self.triggered)))
        self.throttled = int(state.get("throttled", 0))
        self.version = int(state["version"])
        self.rejected = Counter(state["rejected"])
        self.lost = int(state["lost"])
        self.skipped = Counter(state.get("skipped", {}))
        self.warm = bool(state.get("warm", True))  # checkpoints before the warm-up existed were past it
        self.server_rule.load_state_dict(state["server_rule"])
        self.last_heard = [self.clock()] * self.num_workers


def cap_weights(w: Tensor, cap: float) -> Tensor:
    """Weights ``w`` (summing to 1) with none above ``cap``: the excess of capped rows goes to the
    others in proportion to their weights, repeated until none exceeds the cap (at most k rounds).
    When ``cap`` < 1/k no weighting can satisfy it; the result is then uniform."""
    k = w.numel()
    if cap * k <= 1:
        return torch.full_like(w, 1.0 / k)
    w = w.clone()
    for _ in range(k):
        over = w > cap
        if not bool(over.any()):
            break
        free = ~over & (w < cap)
        excess = float((w[over] - cap).sum())
        w[over] = cap
        if bool(free.any()) and float(w[free].sum()) > 0:
            w[free] += excess * w[free] / w[free].sum()
    return w
