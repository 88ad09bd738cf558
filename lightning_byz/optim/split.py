"""An optimizer split into a worker half (what a worker sends) and a server half (how it is applied).

The parameter server aggregates the workers' vectors d_t and hands the aggregate to the server half;
each worker keeps its own worker half (its own momentum state).

**Any optimizer** (the DDP analogue, the default): workers send their gradient (``none``), the
server sets the aggregate as the gradient of its parameters and steps the user's own optimizer
(:class:`OptimizerServer`): SGD with momentum, Adam, AdamW, RMSprop, ..., param groups with their
own hyper-parameters, ``maximize``; schedulers act on it as under any strategy. Momentum then runs
on the server, after aggregation (what the Flag Aggregator paper does).

**Worker momentum** (``worker_momentum=β``): each worker sends its momentum instead of the raw
gradient and the server steps the user's optimizer on the aggregated momenta. Momentum *before*
aggregation averages out the honest noise, so robust rules tell honest from Byzantine better
(Karimireddy, He & Jaggi, ICML 2021; the Weight for Robustness experiments). ``"ema"``:
m_1 = g_1, m_t = β·m_{t−1} + (1 − β)·g_t (a step of size lr); ``"heavy_ball"``:
m_t = β·m_{t−1} + g_t (``torch.optim.SGD``'s buffer; a step of size lr/(1 − β) in the long run).
An optimizer that also keeps momentum (SGD ``momentum``, RMSprop ``momentum``, Adam-family
``betas[0]``) would average twice: an error unless ``double_momentum=True``.

**μ²-SGD** keeps its own split: STORM on the workers (``storm``), AnyTime averaging on the server
(``anytime``), one set of hyper-parameters for the flat vector. Its worker-side hyper-parameters
(β, weight decay) are read on the server at each reply and travel with it
(:meth:`OptimizerSplit.worker_hyperparameters`), so a scheduler that changes them reaches every
worker; γ and lr are read on the server at each step. Formulas: :mod:`lightning_byz.optim.rules`.

Counting of the "theory" schedule: β_t = 1/t uses the worker rule's own step count (one per
``direction`` call of that worker), α_t = t uses the server rule's count (one per ``step``, i.e. per
applied aggregate). With one worker and no delay both equal the standalone optimizer's t.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Callable

import torch
from torch import Tensor

from lightning_byz.optim import rules
from lightning_byz.optim.mu2sgd import Mu2SGD


def _load_tensors(name: str, saved: list[Tensor] | None, current: list[Tensor] | None) -> list[Tensor] | None:
    """Fresh copies of ``saved``, checked against the shapes of ``current`` when that exists."""
    if saved is None:
        return None
    if current is not None and [t.shape for t in saved] != [t.shape for t in current]:
        raise ValueError(f"state {name!r} has shapes {[tuple(t.shape) for t in saved]}, expected "
                         f"{[tuple(t.shape) for t in current]}")
    return rules.clone_all(saved)


class WorkerRule:
    """Turns a worker's gradients into the vector d_t it sends. One instance per worker."""

    #: True when ``direction`` also needs g(x_{t−1}; z_t) (STORM).
    needs_previous_gradient: bool = False

    def __init__(self, weight_decay: float = 0.0) -> None:
        rules.check_weight_decay(weight_decay)
        self.weight_decay = weight_decay
        self.t = 0  # steps taken
        self.buffer: list[Tensor] | None = None  # d_t, owned by the rule

    def direction(
        self,
        grads: list[Tensor],
        prev_grads: list[Tensor] | None,
        params: list[Tensor] | None = None,
        prev_params: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """d_t from grads = g(x_t; z_t) and prev_grads = g(x_{t−1}; z_t) (None on the first step or
        when not needed; a rule may use it as scratch); params / prev_params = x_t / x_{t−1}, needed
        only for weight decay. The result is owned by the rule: the caller must not modify it."""
        self.t += 1
        self.buffer = self._update(self.buffer, grads, prev_grads, params, prev_params)
        return self.buffer

    def _update(self, buffer, grads, prev_grads, params, prev_params) -> list[Tensor]:
        raise NotImplementedError

    def set_hyperparameters(self, values: tuple[float, ...]) -> None:
        """The server's current values of this rule's scheduled hyper-parameters (see
        :meth:`OptimizerSplit.worker_hyperparameters`); rules with none ignore them."""

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "buffer": self.buffer}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are copied as given: same device and dtype)."""
        self.buffer = _load_tensors("buffer", sd["buffer"], self.buffer)
        self.t = int(sd["t"])


class SendGradient(WorkerRule):
    """``none``: d_t = g(x_t) + wd·x_t, copied into a rule-owned buffer."""

    def _update(self, buffer, grads, prev_grads, params, prev_params):
        g = rules.with_weight_decay(grads, params, self.weight_decay)
        if buffer is None:
            return rules.clone_all(g) if g is grads else g
        torch._foreach_copy_(buffer, g)
        return buffer


class HeavyBall(WorkerRule):
    """``momentum``: ``torch.optim.SGD``'s buffer b_1 = g_1, b_t = m·b_{t−1} + (1 − dampening)·g_t
    (g with weight decay); d_t = b_t, or g_t + m·b_t with ``nesterov``."""

    def __init__(self, momentum: float, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        if not momentum > 0:
            raise ValueError(f"momentum must be > 0 (use SendGradient for none), got {momentum!r}")
        if nesterov and dampening != 0:
            raise ValueError("Nesterov momentum requires dampening = 0")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.momentum_buffer: list[Tensor] | None = None

    def _update(self, buffer, grads, prev_grads, params, prev_params):
        g = rules.with_weight_decay(grads, params, self.weight_decay)
        if self.momentum_buffer is None:
            self.momentum_buffer = rules.clone_all(g)
        else:
            rules.heavy_ball_(self.momentum_buffer, g, self.momentum, self.dampening)
        if not self.nesterov:
            return self.momentum_buffer
        return torch._foreach_add(g, self.momentum_buffer, alpha=self.momentum)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "buffer": self.momentum_buffer}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.momentum_buffer = _load_tensors("buffer", sd["buffer"], self.momentum_buffer)
        self.buffer = None if self.nesterov else self.momentum_buffer
        self.t = int(sd["t"])


class Storm(WorkerRule):
    """``storm``: μ²-SGD's worker half, d_t = g(x_t) + (1 − β_t)(d_{t−1} − g(x_{t−1})), on one batch."""

    needs_previous_gradient = True

    def __init__(self, beta: float = 0.25, schedule: str = "fixed", weight_decay: float = 0.0) -> None:
        super().__init__(weight_decay)
        rules.check_unit_interval("beta", beta)
        rules.check_schedule(schedule)
        self.beta, self.schedule = beta, schedule

    def set_hyperparameters(self, values: tuple[float, ...]) -> None:
        """(β, weight decay) as the server's optimizer holds them now."""
        beta, weight_decay = values
        rules.check_unit_interval("beta", beta)
        rules.check_weight_decay(weight_decay)
        self.beta, self.weight_decay = beta, weight_decay

    def _update(self, buffer, grads, prev_grads, params, prev_params):
        beta_t = rules.storm_beta(self.schedule, self.beta, self.t)
        return rules.storm_direction(buffer, grads, prev_grads, params, prev_params, beta_t, self.weight_decay)


