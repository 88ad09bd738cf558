"""``AsyncPSStrategy``: Lightning training over a robust parameter server instead of all-reduce.

Rank 0 is the server: its training loop counts server updates (``max_steps``), its module holds the
server's point, its optimizer (the user's) steps on the aggregate, its validation/test loops and
loggers are the run's. Ranks 1..N are workers: their loop computes gradients on their own shard,
turns them into the vector they send (the worker half of the split: the gradient, the worker's
momentum, or μ²-SGD's STORM), exchanges it for fresh parameters and stops when the server says so.
Without MPI, one process simulates N workers with the same server and worker code.

This module is the Lightning adapter: configuration, the role of this process
(:mod:`lightning_byz.roles`), the closure hand-off, checkpoint state and the workers' endless loop.
The exchange itself is :mod:`lightning_byz.ps` over a transport (:mod:`lightning_byz.transport`).

To Lightning each rank is a single-device process: the strategy's collectives are local, so no
Lightning collective ever pairs a worker with the server by accident; all traffic is the exchange.
Rank and device come from Lightning's cluster environment (:class:`MPIEnvironment`, whatever
launched the ranks: mpirun, srun, mpiexec), except the node-local rank, which MPI's shared-memory
split gives without Lightning's pickled hostname gather (a worker must not send pickles to rank 0).

Checked against Lightning 2.4.0 and 2.6.6 (the pin in ``pyproject.toml``: >=2.4,<2.7). Private
names still used: Lightning's ``_StrategyRegistry``, only as the type in the signature Lightning
gives ``register_strategies``; and ``optimizer.step``, shadowed on the instance for the duration of
one ``Precision.optimizer_step`` call (see :meth:`AsyncPSStrategy.optimizer_step`).
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import MPIEnvironment
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, Timer
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor

from lightning_byz.aggregators import get_aggregator
from lightning_byz.arrivals import SCHEDULES, arrival_probabilities
from lightning_byz.data.partition import Partition, dataset_labels
from lightning_byz.evaluation import relay_evaluation, replace_callback, restore_on_worker
from lightning_byz.faults.base import Fault, FaultSet
from lightning_byz.launcher import device_for_rank
from lightning_byz.optim.split import check_worker_momentum, split_optimizer
from lightning_byz.ps import FlatModel, ParameterServer
from lightning_byz.roles import MPIFollowerRole, MPIServerRole, MPIWorkerRole, Role, SimulatedRole

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
        server_timeout: MPI workers: seconds without a word from the server (it sends a heartbeat
            every few seconds, also while it validates or saves) after which a worker raises
            ``ServerSilentError`` and the job ends; a frozen or unreachable server cannot hang it.
        seed: seeds the simulation (arrivals, shards) and the fault generators.
        sim_step_time: simulated mean compute time of one worker step under uniform arrivals.
        min_workers: warm-up: distinct workers the server must hear from before its first update
            (default: all); nobody is answered before it, so speed buys no weight at the start.
        max_staleness: reject (and count) updates computed more than this many versions ago.
        max_weight: cap on any worker's async weight s_i / Σ s_j, in (0, 1], and on its share of the
            updates it triggers (arrivals past it refresh its row without an update: ``ps/throttled``).
        worker_momentum: β in (0, 1): each worker sends its momentum instead of its gradient (robust
            rules separate honest from Byzantine better after averaging the noise); default None:
            workers send gradients and any momentum runs in the user's optimizer on the server.
        worker_momentum_kind: ``"ema"`` (m = β·m + (1 − β)·g) or ``"heavy_ball"`` (m = β·m + g).
        double_momentum: allow ``worker_momentum`` with an optimizer that keeps momentum itself.
        byzantine_share: simulated: the fraction λ of all arrivals made by the workers the fault
            callbacks mark Byzantine, whatever their speeds (the papers fix λ); within each group
            arrivals follow ``arrival``. Default None: λ follows from ``arrival``.
        byzantine_schedule: how that share is realised: ``"random"`` (each arrival Byzantine with
            probability λ) or ``"interleave"`` (every ⌈1/λ⌉-th arrival, as the released code of
            Dahan & Levy: 1/3 at λ = 0.4) (:mod:`lightning_byz.arrivals`).
        partition: how the training set is split among the workers: ``"iid"`` (equal random
            shards), ``"dirichlet"`` (label skew Dir(``dirichlet_alpha``)) or ``"labels"``
            (``classes_per_worker`` classes each); seeded, the same under MPI and simulated
            (:mod:`lightning_byz.data.partition`).
        num_servers: S >= 1 servers, each owning a contiguous 1/S slice of the parameters and of
            every worker's latest vector; every rule stays exact (cross-shard Gram matrices,
            :mod:`lightning_byz.sharding`). Under MPI ranks 0..S−1 are the servers (rank 0 decides,
            :mod:`lightning_byz.transport.sharded`), the other ranks workers; simulated, S shard
            threads in the one process.

    The optimizer: the server steps the user's own optimizer (any ``torch.optim`` one, its param
    groups and schedulers) with the aggregate as the gradient; ``Mu2SGD`` splits into STORM on the
    workers and AnyTime averaging on the server (:mod:`lightning_byz.optim.split`).
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
        server_timeout: float = 300.0,
        seed: int = 0,
        sim_step_time: float = 0.05,
        min_workers: int | None = None,
        max_staleness: int | None = None,
        max_weight: float | None = None,
        worker_momentum: float | None = None,
        worker_momentum_kind: str = "ema",
        double_momentum: bool = False,
        byzantine_share: float | None = None,
        byzantine_schedule: str = "random",
        partition: str = "iid",
        dirichlet_alpha: float = 0.5,
        classes_per_worker: int = 2,
        num_servers: int = 1,
        aggregator_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(device="cpu")
        if mode not in ("async", "sync"):
            raise ValueError(f"mode must be 'async' or 'sync', got {mode!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        for name, value in (("worker_timeout", worker_timeout), ("server_timeout", server_timeout)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
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
        self.worker_timeout, self.server_timeout = float(worker_timeout), float(server_timeout)
        self.seed = int(seed)
        self.sim_step_time = float(sim_step_time)
        self.transport = "mpi" if transport == "auto" and MPIEnvironment.detect() else transport
        self.transport = "simulated" if self.transport == "auto" else self.transport
        self.local_rank = 0
        if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 1:
            raise ValueError(f"num_servers must be an integer >= 1, got {num_servers!r}")
        self.num_servers = num_servers
        if self.transport == "mpi":
            env = MPIEnvironment()
            size = env.world_size()
            if size < num_servers + 1:
                raise ValueError(
                    f"transport='mpi' needs at least {num_servers + 1} MPI ranks ({num_servers} server(s) + workers); "
                    "launch with `mpirun -n N` / `srun`, or use transport='simulated' for one process"
                )
            if num_workers is not None and num_workers != size - num_servers:
                raise ValueError(f"num_workers={num_workers} but mpirun started {size} ranks "
                                 f"({num_servers} server(s), {size - num_servers} workers)")
            self.num_workers = size - num_servers
            # Lightning sees one single-device process per rank (world_size stays 1): no collectives
            self.global_rank = env.global_rank()
            self.local_rank = _node_local_rank()
            _abort_job_on_uncaught_exception(self.global_rank, num_servers)
            from lightning_byz.transport import mpi

            # every server rank beats; a worker watches them all, a server rank > 0 watches rank 0
            if self.global_rank == 0:
                mpi.start_heartbeat(self.server_timeout)
            elif self.global_rank < num_servers:
                mpi.start_heartbeat(self.server_timeout, targets=range(num_servers, size))
                mpi.watch_the_server(self.server_timeout)
            else:
                mpi.watch_the_server(self.server_timeout, servers=range(num_servers))
            if arrival != "uniform" and self.global_rank == 0:
                warnings.warn(
                    f"arrival={arrival!r} only shapes simulated runs; under MPI real timing decides who arrives"
                )
        else:
            if num_workers is None:
                if transport == "simulated":
                    raise ValueError("transport='simulated' needs num_workers (how many workers to simulate)")
                num_workers = DEFAULT_SIMULATED_WORKERS
            if int(num_workers) < 1:
                raise ValueError(f"num_workers must be >= 1, got {num_workers}")
            self.num_workers = int(num_workers)
        self.arrival_q = arrival_probabilities(arrival, self.num_workers)
        self.min_workers, self.max_staleness, self.max_weight = min_workers, max_staleness, max_weight
        ParameterServer.check_options(self.num_workers, sync_quorum, min_workers, max_staleness, max_weight)
        check_worker_momentum(worker_momentum, worker_momentum_kind)
        self.worker_momentum, self.worker_momentum_kind = worker_momentum, worker_momentum_kind
        self.double_momentum = bool(double_momentum)
        self.partition = Partition(partition, dirichlet_alpha, classes_per_worker)
        if byzantine_share is not None and not (isinstance(byzantine_share, (int, float)) and 0 < byzantine_share < 1):
            raise ValueError(f"byzantine_share must lie in (0, 1), got {byzantine_share!r}")
        if byzantine_schedule not in SCHEDULES:
            raise ValueError(f"byzantine_schedule must be one of {SCHEDULES}, got {byzantine_schedule!r}")
        if byzantine_share is not None and self.transport == "mpi" and self.global_rank == 0:
            warnings.warn("byzantine_share only shapes simulated runs; under MPI real timing decides who arrives")
        self.byzantine_share, self.byzantine_schedule = byzantine_share, byzantine_schedule
        self.faults = FaultSet()
        self.worker_fault_metrics: dict[str, float] = {}  # MPI server: the workers' fault counters at the end
        self.server: ParameterServer | None = None  # the server's state, on the server (kept after fit)
        self._role: Role | None = None

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
            if self.transport == "mpi":  # evaluation: once, on the server (lightning_byz.evaluation)
                from lightning_byz.transport import mpi

                relay_evaluation(trainer, self.is_server, mpi.world())
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
        self.faults = FaultSet(cb for cb in trainer.callbacks if isinstance(cb, Fault))
        self.faults.setup(self.num_workers, self.seed)
        optimizer = self.optimizers[0]
        split = split_optimizer(optimizer, self.worker_momentum, self.worker_momentum_kind, self.double_momentum)
        if self.is_server and self.mode == "async" and self.worker_momentum is None and any(
            g.get("momentum", 0) for g in optimizer.param_groups
        ):
            warnings.warn(
                f"{type(optimizer).__name__}'s momentum runs on the server, after aggregation; with asynchrony "
                "(stale gradients) it is much less stable than momentum on the workers: consider "
                "worker_momentum=0.9 with momentum=0, or a smaller lr (README: 'Where momentum runs')"
            )
        flat = FlatModel(self.lightning_module)
        servers = None
        if self.transport == "mpi" and self.num_servers > 1:
            from lightning_byz.transport.sharded import server_communicator

            servers = server_communicator(self.num_servers)  # collective: every rank
        if self.transport == "simulated":
            self._role = SimulatedRole(self, split, flat)
        elif self.is_server:
            self._role = MPIServerRole(self, split, flat, servers)
        elif servers is not None:
            self._role = MPIFollowerRole(self, trainer, split, flat, servers)
            _make_worker_loop(trainer)
            replace_callback(trainer, _WorkerStopsWithServer, _WorkerStopsWithServer(self._role))
            replace_callback(trainer, _ServerState, _ServerState(self))  # resume: its slices
        else:
            self._role = MPIWorkerRole(self, trainer, split, flat)
            _make_worker_loop(trainer)
            replace_callback(trainer, _WorkerStopsWithServer, _WorkerStopsWithServer(self._role))
            self.lr_scheduler_configs = []  # schedules act on the server's optimizer; a worker's never steps
        if self.is_server:
            self.server = self._role.server
            replace_callback(trainer, _ServerState, _ServerState(self))
            warnings.filterwarnings("ignore", message=".*`training_step` returned `None`.*")

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the server's state only exists after setup

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        trainer = self.lightning_module.trainer
        if self.transport == "mpi" and not self.is_server and trainer.state.fn != TrainerFn.FITTING:
            stand_in = restore_on_worker(checkpoint_path, self.lightning_module)
            if stand_in is not None:
                return stand_in
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if self._role is None or not trainer.training:
            return dataloader
        if self.is_server and self.partition.scheme != "iid" and isinstance(dataloader, torch.utils.data.DataLoader):
            labels = dataset_labels(dataloader.dataset)
            rank_zero_info(self.partition.describe(labels, self.partition.split(labels, self.num_workers, self.seed)))
        return self._role.train_dataloader(dataloader)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._role.training_step(args, kwargs) if self._role else super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """The role's exchange in place of ``optimizer.step``, called through the precision plugin.

        ``Precision.optimizer_step`` wraps the closure as Lightning does for every optimizer (after
        each gradient evaluation: ``on_before_optimizer_step`` hooks and gradient clipping, so every
        worker's gradient is clipped) and then calls ``optimizer.step(closure)``; that call is the
        role's ``optimizer_step`` here, the user's optimizer never steps itself.
        """
        if self._role is None:
            raise RuntimeError("AsyncPSStrategy.optimizer_step outside of fit")
        with _stepping_with(optimizer, self._role.optimizer_step):
            return self.precision_plugin.optimizer_step(optimizer, model or self.lightning_module, closure, **kwargs)

    def on_train_start(self) -> None:
        super().on_train_start()
        if isinstance(self._role, MPIWorkerRole):  # after Lightning registered its signal handlers
            _forward_sigterm_to_the_server(self._role)
        if isinstance(self._role, MPIFollowerRole):  # server 0 gets its own and stops the job
            signal.signal(signal.SIGTERM, lambda signum, frame: log.info("server rank: SIGTERM; server 0 stops the job"))

    def on_validation_start(self) -> None:
        super().on_validation_start()
        if isinstance(self._role, MPIServerRole):
            self._role.whole_point()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The model's weights for a checkpoint (Lightning asks for them first). With several MPI
        servers, server 0 takes the others' slices of everything the checkpoint holds here."""
        if isinstance(self._role, MPIServerRole):
            self._role.snapshot()
        return super().lightning_module_state_dict()

    def on_train_end(self) -> None:
        if self._role is not None:
            self._role.finish()
            if self.is_server:
                self._role.logging.summary()

    def on_exception(self, exception: BaseException) -> None:
        """A stop request on the server (SIGTERM, e.g. Slurm preemption, also one a worker forwarded;
        Ctrl-C) ends the whole job cleanly: after the callbacks' ``on_exception``
        (``OnExceptionCheckpoint`` saves the server's state there), every worker gets the final
        parameters and the stop, as at a normal end. The server then exits with 143 (128 + SIGTERM;
        Lightning's own exit status would be 0), so a scheduler sees the job did not finish."""
        if not self.is_server or not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        if self._role is not None:
            self._role.finish(interrupted=True)
        if isinstance(exception, SIGTERMException) and exception.code is None:
            exception.code = 128 + signal.SIGTERM

    def teardown(self) -> None:
        # A normal end went through ``on_train_end`` (stop messages, final parameters), a stop request
        # through ``on_exception``. After any other exception nothing more is exchanged: it propagates
        # and the job is aborted (``_abort_job_on_uncaught_exception``), so no rank waits forever.
        self._role = None
        super().teardown()

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0])

    def user_training_step(self, batch: Any, args: tuple, kwargs: dict) -> Any:
        """The LightningModule's own training step on ``batch`` (in place of Lightning's batch)."""
        with self.precision_plugin.train_step_context():
            return self.lightning_module.training_step(batch, *args[1:], **kwargs)


