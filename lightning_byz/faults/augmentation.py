"""Nonlinear data augmentation on chosen workers (FA paper §3.1, "Evaluating resilience against
nonlinear data augmentation"), which makes those workers' gradients dependent-noisy.

Each kind moves pixel coordinates; the augmented image at pixel p is the input image read at the
moved location Φ(p) (backward warping). Coordinates are normalised to the unit square (pixel centres
at (j + ½)/W, (i + ½)/H; x is the column, y the row).

- ``lotka_volterra``: Φ is the time-``t_end`` flow of the Lotka–Volterra field
  (ẋ, ẏ) = (αx − βxy, δxy − γy) with (α, β, γ, δ) = (2/3, 4/3, −1, −1) (the paper's values).
- ``smooth_cat_map``: Φ is the time-``t_end`` flow of the paper's smooth cat map
  (ẋ, ẏ) = (a₁ σ(m log a₁), a₂ σ(m log a₂)), a₁ = 2x + y, a₂ = x + y, σ the logistic, m = 0.95.
- ``cat_map``: Arnold's cat map on integer pixel indices, (x, y) -> (2x + y, x + y) mod N, applied
  ``iterations`` times (square images): a pixel permutation (det = 1), periodic in the iterations.

The paper integrates with ``scipy.integrate.solve_ivp(method="LSODA")``; so do the two smooth kinds.
The paper does not say over which time or domain; treating its maps as the right-hand sides of the
ODE, on the unit square, over ``t_end`` (default 0.5), is this library's reading. Locations that
leave the image are reflected at its borders. The discontinuous cat map is applied exactly as the
discrete map of the paper's reference [52] (Bao & Yang, period of the discrete Arnold cat map).

Coordinate maps depend only on the image size: they are computed once per process (an LRU cache),
and each batch costs one ``grid_sample`` (bilinear) or one gather. Then, as in the paper, Gaussian
noise is added (std ``noise_std``, or drawn per image uniformly from a ``(low, high)`` range), and
the result is clamped to the input batch's [min, max] so the data keeps its range. Each image is
augmented with probability ``fraction``; the others pass unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp
from torch import Tensor

from lightning_byz.faults.batch import get_field, replace_field
from lightning_byz.faults.common import WorkerFault

KINDS = ("lotka_volterra", "cat_map", "smooth_cat_map")
LOTKA_VOLTERRA = (2 / 3, 4 / 3, -1.0, -1.0)  # (α, β, γ, δ), FA paper §3.1
SMOOTH_CAT_M = 0.95


def lotka_volterra_field(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    alpha, beta, gamma, delta = LOTKA_VOLTERRA
    return alpha * x - beta * x * y, delta * x * y - gamma * y


def smooth_cat_map_field(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def smooth_mod(a: np.ndarray) -> np.ndarray:  # a·σ(m log a) = a·aᵐ/(1 + aᵐ), → 0 as a → 0
        a = np.clip(a, 0.0, None)
        am = a**SMOOTH_CAT_M
        return a * am / (1.0 + am)

    return smooth_mod(2 * x + y), smooth_mod(x + y)


FIELDS = {"lotka_volterra": lotka_volterra_field, "smooth_cat_map": smooth_cat_map_field}


@lru_cache(maxsize=32)
def flow_grid(kind: str, height: int, width: int, t_end: float) -> Tensor:
    """``grid_sample`` grid [H, W, 2] (float32, in [-1, 1] inside the image) of the field's flow."""
    field = FIELDS[kind]
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width,
                         indexing="ij")
    z0 = np.stack([xs.ravel(), ys.ravel()], axis=1).ravel()  # interleaved x0, y0, x1, y1, ...

    def rhs(_t: float, z: np.ndarray) -> np.ndarray:
        out = np.empty_like(z)
        out[0::2], out[1::2] = field(z[0::2], z[1::2])
        return out

    # Each pixel's 2×2 Jacobian block sits on the band |i − j| <= 1 of the interleaved state.
    sol = solve_ivp(rhs, (0.0, t_end), z0, method="LSODA", rtol=1e-7, atol=1e-9, lband=1, uband=1)
    if not sol.success:
        raise RuntimeError(f"{kind}: LSODA failed on a {height}x{width} grid: {sol.message}")
    moved = torch.from_numpy(sol.y[:, -1].reshape(height, width, 2))
    return (2 * moved - 1).float()


@lru_cache(maxsize=32)
def cat_map_permutation(n: int, iterations: int = 1) -> Tensor:
    """Gather indices [n²]: ``out.flatten()[p] = img.flatten()[perm[p]]`` applies the cat map
    (x, y) -> (2x + y, x + y) mod n to an n×n image ``iterations`` times (x column, y row)."""
    y, x = np.divmod(np.arange(n * n), n)
    dest = ((x + y) % n) * n + (2 * x + y) % n  # where the pixel at (x, y) goes
    moved = np.arange(n * n)
    for _ in range(iterations):
        moved = dest[moved]
    perm = np.empty(n * n, dtype=np.int64)
    perm[moved] = np.arange(n * n)
    return torch.from_numpy(perm)


