"""Batched augmentation of training windows on the training device (torch only).

The per-window path (`vfsearch.core.windows.augment_window`) runs in the DataLoader
processes, one window at a time. This module applies the same transforms with the same
parameter distributions to a whole batch with tensor ops: one `affine_grid`/`grid_sample` over
every window's slices and mask, then contrast, brightness, gamma and noise. Where it runs
(``data.augment_device``), the loader only reads, crops and normalises, and hands each window
a seed (`vfsearch.adapters.dataset.finish_batch` applies `augment_batch` after the batch
has moved to the device).

Per window, as `augment_window` does: one rotation uniform in ±15°·s and one isotropic
scale uniform in 1 ± 0.15·s for every slice and the target (image bilinear, padded with
``fill``; target bilinear then thresholded at 0.5, so it stays 0/1 and follows the image);
then contrast ×(1 ± 0.25·s) about the window mean, brightness ± 0.2·s, gamma log-uniform in
[1/(1 + 0.5·s), 1 + 0.5·s] on the window's min-max range and Gaussian noise of sigma uniform
in [0, 0.1·s] (the ranges are `vfsearch.core.windows.ROTATE_DEG` .. ``NOISE``). No flips: the
CPU path has none (left/right and anterior/posterior are anatomical). Every window draws
its own parameters, independently of the others.

Randomness. Each window carries a seed that the dataset draws from the window's own
generator (`vfsearch.core.windows.item_rng`: base seed, epoch and draw, index), so a window
drawn twice in an epoch gets two seeds. A batch's generator, on the batch's device, is seeded
from all of its windows' seeds (`batch_seed`) and draws each window's parameters and the
noise: the same seeds give the same result on the same device (CPU and CUDA streams differ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vfsearch.core.errors import UserError
from vfsearch.core.windows import BRIGHTNESS, CONTRAST, GAMMA, NOISE, ROTATE_DEG, SCALE

AUGMENT_DEVICES = ("auto", "cpu", "device")
# where ``auto`` augments when training runs on CPU: "cpu", per window in the loader.
# ``benchmarks/loader.py --only-aug`` (one process, one torch thread, 5x128x128 windows):
# ~550 windows per CPU second per window against ~530 batched on the CPU (grid_sample, pow
# and randn cost the same per voxel either way), and the per-window path spreads over the
# loader processes while the batched one runs in the training process
AUTO_ON_CPU = "cpu"
DRAWS = 6  # uniform draws per window: angle, scale, contrast, brightness, gamma, sigma


def augment_on_device(setting: str, *, cuda: bool) -> bool:
    """Does ``data.augment_device`` = ``setting`` mean batched augmentation on the training
    device? ``auto``: yes on CUDA, `AUTO_ON_CPU` otherwise."""
    if setting not in AUGMENT_DEVICES:
        raise UserError(
            f"data.augment_device: must be one of {', '.join(AUGMENT_DEVICES)}, got {setting!r}"
        )
    if setting == "auto":
        return cuda or AUTO_ON_CPU == "device"
    return setting == "device"


def batch_seed(seeds: torch.Tensor | Sequence[int] | np.ndarray) -> int:
    """One 63-bit seed from a batch's per-window seeds (non-negative ints); order matters."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.detach().cpu().numpy()
    values = [int(s) for s in np.asarray(seeds, dtype=np.int64).reshape(-1)]
    if any(v < 0 for v in values):
        raise ValueError("augmentation seeds must be >= 0")
    state = np.random.SeedSequence(values).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def draw_params(
    gen: torch.Generator, strength: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """Each window's parameters for strengths ``strength (B,)``, drawn from ``gen`` on
    ``device`` (`params_from_uniform`)."""
    u = torch.rand((strength.shape[0], DRAWS), generator=gen, device=device)
    return params_from_uniform(u, strength.to(device=device, dtype=torch.float32))


def params_from_uniform(u: torch.Tensor, strength: torch.Tensor) -> dict[str, torch.Tensor]:
    """Parameters from uniform draws ``u (B, DRAWS)`` in [0, 1), float32 ``(B,)`` each, in the
    order and ranges of `vfsearch.core.windows.random_affine` and ``augment_intensity``:
    ``angle`` (radians), ``scale``, ``contrast``, ``brightness``, ``gamma``, ``sigma``."""
    s = strength
    v = 2.0 * u[:, :5] - 1.0  # uniform in [-1, 1), as numpy's uniform(-1, 1)
    return {
        "angle": math.radians(ROTATE_DEG) * s * v[:, 0],
        "scale": 1.0 + SCALE * s * v[:, 1],
        "contrast": 1.0 + CONTRAST * s * v[:, 2],
        "brightness": BRIGHTNESS * s * v[:, 3],
        "gamma": torch.exp(torch.log1p(GAMMA * s) * v[:, 4]),
        "sigma": NOISE * s * u[:, 5],
    }


def affine_theta(angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` `affine_grid` thetas of in-plane rotations and isotropic scalings (as
    `vfsearch.core.windows.random_affine`: output to input coordinates of a square patch)."""
    c, s = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(c)
    return torch.stack([torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1)], 1)


def _per_window(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 1, 1)


def spatial_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    theta: torch.Tensor,
    fill: torch.Tensor,
    *,
    add_fill: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample ``image (B, T, H, W)`` and ``target (B, C, H, W)`` with one affine per window
    (``theta (B, 2, 3)``) in a single `grid_sample`: every slice and the target of a window
    get exactly the same transform. Image bilinear, padded with ``fill (B,)``; target
    bilinear, padded with 0, thresholded at 0.5. With ``add_fill=False`` the image comes
    back less ``fill`` (what `intensity_batch` takes with ``shift=fill``: a pass saved)."""
    n, t = image.shape[:2]
    fill4 = _per_window(fill)
    both = torch.empty(
        (n, t + target.shape[1], *image.shape[2:]), dtype=image.dtype, device=image.device
    )
    # grid_sample pads with zeros: shift the image so that its zero is `fill`
    torch.sub(image, fill4, out=both[:, :t])
    both[:, t:] = target
    grid = F.affine_grid(theta.to(both.dtype), list(both.shape), align_corners=False)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = out[:, :t]
    return (moved + fill4 if add_fill else moved), (out[:, t:] >= 0.5).to(target.dtype)


def intensity_batch(
    image: torch.Tensor,
    params: dict[str, torch.Tensor],
    gen: torch.Generator,
    *,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrast about each window's mean, brightness, gamma on each window's min-max range,
    then Gaussian noise (independent per voxel), on the windows ``image + shift`` (``image
    (B, T, H, W)``, ``shift (B,)`` or None). The maths of
    `vfsearch.core.windows.augment_intensity`, with the affine steps folded into per-window
    scalars so that the batch is walked a few times only (on a CPU the batch outgrows the
    caches that one window fits in). Returns a new tensor."""
    dims = (1, 2, 3)
    c = _per_window(params["contrast"])
    lo_in, hi_in = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
    mean = image.mean(dim=dims, keepdim=True)
    if shift is not None:
        s4 = _per_window(shift).to(image.dtype)
        lo_in, hi_in, mean = lo_in + s4, hi_in + s4, mean + s4
    else:
        s4 = torch.zeros_like(mean)
    # contrast and brightness: x -> x*c + offset; its min and max from the input's
    offset = mean * (1.0 - c) + _per_window(params["brightness"])
    ends = torch.cat([lo_in * c + offset, hi_in * c + offset], 1)
    lo, hi = ends.amin(1, keepdim=True), ends.amax(1, keepdim=True)
    span = (hi - lo).clamp_min(1e-6)
    # (x*c + offset - lo) / span in one pass over the stored image (x = image + shift)
    norm = torch.addcmul((s4 * c + offset - lo) / span, image, c / span)
    norm.clamp_(min=0.0).pow_(_per_window(params["gamma"]))
    noise = torch.randn(image.shape, generator=gen, device=image.device, dtype=image.dtype)
    return torch.addcmul(lo, norm, span).addcmul_(noise, _per_window(params["sigma"]))


def augment_batch(
    image: torch.Tensor,
    target: torch.Tensor,
    seeds: torch.Tensor | Sequence[int] | np.ndarray,
    strength: float | torch.Tensor,
    fill: float | torch.Tensor,
    *,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of windows where it lies (see the module docstring).

    ``image (B, T, H, W)`` normalised float32, ``target (B, C, H, W)`` 0/1 float32 (C = 1 or
    T), on the training device; ``seeds (B,)`` the windows' seeds (>= 0, on the CPU: read
    once, no device sync); ``strength`` and ``fill`` (`normalised_floor`) a float or one
    value per window. A window of strength 0 is returned unchanged; ``intensity=False``
    applies the spatial part only. Returns new tensors.
    """
    n = image.shape[0]
    s_cpu = torch.as_tensor(strength, dtype=torch.float32).reshape(-1).cpu().expand(n)
    if not bool((s_cpu > 0).any()):
        return image, target
    device = image.device
    gen = torch.Generator(device=device).manual_seed(batch_seed(seeds))
    params = draw_params(gen, s_cpu, device)
    fill_t = torch.as_tensor(fill, dtype=image.dtype).reshape(-1).expand(n).to(device)
    theta = affine_theta(params["angle"], params["scale"])
    img, tgt = spatial_batch(image, target, theta, fill_t, add_fill=not intensity)
    if intensity:
        img = intensity_batch(img, params, gen, shift=fill_t)
    off = s_cpu <= 0
    if bool(off.any()):  # mixed strengths: windows of strength 0 stay as they were
        keep = off.to(device).reshape(-1, 1, 1, 1)
        img, tgt = torch.where(keep, image, img), torch.where(keep, target, tgt)
    return img, tgt


__all__ = [
    "AUGMENT_DEVICES",
    "AUTO_ON_CPU",
    "affine_theta",
    "augment_batch",
    "augment_on_device",
    "batch_seed",
    "draw_params",
    "intensity_batch",
    "params_from_uniform",
    "spatial_batch",
]
