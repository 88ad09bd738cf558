"""What each process does inside Lightning's training loop: the strategy picks one role per process.

- :class:`SimulatedRole`: one process is the server and N virtual workers
  (:class:`~lightning_byz.transport.simulated.SimulatedTransport`);
- :class:`MPIServerRole`: rank 0 serves the MPI workers (with S servers: leads ranks 1..S−1);
- :class:`MPIFollowerRole`: with S servers, ranks 1..S−1 hold the other slices of the server;
- :class:`MPIWorkerRole`: the other ranks compute on their shard and exchange with the server(s).

The server roles run the :class:`~lightning_byz.ps.ServeLoop`, the workers (virtual or not) a
:class:`~lightning_byz.ps.WorkerStep`; a role only connects them to Lightning: the batch its
training step sees, the closure it gets, the metrics it logs, the state it checkpoints.
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_byz.arrivals import ArrivalClock
from lightning_byz.data.shards import ShardStream, Ticks, shard_loader
from lightning_byz.evaluation import receive_fit_end, send_fit_end
from lightning_byz.optim.split import OptimizerSplit
from lightning_byz.ps import FlatModel, Message, ParameterServer, Reply, ServeLoop, WorkerStep
from lightning_byz.sharding import MPIGroup, ShardLayout

if TYPE_CHECKING:
    from lightning_byz.strategy import AsyncPSStrategy

log = logging.getLogger(__name__)


class Role:
    """What one process does in the exchange (server, worker or the whole simulation)."""

    def train_dataloader(self, dataloader: object) -> object:
        return dataloader

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        raise NotImplementedError

    def finish(self, interrupted: bool = False) -> None:
        """Training is over (the server reached max_steps or was ``interrupted`` by a stop request,
        or a worker was told to stop)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_server(strategy: AsyncPSStrategy, params: torch.Tensor, split: OptimizerSplit, flat: FlatModel,
                buffers_numel: int, clock, **sharding):
    """The server over the point ``params`` (``flat.params`` itself under MPI, a copy when simulated);
    ``sharding``: which shards it holds, with which group and observers (a server rank of several)."""
    optimizer = strategy.optimizers[0]
    return ParameterServer(
        params,
        strategy.num_workers,
        strategy.aggregator,
        split.make_server_rule(params, flat.param_list, flat.params),
        lr=lambda: optimizer.param_groups[0]["lr"],
        mode=strategy.mode,
        quorum=strategy.sync_quorum,
        worker_timeout=strategy.worker_timeout,
        attack=strategy.faults.server_attack if strategy.faults else None,
        buffers_numel=buffers_numel,
        clock=clock,
        min_workers=strategy.min_workers,
        max_staleness=strategy.max_staleness,
        max_weight=strategy.max_weight,
        layout=ShardLayout(params.numel(), strategy.num_servers),
        **sharding,
    )