class ServerRule:
    """Applies an (aggregated) direction to the server's query point x."""

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        """Update ``params`` (x) in place; ``lr`` is read per call (schedulers change it). The rule
        may modify ``direction``."""
        raise NotImplementedError

    def step_scale(self, lr: float) -> float:
        """A bound on how much the next :meth:`step` amplifies the direction: the server skips an
        aggregate d with max|d|·scale ≥ finfo.max/4 (overflow guard)."""
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass

    def elementwise_state(self) -> list[tuple[Tensor, int]]:
        """``(tensor, offset)`` for every state tensor whose entry j belongs to coordinate offset + j
        of the flat point (a sharded server owns those in its slice)."""
        return []


class SGDServer(ServerRule):
    """``sgd``: x <- x − lr·d (the minimal rule; tests and benchmarks of the server use it)."""

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        rules.sgd_step_(params, direction, lr)


class OptimizerServer(ServerRule):
    """The user's own optimizer steps the server's point, the aggregate as its gradient.

    ``home`` is the flat vector the optimizer's parameters (``param_list``, in order) are views of
    (:class:`~lightning_byz.ps.FlatModel`): the aggregate's slices become their ``.grad`` without a
    copy, and ``step`` runs the optimizer's own ``step`` (captured at construction, so a scheduler's
    step counter and the optimizer's hooks see every update). When the server's point is another
    vector (the simulation keeps it apart from the module) it is copied in and out.

    The optimizer's state travels in Lightning's checkpoints (``optimizer_states``), as under any
    strategy, so this rule has none of its own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, param_list: list[Tensor], home: Tensor) -> None:
        self.optimizer = optimizer
        self.param_list = param_list
        self.numels = [p.numel() for p in param_list]
        self.home = home
        self._step = optimizer.step
        finfo = torch.finfo(home.dtype)
        self._square_scale = 4 * math.sqrt(finfo.max)

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        (x,), (d,) = params, direction
        if x is not self.home:
            self.home.copy_(x)
        for p, g in zip(self.param_list, d.split(self.numels)):
            p.grad = g.view_as(p)
        try:
            self._step()
        finally:
            for p in self.param_list:
                p.grad = None
        if x is not self.home:
            x.copy_(self.home)

    def elementwise_state(self) -> list[tuple[Tensor, int]]:
        """The optimizer's per-parameter state tensors shaped like their parameter (momenta, Adam's
        moments), at the parameter's offset in the flat point, in a fixed order."""
        out, offset = [], 0
        for p, n in zip(self.param_list, self.numels):
            state = self.optimizer.state.get(p, {})
            out += [(state[key], offset) for key in sorted(state)
                    if isinstance(state[key], Tensor) and state[key].shape == p.shape]
            offset += n
        return out

    def step_scale(self, lr: float) -> float:
        """Squares of the aggregate (Adam's second moment) must stay finite, and the largest lr
        times a momentum amplification of up to 1e3 must not overflow the step."""
        largest_lr = max(float(g["lr"]) for g in self.optimizer.param_groups)
        return max(self._square_scale, 1e3 * largest_lr)


