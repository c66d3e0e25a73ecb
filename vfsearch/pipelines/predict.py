"""``vfsearch predict``: a trained model on a new CT → fracture maps in the CT's own grid.

Path of one scan::

    CT + vertebra labels (any format `read_volume` accepts, DICOM series included)
      │ data.ingest.prepare_case        the very preprocessing of ingest, in memory:
      │                                 reorient, resample to the training store's spacing,
      │                                 crop every T4..L5 vertebra with the store's margin
      ▼ crops (z, y, x) int16 HU
      │ crop_probability                normalise with the training fingerprint; every slice
      │                                 along the model's plane as a window centre; encoder
      │                                 features reused across windows; per-plane maps averaged
      ▼ crop probability (z, y, x)
      │ to_ct_grid                      SimpleITK resampling in physical space (linear): undoes
      │                                 crop, resampling and reorientation in one step
      ▼ fusion.CaseAccumulator          overlapping crops: mean | max | vote
    fracture_prob.nii.gz (float32 0..1), fracture_mask.nii.gz (uint8), vertebrae.json,
    segmentation.seg.nrrd (3D Slicer: a named segment per vertebra + "fracture")

Every volume has exactly the input CT's size, spacing, origin and direction.

Model references (`load_model`): a checkpoint file written by training (``torch.load(...,
weights_only=True)``: a dict with the model's ``state_dict`` and the flat config that rebuilds
it), a folder holding one, an export bundle folder (`vfsearch.adapters.bundle`), a registered model
``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (written by ``vfsearch export``), an MLflow
run id (its best checkpoint artifact is downloaded), or a `LoadedModel` already in memory.
Several references (a list, or comma-separated) are per-plane models whose maps are averaged
(multi-plane fusion).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfsearch.core import fusion

from vfsearch.adapters import progress
from vfsearch.core.geometry import Geometry
from vfsearch.core.errors import UserError
from vfsearch.adapters.files import atomic_path

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
DEFAULT_THRESHOLD = 0.5
SCORE_QUANTILE = 0.99  # vertebra score: 99th percentile of probability over its voxels


@dataclass
class LoadedModel:
    """A model ready for inference, with everything its input preprocessing needs.

    ``spacing`` (x, y, z mm), ``margin_mm`` and ``fingerprint`` are those of the store the
    model was trained on, so a new scan is cropped and normalised exactly like its training
    data. ``threshold`` is the one chosen on validation (None: unknown).
    """

    model: Any
    config: Any  # vfsearch.core.config.Config
    fingerprint: dict[str, Any]
    spacing: tuple[float, float, float]
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


# -- loading ------------------------------------------------------------------------------------
def load_model(ref: Any, *, device: Any = None, store: Any = None,
               workdir: str | os.PathLike = "mlruns") -> list[LoadedModel]:
    """Resolve a model reference (or several, one per plane) into `LoadedModel` objects.

    ``ref``: a `LoadedModel`, a checkpoint file, a folder with ``best.pt``/``last.pt``/one
    checkpoint, an export bundle folder, ``models:/NAME@ALIAS`` (or ``/VERSION``), an MLflow
    run id (32 hex digits), or a list / comma-separated string of those. ``store`` (a path
    or `Store`): the training store, for checkpoints that do not carry its spacing, margin
    and fingerprint themselves (an MLflow run names its store in the ``store`` tag).
    ``workdir``: the embedded MLflow server's folder, used for run ids and ``models:/`` URIs
    when ``$MLFLOW_TRACKING_URI`` is unset. Models of different spacing or margin cannot be
    fused: `UserError`.
    """
    refs: list[Any]
    if isinstance(ref, (list, tuple)):
        refs = list(ref)
    elif isinstance(ref, (str, os.PathLike)) and "," in str(ref):
        refs = [r.strip() for r in str(ref).split(",") if r.strip()]
    else:
        refs = [ref]
    if not refs:
        raise UserError("--model: no model given")
    models = [m for r in refs
              for m in ([r] if isinstance(r, LoadedModel) else _load_one(r, device, store,
                                                                          workdir))]
    first = models[0]
    for m in models[1:]:
        if tuple(m.spacing) != tuple(first.spacing) or m.margin_mm != first.margin_mm:
            raise UserError(f"--model: {m.source} was trained on crops of spacing {m.spacing} "
                            f"mm / margin {m.margin_mm} mm, {first.source} on {first.spacing} / "
                            f"{first.margin_mm}; per-plane models must share them")
    return models


def _load_one(ref: Any, device: Any, store: Any, workdir: Any) -> list[LoadedModel]:
    """One reference: one model, or the members of an ensemble bundle (``export --top-k``)."""
    from vfsearch.adapters import bundle

    text = str(ref)
    if text.startswith("models:/"):
        return _load_registered(text, device, workdir)
    path = Path(text).expanduser()
    if path.is_dir() and bundle.is_bundle(path):
        return bundle.load_members(path, device=device)
    if path.exists():
        return [load_checkpoint(_checkpoint_in(path), device=device, store=store)]
    if RUN_ID.match(text):
        return [_load_run(text, device, store, workdir)]
    raise UserError(f"--model: {text}: neither a checkpoint file, a folder holding one, an "
                    f"export bundle, models:/NAME@ALIAS nor an MLflow run id (32 hex digits)")


def _load_registered(uri: str, device: Any, workdir: Any) -> list[LoadedModel]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: download the registered model
    (a `vfsearch export`) and load the bundle it carries (an ensemble: every member)."""
    from vfsearch.adapters import bundle
    from vfsearch.adapters import tracking
    from vfsearch.adapters.tracking.pyfunc import download_bundle

    if not re.match(r"^models:/[^/@]+(@[^/@]+|/\d+)$", uri):
        raise UserError(f"--model: {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    folder = download_bundle(uri, tracking.tracking_uri(workdir))
    models = bundle.load_members(folder, device=device)
    for i, lm in enumerate(models):
        lm.source = uri if len(models) == 1 else f"{uri} member {i}"
    return models


def _checkpoint_in(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("best.pt", "last.pt", "checkpoint.pt", "model.pt"):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"--model: {path}: folder holds no checkpoint (*.pt)")
    raise UserError(f"--model: {path}: folder holds {len(found)} checkpoints; name one")


def load_checkpoint(path: str | os.PathLike, *, device: Any = None, store: Any = None
                    ) -> LoadedModel:
    """Rebuild the model of a training checkpoint and load its weights (eval mode).

    The checkpoint is a dict read with ``weights_only=True``: ``model`` (state_dict),
    ``config`` (flat dotted config), and the training store's ``fingerprint``, ``spacing``
    and ``margin_mm`` (top level or under ``store``; else read from ``store``, the training
    store's path); ``threshold`` if one was chosen on validation.
    """
    import torch

    from vfsearch.core.config import Config
    from vfsearch.core.models import build_model

    p = Path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{p}: cannot read checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p}: not a vfsearch checkpoint (expected a dict)")
    state = next((ckpt[k] for k in ("model", "model_state", "state_dict") if k in ckpt), None)
    flat = ckpt.get("config")
    if state is None or not isinstance(flat, dict):
        raise UserError(f"{p}: not a vfsearch checkpoint (needs 'model' weights and 'config'; "
                        f"has {', '.join(sorted(map(str, ckpt))) or 'nothing'})")
    config = Config.from_flat(flat, source=str(p))
    info = dict(ckpt.get("store") or {})
    fingerprint = ckpt.get("fingerprint") or info.get("fingerprint")
    spacing = ckpt.get("spacing") or info.get("spacing")
    margin = ckpt.get("margin_mm", info.get("margin_mm"))
    if (not fingerprint or not spacing or margin is None) and store is not None:
        meta = _store_meta(store)
        fingerprint = fingerprint or meta["fingerprint"]
        spacing = spacing or meta["spacing"]
        margin = margin if margin is not None else meta["margin_mm"]
    missing = [k for k, v in (("fingerprint", fingerprint), ("spacing", spacing),
                              ("margin_mm", margin)) if v is None or v == {} or v == []]
    if missing:
        raise UserError(f"{p}: checkpoint lacks the training store's {', '.join(missing)} "
                        f"(needed to preprocess a new scan like the training data); "
                        f"pass --store with the training store")
    # trained weights follow: a pretrained-encoder file named in the config is not needed
    model = build_model(config.model, config.data.seq_len, load_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{p}: weights do not fit the model of its config "
                        f"({str(exc).splitlines()[0]})") from None
    model.to(_device(device)).eval()
    threshold = ckpt.get("threshold")
    return LoadedModel(model, config, dict(fingerprint), tuple(float(s) for s in spacing),
                       float(margin), source=str(p), run_id=ckpt.get("run_id"),
                       threshold=float(threshold) if threshold is not None else None)