class ServerLogging:
    """Server metrics logged from inside the training step (so Lightning accepts them)."""

    def __init__(self, strategy: AsyncPSStrategy, server: ParameterServer):
        self.strategy = strategy
        self.server = server
        self.times: deque[float] = deque(maxlen=64)
        self._warm_up_text = ""
        self.byzantine = strategy.faults.byzantine_workers()
        self.budget = getattr(strategy.aggregator, "byzantine_budget", None)
        self._over_budget_said = False

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def warm_up(self, heard: int, needed: int) -> None:
        """Say in the progress bar (else the log, once per change) that the server waits for workers."""
        text = f"warm-up: heard {heard}/{needed} workers"
        if text == self._warm_up_text:
            return
        self._warm_up_text = text
        try:
            self.strategy.lightning_module.trainer.progress_bar_callback.train_progress_bar.set_postfix_str(text)
        except (AttributeError, TypeError):  # no progress bar, or not a tqdm one
            log.info(text)

    def log(self) -> None:
        module = self.strategy.lightning_module
        if module.trainer.global_step % max(1, module.trainer.log_every_n_steps):
            return
        if len(self.times) > 1:
            rate = (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)
            module.log("ps/updates_per_s", rate, prog_bar=True, on_step=True, on_epoch=False)
        metrics = self.server.metrics()
        metrics.update(self.strategy.faults.metrics())
        share = self.byzantine_share()
        if share is not None:
            metrics["byzantine_weight"] = share
            self._check_budget(share)
        for key in ("staleness_mean", "rejected"):
            if key in metrics:
                module.log(f"ps/{key}", metrics.pop(key), prog_bar=True, on_step=True, on_epoch=False)
        for key, value in metrics.items():
            module.log(f"ps/{key}", float(value), on_step=True, on_epoch=False)

    def byzantine_share(self) -> float | None:
        """The realised Byzantine weight: the share of accepted messages the Byzantine workers sent
        (the async weights s_i / Σ s_j summed over them); None without Byzantine workers or updates."""
        total = int(self.server.counts.sum())
        if not self.byzantine or not self.server.warm or total == 0:
            return None
        return float(self.server.counts[[w - 1 for w in self.byzantine]].sum()) / total

    def _check_budget(self, share: float) -> None:
        """Say once when the Byzantine workers hold more weight than the rule is built to tolerate
        (legitimate in an experiment, never silent). Checked once every worker could have arrived."""
        if self._over_budget_said or self.budget is None or share <= self.budget:
            return
        if self.server.version < self.server.num_workers:
            return
        self._over_budget_said = True
        warnings.warn(
            f"Byzantine workers {self.byzantine} hold {share:.3f} of the weight after {self.server.version} updates, "
            f"above the {type(self.strategy.aggregator).__name__} budget {self.budget:g}: its robustness "
            "guarantee does not cover this run (raise lam, cap max_weight, or expect the attack to win)"
        )

    def summary(self) -> None:
        """At the end of fit: the realised Byzantine weight, once (reproductions report it)."""
        share = self.byzantine_share()
        if share is None:
            return
        budget = "none stated" if self.budget is None else f"{self.budget:g}"
        log.info("realised Byzantine weight %.3f (workers %s; rule budget %s)", share, self.byzantine, budget)
        trainer = self.strategy.lightning_module.trainer
        if trainer.logger is not None:
            trainer.logger.log_metrics({"ps/byzantine_weight_final": share}, step=trainer.global_step)


class SimulatedRole(Role):
    """One process: the server plus N virtual workers, each with its shard, point and rule."""

    def __init__(self, strategy: AsyncPSStrategy, split: OptimizerSplit, flat: FlatModel):
        from lightning_byz.transport.simulated import SimulatedTransport

        self.strategy = strategy
        self.flat = flat
        self.x = flat.params.detach().clone()  # the server's point; flat.params is the workers' scratch
        self.clock = ArrivalClock(strategy.arrival_q, strategy.sim_step_time, strategy.seed)
        if strategy.byzantine_share is not None:
            byzantine = strategy.faults.byzantine_workers()
            if not byzantine:
                raise ValueError("byzantine_share needs Byzantine workers: add a ByzantineWorkers callback")
            self.clock.set_byzantine_share(byzantine, strategy.byzantine_share, strategy.byzantine_schedule)
        self.server = make_server(strategy, self.x, split, flat, 0, clock=lambda: self.clock.now)
        self.logging = ServerLogging(strategy, self.server)
        rules = [split.make_worker_rule() for _ in range(strategy.num_workers)]
        scratch = WorkerStep.scratch(flat, rules[0].needs_previous_gradient)
        self.workers = [
            WorkerStep(i + 1, rule, flat, strategy.faults, scratch=scratch) for i, rule in enumerate(rules)
        ]
        self.transport = SimulatedTransport(self.workers, self.clock, self.x, strategy.faults, strategy.batch_to_device)
        self.loop = ServeLoop(self.server, self.transport, on_warm_up=self.logging.warm_up,
                              hyper=split.worker_hyperparameters)
        self.stream_states: list[dict] = []  # restored before the streams exist

    def train_dataloader(self, dataloader: object) -> object:
        if not self.transport.streams:
            n, seed = self.strategy.num_workers, self.strategy.seed
            self.transport.streams = [ShardStream(shard_loader(dataloader, n, i, seed, partition=self.strategy.partition))
                                      for i in range(n)]
            for stream, state in zip(self.transport.streams, self.stream_states):
                stream.load_state_dict(state)
        return Ticks(len(dataloader))

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        self.logging.log()
        return self.strategy.user_training_step(self.transport.batch, args, kwargs)

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        self.transport.closure = closure
        self.loop.serve_until_update()
        self.logging.tick()
        self.flat.params.copy_(self.x)
        return self.transport.result

    def state_dict(self) -> dict:
        storm = self.workers[0].storm
        return {
            "server": self.server.state_dict(),
            "query": self.transport.query.cpu().clone(),
            "prev": torch.stack([w.prev for w in self.workers]).cpu() if storm else None,
            "versions": [w.version for w in self.workers],
            "steps": [w.step for w in self.workers],
            "waiting": list(self.loop.pending),
            "rules": [w.rule.state_dict() for w in self.workers],
            "clock": self.clock.state_dict(),
            "streams": [s.state_dict() for s in self.transport.streams],
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])
        self.transport.query.copy_(state["query"])
        for i, worker in enumerate(self.workers):
            if worker.storm:
                worker.prev.copy_(state["prev"][i])
            worker.version, worker.step = state["versions"][i], state["steps"][i]
            worker.rule.load_state_dict(state["rules"][i])
        self.loop.pending = list(state["waiting"])
        self.transport.waiting = set(self.loop.pending)
        self.clock.load_state_dict(state["clock"])
        self.stream_states = state["streams"]
        torch.set_rng_state(state["torch_rng"])
        self.flat.params.copy_(self.x)