class AnyTimeServer(ServerRule):
    """``anytime``: μ²-SGD's server half. Keeps the anchor w (w_1 = x_1 = ``params`` at construction):
    w <- w − lr·α_t·d, x <- (1 − mix_t)·x + mix_t·w."""

    def __init__(self, params: list[Tensor], gamma: float = 0.1, schedule: str = "fixed",
                 group: dict | None = None) -> None:
        rules.check_unit_interval("gamma", gamma)
        rules.check_schedule(schedule)
        self.gamma, self.schedule = gamma, schedule
        self.group = group  # an optimizer's param group: γ is read from it at every step (schedulers)
        self.t = 0  # updates applied
        self.w = rules.clone_all(params)

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        if self.group is not None and self.group["gamma"] != self.gamma:
            rules.check_unit_interval("gamma", self.group["gamma"])
            self.gamma = self.group["gamma"]
        self.t += 1
        alpha_t, mix = rules.anytime_weights(self.schedule, self.gamma, self.t)
        rules.anytime_step_(params, self.w, direction, lr, alpha_t, mix)

    def step_scale(self, lr: float) -> float:
        return lr * rules.anytime_weights(self.schedule, self.gamma, self.t + 1)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "w": self.w}

    def elementwise_state(self) -> list[tuple[Tensor, int]]:
        return [(self.w[0], 0)] if len(self.w) == 1 else []  # the server's rule keeps one flat anchor

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; w keeps this rule's device and dtype."""
        torch._foreach_copy_(self.w, _load_tensors("w", sd["w"], self.w))
        self.t = int(sd["t"])


@dataclass
class OptimizerSplit:
    """The two halves of a user's optimizer, as factories."""

    make_worker_rule: Callable[[], WorkerRule]  # a fresh worker rule (fresh state) per call
    #: the server half, built on the server's point x and the module's parameters, which are views
    #: of the flat vector ``home`` (``make_server_rule(x, param_list, home)``)
    make_server_rule: Callable[[Tensor, list[Tensor], Tensor], ServerRule]
    #: the worker rule's scheduled hyper-parameters as the server's optimizer holds them now (at most
    #: two floats; they travel with every reply to :meth:`WorkerRule.set_hyperparameters`)
    worker_hyperparameters: Callable[[], tuple[float, ...]] = tuple


