"""2.5D slice predictions to 3D probability maps, and maps of several crops into one grid.

Pure numpy / torch. The resampling between grids (crop → original CT) is SimpleITK's job and
lives in `vfsearch.pipelines.predict`; this module only does the array arithmetic around it:

* `all_windows`: the slice indices of the window centred on each slice, edge-replicated
  at the ends of the crop (the first slice's window repeats slice 0).
* `infer_slices`: every slice of a crop through a segmenter, either encoding each slice once
  and reusing its features in every window that contains it (``reuse=True``), or running the
  full model on each window (``reuse=False``, the reference the reuse path must equal).
* `slices_to_volume` / `volume_to_slices`: ``(n, H, W)`` slice stacks along a plane axis of the
  canonical ``(z, y, x)`` crop, and back.
* `fuse_planes`: average of per-plane maps of one crop.
* `CaseAccumulator`: places per-crop maps (already resampled into a sub-box of the target
  grid) and combines overlaps by mean, max or majority vote.

Axis order is always numpy ``(z, y, x)``; probabilities are float32 in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

COMBINE_METHODS: tuple[str, ...] = ("mean", "max", "vote")


# -- windows ------------------------------------------------------------------------------
def all_windows(n_slices: int, seq_len: int, centres: Sequence[int] | None = None) -> np.ndarray:
    """Indices ``(len(centres), seq_len)`` of the window around each centre slice.

    Window of centre ``t``: ``t - seq_len//2 .. t + seq_len//2``, clamped into
    ``0 .. n_slices - 1`` (edge replication), so every slice of a crop is a centre. Row ``t``
    equals `vfsearch.core.windows.window_indices` ``(t, seq_len, n_slices)``.
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    if seq_len < 1 or seq_len % 2 == 0:
        raise ValueError(f"seq_len must be odd and >= 1, got {seq_len}")
    c = np.arange(n_slices) if centres is None else np.asarray(centres, dtype=np.int64)
    half = seq_len // 2
    windows: np.ndarray = np.clip(c[:, None] + np.arange(-half, half + 1)[None, :], 0, n_slices - 1)
    return windows


# -- slices <-> volume ----------------------------------------------------------------------
def volume_to_slices(volume: np.ndarray, plane_axis: int) -> np.ndarray:
    """``(z, y, x)`` → ``(n, H, W)``: the slices along numpy axis ``plane_axis``.

    The two remaining axes keep their order (for axis 2, sagittal: ``(x, z, y)``).
    """
    return np.moveaxis(volume, plane_axis, 0)


def slices_to_volume(slices: np.ndarray, plane_axis: int) -> np.ndarray:
    """Inverse of `volume_to_slices`: stack ``(n, H, W)`` back along ``plane_axis``."""
    return np.ascontiguousarray(np.moveaxis(slices, 0, plane_axis))