def _store_meta(store: Any) -> dict[str, Any]:
    """Spacing, margin and fingerprint of a training store (path or `Store`)."""
    from vfsearch.adapters.store import Store

    s = store if isinstance(store, Store) else Store(store)
    meta = s.meta
    return {"spacing": meta.get("spacing"), "margin_mm": meta.get("margin_mm"),
            "fingerprint": s.fingerprint}


def _load_run(run_id: str, device: Any, store: Any, workdir: Any) -> LoadedModel:
    """Download a run's best checkpoint artifact and load it."""
    from vfsearch.adapters import tracking

    tracker = tracking.Tracker(tracking.tracking_uri(workdir))
    try:
        artifacts = tracking._retry(lambda: tracker.client.list_artifacts(run_id, "checkpoints"))
    except Exception as exc:  # noqa: BLE001 - unknown run ids surface as MlflowException
        raise UserError(f"--model: MLflow run {run_id}: {str(exc).splitlines()[0]}") from None
    names = [a.path for a in artifacts if not a.is_dir]
    pick = next((n for n in names if n.endswith("best.pt")), None) or \
        next((n for n in names if n.endswith(CHECKPOINT_SUFFIXES)), None)
    if pick is None:
        raise UserError(f"--model: MLflow run {run_id} has no checkpoint artifact under "
                        f"checkpoints/")
    dst = Path(tempfile.mkdtemp(prefix="vfsearch-model-"))
    local = tracking._retry(lambda: tracker.client.download_artifacts(run_id, pick, str(dst)))
    run = tracking._retry(lambda: tracker.client.get_run(run_id))
    if store is None and run.data.tags.get("store") and Path(run.data.tags["store"]).exists():
        store = run.data.tags["store"]
    loaded = load_checkpoint(local, device=device, store=store)
    loaded.run_id = run_id
    loaded.source = f"run {run_id} ({pick})"
    if loaded.threshold is None and "val_threshold3d" in run.data.metrics:
        loaded.threshold = float(run.data.metrics["val_threshold3d"])
    return loaded