WORKER_MOMENTUM_KINDS = ("ema", "heavy_ball")


def _shared_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyper-parameters of the param groups, which must all agree (μ²-SGD: one flat vector)."""
    first, *rest = optimizer.param_groups
    hyper = {k: v for k, v in first.items() if k != "params"}
    for i, group in enumerate(rest, start=1):
        other = {k: v for k, v in group.items() if k != "params"}
        differing = sorted(k for k in hyper.keys() | other.keys() if hyper.get(k) != other.get(k))
        if differing:
            detail = ", ".join(f"{k}: {hyper.get(k)!r} vs {other.get(k)!r}" for k in differing)
            raise ValueError(
                f"param group 0 and param group {i} of {type(optimizer).__name__} differ in {detail}; μ²-SGD's "
                "split updates one flat vector with one set of hyper-parameters, so all groups must share them"
            )
    return hyper


def optimizer_momentum(optimizer: torch.optim.Optimizer) -> str | None:
    """A description of the momentum the optimizer keeps itself (None when it keeps none)."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            return f"momentum={group['momentum']}"
        betas = group.get("betas")
        if betas and betas[0]:
            return f"betas[0]={betas[0]}"
    return None


def check_worker_momentum(worker_momentum: float | None, kind: str) -> None:
    if worker_momentum is not None and not (isinstance(worker_momentum, (int, float)) and 0 < worker_momentum < 1):
        raise ValueError(f"worker_momentum must lie in (0, 1) (or be None: workers send gradients), got {worker_momentum!r}")
    if kind not in WORKER_MOMENTUM_KINDS:
        raise ValueError(f"worker_momentum_kind must be one of {WORKER_MOMENTUM_KINDS}, got {kind!r}")


def split_optimizer(
    optimizer: torch.optim.Optimizer,
    worker_momentum: float | None = None,
    worker_momentum_kind: str = "ema",
    double_momentum: bool = False,
) -> OptimizerSplit:
    """The worker and server halves of ``optimizer``.

    :class:`Mu2SGD` -> STORM on the workers + AnyTime on the server. Any other ``torch.optim``
    optimizer -> the workers send gradients (or their ``worker_momentum``, ``"ema"`` or
    ``"heavy_ball"``) and the server steps ``optimizer`` itself. ``ValueError`` for momentum on both
    sides without ``double_momentum``, and for μ²-SGD with worker momentum or differing groups.
    """
    check_worker_momentum(worker_momentum, worker_momentum_kind)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("LBFGS evaluates the loss again inside its step; the parameter server steps on one "
                         "aggregated gradient per update, so it cannot run LBFGS (any first-order optimizer can)")
    if isinstance(optimizer, Mu2SGD):
        if worker_momentum is not None:
            raise ValueError("Mu2SGD already runs STORM momentum on the workers; leave worker_momentum unset")
        h = _shared_hyperparameters(optimizer)
        group = optimizer.param_groups[0]
        return OptimizerSplit(
            make_worker_rule=lambda: Storm(h["beta"], h["schedule"], h["weight_decay"]),
            make_server_rule=lambda x, param_list, home: AnyTimeServer([x], h["gamma"], h["schedule"], group),
            worker_hyperparameters=lambda: (float(group["beta"]), float(group["weight_decay"])),
        )
    if worker_momentum is None:
        make_worker: Callable[[], WorkerRule] = SendGradient
    else:
        own = optimizer_momentum(optimizer)
        if own is not None and not double_momentum:
            raise ValueError(
                f"momentum on both sides: worker_momentum={worker_momentum} on the workers and "
                f"{type(optimizer).__name__}({own}) on the server; set the optimizer's momentum to 0 (for "
                "Adam-family optimizers betas=(0, beta2)) to keep momentum on the workers only, leave "
                "worker_momentum unset to keep it on the server only, or pass double_momentum=True"
            )
        dampening = worker_momentum if worker_momentum_kind == "ema" else 0.0
        make_worker = lambda: HeavyBall(worker_momentum, dampening)  # noqa: E731
    return OptimizerSplit(
        make_worker_rule=make_worker,
        make_server_rule=lambda x, param_list, home: OptimizerServer(optimizer, param_list, home),
    )