@contextmanager
def _stepping_with(optimizer: torch.optim.Optimizer, step: Callable[[Callable[[], Any]], Any]) -> Iterator[None]:
    """Within the block, ``optimizer.step(closure=...)`` runs ``step(closure)`` instead; afterwards
    ``optimizer.step`` is what it was (a scheduler's wrapper, when a scheduler installed one)."""
    previous = optimizer.__dict__.get("step")
    optimizer.step = lambda closure=None, **_: step(closure)
    try:
        yield
    finally:
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous


def _abort_job_on_uncaught_exception(rank: int, num_servers: int = 1) -> None:
    """An exception that leaves the script on any rank ends the whole MPI job, whatever the launcher.

    Plain ``mpirun python train.py`` or ``srun lightning-byz fit`` would otherwise leave the other
    ranks waiting for this one forever (``python -m mpi4py`` does the same as this hook). It runs
    after Lightning's own exception handling (``on_exception`` callbacks, checkpoint-on-exception,
    loggers finalised), prints the traceback once, naming the rank, and aborts every rank.
    """
    previous = sys.excepthook
    if getattr(previous, "lightning_byz_abort", False):
        return

    def hook(kind, value, tb) -> None:
        role = ("the server" if num_servers == 1 else f"server {rank}") if rank < num_servers else f"worker {rank - num_servers + 1}"
        sys.stderr.write(f"[lightning-byz] rank {rank} ({role}) failed; aborting the MPI job:\n")
        previous(kind, value, tb)
        sys.stderr.flush()
        from lightning_byz.transport import mpi

        mpi.world().Abort(1)

    hook.lightning_byz_abort = True
    sys.excepthook = hook