def _device(device: Any) -> Any:
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# -- one crop -------------------------------------------------------------------------------------
def crop_probability(models: Sequence[LoadedModel], image_hu: np.ndarray, *,
                     batch_size: int = 16, reuse: bool = True,
                     timings: dict[str, float] | None = None) -> np.ndarray:
    """Fracture probability ``(z, y, x)`` float32 of one canonical crop (``image_hu`` HU).

    Each model predicts every slice along its plane (a window centred on it), the slices are
    stacked back into the crop and the per-plane maps are averaged. ``timings`` (if given)
    accumulates the seconds spent in the models under ``"model"``.
    """
    from vfsearch.core.windows import PLANE_AXIS, normalise, normalised_floor

    maps = []
    for lm in models:
        if lm.kind != "segmentation":
            raise UserError(f"--model: {lm.source} is a {lm.kind} model; fracture maps need a "
                            f"segmenter (evaluate reports classifiers)")
        axis = PLANE_AXIS[lm.plane]
        norm = normalise(image_hu, lm.fingerprint)
        start = time.perf_counter()
        probs = fusion.infer_slices(
            lm.model, fusion.volume_to_slices(norm, axis), lm.seq_len, reuse=reuse,
            batch_size=batch_size, pad_value=normalised_floor(lm.fingerprint),
            multiple=2 ** lm.config.model.depth, min_size=lm.config.data.patch_size)
        if timings is not None:
            timings["model"] = timings.get("model", 0.0) + time.perf_counter() - start
        maps.append(fusion.slices_to_volume(probs, axis))
    return maps[0] if len(maps) == 1 else fusion.fuse_planes(maps)


