"""``vfsearch predict``: a trained model on a new CT → fracture maps in the CT's own grid.

Path of one scan::

    CT + vertebra labels (any format `read_volume` accepts, DICOM series included)
      │ ingest.read_ct / read_vertebrae   read and check the files, as ingest does
      ▼ arrays + geometry
      │ core.inference.fuse_case          the one inference path (predict, evaluate,
      │                                   visualize and the pyfunc model): ingest's cropping
      │                                   in memory, the models slice by slice, every crop
      │                                   mapped back onto the CT's grid (SimpleITK) and fused
      │                                   (mean | max | vote), vertebra scores
      ▼ fused probability, mask, labels on the CT's grid
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from vfsearch.adapters import progress
from vfsearch.adapters import volumes as io
from vfsearch.adapters.bundle import is_bundle, load_checkpoint, load_members
from vfsearch.adapters.files import atomic_path
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker, tracking_uri
from vfsearch.adapters.tracking.registry import download_bundle
from vfsearch.adapters.tracking.schema import CHECKPOINTS_DIR
from vfsearch.adapters.volumes import Segment
from vfsearch.core import fusion
from vfsearch.core.crops import CaseCrops
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry
from vfsearch.core.inference import (
    SCORE_QUANTILE,
    LoadedModel,
    check_fusable,
    fuse_case,
)
from vfsearch.core.labels import name as vertebra_name
from vfsearch.pipelines.ingest import read_ct, read_vertebrae

if TYPE_CHECKING:
    import torch

# what `load_model` resolves: one reference, or several (per-plane models, fused)
ModelRef: TypeAlias = LoadedModel | str | os.PathLike | Sequence[LoadedModel | str | os.PathLike]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


# -- loading ------------------------------------------------------------------------------------
def load_model(
    ref: ModelRef,
    *,
    device: str | torch.device | None = None,
    store: str | os.PathLike | Store | None = None,
    workdir: str | os.PathLike = "mlruns",
) -> list[LoadedModel]:
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
    models = [
        m
        for r in refs
        for m in ([r] if isinstance(r, LoadedModel) else _load_one(r, device, store, workdir))
    ]
    try:
        check_fusable(models)
    except UserError as exc:
        raise UserError(f"--model: {exc}") from None
    return models


def _load_one(
    ref: str | os.PathLike,
    device: str | torch.device | None,
    store: str | os.PathLike | Store | None,
    workdir: str | os.PathLike,
) -> list[LoadedModel]:
    """One reference: one model, or the members of an ensemble bundle (``export --top-k``)."""
    text = str(ref)
    if text.startswith("models:/"):
        return _load_registered(text, device, workdir)
    path = Path(text).expanduser()
    if path.is_dir() and is_bundle(path):
        return load_members(path, device=device)
    if path.exists():
        return [load_checkpoint(_checkpoint_in(path), device=device, store=store)]
    if RUN_ID.match(text):
        return [_load_run(text, device, store, workdir)]
    raise UserError(
        f"--model: {text}: neither a checkpoint file, a folder holding one, an "
        f"export bundle, models:/NAME@ALIAS nor an MLflow run id (32 hex digits)"
    )


def _load_registered(
    uri: str, device: str | torch.device | None, workdir: str | os.PathLike
) -> list[LoadedModel]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: download the registered model
    (a `vfsearch export`) and load the bundle it carries (an ensemble: every member)."""
    if not re.match(r"^models:/[^/@]+(@[^/@]+|/\d+)$", uri):
        raise UserError(f"--model: {uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    folder = download_bundle(uri, tracking_uri(workdir))
    models = load_members(folder, device=device)
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


def _load_run(
    run_id: str,
    device: str | torch.device | None,
    store: str | os.PathLike | Store | None,
    workdir: str | os.PathLike,
) -> LoadedModel:
    """Download a run's best checkpoint artifact and load it."""
    tracker = Tracker(tracking_uri(workdir))
    try:
        artifacts = tracker.list_artifacts(run_id, CHECKPOINTS_DIR)
    except Exception as exc:  # noqa: BLE001 - unknown run ids surface as MlflowException
        raise UserError(f"--model: MLflow run {run_id}: {str(exc).splitlines()[0]}") from None
    names = [a.path for a in artifacts if not a.is_dir]
    pick = next((n for n in names if n.endswith("best.pt")), None) or next(
        (n for n in names if n.endswith(CHECKPOINT_SUFFIXES)), None
    )
    if pick is None:
        raise UserError(
            f"--model: MLflow run {run_id} has no checkpoint artifact under checkpoints/"
        )
    dst = Path(tempfile.mkdtemp(prefix="vfsearch-model-"))
    local = tracker.download_artifacts(run_id, pick, dst)
    run = tracker.get_run(run_id)
    if store is None and run.data.tags.get("store") and Path(run.data.tags["store"]).exists():
        store = run.data.tags["store"]
    loaded = load_checkpoint(local, device=device, store=store)
    loaded.run_id = run_id
    loaded.source = f"run {run_id} ({pick})"
    if loaded.threshold is None and "val_threshold3d" in run.data.metrics:
        loaded.threshold = float(run.data.metrics["val_threshold3d"])
    return loaded


# -- the command ----------------------------------------------------------------------------------
@dataclass
class CasePrediction:
    """The fused prediction of one CT, in memory (what `predict` writes, and what the
    pictures of `vfsearch.pipelines.visualize` need besides).

    ``prob`` float32 0..1 and ``mask`` uint8 0/1 ``(z, y, x)`` on the CT's own grid
    (``ct_geometry``, ``ct_shape``); ``labels`` uint8 VerSe ids on the same grid (the label
    map, or box masks for a bounding-box CSV); ``rows`` the per-vertebra summary;
    ``prepared`` the canonical, resampled crops the models saw and ``crop_probs`` each crop's
    probability ``(z, y, x)`` in its crop grid (by VerSe id); ``case_id`` the CT's file name,
    as a case id.
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
    prepared: CaseCrops
    crop_probs: dict[int, np.ndarray]
    timings: dict[str, float]
    case_id: str


def _check_options(threshold: float | None, combine: str) -> None:
    if combine not in fusion.COMBINE_METHODS:
        raise UserError(
            f"--combine: must be one of {', '.join(fusion.COMBINE_METHODS)}, got {combine!r}"
        )
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold: must be between 0 and 1, got {threshold}")


def predict_case(
    model_ref: ModelRef,
    ct: str | os.PathLike,
    vertebrae: str | os.PathLike,
    *,
    label_scheme: str = "verse",
    threshold: float | None = None,
    combine: str = "mean",
    device: str | torch.device | None = None,
    batch_size: int = 16,
    reuse: bool = True,
    store: str | os.PathLike | Store | None = None,
    workdir: str | os.PathLike = "mlruns",
) -> CasePrediction:
    """Predict the fracture map of one CT in memory (arguments as `predict`, without ``out``).

    Returns a `CasePrediction`; nothing is written.
    """
    _check_options(threshold, combine)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    models = load_model(model_ref, device=device, store=store, workdir=workdir)
    case_id = re.sub(r"[^A-Za-z0-9._-]", "_", Path(ct).name) or "case"
    t1 = time.perf_counter()
    timings["load_model"] = t1 - t0
    volume = read_ct(str(ct))
    labels, boxes = read_vertebrae(str(vertebrae), volume, str(ct), label_scheme)
    timings["read_preprocess"] = time.perf_counter() - t1
    for lm in models:
        if lm.kind != "segmentation":
            raise UserError(
                f"--model: {lm.source} is a {lm.kind} model; fracture maps need a "
                f"segmenter (evaluate reports classifiers)"
            )
    bar: Any = None

    def tick(done: int, total: int) -> None:
        nonlocal bar
        if done == 0:
            bar = progress.bar(desc=f"predict {case_id}", unit="vertebra", total=total)
        else:
            bar.update(1)

    try:
        fused = fuse_case(
            models,
            volume.array,
            volume.geometry,
            labels=labels.array if labels is not None else None,
            labels_geometry=labels.geometry if labels is not None else None,
            boxes=boxes,
            label_scheme=label_scheme,
            combine=combine,
            threshold=threshold,
            resampler=io,
            batch_size=batch_size,
            reuse=reuse,
            progress=tick,
            timings=timings,
            ct_source=str(ct),
            labels_source=str(vertebrae),
        )
    finally:
        if bar is not None:
            bar.close()
    timings["read_preprocess"] += timings.pop("preprocess", 0.0)
    return CasePrediction(
        models,
        fused.prob,
        fused.mask,
        fused.labels,
        fused.ct_geometry,
        fused.ct_shape,
        fused.threshold,
        combine,
        fused.rows,
        fused.crops,
        fused.crop_probs,
        timings,
        case_id,
    )


def predict(
    model_ref: ModelRef,
    ct: str | os.PathLike,
    vertebrae: str | os.PathLike,
    out: str | os.PathLike,
    *,
    label_scheme: str = "verse",
    threshold: float | None = None,
    combine: str = "mean",
    device: str | torch.device | None = None,
    batch_size: int = 16,
    reuse: bool = True,
    store: str | os.PathLike | Store | None = None,
    workdir: str | os.PathLike = "mlruns",
) -> dict[str, Any]:
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
    _check_options(threshold, combine)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    t0 = time.perf_counter()
    case = predict_case(
        model_ref,
        ct,
        vertebrae,
        label_scheme=label_scheme,
        threshold=threshold,
        combine=combine,
        device=device,
        batch_size=batch_size,
        reuse=reuse,
        store=store,
        workdir=workdir,
    )
    timings = case.timings
    t4 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    prob_path = io.write_volume(out_dir / "fracture_prob.nii.gz", case.prob, case.ct_geometry)
    mask_path = io.write_volume(out_dir / "fracture_mask.nii.gz", case.mask, case.ct_geometry)
    # vertebrae and fracture overlap: two layers (0: VerSe ids, 1: the thresholded mask)
    seg_path = io.write_segmentation(
        out_dir / "segmentation.seg.nrrd",
        [case.labels, case.mask],
        case.ct_geometry,
        slicer_segments(case.labels, case.threshold),
    )
    report = {
        "ct": str(ct),
        "vertebrae_file": str(vertebrae),
        "model": [m.source for m in case.models],
        "threshold": case.threshold,
        "combine": combine,
        "score": f"q{SCORE_QUANTILE:g} of the probability over the vertebra's voxels",
        "vertebrae": case.rows,
    }
    json_path = _write_json(out_dir / "vertebrae.json", report)
    timings["write"] = time.perf_counter() - t4
    timings["total"] = time.perf_counter() - t0
    return {
        "files": [str(prob_path), str(mask_path), str(seg_path), str(json_path)],
        "threshold": case.threshold,
        "combine": combine,
        "vertebrae": case.rows,
        "seconds": timings,
        "ct_shape": list(case.ct_shape),
    }


# Segment colours of segmentation.seg.nrrd: a fixed table of distinct, non-red colours by
# VerSe id (neighbouring vertebrae always differ); red is the fracture's alone.
VERTEBRA_COLORS: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706),
    (1.000, 0.498, 0.055),
    (0.173, 0.627, 0.173),
    (0.580, 0.404, 0.741),
    (0.549, 0.337, 0.294),
    (0.890, 0.467, 0.761),
    (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
    (0.682, 0.780, 0.910),
    (0.596, 0.875, 0.541),
    (1.000, 0.733, 0.471),
    (0.773, 0.690, 0.835),
)
FRACTURE_COLOR = (1.0, 0.0, 0.0)


def slicer_segments(labels: np.ndarray, threshold: float) -> list[Segment]:
    """Segments of ``segmentation.seg.nrrd``: one per vertebra present in ``labels`` (layer
    0, label value = its VerSe id, named "L1"...) and "fracture" (layer 1, label value 1)."""
    counts = np.bincount(labels.ravel(), minlength=1)  # uint8 ids: cheaper than np.unique
    segments = [
        Segment(
            vertebra_name(v),
            vertebra_name(v),
            VERTEBRA_COLORS[v % len(VERTEBRA_COLORS)],
            int(v),
            0,
            (("vfsearch.verse_id", str(v)),),
        )
        for v in np.flatnonzero(counts).tolist()
        if v > 0
    ]
    segments.append(
        Segment(
            "fracture",
            "fracture",
            FRACTURE_COLOR,
            1,
            1,
            (("vfsearch.threshold", f"{threshold:g}"),),
        )
    )
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
    lines.append(
        f"threshold {summary['threshold']:.2f}, combine {summary['combine']}, "
        f"{summary['seconds']['total']:.1f} s"
    )
    lines += [f"wrote {f}" for f in summary["files"]]
    return "\n".join(lines)


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "FRACTURE_COLOR",
    "RUN_ID",
    "VERTEBRA_COLORS",
    "CasePrediction",
    "ModelRef",
    "format_summary",
    "load_model",
    "predict",
    "predict_case",
    "slicer_segments",
]