class MPIServerRole(Role):
    """Rank 0: serve the workers until each update; at the end stop them and gather their counters.
    With S servers it holds slice 0 and leads the others (:mod:`lightning_byz.transport.sharded`)."""

    def __init__(self, strategy: AsyncPSStrategy, split: OptimizerSplit, flat: FlatModel, servers=None):
        from lightning_byz.transport import mpi, sharded

        self.strategy = strategy
        self.comm = mpi.world().Dup()
        pin = flat.device.type == "cuda"
        S = strategy.num_servers
        self.layout = ShardLayout(flat.numel, S)
        self.leader: sharded.LeaderTransport | None = None
        self._rows: torch.Tensor | None = None  # every server's rows, between a snapshot and its checkpoint
        self.ended = False  # the other servers were told the end (and hold the whole point)
        options = {}
        if S > 1:
            options = dict(shards=[0], group=MPIGroup(servers, strategy.server_timeout),
                           on_store=lambda *a: self.leader.stored(*a),
                           on_update=lambda *a: self.leader.updating(*a))
        self.server = make_server(strategy, flat.params, split, flat, flat.buffers_numel, time.monotonic, **options)
        self.transport = mpi.MPIServerTransport(
            self.comm, self.layout.size(0), flat.buffers_numel, flat.dtype, flat.device, pin,
            on_discard=self.server.reject, first_worker=S,
        )
        if S > 1:
            self.leader = sharded.LeaderTransport(self.transport, servers.Dup(), self.layout,
                                                  slice_timeout=min(strategy.worker_timeout, 30.0),
                                                  server_timeout=strategy.server_timeout)
        self.logging = ServerLogging(strategy, self.server)
        self.loop = ServeLoop(self.server, self.leader or self.transport, model=flat, on_warm_up=self.logging.warm_up,
                              hyper=split.worker_hyperparameters, on_stop_request=self.stop_requested)
        self.stopped = False
        self.stop_asked = False

    def stop_requested(self, worker: int) -> None:
        """A worker got SIGTERM: stop the job as for the server's own SIGTERM (Lightning's handler
        ends fit at the next update: ``on_exception`` checkpoints, then every worker is stopped)."""
        if not self.stop_asked:
            self.stop_asked = True
            log.warning("worker %d received SIGTERM: stopping the job (checkpoint first, as for the server's)", worker)
            signal.raise_signal(signal.SIGTERM)

    def train_dataloader(self, dataloader: object) -> object:
        return Ticks(len(dataloader))  # the server trains on no data itself

    def training_step(self, args: tuple, kwargs: dict) -> None:
        self.logging.log()
        return None

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        result = closure()  # runs the (empty) server training step; Lightning requires the call
        self.loop.serve_until_update()
        self.logging.tick()
        return result

    def finish(self, interrupted: bool = False) -> None:
        """Tell every worker to stop (with the final parameters), absorb their last messages."""
        from lightning_byz.transport import mpi

        if self.stopped:
            return
        self.stopped = True
        self.loop.stop()
        if self.leader is not None:
            self.whole_point()
            self.leader.end(self.server.params)
            self.ended = True
        faults, absorb = self.strategy.faults, self.transport.absorb  # workers' last updates, unread
        timeout = min(self.strategy.worker_timeout, 30.0)
        S = self.strategy.num_servers
        values, rejected = mpi.gather_metrics(self.comm, faults.num_counters, timeout, while_waiting=absorb,
                                              first_worker=S)
        for rank, reason in rejected.items():
            self.server.reject(rank - S + 1, reason)
        self._log_worker_fault_metrics({r - S + 1: faults.metrics_of(v.tolist()) for r, v in values.items()})
        mpi.barrier(self.comm, timeout=30.0, while_waiting=absorb)
        self.transport.close()
        send_fit_end(self.strategy.lightning_module.trainer, mpi.world(), interrupted)

    def _log_worker_fault_metrics(self, gathered: dict[int, dict[str, float]]) -> None:
        """Worker-side fault counters (attacks, packet loss) live on the workers: log them as
        ``faults/worker_<i>/<name>``, so an MPI run reports what a simulated run does."""
        metrics = {f"faults/worker_{w}/{k}": float(v) for w, values in gathered.items() for k, v in values.items()}
        self.strategy.worker_fault_metrics = metrics
        trainer = self.strategy.lightning_module.trainer
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def whole_point(self) -> None:
        """With S servers: put every server's slice of the parameters into this rank's model (before it
        validates or ends), so rank 0 holds the whole point as with one server (after the end it does)."""
        if self.leader is not None and not self.ended:
            self.leader.gather(self.server.params)

    def snapshot(self) -> None:
        """With S servers, before a checkpoint: the whole point, optimizer state and rows here."""
        if self.leader is not None and not self.ended:
            self._rows = self.leader.snapshot(self.server)

    def state_dict(self) -> dict:
        if self.leader is not None and self.ended:
            raise RuntimeError("a sharded server's state is spread over its ranks and they have ended: "
                               "checkpoint during fit (e.g. ModelCheckpoint), not after it")
        if self.leader is not None and self._rows is None:
            self.snapshot()
        state = self.server.state_dict()
        if self.leader is not None:  # every server's rows, from the snapshot
            state["latest"], self._rows = self._rows, None
        return {"server": state}

    def load_state_dict(self, state: dict) -> None:
        self.server.load_state_dict(state["server"])


