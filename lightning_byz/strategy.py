"""``AsyncPSStrategy``: Lightning training over a robust parameter server instead of all-reduce.

Rank 0 is the server: its training loop counts server updates (``max_steps``), its module holds the
server's point, its validation/test loops and loggers are the run's. Ranks 1..N−1 are workers: their
loop computes gradients on their own shard, turns them into the vector they send (the worker half of
the optimizer: plain, heavy-ball or STORM), exchanges it for fresh parameters and stops when the
server says so. Without MPI, one process simulates N workers with the same server code
(:mod:`lightning_byz.transport.simulated`).

To Lightning each rank is a single-device process: the strategy's collectives are local, so no
Lightning collective ever pairs a worker with the server by accident; all traffic is the exchange.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import deque
from functools import partial
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

from lightning_byz.aggregators import get_aggregator
from lightning_byz.faults.base import Fault
from lightning_byz.flat import FlatModel
from lightning_byz.launcher import device_for_rank, local_rank
from lightning_byz.optim import split_optimizer
from lightning_byz.server import Message, ParameterServer
from lightning_byz.transport import simulated

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "mpi", "simulated")
DEFAULT_SIMULATED_WORKERS = 4


class AsyncPSStrategy(SingleDeviceStrategy):
    """Asynchronous (or synchronous) Byzantine-robust parameter-server training.

    Args:
        aggregator: a name for :func:`lightning_byz.aggregators.get_aggregator` or a callable
            ``agg(vectors[n, d], weights[n]) -> [d]``.
        aggregator_kwargs: keyword arguments of the aggregator (e.g. ``{lam: 0.25, base: cwmed}``);
            the YAML/CLI way to give them. Extra ``**kwargs`` are merged in (the Python way).
        mode: ``"async"`` (update on every arrival, weights s_i / Σ s_j) or ``"sync"`` (rounds).
        transport: ``"auto"`` (MPI under mpirun/srun with > 1 rank, else simulated), ``"mpi"``,
            ``"simulated"``.
        num_workers: simulated workers (MPI: the number of ranks − 1; given, it must agree).
        arrival: simulated arrival distribution: ``"uniform"``, ``"id"`` (P ∝ i), ``"id2"``
            (P ∝ i²) or a list of N probabilities.
        sync_quorum: sync mode: workers per round (default all).
        server_device: where the server keeps the model and aggregates: ``"auto"`` (its GPU when
            the Trainer's accelerator is CUDA), or a torch device string.
        worker_timeout: seconds (virtual seconds when simulated) of silence after which a worker is
            reported and left out of the aggregate until it sends again.
        seed: seeds the simulation (arrivals, shards) and the fault generators.
        sim_step_time: simulated mean compute time of one worker step under uniform arrivals.
    """

    strategy_name = "async_ps"

    def __init__(
        self,
        aggregator: str | Callable[..., Tensor] = "cwmed",
        mode: str = "async",
        transport: str = "auto",
        num_workers: int | None = None,
        arrival: str | Sequence[float] = "uniform",
        sync_quorum: int | None = None,
        server_device: str = "auto",
        worker_timeout: float = 60.0,
        seed: int = 0,
        sim_step_time: float = 0.05,
        aggregator_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(device="cpu")
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be > 0 seconds, got {worker_timeout}")
        options = dict(aggregator_kwargs or {})
        both = sorted(set(options) & set(kwargs))
        if both:
            raise ValueError(f"aggregator arguments {both} given both in aggregator_kwargs and as keywords")
        options.update(kwargs)
        self.aggregator = get_aggregator(aggregator, **options)
        self.mode = mode
        self.arrival = arrival
        self.sync_quorum = sync_quorum
        self.server_device = server_device
        self.worker_timeout = float(worker_timeout)
        self.seed = int(seed)
        self.sim_step_time = float(sim_step_time)
        self.transport = self._resolve_transport(transport)
        if self.transport == "mpi":
            from lightning_byz.transport import mpi

            size = mpi.world().Get_size()
            if size < 2:
                raise ValueError(
                    "transport='mpi' needs at least 2 MPI ranks (1 server + workers); launch with "
                    "`mpirun -n N` / `srun`, or use transport='simulated' for one process"
                )
            if num_workers is not None and num_workers != size - 1:
                raise ValueError(f"num_workers={num_workers} but mpirun started {size} ranks ({size - 1} workers)")
            self.num_workers = size - 1
            # Lightning sees one single-device process per rank (world_size stays 1): no collectives
            self.global_rank = mpi.world().Get_rank()
        else:
            if num_workers is None:
                if transport == "simulated":
                    raise ValueError("transport='simulated' needs num_workers (how many workers to simulate)")
                num_workers = DEFAULT_SIMULATED_WORKERS
            if int(num_workers) < 1:
                raise ValueError(f"num_workers must be >= 1, got {num_workers}")
            self.num_workers = int(num_workers)
        self.arrival_q = simulated.arrival_probabilities(arrival, self.num_workers)
        self.local_rank = local_rank()
        self.faults: list[Fault] = []
        self.worker_fault_metrics: dict[str, float] = {}  # MPI server: the workers' fault counters at the end
        self.server: ParameterServer | None = None  # the server's state, on the server (kept after fit)
        self._role: _Role | None = None

    @staticmethod
    def _resolve_transport(transport: str) -> str:
        if transport != "auto":
            return transport
        from lightning_byz.transport import mpi

        return "mpi" if mpi.under_mpi() else "simulated"

    # -- what Lightning asks of a strategy ------------------------------------------------------
    @property
    def is_server(self) -> bool:
        return self.global_rank == 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def root_device(self) -> torch.device:
        on_gpu = isinstance(self.accelerator, CUDAAccelerator)
        if self.is_server and self.server_device != "auto":
            return torch.device(self.server_device)
        return device_for_rank(self.local_rank) if on_gpu else torch.device("cpu")

    def setup_environment(self) -> None:
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
        super().setup_environment()

    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if len(self.optimizers) != 1:
            raise ValueError(f"AsyncPSStrategy trains with exactly one optimizer, got {len(self.optimizers)}")
        if getattr(self.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "AsyncPSStrategy does not support loss scaling (precision='16-mixed'): workers would send "
                "scaled gradients; use precision='bf16-mixed' or '32-true'"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"AsyncPSStrategy sends one batch's gradient per message; accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} is not supported (a larger batch size does the same)"
            )
        self.faults = [cb for cb in trainer.callbacks if isinstance(cb, Fault)]
        for fault in self.faults:
            fault.setup_faults(self.num_workers, self.seed)
        split = split_optimizer(self.optimizers[0])
        flat = FlatModel(self.lightning_module)
        if self.transport == "simulated":
            self._role = _SimulatedRole(self, split, flat)
        elif self.is_server:
            self._role = _MPIServerRole(self, split, flat)
        else:
            self._role = _MPIWorkerRole(self, trainer, split, flat)
            _make_worker_loop(trainer)
        if self.is_server:
            self.server = self._role.server
            trainer.callbacks.append(_ServerState(self))
            warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the server's state only exists after setup

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if self._role is None or not trainer.training:
            return dataloader
        return self._role.train_dataloader(dataloader)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._role.training_step(args, kwargs) if self._role else super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self._role is None:
            raise RuntimeError("AsyncPSStrategy.optimizer_step outside of fit")
        # As Precision.optimizer_step does: after each gradient evaluation, on_before_optimizer_step
        # hooks and gradient clipping (gradient_clip_val), so every worker's gradient is clipped.
        wrapped = partial(self.precision_plugin._wrap_closure, model or self.lightning_module, optimizer, closure)
        return self._role.optimizer_step(wrapped)

    def on_train_end(self) -> None:
        if self._role is not None:
            self._role.finish()

    def teardown(self) -> None:
        # A normal end went through ``on_train_end`` (stop messages, final parameters). After an
        # exception nothing more is exchanged: it propagates, and ``python -m mpi4py`` aborts
        # every rank, so no rank waits forever for a partner that is gone.
        self._role = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0])

    # -- shared by the roles ------------------------------------------------------------------------
    def user_training_step(self, batch: Any, args: tuple, kwargs: dict) -> Any:
        """The LightningModule's own training step on ``batch`` (in place of Lightning's batch)."""
        with self.precision_plugin.train_step_context():
            return self.lightning_module.training_step(batch, *args[1:], **kwargs)

    def worker_batch(self, worker: int, step: int, batch: Any) -> Any:
        for fault in self.faults:
            batch = fault.on_worker_batch(worker, step, batch)
        return batch

    def worker_message(self, worker: int, step: int, vector: Tensor | None) -> Tensor | None:
        for fault in self.faults:
            if vector is None:
                break
            vector = fault.on_worker_message(worker, step, vector)
        return vector

    def worker_delay(self, worker: int, step: int) -> float:
        return sum(fault.worker_delay(worker, step) for fault in self.faults)

    def crashed(self, worker: int, step: int) -> bool:
        return any(fault.crashed(worker, step) for fault in self.faults)

    def server_attack(self, vectors: Tensor, weights: Tensor, workers: Tensor) -> Tensor:
        for fault in self.faults:
            vectors = fault.server_attack(vectors, weights, workers)
        return vectors

    def fault_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for fault in self.faults:
            metrics = getattr(fault, "metrics", None)
            if metrics is not None:
                out.update(metrics())
        return out

    def make_server(self, params: Tensor, split, optimizer, buffers_numel: int, clock) -> ParameterServer:
        return ParameterServer(
            params,
            self.num_workers,
            self.aggregator,
            split.make_server_rule([params]),
            lr=lambda: optimizer.param_groups[0]["lr"],
            mode=self.mode,
            quorum=self.sync_quorum,
            worker_timeout=self.worker_timeout,
            attack=self.server_attack if self.faults else None,
            buffers_numel=buffers_numel,
            clock=clock,
        )


def _gradient_at(flat: FlatModel, point: Tensor, closure: Callable[[], Any], out: Tensor, same_rng: bool) -> Any:
    """Run Lightning's closure (training step + backward) at ``point``; flat gradient into ``out``.

    ``same_rng`` forks the RNG so the next evaluation draws the same random numbers (dropout masks):
    STORM's two gradients must see the same sample z_t.
    """
    if point is not flat.params:
        flat.params.copy_(point)
    devices = [flat.device] if flat.device.type == "cuda" else []
    if same_rng:
        with torch.random.fork_rng(devices=devices):
            result = closure()
    else:
        result = closure()
    flat.gather_grads(out)
    return result


def _make_worker_loop(trainer: pl.Trainer) -> None:
    """A worker trains until the server says stop, and neither validates nor checkpoints."""
    trainer.fit_loop.max_epochs = -1
    trainer.fit_loop.epoch_loop.max_steps = -1
    trainer.limit_val_batches = 0
    trainer.num_sanity_val_steps = 0
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, Checkpoint)]


class _Role:
    """What one process does in the exchange (server, worker or the whole simulation)."""

    def train_dataloader(self, dataloader: object) -> object:
        return dataloader

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def finish(self) -> None:
        """Training is over (the server reached max_steps, or a worker was told to stop)."""


class _ServerLogging:
    """Server metrics logged from inside the training step (so Lightning accepts them)."""

    def __init__(self, strategy: AsyncPSStrategy, server: ParameterServer):
        self.strategy = strategy
        self.server = server
        self.times: deque[float] = deque(maxlen=64)

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def log(self) -> None:
        module = self.strategy.lightning_module
        trainer = module.trainer
        every = max(1, trainer.log_every_n_steps)
        if trainer.global_step % every:
            return
        if len(self.times) > 1:
            rate = (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)
            module.log("ps/updates_per_s", rate, prog_bar=True, on_step=True, on_epoch=False)
        metrics = self.server.metrics()
        metrics.update(self.strategy.fault_metrics())
        for key in ("staleness_mean", "rejected"):
            if key in metrics:
                module.log(f"ps/{key}", metrics.pop(key), prog_bar=True, on_step=True, on_epoch=False)
        for key, value in metrics.items():
            module.log(f"ps/{key}", float(value), on_step=True, on_epoch=False)


class _SimulatedRole(_Role):
    """One process: the server plus N virtual workers, each with its shard, query point and rule."""

    def __init__(self, strategy: AsyncPSStrategy, split, flat: FlatModel):
        self.strategy = strategy
        self.flat = flat
        n = strategy.num_workers
        self.x = flat.params.detach().clone()
        self.clock = simulated.ArrivalClock(strategy.arrival_q, strategy.sim_step_time, strategy.seed)
        self.server = strategy.make_server(
            self.x, split, strategy.optimizers[0], 0, clock=lambda: self.clock.now
        )
        self.logging = _ServerLogging(strategy, self.server)
        self.rules = [split.make_worker_rule() for _ in range(n)]
        self.storm = self.rules[0].needs_previous_gradient
        self.query = self.x.expand(n, -1).clone()  # the point each worker computes at
        self.prev = self.query.clone() if self.storm else None
        self.versions = [0] * n
        self.steps = [0] * n
        self.waiting: list[int] = []
        self.streams: list[simulated.ShardStream] = []
        self.stream_states: list[dict] = []  # restored before the streams exist
        self.batch: Any = None
        self.grad = torch.empty_like(self.x)
        self.prev_grad = torch.empty_like(self.x) if self.storm else None
        self.clock.start(strategy.worker_delay)

    def train_dataloader(self, dataloader: object) -> object:
        if not self.streams:
            n = self.strategy.num_workers
            self.streams = [
                simulated.ShardStream(simulated.shard_loader(dataloader, n, i, self.strategy.seed))
                for i in range(n)
            ]
            for stream, state in zip(self.streams, self.stream_states):
                stream.load_state_dict(state)
        return simulated.Ticks(len(dataloader))

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        self.logging.log()
        return self.strategy.user_training_step(self.batch, args, kwargs)

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        strategy, server = self.strategy, self.server
        result = None
        while True:
            w = self.clock.next()
            i, step = w - 1, self.steps[w - 1]
            if strategy.crashed(w, step):
                continue  # crash-stop: never scheduled again
            batch = strategy.batch_to_device(self.streams[i].next())
            self.batch = strategy.worker_batch(w, step, batch)
            prev = None
            if self.storm and step > 0:
                _gradient_at(self.flat, self.prev[i], closure, self.prev_grad, same_rng=True)
                prev = [self.prev_grad]
            result = _gradient_at(self.flat, self.query[i], closure, self.grad, same_rng=False)
            point = [self.query[i]]
            direction = self.rules[i].direction(
                [self.grad], prev, params=point, prev_params=[self.prev[i]] if prev else None
            )[0]
            vector = strategy.worker_message(w, step, direction)
            due = server.receive(Message(w, step, self.versions[i], vector))
            self.steps[i] += 1
            if self.storm:
                self.prev[i].copy_(self.query[i])
            self.waiting.append(w)
            if due:
                server.update()
                self.logging.tick()
            if due or strategy.mode == "async" or vector is None:
                self._answer(w if not due and strategy.mode == "sync" else None)
            if due:
                break
        self.flat.params.copy_(self.x)
        return result

    def _answer(self, only: int | None) -> None:
        """Send the current point to the waiting workers (or just ``only``) and reschedule them."""
        answered = [only] if only is not None else self.waiting
        for w in answered:
            self.query[w - 1].copy_(self.x)
            self.versions[w - 1] = self.server.version
            self.clock.schedule(w, self.steps[w - 1], self.strategy.worker_delay)
        self.waiting = [w for w in self.waiting if w not in answered]

    def state_dict(self) -> dict:
        return {
            "server": self.server.state_dict(),
            "query": self.query.cpu().clone(),
            "prev": None if self.prev is None else self.prev.cpu().clone(),
            "versions": list(self.versions),
            "steps": list(self.steps),
            "waiting": list(self.waiting),
            "rules": [r.state_dict() for r in self.rules],
            "clock": self.clock.state_dict(),
            "streams": [s.state_dict() for s in self.streams],
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.query.copy_(state["query"])
        if self.prev is not None:
            self.prev.copy_(state["prev"])
        self.versions, self.steps, self.waiting = state["versions"], state["steps"], state["waiting"]
        for rule, sd in zip(self.rules, state["rules"]):
            rule.load_state_dict(sd)
        self.clock.load_state_dict(state["clock"])
        self.stream_states = state["streams"]
        torch.set_rng_state(state["torch_rng"])
        self.flat.params.copy_(self.x)


class _MPIServerRole(_Role):
    """Rank 0: receive from whoever is ready, validate, aggregate, update, answer that worker."""

    def __init__(self, strategy: AsyncPSStrategy, split, flat: FlatModel):
        from lightning_byz.transport import mpi

        self.strategy = strategy
        self.flat = flat
        self.comm = mpi.world().Dup()
        self.d, self.b = flat.numel, flat.buffers_numel
        pin = flat.device.type == "cuda"
        self.transport = mpi.MPIServerTransport(self.comm, self.d + self.b, flat.dtype, pin)
        self.server = strategy.make_server(flat.params, split, strategy.optimizers[0], self.b, time.monotonic)
        self.logging = _ServerLogging(strategy, self.server)
        self.pending: list[int] = []  # workers owed a reply (sync: until the round ends)
        self.stopped = False

    def train_dataloader(self, dataloader: object) -> object:
        return simulated.Ticks(len(dataloader))  # the server trains on no data itself

    def training_step(self, args: tuple, kwargs: dict) -> None:
        self.logging.log()
        return None

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        result = closure()  # runs the (empty) server training step; Lightning requires the call
        while not self._serve_one():
            pass
        self.logging.tick()
        return result

    def _serve_one(self) -> bool:
        """Handle one incoming message; True when it completed an update."""
        from lightning_byz.transport.mpi import UP_NOTHING

        got = self.transport.poll(timeout=1.0)
        if got is None:  # nothing for a while: note silent workers; a sync round may now be complete
            if not (self.server.round_complete() and self.server.round):
                self.server.active_workers()
                return False
            self._update()
            self._reply(self.pending)
            return True
        worker, header, payload, error = got
        if error is None and int(header[0]) != worker:
            error = f"unknown sender: header claims worker {int(header[0])}, sent by rank {worker}"
        if error is not None:
            self.server.reject(worker, error)
            due = False
        else:
            nothing = int(header[3]) == UP_NOTHING
            vector = buffers = None
            if not nothing:
                if payload.numel() == self.d + self.b:
                    vector = payload[: self.d].to(self.flat.device, non_blocking=True)
                    buffers = payload[self.d :].to(self.flat.device, non_blocking=True)
                else:
                    vector = payload.to(self.flat.device)  # wrong size: the server rejects it
            msg = Message(worker, int(header[1]), int(header[2]), vector, buffers)
            due = self.server.receive(msg)
        self.transport.release(worker)
        self.pending.append(worker)
        if due:
            self._update()
        if due or self.strategy.mode == "async":
            self._reply(self.pending)
        elif error is not None or (msg.vector is None):
            self._reply([worker])
        return due

    def _update(self) -> None:
        self.server.update()
        buffers = self.server.buffers()
        if buffers is not None:
            self.flat.load_buffers(buffers)

    def _reply(self, workers: list[int], stop: bool = False) -> None:
        buffers = self.flat.gather_buffers() if self.b else None
        for w in workers:
            self.transport.reply(w, self.flat.params, buffers, self.server.version, stop=stop)
        self.pending = [w for w in self.pending if w not in workers]

    def finish(self) -> None:
        """Tell every worker to stop (with the final parameters), absorb their last messages."""
        if self.stopped:
            return
        self.stopped = True
        self._reply(list(range(1, self.strategy.num_workers + 1)), stop=True)
        self.transport.close(drain=min(self.strategy.worker_timeout, 30.0))
        self._collect_fault_metrics(timeout=10.0)
        _barrier(self.comm, timeout=30.0)

    def _collect_fault_metrics(self, timeout: float) -> None:
        """Worker-side fault counters (attacks, packet loss) live on the workers: gather and log them
        as ``faults/worker_<i>/<name>``, so an MPI run reports what a simulated run does."""
        from lightning_byz.transport.mpi import TAG_METRICS

        requests = {w: self.comm.irecv(source=w, tag=TAG_METRICS) for w in range(1, self.strategy.num_workers + 1)}
        deadline = time.monotonic() + timeout
        metrics: dict[str, float] = {}
        while requests and time.monotonic() < deadline:
            for w, req in list(requests.items()):
                done, values = req.test()
                if done:
                    metrics.update({f"faults/worker_{w}/{k}": float(v) for k, v in values.items()})
                    del requests[w]
            time.sleep(1e-3)
        for req in requests.values():
            req.cancel()
        self.strategy.worker_fault_metrics = metrics
        logger = self.strategy.lightning_module.trainer.logger
        if metrics and logger is not None:
            logger.log_metrics(metrics, step=self.strategy.lightning_module.trainer.global_step)

    def state_dict(self) -> dict:
        return {"server": self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])


class _MPIWorkerRole(_Role):
    """Ranks 1..N−1: gradient(s) on the own shard → worker rule → exchange → new parameters."""

    def __init__(self, strategy: AsyncPSStrategy, trainer: pl.Trainer, split, flat: FlatModel):
        from lightning_byz.transport import mpi

        self.strategy = strategy
        self.trainer = trainer
        self.flat = flat
        self.comm = mpi.world().Dup()
        self.worker = self.comm.Get_rank()
        self.d, self.b = flat.numel, flat.buffers_numel
        self.transport = mpi.MPIWorkerTransport(self.comm, self.d + self.b, flat.dtype, flat.device.type == "cuda")
        self.rule = split.make_worker_rule()
        self.storm = self.rule.needs_previous_gradient
        self.grad = torch.empty_like(flat.params)
        self.current = torch.empty_like(flat.params)
        self.prev = flat.params.detach().clone() if self.storm else None
        self.prev_grad = torch.empty_like(flat.params) if self.storm else None
        self.step = 0
        self.version = 0
        self.stopped = False

    def train_dataloader(self, dataloader: object) -> object:
        # A resumed checkpoint is the server's: its loader state (the server's ticks) means nothing
        # to a worker's shard, which starts afresh (the server sends the parameters to resume from).
        self.trainer.fit_loop._combined_loader_states_to_load = []
        n = self.strategy.num_workers
        return simulated.shard_loader(dataloader, n, self.worker - 1, self.strategy.seed, keep_workers=True)

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        batch = self.strategy.worker_batch(self.worker, self.step, args[0])
        return self.strategy.user_training_step(batch, args, kwargs)

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        strategy = self.strategy
        if strategy.crashed(self.worker, self.step):  # crash-stop: silent until the server stops all
            self._apply_reply(*self.transport.wait_stop())
            return closure()  # Lightning insists the closure runs; its gradient goes nowhere
        prev = None
        if self.storm and self.step > 0:
            self.current.copy_(self.flat.params)
            _gradient_at(self.flat, self.prev, closure, self.prev_grad, same_rng=True)
            self.flat.params.copy_(self.current)
            prev = [self.prev_grad]
        result = _gradient_at(self.flat, self.flat.params, closure, self.grad, same_rng=False)
        direction = self.rule.direction(
            [self.grad], prev, params=[self.flat.params], prev_params=[self.prev] if prev else None
        )[0]
        vector = strategy.worker_message(self.worker, self.step, direction)
        delay = strategy.worker_delay(self.worker, self.step)
        if delay > 0:
            time.sleep(delay)
        payload = vector
        if vector is not None and self.b:
            payload = torch.cat([vector, self.flat.gather_buffers()])
        if self.storm:
            self.prev.copy_(self.flat.params)
        self._apply_reply(*self.transport.exchange(self.step, self.version, payload))
        self.step += 1
        return result

    def _apply_reply(self, header, payload: Tensor) -> None:
        from lightning_byz.transport.mpi import DOWN_STOP

        self.version = int(header[0])
        self.flat.params.copy_(payload[: self.d], non_blocking=True)
        if int(header[1]) == DOWN_STOP:
            if self.b:
                self.flat.load_buffers(payload[self.d : self.d + self.b])
            self.stopped = True
            self.trainer.should_stop = True

    def finish(self) -> None:
        from lightning_byz.transport.mpi import TAG_METRICS

        if not self.stopped:  # the loop ended on its own (e.g. an exception path): get the final point
            self._apply_reply(*self.transport.wait_stop())
        request = self.comm.isend(self.strategy.fault_metrics(), dest=0, tag=TAG_METRICS)
        _barrier(self.comm, timeout=30.0)
        request.wait()


def _barrier(comm, timeout: float) -> None:
    """A barrier that gives up (and aborts the job) instead of hanging forever."""
    req = comm.Ibarrier()
    deadline = time.monotonic() + timeout
    while not req.Test():
        if time.monotonic() > deadline:
            log.error("teardown barrier timed out after %.0fs; aborting the MPI job", timeout)
            comm.Abort(3)
        time.sleep(1e-3)


class _ServerState(Callback):
    """Carries the parameter server's state (and the simulation's) in Lightning checkpoints."""

    def __init__(self, strategy: AsyncPSStrategy):
        self.strategy = strategy

    @property
    def state_key(self) -> str:
        return "AsyncPSStrategy"

    def state_dict(self) -> dict:
        role = self.strategy._role
        return role.state_dict() if role is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict and self.strategy._role is not None:
            self.strategy._role.load_state_dict(state_dict)