def crop_slice_scores(lm: LoadedModel, image_hu: np.ndarray, *, batch_size: int = 32
                      ) -> np.ndarray:
    """Per-slice fracture probability ``(n,)`` of a slice classifier along its plane."""
    from vfsearch.core.windows import PLANE_AXIS, normalise, normalised_floor

    axis = PLANE_AXIS[lm.plane]
    norm = normalise(image_hu, lm.fingerprint)
    return fusion.infer_slice_scores(lm.model, fusion.volume_to_slices(norm, axis), lm.seq_len,
                                     batch_size=batch_size,
                                     pad_value=normalised_floor(lm.fingerprint), multiple=32,
                                     min_size=lm.config.data.patch_size)


def crop_attention(lm: LoadedModel, image_hu: np.ndarray, index: int
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Probability and attention-gate coefficients of one slice of a canonical crop.

    ``image_hu`` ``(z, y, x)`` HU; ``index``: the slice along the model's plane (the centre
    of its window, windows and padding exactly as `fusion.infer_slices`). Returns the slice's
    probability ``(H, W)`` and one coefficient map ``(H, W)`` in [0, 1] per gate level
    (finest first), each brought back to the slice's voxels (nearest upsampling of the
    coarse level, padding cut off); an empty list for a model without gates. ``(H, W)`` are
    the two remaining axes in their order (sagittal: ``(z, y)``).
    """
    import torch

    from vfsearch.core.windows import PLANE_AXIS, normalise, normalised_floor

    axis = PLANE_AXIS[lm.plane]
    slices = fusion.volume_to_slices(normalise(image_hu, lm.fingerprint), axis)
    n, h, w = slices.shape
    if not 0 <= index < n:
        raise ValueError(f"slice {index} outside 0..{n - 1}")
    multiple = 2 ** lm.config.model.depth
    ph = fusion.padded_size(h, multiple, lm.config.data.patch_size)
    pw = fusion.padded_size(w, multiple, lm.config.data.patch_size)
    window = fusion.all_windows(n, lm.seq_len, [index])[0]  # (T,)
    padded, inner = fusion.pad_slices(np.asarray(slices[window], np.float32), ph, pw,
                                      normalised_floor(lm.fingerprint))
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


def to_ct_grid(array: np.ndarray, crop_geometry: Geometry, ct_geometry: Geometry,
               ct_shape: Sequence[int], *, nearest: bool = False
               ) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray] | None:
    """Map a crop array onto the sub-box of the original CT grid that the crop covers.

    SimpleITK resampling in physical space (linear for probabilities, ``nearest`` for
    labels) undoes crop, resampling and reorientation in one step. Returns ``(values, offset
    (z, y, x) of the sub-box in the CT grid, cover)`` where ``cover`` marks the voxels inside
    the crop's extent, or None when the crop lies outside the CT.
    """
    from vfsearch.adapters import volumes as io

    box = fusion.box_in_grid(crop_geometry, array.shape, ct_geometry, ct_shape)
    if box is None:
        return None
    lo, hi = box
    sub = ct_geometry.shifted(lo)
    shape = tuple(b - a for a, b in zip(lo, hi))
    values = io.resample_to(array, crop_geometry, sub, shape, nearest=nearest, default=0)
    cover = io.resample_to(np.ones(array.shape, np.uint8), crop_geometry, sub, shape,
                           nearest=True, default=0) > 0
    return values, lo, cover


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


def combine_maps(maps: Sequence[CropMap], box: tuple[Sequence[int], Sequence[int]],
                 method: str, threshold: float) -> fusion.CaseAccumulator:
    """Accumulate crop maps over ``box`` of the CT grid (offsets shift into the box)."""
    lo, hi = box
    acc = fusion.CaseAccumulator(tuple(b - a for a, b in zip(lo, hi)), method, threshold)
    for m in maps:
        acc.add(m.values, tuple(o - a for o, a in zip(m.offset, lo)), m.cover)
    return acc


def vertebra_summary(prob: np.ndarray, mask: np.ndarray, labels: np.ndarray,
                     cells: np.ndarray, vids: Sequence[int], voxel_mm3: float,
                     quantile: float = SCORE_QUANTILE) -> list[dict[str, Any]]:
    """Per vertebra: score and predicted fracture volume, from arrays over one region.

    ``score``: the ``quantile`` of the probability over the vertebra's labelled voxels (over
    its cell when it has none), so a vertebra scores high when at least 1 - quantile of it
    looks fractured, and a single hot voxel does not. ``fracture_volume_mm3``: predicted
    fracture voxels in the vertebra's cell (`fusion.nearest_label`) times the voxel volume.
    """
    from vfsearch.core.labels import name

    out = []
    for v in vids:
        own = labels == v
        region = own if own.any() else cells == v
        score = float(np.quantile(prob[region], quantile)) if region.any() else 0.0
        voxels = int(np.count_nonzero(mask[cells == v]))
        out.append({"vertebra": int(v), "name": name(v), "score": round(score, 6),
                    "fracture_voxels": voxels,
                    "fracture_volume_mm3": round(voxels * voxel_mm3, 3)})
    return out


def _labels_in_ct(path: str, label_scheme: str, ct_geometry: Geometry,
                  ct_shape: Sequence[int], crops: Sequence[Any]) -> np.ndarray:
    """Vertebra ids (VerSe, T4..L5) in the CT grid: the label map as given, or, for a
    bounding-box CSV, the crops' box masks mapped back (nearest)."""
    from vfsearch.adapters import volumes as io
    from vfsearch.core.labels import to_verse

    if not str(path).lower().endswith(".csv"):
        return to_verse(io.read_volume(path, what="vertebra label map").array, label_scheme,
                        source=str(path))
    labels = np.zeros(tuple(ct_shape), np.uint8)
    for crop in crops:
        g = Geometry.from_dict(crop.attrs["geometry"])
        mapped = to_ct_grid(crop.arrays["mask"], g, ct_geometry, ct_shape, nearest=True)
        if mapped is None:
            continue
        values, lo, cover = mapped
        dst = tuple(slice(a, a + n) for a, n in zip(lo, values.shape))
        labels[dst] = np.where((values > 0) & cover, crop.vid, labels[dst])
    return labels


