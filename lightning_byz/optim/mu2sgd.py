"""μ²-SGD as a standalone ``torch.optim.Optimizer`` (Dahan & Levy, NeurIPS 2024): STORM momentum
(the worker half) composed with AnyTime averaging (the server half), formulas from
:mod:`lightning_byz.optim.rules`.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor

from lightning_byz.optim import rules


class Mu2SGD(torch.optim.Optimizer):
    """μ²-SGD: d_t = g(x_t; z_t) + (1 − β_t)(d_{t−1} − g(x_{t−1}; z_t)); w_{t+1} = w_t − lr·α_t·d_t;
    x_{t+1} = (1 − mix_t)·x_t + mix_t·w_{t+1}. The model's parameters are the query point x.

    ``schedule="fixed"`` (the paper's experiments): β_t = beta, α_t = 1, mix_t = gamma.
    ``schedule="theory"``: β_t = 1/t, α_t = t, mix_t = α_{t+1}/α_{1:t+1} = 2/(t+2); beta and gamma
    are then unused. ``weight_decay`` adds wd·x to the gradient at each evaluated point.

    ``step(closure)`` needs a closure that clears the gradients, recomputes the loss and calls
    ``backward`` (as for LBFGS; Lightning's automatic optimization passes one). From t = 2 on it runs
    the closure twice on the same batch: first at x_{t−1} (with the random-number state forked, so
    dropout draws the same masks at both points), then at x_t. It returns the loss at x_t and leaves
    g(x_t; z_t) (without weight decay) in ``.grad``. Gradients are cleared before each evaluation, so
    gradient accumulation is not supported: gradients found at entry that the previous step did not
    leave (a ``backward`` outside the closure, Lightning's ``accumulate_grad_batches > 1``) raise
    ``ValueError`` instead of being dropped. A parameter without gradient counts as a zero gradient.
    Training-step side effects (logging, BatchNorm statistics) happen twice per step.

    State per parameter: ``step`` (t), ``d`` (d_t), ``w`` (the AnyTime anchor), ``prev`` (x_t after
    the step, which is x_{t−1} of the next one). To evaluate at x_{t−1} a parameter's ``.data`` is
    pointed at ``prev`` for the first closure and back at its own storage after it (no copies); the
    parameter's storage is the same before and after ``step``.
    """

    def __init__(self, params, lr: float, beta: float = 0.25, gamma: float = 0.1, schedule: str = "fixed",
                 weight_decay: float = 0.0) -> None:
        defaults = dict(lr=lr, beta=beta, gamma=gamma, schedule=schedule, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._grads_left: list[tuple[weakref.ref, int] | None] = []  # (.grad, its version) after the last step

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._grads_left = []

    def add_param_group(self, param_group: dict) -> None:
        group = {**self.defaults, **param_group}  # validate before the group joins
        rules.check_lr(group["lr"])
        rules.check_unit_interval("beta", group["beta"])
        rules.check_unit_interval("gamma", group["gamma"])
        rules.check_schedule(group["schedule"])
        rules.check_weight_decay(group["weight_decay"])
        super().add_param_group(param_group)

    def _evaluate(self, closure: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Run the closure on cleared gradients; return its loss and the gradients (zeros where None)."""
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        return loss, [torch.zeros_like(p) if p.grad is None else p.grad for p in params]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One μ²-SGD step; returns the closure's loss at x_t."""
        if closure is None:
            raise ValueError(
                "Mu2SGD.step needs a closure that clears the gradients, recomputes the loss and calls backward: "
                "it evaluates the gradient at x_t and at x_{t-1} on the same batch (e.g. `optimizer.step(closure)`; "
                "under Lightning use automatic optimization without 16-mixed precision)"
            )
        params = [p for group in self.param_groups for p in group["params"]]
        self._check_no_foreign_gradients(params)
        t = self.state[params[0]].get("step", 0) + 1
        if t == 1:
            loss, grads = self._evaluate(closure, params)
            prev_grads = [None] * len(params)
        else:
            own = [p.data for p in params]
            cuda = sorted({p.device.index for p in params if p.device.type == "cuda"})
            try:
                for p in params:
                    p.data = self.state[p]["prev"]
                with torch.random.fork_rng(devices=cuda):
                    _, prev_grads = self._evaluate(closure, params)
            finally:
                for p, data in zip(params, own):
                    p.data = data
            loss, grads = self._evaluate(closure, params)

        by_param = dict(zip(params, zip(grads, prev_grads)))
        for group in self.param_groups:
            x = group["params"]
            g, g_prev = (list(column) for column in zip(*(by_param[p] for p in x)))
            state = [self.state[p] for p in x]
            d, w, x_prev = ([s[k] for s in state] if t > 1 else None for k in ("d", "w", "prev"))
            d = rules.storm_direction(d, g, g_prev if t > 1 else None, x, x_prev,
                                      rules.storm_beta(group["schedule"], group["beta"], t), group["weight_decay"])
            if t == 1:
                w, x_prev = rules.clone_all(x), rules.clone_all(x)
            else:
                torch._foreach_copy_(x_prev, x)  # x_{t-1} is spent: its buffer keeps x_t
            rules.anytime_step_(x, w, d, group["lr"], *rules.anytime_weights(group["schedule"], group["gamma"], t))
            for s, d_i, w_i, prev_i in zip(state, d, w, x_prev):
                s.update(step=t, d=d_i, w=w_i, prev=prev_i)
        self._grads_left = [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in params]
        return loss

    def _check_no_foreign_gradients(self, params: list[Tensor]) -> None:
        """Raise if a parameter holds a gradient this optimizer did not leave there (a new tensor, or
        the old one changed in place to anything but zeros): step would drop it."""
        for i, p in enumerate(params):
            g, left = p.grad, self._grads_left[i] if i < len(self._grads_left) else None
            if g is None or (left is not None and left[0]() is g and (g._version == left[1] or not g.any())):
                continue
            raise ValueError(
                "Mu2SGD.step found gradients computed outside its closure (a backward() before step, or "
                "Lightning's accumulate_grad_batches > 1): it evaluates the gradients at x_t and x_{t-1} on "
                "the same batch itself and would drop them. Call backward only inside the closure, and use "
                "a larger batch instead of gradient accumulation."
            )
