"""2.5D windows: index arithmetic, CT normalisation, patch fitting, augmentation (numpy/torch).

A window is ``seq_len`` consecutive slices of a vertebra crop, centred on slice ``t`` and cut
along a plane. Crops are stored in the canonical ``(z, y, x)`` order, so a plane's slices run
along one numpy axis (`PLANE_AXIS`): axial slices along z (in-plane ``(y, x)``), coronal along
y (in-plane ``(z, x)``), sagittal along x (in-plane ``(z, y)``). Slices past the crop's first
or last slice repeat the edge slice.

Every function here is pure: the dataset (`vfsearch.adapters.dataset`) reads the arrays, and
prediction/export reuse `normalise`, `window_indices` and `cut_window` so that a model sees the
same input at training and inference time.

The augmentation here (`augment_window`) is the per-window path that DataLoader processes run
(``data.augment_device=cpu``); `vfsearch.core.augment` is its batched twin on the training
device, drawing from the same ranges (`ROTATE_DEG` .. `NOISE`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import EllipsisType
from typing import Any, cast, overload

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from vfsearch.core.errors import UserError

# numpy axis of the canonical (z, y, x) crop along which each plane's slices are cut;
# the same table as vfsearch.adapters.store.PLANE_AXIS (a test holds them equal).
PLANE_AXIS: dict[str, int] = {"axial": 0, "coronal": 1, "sagittal": 2}
HU_AIR = -1024  # fill of raw HU padding; normalisation clips it to the fingerprint's p0_5
FINGERPRINT_KEYS = ("p0_5", "p99_5", "mean", "std")


def plane_axis(plane: str) -> int:
    """The numpy axis of a ``(z, y, x)`` crop along which ``plane``'s slices are cut."""
    try:
        return PLANE_AXIS[plane]
    except KeyError:
        raise UserError(
            f"data.plane: must be one of {', '.join(PLANE_AXIS)}, got {plane!r}"
        ) from None


def window_indices(t: int, seq_len: int, n: int) -> np.ndarray:
    """Slice indices ``t - seq_len//2 .. t + seq_len//2`` clipped to ``[0, n-1]``.

    Clipping replicates the edge slice for windows that reach past either end. ``seq_len``
    must be odd so that ``t`` is the centre. Returns int64 ``(seq_len,)``.
    """
    if seq_len < 1 or seq_len % 2 == 0:
        raise ValueError(f"seq_len must be odd and >= 1, got {seq_len}")
    if not 0 <= t < n:
        raise IndexError(f"slice {t} outside 0..{n - 1}")
    half = seq_len // 2
    return np.clip(np.arange(t - half, t + half + 1), 0, n - 1)


def plane_first(volume: np.ndarray, axis: int) -> np.ndarray:
    """View of a ``(z, y, x)`` volume with the plane axis first: ``(n_slices, H, W)``.

    The remaining two axes keep their canonical order (e.g. sagittal: ``(x, z, y)``).
    """
    return np.moveaxis(volume, axis, 0)


def cut_window(volume: np.ndarray, t: int, seq_len: int, axis: int) -> np.ndarray:
    """The ``(seq_len, H, W)`` window centred on slice ``t`` along ``axis`` of ``volume``.

    Edge slices are replicated (`window_indices`). Works on any array supporting
    `numpy.take` (numpy arrays and memmaps); returns a new contiguous array.
    """
    idx = window_indices(t, seq_len, volume.shape[axis])
    return np.ascontiguousarray(np.moveaxis(np.take(volume, idx, axis=axis), axis, 0))