class MPIFollowerRole(Role):
    """Ranks 1..S−1 of S servers: hold slice k, validate and aggregate it as server 0 commands
    (:class:`~lightning_byz.transport.sharded.Follower`); one Lightning step per update, no data."""

    def __init__(self, strategy: AsyncPSStrategy, trainer: pl.Trainer, split: OptimizerSplit, flat: FlatModel,
                 servers):
        from lightning_byz.transport import mpi, sharded

        self.strategy, self.trainer = strategy, trainer
        self.comm = mpi.duplicate(mpi.world())
        k, S = servers.Get_rank(), strategy.num_servers
        layout = ShardLayout(flat.numel, S)
        server = make_server(strategy, flat.params, split, flat, 0, time.monotonic, shards=[k],
                             group=MPIGroup(servers, strategy.server_timeout))
        self.transport = mpi.MPIServerTransport(self.comm, layout.size(k), 0, flat.dtype, flat.device,
                                                flat.device.type == "cuda", first_worker=S)
        self.follower = sharded.Follower(server, self.transport, servers.Dup(), layout, k)
        self.stopped = False

    def load_state_dict(self, state: dict) -> None:
        """Resume: this server's slices of a checkpoint server 0 wrote (every rank reads the file)."""
        self.follower.server.load_state_dict(state["server"])

    def train_dataloader(self, dataloader: object) -> object:
        return Ticks(len(dataloader))

    def training_step(self, args: tuple, kwargs: dict) -> None:
        return None

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        result = closure()  # the (empty) training step; Lightning requires the call
        if not self.stopped:
            self.stopped = self.follower.serve_until_update()
        self.stop_only_with_the_server()
        return result

    def stop_only_with_the_server(self) -> None:
        self.trainer.should_stop = self.stopped

    def finish(self, interrupted: bool = False) -> None:
        from lightning_byz.transport import mpi

        while not self.stopped:  # the loop ended on its own: follow server 0 to its end
            self.stopped = self.follower.serve_until_update()
        mpi.barrier(self.comm, timeout=30.0, while_waiting=self.transport.absorb)
        self.follower.close()
        self.transport.close()
        if receive_fit_end(self.trainer, mpi.world()):
            raise SIGTERMException