# -- the command ----------------------------------------------------------------------------------
@dataclass
class CasePrediction:
    """The fused prediction of one CT, in memory (what `predict` writes, and what the
    pictures of `vfsearch.pipelines.visualize` need besides).

    ``prob`` float32 0..1 and ``mask`` uint8 0/1 ``(z, y, x)`` on the CT's own grid
    (``ct_geometry``, ``ct_shape``); ``labels`` uint8 VerSe ids on the same grid (the label
    map, or box masks for a bounding-box CSV); ``rows`` the per-vertebra summary;
    ``prepared`` the canonical, resampled crops the models saw and ``crop_probs`` each crop's
    probability ``(z, y, x)`` in its crop grid (by VerSe id).
    """

    models: list[LoadedModel]
    prob: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    ct_geometry: Geometry
    ct_shape: tuple[int, int, int]
    threshold: float
    combine: str
    rows: list[dict[str, Any]]
    prepared: Any  # vfsearch.pipelines.ingest.PreparedCase
    crop_probs: dict[int, np.ndarray]
    timings: dict[str, float]


def _check_options(threshold: float | None, combine: str) -> None:
    if combine not in fusion.COMBINE_METHODS:
        raise UserError(f"--combine: must be one of {', '.join(fusion.COMBINE_METHODS)}, "
                        f"got {combine!r}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold: must be between 0 and 1, got {threshold}")


