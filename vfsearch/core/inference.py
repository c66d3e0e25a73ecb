"""One inference path: vertebra crops -> models -> the CT's grid -> fusion -> vertebra scores.

``vfsearch predict``, ``vfsearch evaluate``, ``vfsearch visualize``, the end-of-training fused
validation and the MLflow pyfunc model all run this code::

    CT (z, y, x) HU + Geometry, vertebra labels (or boxes)
      │ crops.crop_arrays      ingest's preprocessing: reorient, resample to the training
      │                        spacing, crop every T4..L5 vertebra with the training margin
      ▼ crops (z, y, x) int16 HU
      │ crop_probability       normalise with the training fingerprint; every slice along
      │                        the model's plane as a window centre; encoder features reused
      │                        across windows; per-plane (per-member) maps averaged
      ▼ crop probability (z, y, x)
      │ to_ct_grid             resampling in physical space (linear): undoes crop,
      │                        resampling and reorientation in one step
      ▼ fusion.CaseAccumulator overlapping crops: mean | max | vote
    fused probability and mask on the CT's grid, per-vertebra scores (`vertebra_score`)

`fuse_case` is the whole path on arrays; `fuse_crops` its part from crops already cut (a
training store's, which `vfsearch.pipelines.evaluate` scores). Pure compute: the resampling
between grids is SimpleITK's, passed in as a `vfsearch.core.crops.Resampler`
(`vfsearch.adapters.volumes`); nothing here reads or writes a file.

The vertebra score is one rule, `vertebra_score`: the `SCORE_QUANTILE` (0.99) quantile of the
fused probability over the vertebra's labelled voxels (over its nearest-label cell when it has
none there), so a vertebra scores high when at least 1 % of it looks fractured, and a single
hot voxel does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from vfsearch.core import fusion
from vfsearch.core.config import Config
from vfsearch.core.crops import Box, CaseCrops, Crop, Resampler, crop_arrays
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry
from vfsearch.core.labels import name as vertebra_name
from vfsearch.core.windows import PLANE_AXIS, normalise, normalised_floor

DEFAULT_THRESHOLD = 0.5  # voxel threshold when neither the caller nor the model gives one
SCORE_QUANTILE = 0.99  # vertebra score: 99th percentile of probability over its voxels

# progress of a loop over vertebrae: (done, total), called with done = 0 before the first
Progress = Callable[[int, int], None]


@dataclass
class LoadedModel:
    """A model ready for inference, with everything its input preprocessing needs.

    ``spacing`` (x, y, z mm), ``margin_mm`` and ``fingerprint`` are those of the store the
    model was trained on, so a new scan is cropped and normalised exactly like its training
    data. ``threshold`` is the one chosen on validation (None: unknown). ``extra``: what the
    source carried besides (a bundle's config.json, an ensemble member's own threshold).
    """

    model: torch.nn.Module
    config: Config
    fingerprint: dict[str, Any]
    spacing: tuple[float, ...]  # x, y, z
    margin_mm: float
    source: str = ""
    run_id: str | None = None
    threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def plane(self) -> str:
        return self.config.data.plane

    @property
    def seq_len(self) -> int:
        return self.config.data.seq_len

    @property
    def kind(self) -> str:
        return getattr(self.model, "output_kind", "segmentation")


def check_fusable(models: Sequence[LoadedModel]) -> None:
    """`UserError` unless every model was trained on crops of one spacing and margin (their
    crop maps are averaged voxel by voxel)."""
    first = models[0]
    for m in models[1:]:
        if tuple(m.spacing) != tuple(first.spacing) or m.margin_mm != first.margin_mm:
            raise UserError(
                f"{m.source} was trained on crops of spacing {m.spacing} mm / "
                f"margin {m.margin_mm} mm, {first.source} on {first.spacing} / "
                f"{first.margin_mm}; per-plane models must share them"
            )


# -- one crop -------------------------------------------------------------------------------------
def crop_probability(
    models: Sequence[LoadedModel],
    image_hu: np.ndarray,
    *,
    batch_size: int = 16,
    reuse: bool = True,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """Fracture probability ``(z, y, x)`` float32 of one canonical crop (``image_hu`` HU).

    Each model predicts every slice along its plane (a window centred on it), the slices are
    stacked back into the crop and the per-plane maps are averaged. ``timings`` (if given)
    accumulates the seconds spent in the models under ``"model"``.
    """
    maps = []
    for lm in models:
        if lm.kind != "segmentation":
            raise UserError(
                f"{lm.source} is a {lm.kind} model; fracture maps need a "
                f"segmenter (evaluate reports classifiers)"
            )
        axis = PLANE_AXIS[lm.plane]
        norm = normalise(image_hu, lm.fingerprint)
        start = time.perf_counter()
        probs = fusion.infer_slices(
            lm.model,
            fusion.volume_to_slices(norm, axis),
            lm.seq_len,
            reuse=reuse,
            batch_size=batch_size,
            pad_value=normalised_floor(lm.fingerprint),
            multiple=2**lm.config.model.depth,
            min_size=lm.config.data.patch_size,
        )
        if timings is not None:
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - start
        maps.append(fusion.slices_to_volume(probs, axis))
    return maps[0] if len(maps) == 1 else fusion.fuse_planes(maps)


def crop_slice_scores(lm: LoadedModel, image_hu: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Per-slice fracture probability ``(n,)`` of a slice classifier along its plane."""
    axis = PLANE_AXIS[lm.plane]
    norm = normalise(image_hu, lm.fingerprint)
    return fusion.infer_slice_scores(
        lm.model,
        fusion.volume_to_slices(norm, axis),
        lm.seq_len,
        batch_size=batch_size,
        pad_value=normalised_floor(lm.fingerprint),
        multiple=32,
        min_size=lm.config.data.patch_size,
    )