def slice_counts(mask: np.ndarray, axis: int) -> np.ndarray:
    """Non-zero voxels of each slice of ``mask`` along ``axis``: int64 ``(n_slices,)``."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    counts: np.ndarray = np.count_nonzero(mask, axis=other).astype(np.int64)
    return counts


def fracture_slice_counts(fracture: np.ndarray) -> dict[str, list[int]]:
    """Fracture voxels per slice for every plane, as JSON-able lists (for vertebra attrs).

    Ingest can store this as the vertebra attribute ``fracture_slices`` so that the dataset
    knows which windows contain fracture without reading the masks.
    """
    return {plane: slice_counts(fracture, axis).tolist() for plane, axis in PLANE_AXIS.items()}


def window_has_target(counts: np.ndarray, seq_len: int, all_slices: bool) -> np.ndarray:
    """Per centre slice: does the window's target contain any foreground? bool ``(n,)``.

    ``counts`` are per-slice foreground counts (`slice_counts`). With ``all_slices`` the
    target is every slice of the window (edges replicated), else slice ``t`` only.
    """
    counts = np.asarray(counts)
    n = counts.shape[0]
    positive = counts > 0
    if not all_slices or seq_len == 1:
        return positive
    half = seq_len // 2
    padded = np.concatenate(
        [np.repeat(positive[:1], half), positive, np.repeat(positive[-1:], half)]
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, seq_len)  # (n, seq_len)
    return cast(np.ndarray, windows.any(axis=1))[:n]


# -- normalisation --------------------------------------------------------------------------


def _fingerprint_values(fingerprint: Mapping[str, Any]) -> tuple[float, float, float, float]:
    missing = [k for k in FINGERPRINT_KEYS if k not in fingerprint]
    if missing:
        raise UserError(f"fingerprint: missing {', '.join(missing)} (re-run vfsearch ingest)")
    lo, hi, mean, std = (float(fingerprint[k]) for k in FINGERPRINT_KEYS)
    if not (std > 0 and hi >= lo):
        raise UserError(f"fingerprint: needs std > 0 and p99_5 >= p0_5, got {dict(fingerprint)}")
    return lo, hi, mean, std


@overload
def normalise(hu: torch.Tensor, fingerprint: Mapping[str, Any]) -> torch.Tensor: ...


@overload
def normalise(hu: npt.ArrayLike, fingerprint: Mapping[str, Any]) -> npt.NDArray[np.float32]: ...


def normalise(
    hu: torch.Tensor | npt.ArrayLike, fingerprint: Mapping[str, Any]
) -> torch.Tensor | npt.NDArray[np.float32]:
    """CT normalisation (nnU-Net style): clip HU to ``[p0_5, p99_5]``, subtract mean, / std.

    A pure function of the data and the dataset fingerprint stored at ingest
    (`vfsearch.adapters.store.Store.fingerprint`), so training and prediction normalise alike.
    ``hu``: numpy array or torch tensor of any shape, in HU. Returns float32 of the same
    kind and shape (dimensionless).
    """
    lo, hi, mean, std = _fingerprint_values(fingerprint)
    if isinstance(hu, torch.Tensor):
        return (hu.to(torch.float32).clamp(lo, hi) - mean) / std
    out = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


def normalised_floor(fingerprint: Mapping[str, Any]) -> float:
    """The value that the lowest clipped HU (``p0_5``, air and padding) normalises to."""
    lo, _, mean, std = _fingerprint_values(fingerprint)
    return (lo - mean) / std


# -- patch size -----------------------------------------------------------------------------


def patch_start(
    shape_hw: tuple[int, int], size: int, rng: np.random.Generator | None = None
) -> tuple[int, int]:
    """Top-left corner in the source of a ``size x size`` patch; negative means padding.

    Without ``rng`` the patch is centred; with it the offset is uniform over all positions
    that keep the source inside the patch (if smaller) or the patch inside the source.
    """
    out = []
    for dim in shape_hw:
        lo, hi = min(0, dim - size), max(0, dim - size)
        out.append(int(rng.integers(lo, hi + 1)) if rng is not None else (dim - size) // 2)
    return out[0], out[1]


def fit_to_patch(array: np.ndarray, size: int, start: tuple[int, int], fill: float) -> np.ndarray:
    """Crop/pad the last two axes of ``array (..., H, W)`` to ``(..., size, size)``.

    ``start`` is the source position of the patch's top-left pixel (`patch_start`); pixels
    outside the source get ``fill``. Keeps the dtype.
    """
    out = np.full(array.shape[:-2] + (size, size), fill, dtype=array.dtype)
    src: list[slice] = []
    dst: list[slice] = []
    for dim, s in zip(array.shape[-2:], start, strict=False):
        a, b = max(s, 0), min(s + size, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    at_dst: tuple[EllipsisType | slice, ...] = (..., *dst)
    at_src: tuple[EllipsisType | slice, ...] = (..., *src)
    out[at_dst] = array[at_src]
    return out


# -- augmentation ---------------------------------------------------------------------------

# ranges at strength 1, shared with the batched device path (`vfsearch.core.augment`)
ROTATE_DEG = 15.0  # rotation uniform in ±ROTATE_DEG·s degrees
SCALE = 0.15  # isotropic scale uniform in 1 ± SCALE·s
CONTRAST = 0.25  # contrast ×(1 ± CONTRAST·s) about the window mean
BRIGHTNESS = 0.2  # brightness ± BRIGHTNESS·s (normalised units)
GAMMA = 0.5  # gamma log-uniform in [1/(1 + GAMMA·s), 1 + GAMMA·s]
NOISE = 0.1  # Gaussian noise sigma uniform in [0, NOISE·s]


def random_affine(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A random in-plane rotation + isotropic scaling as a ``(2, 3)`` `affine_grid` theta.

    Rotation is uniform in ±15°·strength, scale in 1 ± 0.15·strength. No flips: left/right
    and anterior/posterior are anatomically meaningful (and posterior elements are not
    symmetric to the vertebral body). The theta maps output to input normalised coordinates
    of a square patch, so the transform is a rotation, not a shear.
    """
    angle = math.radians(ROTATE_DEG * strength) * rng.uniform(-1.0, 1.0)
    scale = 1.0 + SCALE * strength * rng.uniform(-1.0, 1.0)
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    return np.array([[c, -s, 0.0], [s, c, 0.0]], dtype=np.float32)


