"""The update formulas of μ²-SGD, SGD and heavy-ball momentum, written once on lists of tensors.

Every function takes lists of tensors — one flat ``[d]`` vector (the parameter server) or one
tensor per parameter (the standalone :class:`~lightning_byz.optim.Mu2SGD`) — and uses
``torch._foreach_*`` kernels, so both users share this single copy of the maths.

μ²-SGD (Dahan & Levy, "Weight for Robustness: a Comprehensive Approach towards Optimal
Fault-Tolerant Asynchronous ML", NeurIPS 2024),
t = 1, 2, ...:

* worker, STORM (Cutkosky & Orabona 2019): d_1 = g(x_1; z_1),
  d_t = g(x_t; z_t) + (1 − β_t)(d_{t−1} − g(x_{t−1}; z_t));
* server, AnyTime SGD (Cutkosky 2019): w_{t+1} = w_t − lr·α_t·d_t,
  x_{t+1} = (α_{1:t}·x_t + α_{t+1}·w_{t+1}) / α_{1:t+1}, which is
  ``lerp(x_t, w_{t+1}, α_{t+1} / α_{1:t+1})``.

Schedules: ``"fixed"`` (the paper's experiments): β_t = beta, α_t = 1 and the mixing weight is a
constant gamma; ``"theory"``: β_t = 1/t, α_t = t, so α_{1:t} = t(t+1)/2 and the mixing weight is
α_{t+1} / α_{1:t+1} = 2/(t+2).

Weight decay is added to the gradient at each evaluated point (g(x) + wd·x, also at x_{t−1} for
STORM), as ``torch.optim.SGD`` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEDULES = ("fixed", "theory")


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` unless 0 < value <= 1."""
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


def check_lr(lr: float) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def check_weight_decay(weight_decay: float) -> None:
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


def storm_beta(schedule: str, beta: float, t: int) -> float:
    """β_t of STORM at worker step t (1-based): ``beta`` for "fixed", 1/t for "theory"."""
    return beta if schedule == "fixed" else 1.0 / t


def anytime_weights(schedule: str, gamma: float, t: int) -> tuple[float, float]:
    """(α_t, mixing weight α_{t+1}/α_{1:t+1}) of AnyTime SGD at server step t (1-based)."""
    return (1.0, gamma) if schedule == "fixed" else (float(t), 2.0 / (t + 2))


def with_weight_decay(grads: list[Tensor], params: list[Tensor] | None, weight_decay: float) -> list[Tensor]:
    """g + wd·x as a new list (``grads`` itself when wd = 0; then ``params`` may be None)."""
    if weight_decay == 0:
        return grads
    if params is None:
        raise ValueError("weight_decay > 0 needs the parameters at which the gradients were taken")
    return torch._foreach_add(grads, params, alpha=weight_decay)


def clone_all(tensors: list[Tensor]) -> list[Tensor]:
    """Detached copies (fresh memory, same dtype/device/layout)."""
    return [t.detach().clone(memory_format=torch.preserve_format) for t in tensors]


def storm_(d: list[Tensor], grads: list[Tensor], prev_grads: list[Tensor], beta_t: float) -> None:
    """In place: d <- grads + (1 − β_t)(d − prev_grads); ``prev_grads`` is overwritten (scratch).

    Two foreach kernels (6 array passes) instead of three (8): E = lerp(prev, g, 1/β) = (g − (1 − β)·prev)/β, then
    d <- lerp(d, E, β) = (1 − β)·d + g − (1 − β)·prev. (lerp evaluates a weight >= 1/2 from the
    end point, so the rounding error stays that of the direct formula.)
    """
    torch._foreach_lerp_(prev_grads, grads, 1.0 / beta_t)
    torch._foreach_lerp_(d, prev_grads, beta_t)


def heavy_ball_(buf: list[Tensor], grads: list[Tensor], momentum: float, dampening: float) -> None:
    """In place, ``torch.optim.SGD``'s momentum buffer: buf <- momentum·buf + (1 − dampening)·grads."""
    torch._foreach_mul_(buf, momentum)
    torch._foreach_add_(buf, grads, alpha=1.0 - dampening)


def sgd_step_(params: list[Tensor], d: list[Tensor], lr: float) -> None:
    """In place: x <- x − lr·d."""
    torch._foreach_add_(params, d, alpha=-lr)


def anytime_step_(x: list[Tensor], w: list[Tensor], d: list[Tensor], lr: float, alpha_t: float, mix: float) -> None:
    """In place: w <- w − lr·α_t·d, then x <- (1 − mix)·x + mix·w."""
    torch._foreach_add_(w, d, alpha=-lr * alpha_t)
    torch._foreach_lerp_(x, w, mix)


def storm_direction(
    d: list[Tensor] | None,
    grads: list[Tensor],
    prev_grads: list[Tensor] | None,
    params: list[Tensor] | None,
    prev_params: list[Tensor] | None,
    beta_t: float,
    weight_decay: float,
) -> list[Tensor]:
    """STORM's d_t: a fresh copy of g(x_1) + wd·x_1 when ``d`` is None (the first step), else ``d``
    updated in place with the correction g(x_{t−1}; z_t) + wd·x_{t−1} in ``prev_grads``, which
    serves as scratch (overwritten)."""
    g = with_weight_decay(grads, params, weight_decay)
    if d is None:
        return clone_all(g) if g is grads else g
    if prev_grads is None:
        raise ValueError("STORM needs prev_grads = g(x_{t-1}; z_t) after its first step")
    if weight_decay != 0 and prev_params is None:
        raise ValueError("STORM with weight_decay > 0 needs prev_params = x_{t-1} after its first step")
    storm_(d, g, with_weight_decay(prev_grads, prev_params, weight_decay), beta_t)
    return d