def crop_attention(
    lm: LoadedModel, image_hu: np.ndarray, index: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probability and attention-gate coefficients of one slice of a canonical crop.

    ``image_hu`` ``(z, y, x)`` HU; ``index``: the slice along the model's plane (the centre
    of its window, windows and padding exactly as `fusion.infer_slices`). Returns the slice's
    probability ``(H, W)`` and one coefficient map ``(H, W)`` in [0, 1] per gate level
    (finest first), each brought back to the slice's voxels (nearest upsampling of the
    coarse level, padding cut off); an empty list for a model without gates. ``(H, W)`` are
    the two remaining axes in their order (sagittal: ``(z, y)``).
    """
    axis = PLANE_AXIS[lm.plane]
    slices = fusion.volume_to_slices(normalise(image_hu, lm.fingerprint), axis)
    n, h, w = slices.shape
    if not 0 <= index < n:
        raise ValueError(f"slice {index} outside 0..{n - 1}")
    multiple = 2**lm.config.model.depth
    ph = fusion.padded_size(h, multiple, lm.config.data.patch_size)
    pw = fusion.padded_size(w, multiple, lm.config.data.patch_size)
    window = fusion.all_windows(n, lm.seq_len, [index])[0]  # (T,)
    padded, inner = fusion.pad_slices(
        np.asarray(slices[window], np.float32), ph, pw, normalised_floor(lm.fingerprint)
    )
    dev = fusion._model_device(lm.model)
    with torch.inference_mode():
        out = lm.model(torch.from_numpy(padded)[None].to(dev))  # (1, T, H, W)
    prob = fusion._centre_probs(out, lm.seq_len // 2)[0][inner]
    maps = []
    for alpha in (out.get("attention") or []) if isinstance(out, dict) else []:
        a = alpha[0, 0].float().cpu().numpy()  # (H / 2**l, W / 2**l)
        fy, fx = ph // a.shape[0], pw // a.shape[1]
        maps.append(np.ascontiguousarray(np.repeat(np.repeat(a, fy, 0), fx, 1)[inner]))
    return np.ascontiguousarray(prob), maps


# -- crops onto the CT's grid ---------------------------------------------------------------------
def to_ct_grid(
    array: np.ndarray,
    crop_geometry: Geometry,
    ct_geometry: Geometry,
    ct_shape: Sequence[int],
    *,
    resampler: Resampler,
    nearest: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray] | None:
    """Map a crop array onto the sub-box of the original CT grid that the crop covers.

    Resampling in physical space (linear for probabilities, ``nearest`` for labels) undoes
    crop, resampling and reorientation in one step. Returns ``(values, offset (z, y, x) of
    the sub-box in the CT grid, cover)`` where ``cover`` marks the voxels inside the crop's
    extent, or None when the crop lies outside the CT.
    """
    box = fusion.box_in_grid(crop_geometry, array.shape, ct_geometry, ct_shape)
    if box is None:
        return None
    lo, hi = box
    sub = ct_geometry.shifted(lo)
    shape = cast("tuple[int, int, int]", tuple(b - a for a, b in zip(lo, hi, strict=True)))
    values = resampler.resample_to(
        array,
        crop_geometry,
        sub,
        shape,
        nearest=nearest,
        default=0,
    )
    cover = (
        resampler.resample_to(
            np.ones(array.shape, np.uint8), crop_geometry, sub, shape, nearest=True, default=0
        )
        > 0
    )
    return values, lo, cover


def _on_grid(
    array: np.ndarray, crop_geometry: Geometry, grid: Geometry
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """A crop cut out of ``grid`` itself: its values at its voxel offset, every voxel covered."""
    idx = grid.physical_to_index(np.asarray(crop_geometry.origin))[::-1]  # zyx
    offset = np.rint(idx)
    if (
        np.abs(idx - offset).max() > 1e-3
        or not np.allclose(crop_geometry.spacing, grid.spacing)
        or not np.allclose(crop_geometry.direction, grid.direction)
    ):
        raise ValueError("crop does not lie voxel for voxel on the grid; give a resampler")
    lo = tuple(int(v) for v in offset)
    return array, lo, np.ones(array.shape, bool)  # type: ignore[return-value]


def paste_crops(
    items: Iterable[tuple[int, np.ndarray, Geometry]],
    ct_geometry: Geometry,
    ct_shape: Sequence[int],
    *,
    resampler: Resampler,
) -> np.ndarray:
    """uint8 ``(z, y, x)`` on the CT grid: each ``(value, crop array, crop geometry)`` mapped
    back (nearest), ``value`` where the crop is nonzero; later items win where they overlap.
    With ``value`` = VerSe id and the crops' ``mask``: the label map of the crops."""
    out = np.zeros(tuple(ct_shape), np.uint8)
    for value, array, geometry in items:
        mapped = to_ct_grid(
            array, geometry, ct_geometry, ct_shape, resampler=resampler, nearest=True
        )
        if mapped is None:
            continue
        values, lo, cover = mapped
        dst = tuple(slice(a, a + n) for a, n in zip(lo, values.shape, strict=True))
        out[dst] = np.where((values > 0) & cover, value, out[dst])
    return out