def predict_case(model_ref: Any, ct: str | os.PathLike, vertebrae: str | os.PathLike, *,
                 label_scheme: str = "verse", threshold: float | None = None,
                 combine: str = "mean", device: Any = None, batch_size: int = 16,
                 reuse: bool = True, store: Any = None,
                 workdir: str | os.PathLike = "mlruns") -> CasePrediction:
    """Predict the fracture map of one CT in memory (arguments as `predict`, without ``out``).

    Returns a `CasePrediction`; nothing is written.
    """
    from vfsearch.pipelines.ingest import CaseSpec, Params, prepare_case

    _check_options(threshold, combine)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    models = load_model(model_ref, device=device, store=store, workdir=workdir)
    t_used = threshold if threshold is not None else (models[0].threshold or DEFAULT_THRESHOLD)
    lm = models[0]
    case_id = re.sub(r"[^A-Za-z0-9._-]", "_", Path(ct).name) or "case"
    params = Params(tuple(lm.spacing), float(lm.margin_mm), label_scheme, lm.plane)
    t1 = time.perf_counter()
    timings["load_model"] = t1 - t0
    prepared = prepare_case(CaseSpec(case_id, str(ct), str(vertebrae)), params)
    ct_geometry = Geometry.from_dict(prepared.attrs["ct_geometry"])
    ct_shape = tuple(int(v) for v in prepared.attrs["ct_shape"])
    timings["read_preprocess"] = time.perf_counter() - t1

    maps: list[CropMap] = []
    crop_probs: dict[int, np.ndarray] = {}
    for crop in progress.bar(prepared.crops, f"predict {case_id}", unit="vertebra"):
        prob = crop_probability(models, crop.arrays["image"], batch_size=batch_size,
                                reuse=reuse, timings=timings)
        crop_probs[crop.vid] = prob
        t2 = time.perf_counter()
        mapped = to_ct_grid(prob, Geometry.from_dict(crop.attrs["geometry"]), ct_geometry,
                            ct_shape)
        if mapped is not None:
            maps.append(CropMap(crop.vid, *mapped))
        timings["resample"] = timings.get("resample", 0.0) + time.perf_counter() - t2
    t3 = time.perf_counter()
    prob_full = np.zeros(ct_shape, np.float32)
    mask_full = np.zeros(ct_shape, np.uint8)
    labels_full = _labels_in_ct(str(vertebrae), label_scheme, ct_geometry, ct_shape,
                                prepared.crops)
    rows: list[dict[str, Any]] = []
    if maps:
        box = union_box(maps)
        acc = combine_maps(maps, box, combine, t_used)
        region = tuple(slice(a, b) for a, b in zip(*box))
        prob_roi = acc.result()
        mask_roi = acc.mask(t_used)
        prob_full[region] = prob_roi
        mask_full[region] = mask_roi
        labels = labels_full[region]
        cells = fusion.nearest_label(labels, ct_geometry.spacing[::-1])
        rows = vertebra_summary(prob_roi, mask_roi, labels, cells, [m.vid for m in maps],
                                float(np.prod(ct_geometry.spacing)))
    timings["fusion"] = time.perf_counter() - t3
    return CasePrediction(models, prob_full, mask_full, labels_full, ct_geometry,
                          ct_shape, float(t_used), combine, rows, prepared, crop_probs,
                          timings)