def padded_size(size: int, multiple: int, minimum: int = 0) -> int:
    """Smallest ``m >= max(size, minimum)`` divisible by ``multiple``."""
    target = max(size, minimum)
    return -(-target // multiple) * multiple


def pad_slices(
    slices: np.ndarray, height: int, width: int, value: float
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Centre-pad ``(n, H, W)`` to ``(n, height, width)`` with ``value``.

    Returns the padded stack and the in-plane slices that cut the original back out. Never
    crops: inference must see (and predict) every voxel of the crop.
    """
    n, h, w = slices.shape
    if h > height or w > width:
        raise ValueError(f"slices {h}x{w} larger than target {height}x{width}")
    # same rounding as training's centred patches: start = (h - height) // 2 (floor)
    top, left = -((h - height) // 2), -((w - width) // 2)
    out = np.full((n, height, width), value, dtype=np.float32)
    inner = (slice(top, top + h), slice(left, left + w))
    out[:, inner[0], inner[1]] = slices
    return out, inner


# -- inference over one crop -------------------------------------------------------------------
def infer_slices(
    model: Any,
    slices: np.ndarray,
    seq_len: int,
    *,
    reuse: bool = True,
    batch_size: int = 16,
    device: Any = None,
    pad_value: float = 0.0,
    multiple: int = 16,
    min_size: int = 0,
) -> np.ndarray:
    """Fracture probability of every slice of a crop, each as the centre of its window.

    ``slices``: normalised intensities ``(n, H, W)`` float along the model's plane.
    ``model``: a segmenter (`vfsearch.core.models.AttentionUNet25D`) in eval mode, with the seams
    ``encode(x (N, 1, H, W)) -> (bottleneck (N, C, h, w), skips)`` and
    ``forward_features(bottlenecks (B, T, C, h, w), centre skips) -> {"logits": (B, 1, H, W)}``,
    and ``forward(window (B, T, H, W)) -> {"logits": (B, 1 or T, H, W)}``. Slices are padded
    like training patches (`vfsearch.core.windows.patch_start`: centred) with ``pad_value``
    to a size divisible by ``multiple`` (``2 ** depth``) and at least ``min_size``; never
    cropped, and the padding is cut off again.

    ``reuse=True`` encodes each slice once and assembles windows of its bottleneck and skips;
    ``reuse=False`` runs ``model(windows)`` on every window (``seq_len`` encodings per slice).
    Both give the same result up to float rounding. Returns float32 ``(n, H, W)`` in [0, 1].
    """
    import torch

    n, h, w = slices.shape
    ph, pw = padded_size(h, multiple, min_size), padded_size(w, multiple, min_size)
    padded, inner = pad_slices(np.asarray(slices, dtype=np.float32), ph, pw, pad_value)
    dev = torch.device(device) if device is not None else _model_device(model)
    x = torch.from_numpy(padded).to(dev)  # (n, H, W)
    with torch.inference_mode():
        logits = centre_logits(model, x, seq_len, reuse=reuse, batch_size=batch_size)
        out = torch.sigmoid(logits.float()).cpu().numpy()
    return np.ascontiguousarray(out[:, inner[0], inner[1]])


def centre_logits(
    model: Any,
    x: Any,
    seq_len: int,
    *,
    reuse: bool = True,
    batch_size: int = 16,
    centres: Any = None,
) -> Any:
    """Logits ``(n, H, W)`` of every slice of ``x`` (a tensor ``(n, H, W)`` of normalised
    slices on the model's device, ``H`` and ``W`` already fit for the model), each slice as
    the centre of its window (`all_windows`: edge-replicated). The caller chooses the grad
    mode and any autocast.

    ``reuse=True`` encodes each slice once and assembles the windows from its bottleneck and
    skips (`infer_slices`'s seams); ``reuse=False`` runs ``model(windows)`` on each window.
    ``centres`` (ascending slice indices): only those slices' logits ``(len(centres), H, W)``,
    and only the slices their windows hold are encoded. A model that reads the centre slice
    alone (``model.centre_only``: ``temporal="none"``) has only the centres encoded.
    """
    import torch

    n = x.shape[0]
    span = 1 if reuse and getattr(model, "centre_only", False) else seq_len
    windows = torch.from_numpy(all_windows(n, span, centres)).to(x.device)  # (m, T)
    centre = span // 2
    parts = []
    if reuse:
        if centres is None:
            bottlenecks, skips = _encode_all(model, x, batch_size)  # (n, C, h, w), skips
            rows = None
        else:  # encode the slices the windows hold; windows index into those
            held = torch.unique(windows)  # sorted
            bottlenecks, skips = _encode_all(model, x[held], batch_size)
            windows = torch.searchsorted(held, windows)
            rows = windows[:, centre]  # each centre's own row among the encoded slices
        for start in range(0, len(windows), batch_size):
            idx = windows[start : start + batch_size]  # (B, T)
            # every slice a centre: the centres are slices start..start+B-1, slice views
            centre_skips = (
                [s[start : start + len(idx)] for s in skips]
                if rows is None
                else [s[rows[start : start + len(idx)]] for s in skips]
            )
            result = model.forward_features(bottlenecks[idx], centre_skips)  # (B, T, C, h, w)
            parts.append(_centre_logits(result, centre))
    else:
        for start in range(0, len(windows), batch_size):
            parts.append(_centre_logits(model(x[windows[start : start + batch_size]]), centre))
    return torch.cat(parts)


def _encode_all(model: Any, x: Any, batch_size: int) -> tuple[Any, list[Any]]:
    """Encode ``x (n, H, W)`` slice by slice in batches: ``(n, C, h, w)`` and skips."""
    import torch

    enc_batch = max(batch_size, 1) * 2  # encoding alone needs less memory than a window
    parts_b, parts_s = [], []
    for start in range(0, x.shape[0], enc_batch):
        b, s = model.encode(x[start : start + enc_batch, None])  # (N, 1, H, W)
        parts_b.append(b)
        parts_s.append(s)
    bottlenecks = torch.cat(parts_b)
    skips = [torch.cat([p[level] for p in parts_s]) for level in range(len(parts_s[0]))]
    return bottlenecks, skips


def _centre_logits(output: Any, centre: int) -> Any:
    """The centre slice's logits ``(B, H, W)`` of ``(B, 1, H, W)`` or all-slice ``(B, T, H, W)``."""
    logits = output["logits"] if isinstance(output, dict) else output
    return logits[:, 0 if logits.shape[1] == 1 else centre]


def _centre_probs(output: Any, centre: int) -> np.ndarray:
    """Sigmoid of the centre slice's logits: ``(B, 1, H, W)`` or all-slice ``(B, T, H, W)``."""
    import torch

    return torch.sigmoid(_centre_logits(output, centre).float()).cpu().numpy()


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def infer_slice_scores(
    model: Any,
    slices: np.ndarray,
    seq_len: int,
    *,
    batch_size: int = 32,
    device: Any = None,
    pad_value: float = 0.0,
    multiple: int = 32,
    min_size: int = 0,
) -> np.ndarray:
    """Per-slice fracture probability ``(n,)`` of a slice classifier (logits ``(B, 1)``).

    Windows as in `infer_slices`; ``model(windows (B, T, H, W)) -> (B, 1)`` logits.
    """
    import torch

    n, h, w = slices.shape
    ph, pw = padded_size(h, multiple, min_size), padded_size(w, multiple, min_size)
    padded, _ = pad_slices(np.asarray(slices, dtype=np.float32), ph, pw, pad_value)
    dev = torch.device(device) if device is not None else _model_device(model)
    x = torch.from_numpy(padded).to(dev)
    windows = torch.from_numpy(all_windows(n, seq_len)).to(dev)
    out = np.empty(n, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = windows[start : start + batch_size]
            logits = model(x[idx])
            if isinstance(logits, dict):
                logits = logits["logits"]
            out[start : start + len(idx)] = (
                torch.sigmoid(logits.reshape(len(idx), -1)[:, 0].float()).cpu().numpy()
            )
    return out


# -- several planes, several crops ---------------------------------------------------------
def fuse_planes(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Average of per-plane probability maps of one crop (all ``(z, y, x)`` on the same grid)."""
    if not maps:
        raise ValueError("no maps to fuse")
    shapes = {m.shape for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"per-plane maps differ in shape: {sorted(shapes)}")
    fused: np.ndarray = np.mean(np.stack(maps), axis=0).astype(np.float32)
    return fused


class CaseAccumulator:
    """Combine per-crop probability maps placed into one ``(z, y, x)`` grid.

    Each crop contributes a map over a sub-box of the grid (``offset_zyx`` + its shape) and a
    boolean ``cover`` telling which voxels of that box the crop really covers (a rotated or
    resampled crop covers less than its bounding box). Where crops overlap:

    * ``mean``: average of the covering crops' probabilities;
    * ``max``: their maximum;
    * ``vote``: each covering crop votes "fracture" where its probability is
      ``>= threshold``; the result is the share of covering crops that voted fracture, and the
      mask is ``share >= 0.5`` (ties count as fracture: a miss costs more than a false alarm
      in fracture detection).

    Voxels that no crop covers get probability 0.
    """

    def __init__(
        self, shape_zyx: tuple[int, int, int], method: str = "mean", threshold: float = 0.5
    ) -> None:
        if method not in COMBINE_METHODS:
            raise ValueError(
                f"unknown combine method {method!r}; expected one of {', '.join(COMBINE_METHODS)}"
            )
        self.shape = tuple(int(s) for s in shape_zyx)
        self.method = method
        self.threshold = float(threshold)
        self.value = np.zeros(self.shape, dtype=np.float32)
        self.count = np.zeros(self.shape, dtype=np.uint16)

    def add(
        self, prob: np.ndarray, offset_zyx: Sequence[int], cover: np.ndarray | None = None
    ) -> None:
        """Add one crop's map ``prob`` (sub-box at ``offset_zyx``; parts outside are cut)."""
        prob = np.asarray(prob, dtype=np.float32)
        cover = np.ones(prob.shape, dtype=bool) if cover is None else np.asarray(cover, bool)
        src, dst = _clip_box(offset_zyx, prob.shape, self.shape)
        if src is None:
            return
        p, c = prob[src], cover[src]
        if self.method == "mean":
            self.value[dst] += np.where(c, p, 0.0)
        elif self.method == "max":
            self.value[dst] = np.where(c, np.maximum(self.value[dst], p), self.value[dst])
        else:
            self.value[dst] += (c & (p >= self.threshold)).astype(np.float32)
        self.count[dst] += c.astype(np.uint16)

    @property
    def covered(self) -> np.ndarray:
        """Boolean ``(z, y, x)``: voxels covered by at least one crop."""
        return self.count > 0

    def result(self) -> np.ndarray:
        """Combined probability (``mean``/``max``) or vote share (``vote``), float32 [0, 1]."""
        if self.method == "max":
            return self.value.copy()
        out = np.zeros(self.shape, dtype=np.float32)
        np.divide(self.value, self.count, out=out, where=self.count > 0)
        return out

    def mask(self, threshold: float | None = None) -> np.ndarray:
        """uint8 fracture mask: ``result >= threshold`` (``vote``: share >= 0.5)."""
        t = 0.5 if self.method == "vote" else (self.threshold if threshold is None else threshold)
        return (self.result() >= t).astype(np.uint8)


def _clip_box(
    offset: Sequence[int], shape: Sequence[int], bounds: Sequence[int]
) -> tuple[tuple[slice, ...] | None, tuple[slice, ...] | None]:
    """Source and destination slices of a box at ``offset`` clipped into ``bounds``."""
    src: list[slice] = []
    dst: list[slice] = []
    for o, s, b in zip(offset, shape, bounds, strict=False):
        lo, hi = max(int(o), 0), min(int(o) + int(s), int(b))
        if hi <= lo:
            return None, None
        src.append(slice(lo - int(o), hi - int(o)))
        dst.append(slice(lo, hi))
    return tuple(src), tuple(dst)


def combine(
    maps: Sequence[tuple[np.ndarray, Sequence[int], np.ndarray | None]],
    shape_zyx: tuple[int, int, int],
    method: str = "mean",
    threshold: float = 0.5,
) -> np.ndarray:
    """One-shot `CaseAccumulator`: ``maps`` of ``(prob, offset_zyx, cover)`` → combined map."""
    acc = CaseAccumulator(shape_zyx, method, threshold)
    for prob, offset, cover in maps:
        acc.add(prob, offset, cover)
    return acc.result()


# -- grids ------------------------------------------------------------------------------------
def box_in_grid(
    src: Any, src_shape: Sequence[int], dst: Any, dst_shape: Sequence[int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """The voxels of grid ``dst`` whose centres lie in the extent of grid ``src``.

    ``src``/``dst`` are `vfsearch.core.geometry.Geometry`; shapes ``(z, y, x)``. The extent of
    ``src`` reaches half a voxel past its outer voxel centres. Returns half-open
    ``(lo_zyx, hi_zyx)`` clipped to ``dst_shape`` (a bounding box: for an oblique ``src`` some
    voxels inside it are still outside the extent), or None when they do not overlap.
    """
    nz, ny, nx = (int(v) for v in src_shape)
    corners = np.array(
        [[z, y, x] for z in (-0.5, nz - 0.5) for y in (-0.5, ny - 0.5) for x in (-0.5, nx - 0.5)],
        dtype=np.float64,
    )
    idx = dst.physical_to_index(src.zyx_to_physical(corners))[:, ::-1]  # (8, zyx)
    lo = np.ceil(idx.min(axis=0) - 1e-6).astype(np.int64)
    hi = np.floor(idx.max(axis=0) + 1e-6).astype(np.int64) + 1
    lo = np.clip(lo, 0, np.asarray(dst_shape))
    hi = np.clip(hi, 0, np.asarray(dst_shape))
    if np.any(hi <= lo):
        return None
    return (int(lo[0]), int(lo[1]), int(lo[2])), (int(hi[0]), int(hi[1]), int(hi[2]))


def nearest_label(labels: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """Each voxel gets the label of the nearest labelled voxel (distance in mm).

    Partitions a region between the vertebrae it holds (Voronoi cells of the label map), so
    every predicted or true fracture voxel belongs to exactly one vertebra and per-vertebra
    counts sum to the region's. ``labels`` int ``(z, y, x)``, 0 = unlabelled; all-zero input
    gives all zeros. Uses ``scipy.ndimage`` (array maths).
    """
    from scipy import ndimage

    if not np.any(labels):
        return np.zeros_like(labels)
    idx = ndimage.distance_transform_edt(
        labels == 0, sampling=spacing_zyx, return_distances=False, return_indices=True
    )
    nearest: np.ndarray = labels[tuple(idx)]
    return nearest


__all__ = [
    "COMBINE_METHODS",
    "CaseAccumulator",
    "all_windows",
    "box_in_grid",
    "combine",
    "fuse_planes",
    "infer_slice_scores",
    "infer_slices",
    "nearest_label",
    "pad_slices",
    "padded_size",
    "slices_to_volume",
    "volume_to_slices",
]