@dataclass
class CropMap:
    """One vertebra crop's map in the CT grid: ``values`` over the sub-box at ``offset``."""

    vid: int
    values: np.ndarray
    offset: tuple[int, int, int]
    cover: np.ndarray


def union_box(maps: Sequence[CropMap]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Half-open bounding box ``(lo, hi)`` (z, y, x) of all crop maps in the CT grid."""
    lo = np.min([m.offset for m in maps], axis=0)
    hi = np.max([np.add(m.offset, m.values.shape) for m in maps], axis=0)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)


def combine_maps(
    maps: Sequence[CropMap], box: tuple[Sequence[int], Sequence[int]], method: str, threshold: float
) -> fusion.CaseAccumulator:
    """Accumulate crop maps over ``box`` of the CT grid (offsets shift into the box)."""
    lo, hi = box
    shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
    acc = fusion.CaseAccumulator(shape, method, threshold)  # type: ignore[arg-type]
    for m in maps:
        acc.add(m.values, tuple(o - a for o, a in zip(m.offset, lo, strict=True)), m.cover)
    return acc


# -- the vertebra score ---------------------------------------------------------------------------
def vertebra_score(
    prob: np.ndarray,
    labels: np.ndarray,
    cells: np.ndarray,
    vid: int,
    quantile: float = SCORE_QUANTILE,
) -> float:
    """A vertebra's score: the ``quantile`` of ``prob`` over its labelled voxels (``labels ==
    vid``), over its cell (``cells == vid``, `fusion.nearest_label`) when it has none, 0.0
    when it has neither. All three arrays cover one region ``(z, y, x)``."""
    own = labels == vid
    region = own if own.any() else cells == vid
    return float(np.quantile(prob[region], quantile)) if region.any() else 0.0


def vertebra_summary(
    prob: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    cells: np.ndarray,
    vids: Sequence[int],
    voxel_mm3: float,
    quantile: float = SCORE_QUANTILE,
) -> list[dict[str, Any]]:
    """Per vertebra: score (`vertebra_score`) and predicted fracture volume, from arrays over
    one region. ``fracture_volume_mm3``: predicted fracture voxels in the vertebra's cell
    (`fusion.nearest_label`) times the voxel volume."""
    out = []
    for v in vids:
        score = vertebra_score(prob, labels, cells, v, quantile)
        voxels = int(np.count_nonzero(mask[cells == v]))
        out.append(
            {
                "vertebra": int(v),
                "name": vertebra_name(v),
                "score": round(score, 6),
                "fracture_voxels": voxels,
                "fracture_volume_mm3": round(voxels * voxel_mm3, 3),
            }
        )
    return out


# -- crops of a case -> fused maps ----------------------------------------------------------------
@dataclass
class ModelCrop:
    """A vertebra crop as the models see it: canonical ``image`` (z, y, x) HU on
    ``geometry``."""

    vid: int
    image: np.ndarray
    geometry: Geometry

    @classmethod
    def of(cls, crop: Crop) -> ModelCrop:
        return cls(crop.vid, crop.arrays["image"], Geometry.from_dict(crop.attrs["geometry"]))


@dataclass
class FusedCrops:
    """Every crop's probability (``probs``, crop grid, by VerSe id) and its map on the target
    grid (``maps``; crops outside it have none)."""

    maps: list[CropMap]
    probs: dict[int, np.ndarray]

    @property
    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`union_box` of the maps."""
        return union_box(self.maps)