def cat_map_period(n: int) -> int:
    """Smallest k >= 1 with (cat map)^k = identity on n×n pixels (at most 3n, Dyson & Falk 1992)."""
    y, x = np.divmod(np.arange(n * n), n)
    dest = ((x + y) % n) * n + (2 * x + y) % n
    moved, identity = dest.copy(), np.arange(n * n)
    for k in range(1, 3 * n + 1):
        if np.array_equal(moved, identity):
            return k
        moved = dest[moved]
    raise AssertionError(f"cat map period above 3n for n={n}")


class NonlinearAugmentation(WorkerFault):
    """Augment the image batches of ``workers``: a nonlinear coordinate map plus Gaussian noise.

    Args:
        workers: worker ids.
        kind: ``"lotka_volterra"``, ``"cat_map"`` or ``"smooth_cat_map"`` (module docstring).
        noise_std: std of the added Gaussian noise, or ``(low, high)`` drawn uniformly per image.
        fraction: probability that an image is augmented.
        t_end: integration time of the two ODE kinds.
        iterations: applications of the integer cat map.
        input_key: where the images are in a batch (tuple/list position or dict key); images are
            [..., H, W] tensors (e.g. [B, C, H, W] or [B, H, W]), floating or integer.
    """

    kind = "augmentation"
    counters = ('images',)

    def __init__(
        self,
        workers: Sequence[int],
        kind: str = "lotka_volterra",
        noise_std: float | tuple[float, float] = 0.0,
        fraction: float = 1.0,
        t_end: float = 0.5,
        iterations: int = 1,
        input_key: int | str = 0,
    ) -> None:
        super().__init__(workers)
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation kind {kind!r}; choose {', '.join(KINDS)}")
        low, high = (noise_std, noise_std) if isinstance(noise_std, (int, float)) else noise_std
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            raise ValueError(f"noise_std must be >= 0 (or a range low <= high), got {noise_std!r}")
        if not (isinstance(fraction, (int, float)) and 0 <= fraction <= 1):
            raise ValueError(f"augmentation fraction must be in [0, 1], got {fraction!r}")
        if not (math.isfinite(t_end) and t_end > 0):
            raise ValueError(f"t_end must be a positive time, got {t_end!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"cat map iterations must be an integer >= 1, got {iterations!r}")
        self.map_kind, self.fraction = kind, float(fraction)
        self.noise_low, self.noise_high = float(low), float(high)
        self.t_end, self.iterations, self.input_key = float(t_end), iterations, input_key

    def warp(self, images: Tensor) -> Tensor:
        """Apply the coordinate map (no noise) to images [..., H, W]."""
        if images.dim() < 3:
            raise ValueError(f"augmentation needs images [..., H, W], got {list(images.shape)}")
        height, width = images.shape[-2:]
        if self.map_kind == "cat_map":
            if height != width:
                raise ValueError(f"the cat map needs square images, got {height}x{width}")
            perm = cat_map_permutation(height, self.iterations).to(images.device)
            return images.flatten(-2).index_select(-1, perm).view_as(images)
        grid = flow_grid(self.map_kind, height, width, self.t_end)
        work = images if images.is_floating_point() else images.float()
        grid = grid.to(device=images.device, dtype=work.dtype)[None]
        out = F.grid_sample(work.reshape(1, -1, height, width), grid, mode="bilinear",
                            padding_mode="reflection", align_corners=False).view_as(images)
        return out if images.is_floating_point() else out.round().to(images.dtype)

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Warp + noise a random ``fraction`` of images [B, ..., H, W]; clamp to their range."""
        batch, shape = images.shape[0], (images.shape[0],) + (1,) * (images.dim() - 1)
        chosen = torch.rand(batch, generator=generator) < self.fraction
        spread = self.noise_high - self.noise_low
        std = self.noise_low + spread * torch.rand(batch, generator=generator, dtype=torch.float64)
        out = self.warp(images)
        if self.noise_high > 0:
            dtype = images.dtype if images.is_floating_point() else torch.float32
            noise = torch.randn(images.shape, generator=generator, dtype=dtype)
            noise = (noise * std.to(dtype).view(shape)).to(images.device)
            out = (out.to(dtype) + noise).clamp(images.min().to(dtype), images.max().to(dtype))
            if not images.is_floating_point():
                out = out.round().to(images.dtype)
        self.counts["images"] += int(chosen.sum())
        return torch.where(chosen.to(images.device).view(shape), out, images)

    def on_worker_batch(self, worker: int, step: int, batch: Any) -> Any:
        if not self.targets(worker) or self.fraction == 0:
            return batch
        images = get_field(batch, self.input_key, "input_key")
        out = self.augment(images, self.generator(worker, step))
        return replace_field(batch, self.input_key, out)