def _forward_sigterm_to_the_server(role: MPIWorkerRole) -> None:
    """A worker's SIGTERM does not end it alone: its next message asks the server to stop the job
    (under Slurm preemption every rank gets one; the server's own ends the job, checkpoint first),
    and it keeps answering until the server says stop. Lightning restores its handlers at teardown."""
    def forward(signum, frame) -> None:
        log.info("worker received SIGTERM; the server stops the job")
        role.sigterm = True

    signal.signal(signal.SIGTERM, forward)


def _node_local_rank() -> int:
    """This rank's index among the ranks on its node (MPI-3 shared-memory split; no pickle)."""
    from lightning_byz.transport import mpi

    node = mpi.world().Split_type(mpi.MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def _make_worker_loop(trainer: pl.Trainer) -> None:
    """A worker trains until the server says stop: it neither validates nor checkpoints, and the
    callbacks that end training (early stopping, ``max_time``) decide on the server only."""
    trainer.fit_loop.max_epochs = -1
    trainer.fit_loop.epoch_loop.max_steps = -1
    trainer.limit_val_batches = 0
    trainer.num_sanity_val_steps = 0
    server_only = (Checkpoint, EarlyStopping, Timer)
    trainer.callbacks[:] = [cb for cb in trainer.callbacks if not isinstance(cb, server_only)]


class _WorkerStopsWithServer(Callback):
    """On a worker (or a server rank other than 0), after every other hook of a batch or epoch: only
    the server's stop ends training."""

    def __init__(self, role: MPIWorkerRole | MPIFollowerRole):
        self.role = role

    def on_train_batch_end(self, trainer, *args) -> None:
        self.role.stop_only_with_the_server()

    def on_train_epoch_end(self, trainer, *args) -> None:
        self.role.stop_only_with_the_server()


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