def fuse_crops(
    models: Sequence[LoadedModel],
    crops: Sequence[ModelCrop],
    grid: Geometry,
    shape: Sequence[int],
    *,
    resampler: Resampler | None,
    batch_size: int = 16,
    reuse: bool = True,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
) -> FusedCrops:
    """Predict each crop (`crop_probability`) and map it onto ``grid`` of ``shape`` (z, y, x).

    ``resampler``: maps each crop onto the grid (`to_ct_grid`: a CT's original grid); None
    when the crops were cut out of ``grid`` itself (a stored case's resampled grid): each is
    placed at its voxel offset, uninterpolated. ``progress(done, total)``: called with 0
    before the first crop and after each. ``timings`` accumulates ``model`` and ``resample``
    seconds.
    """
    maps: list[CropMap] = []
    probs: dict[int, np.ndarray] = {}
    total = len(crops)
    if progress is not None:
        progress(0, total)
    for done, crop in enumerate(crops, start=1):
        prob = crop_probability(
            models, crop.image, batch_size=batch_size, reuse=reuse, timings=timings
        )
        probs[crop.vid] = prob
        start = time.perf_counter()
        mapped = (
            to_ct_grid(prob, crop.geometry, grid, shape, resampler=resampler)
            if resampler is not None
            else _on_grid(prob, crop.geometry, grid)
        )
        if mapped is not None:
            maps.append(CropMap(crop.vid, *mapped))
        if timings is not None:
            timings["resample"] = timings.get("resample", 0.0) + time.perf_counter() - start
        if progress is not None:
            progress(done, total)
    return FusedCrops(maps, probs)


# -- a whole case ---------------------------------------------------------------------------------
@dataclass
class FusedCase:
    """The fused prediction of one CT, on its own grid (``crops.ct_geometry``/``ct_shape``).

    ``prob`` float32 0..1 and ``mask`` uint8 0/1 ``(z, y, x)``; ``labels`` uint8 VerSe ids on
    the same grid (the label map, or the crops' box masks mapped back); ``rows`` the
    per-vertebra summary (`vertebra_summary`); ``crops`` the canonical, resampled crops the
    models saw and ``crop_probs`` each crop's probability in its crop grid (by VerSe id).
    """

    prob: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    threshold: float
    rows: list[dict[str, Any]]
    crops: CaseCrops
    crop_probs: dict[int, np.ndarray]

    @property
    def ct_geometry(self) -> Geometry:
        return self.crops.ct_geometry

    @property
    def ct_shape(self) -> tuple[int, int, int]:
        return self.crops.ct_shape


