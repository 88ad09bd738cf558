"""A worker's side of one exchange, written once for MPI workers and simulated ones.

:class:`WorkerStep` holds what a worker carries from step to step (its step count, the server
version its point came from, its optimizer half, STORM's previous point) and turns one batch into
one :class:`Message`: faults on the batch, the gradient (two for STORM: g(x_t; z_t) and
g(x_{t−1}; z_t), on the same random draws), the worker rule, faults on the vector.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from lightning_byz.faults.base import FaultSet
from lightning_byz.optim.split import WorkerRule
from lightning_byz.ps.flat import FlatModel
from lightning_byz.ps.messages import Message


def gradient_at(model: FlatModel, point: Tensor, closure: Callable[[], Any], out: Tensor, same_rng: bool) -> Any:
    """Run Lightning's closure (training step + backward) at ``point``; flat gradient into ``out``.

    ``same_rng`` forks the RNG so the next evaluation draws the same random numbers (dropout masks):
    STORM's two gradients must see the same sample z_t.
    """
    if point is not model.params:
        model.params.copy_(point)
    devices = [model.device] if model.device.type == "cuda" else []
    if same_rng:
        with torch.random.fork_rng(devices=devices):
            result = closure()
    else:
        result = closure()
    model.gather_grads(out)
    return result


class WorkerStep:
    """Worker ``worker``: batch → gradient(s) at its point → worker rule → message faults → Message.

    Args:
        worker: the worker's id (1..N).
        rule: its half of the optimizer (a fresh :class:`WorkerRule`).
        model: the module the closure evaluates (its ``params`` are overwritten with the point).
        faults: the run's faults.
        send_buffers: attach the module's floating-point buffers to each message (MPI workers).
        scratch: gradient buffers to share between workers of one process (the simulation).
    """

    def __init__(
        self,
        worker: int,
        rule: WorkerRule,
        model: FlatModel,
        faults: FaultSet,
        send_buffers: bool = False,
        scratch: tuple[Tensor, Tensor | None] | None = None,
    ):
        self.worker = worker
        self.rule = rule
        self.model = model
        self.faults = faults
        self.send_buffers = send_buffers and model.buffers_numel > 0
        self.storm = rule.needs_previous_gradient
        if scratch is None:
            scratch = WorkerStep.scratch(model, self.storm)
        self.grad, self.prev_grad = scratch
        self.prev = model.params.detach().clone() if self.storm else None  # x_{t−1}
        self._saved: Tensor | None = None  # the point, while the model visits x_{t−1}
        self.step = 0
        self.version = 0
        self._batch: tuple[int, Any] | None = None

    @staticmethod
    def scratch(model: FlatModel, storm: bool) -> tuple[Tensor, Tensor | None]:
        """Gradient buffers for one worker (or for several that take turns)."""
        return torch.empty_like(model.params), torch.empty_like(model.params) if storm else None

    def crashed(self) -> bool:
        """Crash-stop: the worker sends nothing from this step on."""
        return self.faults.crashed(self.worker, self.step)

    def batch(self, batch: Any) -> Any:
        """This step's batch after the data faults, applied once per step (STORM evaluates twice)."""
        if self._batch is None or self._batch[0] != self.step:
            self._batch = (self.step, self.faults.batch(self.worker, self.step, batch))
        return self._batch[1]

    def message(self, point: Tensor, closure: Callable[[], Any]) -> tuple[Message, Any]:
        """Compute this step's message at ``point``; returns it with the closure's result."""
        prev_grads = None
        if self.storm and self.step > 0:
            if point is self.model.params:  # visiting x_{t−1} overwrites the model's point
                if self._saved is None:
                    self._saved = torch.empty_like(point)
                point = self._saved.copy_(point)
            gradient_at(self.model, self.prev, closure, self.prev_grad, same_rng=True)
            prev_grads = [self.prev_grad]
        result = gradient_at(self.model, point, closure, self.grad, same_rng=False)
        direction = self.rule.direction(
            [self.grad], prev_grads, params=[point], prev_params=[self.prev] if prev_grads else None
        )[0]
        vector = self.faults.message(self.worker, self.step, direction)
        buffers = self.model.gather_buffers() if self.send_buffers and vector is not None else None
        msg = Message(self.worker, self.step, self.version, vector, buffers)
        if self.storm:
            self.prev.copy_(point)
        self.step += 1
        return msg, result