class FreshShard:
    """A worker's shard as Lightning's train loader: resumable in Lightning's eyes, but a resumed
    checkpoint is the server's, whose loader state (the server's ticks) means nothing to a worker's
    shard; the shard starts afresh and the server sends the parameters to resume from."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MPIWorkerRole(Role):
    """Ranks 1..N: gradient(s) on the own shard → worker rule → exchange → new parameters."""

    def __init__(self, strategy: AsyncPSStrategy, trainer: pl.Trainer, split: OptimizerSplit, flat: FlatModel):
        from lightning_byz.transport import mpi

        self.strategy = strategy
        self.trainer = trainer
        self.flat = flat
        self.comm = mpi.duplicate(mpi.world())  # bounded, as every wait on the server
        pin = flat.device.type == "cuda"
        S = strategy.num_servers
        self.transport = mpi.MPIWorkerTransport(self.comm, flat.numel, flat.buffers_numel, flat.dtype, pin,
                                                layout=ShardLayout(flat.numel, S))
        worker = self.comm.Get_rank() - S + 1
        self.worker = WorkerStep(worker, split.make_worker_rule(), flat, strategy.faults, send_buffers=True)
        self.hyper_count = len(split.worker_hyperparameters())  # how many values the rule takes
        self.stopped = False
        self.sigterm = False  # this rank got SIGTERM: its next message asks the server to stop the job

    def train_dataloader(self, dataloader: object) -> object:
        n, rank = self.strategy.num_workers, self.worker.worker
        return FreshShard(shard_loader(dataloader, n, rank - 1, self.strategy.seed, keep_workers=True,
                                       partition=self.strategy.partition))

    def training_step(self, args: tuple, kwargs: dict) -> Any:
        return self.strategy.user_training_step(self.worker.batch(args[0]), args, kwargs)

    def optimizer_step(self, closure: Callable[[], Any]) -> Any:
        worker = self.worker
        if worker.crashed():  # crash-stop: silent until the server stops all
            self._apply(self.transport.wait_stop())
            return closure()  # Lightning insists the closure runs; its gradient goes nowhere
        msg, result = worker.message(self.flat.params, closure)
        if self.sigterm:  # forwarded once, in place of this step's update
            self.sigterm = False
            msg = Message(msg.worker, msg.step, msg.version, None, stop_request=True)
        faults = self.strategy.faults
        repeats = max(1, round(faults.rate(worker.worker)))  # a flooding worker resends at once
        delay = faults.delay(worker.worker, msg.step)
        if delay > 0 and repeats == 1:
            time.sleep(delay)
        for _ in range(repeats):
            self._apply(self.transport.exchange(msg))
            if self.stopped:
                break
        self.stop_only_with_the_server()
        return result

    def stop_only_with_the_server(self) -> None:
        """A worker stops when the server says so: a ``should_stop`` set by code on the worker (the
        module, a callback: e.g. a step count reached on this rank) is undone, or the worker would
        wait for a stop while the server waits for its updates."""
        self.trainer.should_stop = self.stopped

    def _apply(self, reply: Reply) -> None:
        self.worker.version = reply.version
        self.worker.rule.set_hyperparameters(reply.hyper[: self.hyper_count])
        self.flat.params.copy_(reply.params, non_blocking=True)
        if reply.stop:
            if reply.buffers is not None:  # the server's robust buffers come with the final point
                self.flat.load_buffers(reply.buffers)
            self.stopped = True
            self.trainer.should_stop = True

    def finish(self, interrupted: bool = False) -> None:
        """Take the final point, report the fault counters; end as the server's fit ended."""
        from lightning_byz.transport import mpi

        if not self.stopped:  # the loop ended on its own (e.g. an exception path): get the final point
            self._apply(self.transport.wait_stop())
        request = mpi.send_metrics(self.comm, self.strategy.faults.counter_values())
        mpi.barrier(self.comm, timeout=30.0)
        request.Wait()
        if receive_fit_end(self.trainer, mpi.world()):
            raise SIGTERMException  # the server's fit was interrupted (preemption): so is this rank's