def fuse_case(
    models: Sequence[LoadedModel],
    ct: np.ndarray,
    ct_geometry: Geometry,
    *,
    labels: np.ndarray | None = None,
    labels_geometry: Geometry | None = None,
    boxes: Mapping[int, Box] | None = None,
    label_scheme: str = "verse",
    combine: str = "mean",
    threshold: float | None = None,
    resampler: Resampler,
    batch_size: int = 16,
    reuse: bool = True,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    ct_source: str = "ct",
    labels_source: str = "vertebrae",
) -> FusedCase:
    """The fused fracture map and vertebra scores of one CT given as arrays.

    ``ct`` ``(z, y, x)`` HU on ``ct_geometry``; the vertebrae as ``labels`` (ids of
    ``label_scheme`` on ``labels_geometry``, default the CT's) or ``boxes`` (VerSe id -> box
    in the CT's stored index grid). ``models``: one or several (planes, ensemble members) of
    one training spacing and margin, whose crop maps are averaged. ``combine``: ``mean`` |
    ``max`` | ``vote`` where crops overlap; ``threshold``: voxel threshold (default: the
    first model's validation threshold, else `DEFAULT_THRESHOLD`). ``progress(done,
    total)`` over the vertebrae; ``timings`` accumulates seconds under ``preprocess``,
    ``model``, ``resample`` and ``fusion``. ``ct_source``/``labels_source`` name the inputs
    in errors.
    """
    check_fusable(models)
    t_used = threshold if threshold is not None else (models[0].threshold or DEFAULT_THRESHOLD)
    timings = timings if timings is not None else {}
    t0 = time.perf_counter()
    case = crop_arrays(
        ct,
        ct_geometry,
        labels=labels,
        labels_geometry=labels_geometry,
        boxes=boxes,
        label_scheme=label_scheme,
        spacing=models[0].spacing,
        margin_mm=float(models[0].margin_mm),
        resampler=resampler,
        ct_source=ct_source,
        labels_source=labels_source,
    )
    timings["preprocess"] = timings.get("preprocess", 0.0) + time.perf_counter() - t0
    geometry, shape = case.ct_geometry, case.ct_shape
    fused = fuse_crops(
        models,
        [ModelCrop.of(c) for c in case.crops],
        geometry,
        shape,
        resampler=resampler,
        batch_size=batch_size,
        reuse=reuse,
        progress=progress,
        timings=timings,
    )
    t1 = time.perf_counter()
    prob_full = np.zeros(shape, np.float32)
    mask_full = np.zeros(shape, np.uint8)
    labels_full = (
        case.labels
        if case.labels is not None
        else paste_crops(
            (
                (c.vid, c.arrays["mask"], Geometry.from_dict(c.attrs["geometry"]))
                for c in case.crops
            ),
            geometry,
            shape,
            resampler=resampler,
        )
    )
    rows: list[dict[str, Any]] = []
    if fused.maps:
        box = fused.box
        acc = combine_maps(fused.maps, box, combine, t_used)
        region = tuple(slice(a, b) for a, b in zip(*box, strict=True))
        prob_roi = acc.result()
        mask_roi = acc.mask(t_used)
        prob_full[region] = prob_roi
        mask_full[region] = mask_roi
        lab = labels_full[region]
        cells = fusion.nearest_label(lab, geometry.spacing[::-1])
        rows = vertebra_summary(
            prob_roi,
            mask_roi,
            lab,
            cells,
            [m.vid for m in fused.maps],
            float(np.prod(geometry.spacing)),
        )
    timings["fusion"] = timings.get("fusion", 0.0) + time.perf_counter() - t1
    return FusedCase(prob_full, mask_full, labels_full, float(t_used), rows, case, fused.probs)


__all__ = [
    "DEFAULT_THRESHOLD",
    "SCORE_QUANTILE",
    "CropMap",
    "FusedCase",
    "FusedCrops",
    "LoadedModel",
    "ModelCrop",
    "Progress",
    "check_fusable",
    "combine_maps",
    "crop_attention",
    "crop_probability",
    "crop_slice_scores",
    "fuse_case",
    "fuse_crops",
    "paste_crops",
    "to_ct_grid",
    "union_box",
    "vertebra_score",
    "vertebra_summary",
]
