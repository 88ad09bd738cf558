"""One contiguous buffer behind a module's parameters, so a model travels as a single vector.

The parameter server exchanges flat vectors: gradients out, parameters back. :class:`FlatModel`
re-points every parameter of a module at a view into one flat tensor, so loading a received vector
into the model is one copy (or none, when a transport receives straight into the buffer), and the
model's current point *is* ``flat``. Floating-point buffers (BatchNorm running statistics) are
gathered separately: they are not trained by gradients, so the server keeps a robust summary of
the workers' buffers instead (see :mod:`lightning_byz.server`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatModel:
    """Views of a module's parameters into one flat tensor ``self.params`` ([d], one dtype/device)."""

    def __init__(self, module: nn.Module):
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the module has no trainable parameters")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"parameter-server training needs one dtype and device for all parameters, got "
                f"dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}"
            )
        self.module = module
        self.param_list = params
        self.numel = sum(p.numel() for p in params)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            n = p.numel()
            p.data = flat[offset : offset + n].view_as(p)
            offset += n
        self.params = flat
        self.buffer_list = [b for b in module.buffers() if b.is_floating_point()]
        self.buffers_numel = sum(b.numel() for b in self.buffer_list)

    @property
    def dtype(self) -> torch.dtype:
        return self.params.dtype

    @property
    def device(self) -> torch.device:
        return self.params.device

    def gather_grads(self, out: Tensor | None = None) -> Tensor:
        """The parameters' ``.grad`` as one flat vector (zeros where a parameter got no gradient)."""
        out = torch.empty_like(self.params) if out is None else out
        offset = 0
        for p in self.param_list:
            n = p.numel()
            if p.grad is None:
                out[offset : offset + n].zero_()
            else:
                out[offset : offset + n].copy_(p.grad.reshape(-1))
            offset += n
        return out

    def gather_buffers(self) -> Tensor:
        """Floating-point buffers (e.g. BatchNorm statistics) as one flat vector (may be empty)."""
        if not self.buffer_list:
            return self.params.new_empty(0)
        return torch.cat([b.detach().reshape(-1).to(self.dtype) for b in self.buffer_list])

    def load_buffers(self, flat: Tensor) -> None:
        offset = 0
        for b in self.buffer_list:
            n = b.numel()
            b.copy_(flat[offset : offset + n].view_as(b))
            offset += n