def apply_affine(
    stack: torch.Tensor, theta: np.ndarray | torch.Tensor, fill: float = 0.0
) -> torch.Tensor:
    """Resample every channel of ``stack (C, H, W)`` with one affine (bilinear).

    The slices of a window and its mask go through here as channels of one stack, so all
    receive exactly the same spatial transform. Pixels from outside the input get ``fill``.
    """
    theta_t = torch.as_tensor(theta, dtype=torch.float32).reshape(1, 2, 3)
    grid = F.affine_grid(theta_t, [1, *stack.shape], align_corners=False)
    # grid_sample pads with zeros: shift so that zero is the wanted fill value
    moved = F.grid_sample(
        (stack - fill).unsqueeze(0),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )[0]
    return moved + fill


def augment_intensity(
    image: torch.Tensor, rng: np.random.Generator, strength: float
) -> torch.Tensor:
    """Contrast, brightness, gamma and Gaussian noise on a normalised window ``(T, H, W)``.

    One draw per window (a scan's contrast does not change from slice to slice); noise is
    independent per voxel. Magnitudes scale with ``strength``: contrast ×(1 ± 0.25·s) about
    the window mean, brightness ± 0.2·s (normalised units, i.e. fractions of the dataset HU
    std), gamma in [1/(1+0.5·s), 1+0.5·s] on the window's min-max range, noise σ ≤ 0.1·s.
    """
    if strength <= 0:
        return image
    contrast = 1.0 + CONTRAST * strength * rng.uniform(-1.0, 1.0)
    brightness = BRIGHTNESS * strength * rng.uniform(-1.0, 1.0)
    gamma = math.exp(math.log1p(GAMMA * strength) * rng.uniform(-1.0, 1.0))
    sigma = NOISE * strength * rng.uniform(0.0, 1.0)
    # contrast and brightness as one affine map of the values: x*c + (m*(1-c) + b)
    out = image * contrast + (float(image.mean()) * (1.0 - contrast) + brightness)
    lo, hi = float(out.min()), float(out.max())
    span = max(hi - lo, 1e-6)
    out.sub_(lo).div_(span).pow_(gamma).mul_(span).add_(lo)
    # torch's generator is several times faster than numpy's for the per-voxel noise;
    # it is seeded from `rng`, so the result stays a function of the item's seed
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(image.shape, generator=gen, dtype=image.dtype)
    return out.add_(noise, alpha=sigma)


def augment_window(
    image: torch.Tensor,
    target: torch.Tensor,
    rng: np.random.Generator,
    strength: float,
    fill: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random spatial transform on every slice and the target, then intensity (image).

    ``image (T, H, W)`` normalised float32; ``target (C, H, W)`` 0/1 float32 (C = 1 or T).
    The target is resampled bilinearly and thresholded at 0.5, so it stays binary and follows
    the image's geometry. ``fill`` pads the image (`normalised_floor`). Returns new tensors.
    """
    if strength <= 0:
        return image, target
    theta = random_affine(rng, strength)
    t = image.shape[0]
    # one grid_sample over image and target channels; the image is shifted so that the
    # zero padding of grid_sample reads as `fill` (air), the target pads with 0
    both = apply_affine(torch.cat([image - fill, target]), theta)
    image_out = both[:t] + fill
    target_out = (both[t:] >= 0.5).to(torch.float32)
    return augment_intensity(image_out, rng, strength), target_out


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation: same (seed, epoch, index), same result."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def make_window(
    image: np.ndarray,
    fracture: np.ndarray,
    fingerprint: Mapping[str, Any],
    *,
    patch_size: int,
    rng: np.random.Generator | None = None,
    strength: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw window → model input: fit to the patch, normalise, augment.

    ``image (T, h, w)`` HU (any int/float dtype), ``fracture (C, h, w)`` 0/1 with C = 1
    (slice t) or T. Without ``rng`` the patch is centred and nothing is augmented. Returns
    float32 tensors ``(T, P, P)`` (normalised) and ``(C, P, P)`` (0/1), P = ``patch_size``.
    """
    start = patch_start(image.shape[-2:], patch_size, rng)
    img = fit_to_patch(image, patch_size, start, HU_AIR)
    tgt = fit_to_patch(fracture, patch_size, start, 0)
    img_t = torch.from_numpy(normalise(img, fingerprint))
    tgt_t = torch.from_numpy(np.ascontiguousarray(tgt, dtype=np.float32))
    if rng is not None and strength > 0:
        img_t, tgt_t = augment_window(
            img_t, tgt_t, rng, strength, fill=normalised_floor(fingerprint)
        )
    return img_t, tgt_t


__all__ = [
    "HU_AIR",
    "PLANE_AXIS",
    "apply_affine",
    "augment_intensity",
    "augment_window",
    "cut_window",
    "fit_to_patch",
    "fracture_slice_counts",
    "item_rng",
    "make_window",
    "normalise",
    "normalised_floor",
    "patch_start",
    "plane_axis",
    "plane_first",
    "random_affine",
    "slice_counts",
    "window_has_target",
    "window_indices",
]
