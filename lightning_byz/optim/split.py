"""An optimizer split into a worker half (what a worker sends) and a server half (how it is applied).

The parameter server aggregates the workers' vectors d_t and hands the aggregate to the server half;
each worker keeps its own worker half (its own momentum state). Worker rules: ``none`` (send the
gradient), ``momentum`` (heavy-ball, ``torch.optim.SGD`` semantics incl. dampening and Nesterov) and
``storm`` (μ²-SGD's STORM); server rules: ``sgd`` (x <- x − lr·d) and ``anytime`` (μ²-SGD's AnyTime
averaging). Formulas: :mod:`lightning_byz.optim.rules`.

Counting of the "theory" schedule: β_t = 1/t uses the worker rule's own step count (one per
``direction`` call of that worker), α_t = t uses the server rule's count (one per ``step``, i.e. per
applied aggregate). With one worker and no delay both equal the standalone optimizer's t.
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def _update(self, buffer, grads, prev_grads, params, prev_params):
        beta_t = rules.storm_beta(self.schedule, self.beta, self.t)
        return rules.storm_direction(buffer, grads, prev_grads, params, prev_params, beta_t, self.weight_decay)


class ServerRule:
    """Applies an (aggregated) direction to the server's query point x."""

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        """Update ``params`` (x) in place; ``lr`` is read per call (schedulers change it)."""
        raise NotImplementedError

    def step_scale(self, lr: float) -> float:
        """The largest factor the next :meth:`step` multiplies the direction by (overflow guard)."""
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


class SGDServer(ServerRule):
    """``sgd``: x <- x − lr·d."""

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        rules.sgd_step_(params, direction, lr)


class AnyTimeServer(ServerRule):
    """``anytime``: μ²-SGD's server half. Keeps the anchor w (w_1 = x_1 = ``params`` at construction):
    w <- w − lr·α_t·d, x <- (1 − mix_t)·x + mix_t·w."""

    def __init__(self, params: list[Tensor], gamma: float = 0.1, schedule: str = "fixed") -> None:
        rules.check_unit_interval("gamma", gamma)
        rules.check_schedule(schedule)
        self.gamma, self.schedule = gamma, schedule
        self.t = 0  # updates applied
        self.w = rules.clone_all(params)

    def step(self, params: list[Tensor], direction: list[Tensor], lr: float) -> None:
        self.t += 1
        alpha_t, mix = rules.anytime_weights(self.schedule, self.gamma, self.t)
        rules.anytime_step_(params, self.w, direction, lr, alpha_t, mix)

    def step_scale(self, lr: float) -> float:
        return lr * rules.anytime_weights(self.schedule, self.gamma, self.t + 1)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "w": self.w}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; w keeps this rule's device and dtype."""
        torch._foreach_copy_(self.w, _load_tensors("w", sd["w"], self.w))
        self.t = int(sd["t"])


@dataclass
class OptimizerSplit:
    """The two halves of a user's optimizer, as factories."""

    make_worker_rule: Callable[[], WorkerRule]  # a fresh worker rule (fresh state) per call
    make_server_rule: Callable[[list[Tensor]], ServerRule]  # built on the server's params (w_1 = x_1)


SUPPORTED = "torch.optim.SGD (any momentum, dampening, nesterov, weight_decay; maximize=False) and lightning_byz.optim.Mu2SGD"


def _shared_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyper-parameters of the param groups, which must all agree (one flat vector, one lr)."""
    first, *rest = optimizer.param_groups
    hyper = {k: v for k, v in first.items() if k != "params"}
    for i, group in enumerate(rest, start=1):
        other = {k: v for k, v in group.items() if k != "params"}
        differing = sorted(k for k in hyper.keys() | other.keys() if hyper.get(k) != other.get(k))
        if differing:
            detail = ", ".join(f"{k}: {hyper.get(k)!r} vs {other.get(k)!r}" for k in differing)
            raise ValueError(
                f"param group 0 and param group {i} of {type(optimizer).__name__} differ in {detail}; the parameter "
                "server updates one flat vector with one set of hyper-parameters, so all groups must share them"
            )
    return hyper


def split_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerSplit:
    """Map ``torch.optim.SGD`` (momentum 0 -> none + sgd, momentum > 0 -> momentum + sgd) and
    :class:`Mu2SGD` (-> storm + anytime with its schedule) to their worker and server halves.
    Raises ``ValueError`` for other optimizers and for param groups with differing hyper-parameters."""
    if type(optimizer) is Mu2SGD:
        h = _shared_hyperparameters(optimizer)
        return OptimizerSplit(
            make_worker_rule=lambda: Storm(h["beta"], h["schedule"], h["weight_decay"]),
            make_server_rule=lambda params: AnyTimeServer(params, h["gamma"], h["schedule"]),
        )
    if type(optimizer) is torch.optim.SGD:
        h = _shared_hyperparameters(optimizer)
        if h.get("maximize", False):
            raise ValueError("torch.optim.SGD with maximize=True cannot be split; negate the loss instead")
        if h["momentum"] == 0:
            make_worker = lambda: SendGradient(h["weight_decay"])  # noqa: E731
        else:
            make_worker = lambda: HeavyBall(h["momentum"], h["dampening"], h["nesterov"], h["weight_decay"])  # noqa: E731
        return OptimizerSplit(make_worker_rule=make_worker, make_server_rule=lambda params: SGDServer())
    raise ValueError(f"cannot split optimizer {type(optimizer).__name__}; supported: {SUPPORTED}")