def predict(model_ref: Any, ct: str | os.PathLike, vertebrae: str | os.PathLike,
            out: str | os.PathLike, *, label_scheme: str = "verse",
            threshold: float | None = None, combine: str = "mean", device: Any = None,
            batch_size: int = 16, reuse: bool = True, store: Any = None,
            workdir: str | os.PathLike = "mlruns") -> dict[str, Any]:
    """Predict the fracture map of one CT and write it to folder ``out``.

    ``ct``: a CT file or DICOM series folder; ``vertebrae``: its vertebra label map (or a
    bounding-box CSV, as ingest accepts), ids of ``label_scheme``. ``threshold``: probability
    at or above which a voxel is fracture (default: the model's validation threshold, else
    0.5). ``combine``: ``mean`` | ``max`` | ``vote`` where vertebra crops overlap.
    ``store``: the training store, for checkpoints that do not carry its preprocessing;
    ``workdir``: the embedded MLflow server's folder (for run ids).

    Writes ``fracture_prob.nii.gz`` (float32 0..1), ``fracture_mask.nii.gz`` (uint8 0/1) and
    ``segmentation.seg.nrrd`` (3D Slicer's layered segmentation: layer 0 holds a segment per
    vertebra present, named "L1"..., label value its VerSe id; layer 1 the segment "fracture",
    red, label value 1 = the mask), all with exactly the CT's size, spacing, origin and
    direction, and ``vertebrae.json`` (per vertebra: VerSe id, name, score, predicted
    fracture volume in mm3). Returns a summary dict (files, threshold, per-vertebra rows,
    seconds per stage).
    """
    from vfsearch.adapters import volumes as io

    _check_options(threshold, combine)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    t0 = time.perf_counter()
    case = predict_case(model_ref, ct, vertebrae, label_scheme=label_scheme,
                        threshold=threshold, combine=combine, device=device,
                        batch_size=batch_size, reuse=reuse, store=store, workdir=workdir)
    timings = case.timings
    t4 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    prob_path = io.write_volume(out_dir / "fracture_prob.nii.gz", case.prob, case.ct_geometry)
    mask_path = io.write_volume(out_dir / "fracture_mask.nii.gz", case.mask, case.ct_geometry)
    # vertebrae and fracture overlap: two layers (0: VerSe ids, 1: the thresholded mask)
    seg_path = io.write_segmentation(out_dir / "segmentation.seg.nrrd", [case.labels, case.mask],
                                     case.ct_geometry, slicer_segments(case.labels,
                                                                       case.threshold))
    report = {"ct": str(ct), "vertebrae_file": str(vertebrae),
              "model": [m.source for m in case.models], "threshold": case.threshold,
              "combine": combine, "score": f"q{SCORE_QUANTILE:g} of the "
              f"probability over the vertebra's voxels", "vertebrae": case.rows}
    json_path = _write_json(out_dir / "vertebrae.json", report)
    timings["write"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    return {"files": [str(prob_path), str(mask_path), str(seg_path), str(json_path)],
            "threshold": case.threshold, "combine": combine, "vertebrae": case.rows,
            "seconds": timings, "ct_shape": list(case.ct_shape)}


# Segment colours of segmentation.seg.nrrd: a fixed table of distinct, non-red colours by
# VerSe id (neighbouring vertebrae always differ); red is the fracture's alone.
VERTEBRA_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706), (1.000, 0.498, 0.055), (0.173, 0.627, 0.173),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812), (0.682, 0.780, 0.910),
    (0.596, 0.875, 0.541), (1.000, 0.733, 0.471), (0.773, 0.690, 0.835),
)
FRACTURE_COLOR = (1.0, 0.0, 0.0)


def slicer_segments(labels: np.ndarray, threshold: float) -> list[Any]:
    """Segments of ``segmentation.seg.nrrd``: one per vertebra present in ``labels`` (layer
    0, label value = its VerSe id, named "L1"...) and "fracture" (layer 1, label value 1)."""
    from vfsearch.adapters.volumes import Segment
    from vfsearch.core.labels import name

    counts = np.bincount(labels.ravel(), minlength=1)  # uint8 ids: cheaper than np.unique
    segments = [Segment(name(v), name(v), VERTEBRA_COLORS[v % len(VERTEBRA_COLORS)], int(v),
                        0, (("vfsearch.verse_id", str(v)),))
                for v in np.flatnonzero(counts).tolist() if v > 0]
    segments.append(Segment("fracture", "fracture", FRACTURE_COLOR, 1, 1,
                            (("vfsearch.threshold", f"{threshold:g}"),)))
    return segments


def _write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write (temporary file in the same folder, then rename)."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The terminal table of a `predict` summary."""
    lines = [f"{'vertebra':<9}{'score':>8}{'fracture mm3':>15}"]
    for r in summary["vertebrae"]:
        lines.append(f"{r['name']:<9}{r['score']:>8.3f}{r['fracture_volume_mm3']:>15.1f}")
    lines.append(f"threshold {summary['threshold']:.2f}, combine {summary['combine']}, "
                 f"{summary['seconds']['total']:.1f} s")
    lines += [f"wrote {f}" for f in summary["files"]]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_THRESHOLD",
    "SCORE_QUANTILE",
    "CasePrediction",
    "CropMap",
    "LoadedModel",
    "combine_maps",
    "crop_attention",
    "crop_probability",
    "crop_slice_scores",
    "format_summary",
    "load_checkpoint",
    "load_model",
    "predict",
    "predict_case",
    "slicer_segments",
    "to_ct_grid",
    "union_box",
    "vertebra_summary",
]
