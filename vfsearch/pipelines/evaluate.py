"""``vfsearch evaluate``: fused 3D evaluation of a model on a split of a store.

For every case of the split, each stored vertebra crop is predicted slice by slice, mapped
back onto the case's original CT grid and the crops are combined by the code ``vfsearch
predict`` runs for a new scan (`vfsearch.core.inference.fuse_crops`, `combine_maps`).
Scores are computed there, at the original resolution:

* Ground truth in the original grid: the case's source files recorded by ingest (fracture
  mask and vertebra label map, read again); where a source file is gone (or the vertebrae were
  given as bounding boxes), it is rebuilt from the stored crops by the same inverse mapping
  with nearest-neighbour interpolation. ``metrics.json`` says which (``gt_source``).
* Per vertebra: TP/FP/FN over the vertebra's cell (every voxel of the cases' region of
  interest goes to the nearest labelled vertebra, `fusion.nearest_label`), Dice/IoU/precision/
  recall under the empty-mask policy of `vfsearch.core.metrics3d`; per case: counts over the whole
  CT; pooled (micro): counts summed over the split. Bootstrap 95 % intervals (cases
  resampled, seeded) for pooled Dice and mean Dice over fractured vertebrae.
* The threshold: chosen on the validation split (pooled 3D Dice, candidates 0.01..0.99; vote
  combination 0.05..0.95) and applied unchanged to the evaluated split, unless given. Where
  the evaluated split *is* the validation split, each case is scored at the threshold chosen
  on the other half of the split (`crossfit_indices`), so no figure is scored at a threshold
  tuned on the cases it scores; the same holds for `fused_validation_metrics`, the value a
  sweep ranks trials by.
* 2D slice level (crop grid, along the model's plane): pooled Dice/IoU over slices and mean
  Dice over slices with fracture; slice detection (slice score = highest probability).
* Vertebra detection from a per-vertebra score (segmenter: `vfsearch.core.inference.
  vertebra_score`, the 99th percentile of the fused probability over the vertebra's voxels,
  positive at ``score >= threshold``): PR-AUC next to the prevalence (its floor), ROC-AUC,
  sensitivity, specificity.

A slice classifier (``output_kind == "classification"``, e.g. ``resnet18_classifier``) gets
the same slice- and vertebra-level detection figures on the same split and the same
vertebra truth (vertebra score = its highest slice score; threshold maximising Youden's J on
validation), so segmentation and classification compare side by side.

Writes ``metrics.json`` and ``per_vertebra.csv`` to ``out`` and logs the figures (and both
files) to the evaluated MLflow run when the model reference is a run.
"""

from __future__ import annotations

import csv
import json
import os
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from vfsearch.adapters import progress, tracking
from vfsearch.adapters import volumes as io
from vfsearch.adapters.files import atomic_path
from vfsearch.adapters.store import Store
from vfsearch.core import fusion, metrics3d
from vfsearch.core.config import Config
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry
from vfsearch.core.inference import (
    LoadedModel,
    ModelCrop,
    combine_maps,
    crop_slice_scores,
    fuse_crops,
    paste_crops,
    vertebra_score,
)
from vfsearch.core.labels import name as vertebra_name
from vfsearch.core.labels import to_verse
from vfsearch.core.windows import PLANE_AXIS
from vfsearch.pipelines.predict import ModelRef, load_model

if TYPE_CHECKING:
    import torch

CSV_COLUMNS = (
    "case_id",
    "vertebra",
    "name",
    "tp",
    "fp",
    "fn",
    "dice",
    "iou",
    "precision",
    "recall",
    "score",
    "gt_positive",
    "pred_positive",
    "gt_voxels",
    "pred_voxels",
    "hd95_mm",
)
SWEEP = np.round(np.arange(1, 100) / 100, 2)  # threshold candidates (mean / max)
SWEEP_VOTE = np.round(np.arange(1, 20) / 20, 2)  # vote: each needs its own combination
BINS = 1000  # probability histogram bins: thresholds are exact on the 0.001 grid


# -- ground truth in the original grid -------------------------------------------------------
@dataclass
class CaseTruth:
    """A case's truth over its region of interest (the crops' bounding box) in the CT grid."""

    case_id: str
    ct_geometry: Geometry
    ct_shape: tuple[int, int, int]
    box: tuple[tuple[int, ...], tuple[int, ...]]  # (lo, hi) z, y, x in the CT grid
    fracture: np.ndarray  # bool, over box
    labels: np.ndarray  # VerSe ids, over box
    cells: np.ndarray  # nearest-vertebra partition of box
    outside: int  # fracture voxels outside box (counted as missed)
    source: str  # "files" | "crops" | "crops+files" (sorted, "+"-joined)

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(*self.box, strict=False))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(self.ct_geometry.spacing[::-1])  # type: ignore[return-value]


def case_truth(store: Store, case_id: str) -> CaseTruth:
    """Fracture mask and vertebra labels of a stored case in its original CT grid.

    Read (and the vertebra cells computed) once per store contents: the result is kept in
    this process and on disk (`TRUTH_CACHE`), keyed by `truth_key`, and every later call (the
    next trial's final validation, an evaluation) loads it from there.
    """
    return TRUTH_CACHE.get(store, case_id)


def _compute_case_truth(store: Store, case_id: str) -> CaseTruth:
    attrs = store.case_attrs(case_id)
    ct_geometry = Geometry.from_dict(attrs["ct_geometry"])
    ct_shape = cast("tuple[int, int, int]", tuple(int(v) for v in attrs["ct_shape"]))
    vids = store.vertebrae(case_id)
    boxes = []
    for vid in vids:
        va = store.vertebra_attrs(case_id, vid)
        b = fusion.box_in_grid(
            Geometry.from_dict(va["geometry"]), va["shape"], ct_geometry, ct_shape
        )
        if b is not None:
            boxes.append(b)
    if not boxes:
        raise UserError(f"{store.path}: case {case_id}: no crop lies inside its CT grid")
    box = (
        tuple(int(v) for v in np.min([b[0] for b in boxes], axis=0)),
        tuple(int(v) for v in np.max([b[1] for b in boxes], axis=0)),
    )
    region = tuple(slice(a, b) for a, b in zip(*box, strict=False))
    source = attrs.get("source") or {}
    used: list[str] = []

    frac_path = source.get("fracture")
    if frac_path and Path(frac_path).exists():
        full = io.read_volume(frac_path, what="fracture mask").array > 0
        used.append("files")
    elif not frac_path and source.get("ct"):
        full = np.zeros(ct_shape, bool)  # ingested without a fracture mask: none
        used.append("files")
    else:
        full = _from_crops(store, case_id, vids, "fracture", ct_geometry, ct_shape) > 0
        used.append("crops")
    if full.shape != ct_shape:
        raise UserError(
            f"{frac_path}: fracture mask shape {full.shape} differs from the CT's "
            f"{ct_shape} recorded in {store.path}"
        )
    outside = int(full.sum() - full[region].sum())
    fracture = np.ascontiguousarray(full[region])
    del full

    lab_path = source.get("vertebrae")
    if lab_path and Path(lab_path).exists() and attrs.get("vertebrae_source") != "boxes":
        labels = to_verse(
            io.read_volume(lab_path, what="vertebra label map").array,
            attrs.get("label_scheme", "verse"),
            source=lab_path,
        )[region]
        used.append("files")
    else:
        labels = _from_crops(store, case_id, vids, "mask", ct_geometry, ct_shape)[region]
        used.append("crops")
    labels = np.ascontiguousarray(labels)
    cells = fusion.nearest_label(labels, ct_geometry.spacing[::-1])
    src = "+".join(sorted(set(used)))
    return CaseTruth(case_id, ct_geometry, ct_shape, box, fracture, labels, cells, outside, src)


def _from_crops(
    store: Store,
    case_id: str,
    vids: Sequence[int],
    name: str,
    ct_geometry: Geometry,
    ct_shape: Sequence[int],
) -> np.ndarray:
    """A crop array of every vertebra mapped back (nearest); ``mask`` gives VerSe ids."""
    items = (
        (
            vid if name == "mask" else 1,
            store.read(case_id, vid, name),
            Geometry.from_dict(store.vertebra_attrs(case_id, vid)["geometry"]),
        )
        for vid in vids
    )
    return paste_crops(items, ct_geometry, ct_shape, resampler=io)


# -- the truth cache ---------------------------------------------------------------------------
TRUTH_FORMAT = 1  # bump when CaseTruth or its computation changes: old entries are not read
TRUTH_MEMORY_BYTES = 1 << 30  # in-process budget (least recently used entries leave first)
ENV_CACHE_DIR = "VFSEARCH_CACHE_DIR"  # the disk cache's folder; "off" (or "0") turns it off


def _truth_inputs(store: Store, case_id: str) -> tuple[bool, bool]:
    """Whether `_compute_case_truth` rebuilds the fracture mask and the labels from the
    stored crops (True) rather than reading source files."""
    attrs = store.case_attrs(case_id)
    source = attrs.get("source") or {}
    frac_path, lab_path = source.get("fracture"), source.get("vertebrae")
    frac_from_files = bool(frac_path and Path(frac_path).exists()) or (
        not frac_path and bool(source.get("ct"))
    )
    lab_from_files = bool(lab_path and Path(lab_path).exists()) and (
        attrs.get("vertebrae_source") != "boxes"
    )
    return not frac_from_files, not lab_from_files


def truth_key(store: Store, case_id: str) -> str:
    """What a case's truth is computed from, hashed: the store's metadata (its fingerprint,
    spacing, margin), the case's and its crops' attributes (grids, source paths), each
    source file's size and modification time, and the stored crops' bytes where the truth
    is rebuilt from them. Any change gives a new key."""
    import hashlib

    attrs = store.case_attrs(case_id)
    vids = store.vertebrae(case_id)
    files = {}
    for name, path in sorted((attrs.get("source") or {}).items()):
        if path:
            try:
                st = os.stat(path)
                files[name] = [path, st.st_size, st.st_mtime_ns]
            except OSError:
                files[name] = [path, None]
    payload = {
        "format": TRUTH_FORMAT,
        "meta": store.meta,
        "case": attrs,
        "vertebrae": {str(v): store.vertebra_attrs(case_id, v) for v in vids},
        "files": files,
    }
    h = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for name, from_crops in zip(("fracture", "mask"), _truth_inputs(store, case_id), strict=True):
        if from_crops:
            for v in vids:
                h.update(np.ascontiguousarray(store.read(case_id, v, name)).tobytes())
    return h.hexdigest()[:32]


def truth_cache_dir() -> Path | None:
    """The disk cache's folder: ``$VFSEARCH_CACHE_DIR/truth`` when set (``off``: no disk
    cache), else ``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/vfsearch/truth``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env is not None:
        off = env.strip().lower() in ("", "0", "off", "false", "no")
        return None if off else Path(env) / "truth"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory to put it in
        return None
    return Path(base) / "vfsearch" / "truth"


class TruthCache:
    """Cases' truth (`CaseTruth`) by `truth_key`: in this process (a byte-bounded LRU, so a
    process that runs trial after trial reads each case once) and in `truth_cache_dir`
    (``<key>.npz``, written atomically; shared by the processes of a node). ``hits`` /
    ``misses`` count where each `get` was answered (``memory``, ``disk``, computed)."""

    def __init__(self, memory_bytes: int = TRUTH_MEMORY_BYTES) -> None:
        from collections import OrderedDict

        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, CaseTruth] = OrderedDict()
        self._used = 0
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    def clear(self) -> None:
        """Forget what this process holds (the disk cache stays)."""
        self._memory.clear()
        self._used = 0

    def get(self, store: Store, case_id: str) -> CaseTruth:
        key = truth_key(store, case_id)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits["memory"] += 1
            return self._memory[key]
        folder = truth_cache_dir()
        path = folder / f"{key}.npz" if folder is not None else None
        truth = _load_truth(path) if path is not None and path.is_file() else None
        if truth is not None:
            self.hits["disk"] += 1
        else:
            self.misses += 1
            truth = _compute_case_truth(store, case_id)
            if path is not None:
                _save_truth(path, truth)
        for arr in (truth.fracture, truth.labels, truth.cells):
            arr.setflags(write=False)  # shared by every caller: read-only
        self._keep(key, truth)
        return truth

    def _keep(self, key: str, truth: CaseTruth) -> None:
        size = truth.fracture.nbytes + truth.labels.nbytes + truth.cells.nbytes
        if size > self.memory_bytes:
            return
        while self._memory and self._used + size > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._used -= old.fracture.nbytes + old.labels.nbytes + old.cells.nbytes
        self._memory[key] = truth
        self._used += size


def _save_truth(path: Path, truth: CaseTruth) -> None:
    head = {
        "case_id": truth.case_id,
        "ct_geometry": truth.ct_geometry.to_dict(),
        "ct_shape": list(truth.ct_shape),
        "box": [list(truth.box[0]), list(truth.box[1])],
        "outside": truth.outside,
        "source": truth.source,
    }
    try:
        with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                head=np.frombuffer(json.dumps(head).encode(), np.uint8),
                fracture=truth.fracture,
                labels=truth.labels,
                cells=truth.cells,
            )
    except OSError:  # a read-only or full disk: the cache is an optimisation only
        pass


def _load_truth(path: Path) -> CaseTruth | None:
    try:
        with np.load(path) as z:
            head = json.loads(z["head"].tobytes().decode())
            return CaseTruth(
                head["case_id"],
                Geometry.from_dict(head["ct_geometry"]),
                cast("tuple[int, int, int]", tuple(int(v) for v in head["ct_shape"])),
                (tuple(head["box"][0]), tuple(head["box"][1])),
                z["fracture"],
                z["labels"],
                z["cells"],
                int(head["outside"]),
                str(head["source"]),
            )
    # unreadable, corrupt or half-written: compute again
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None


TRUTH_CACHE = TruthCache()


# -- one case ------------------------------------------------------------------------------
@dataclass
class VertebraResult:
    vid: int
    score: float
    gt_voxels: int
    curve: np.ndarray  # (n_thresholds, 3) TP, FP, FN in the vertebra's cell
    hd95: float = float("nan")


@dataclass
class CaseResult:
    case_id: str
    thresholds: np.ndarray
    vertebrae: list[VertebraResult]
    curve: np.ndarray  # (n_thresholds, 3) over the whole CT
    source: str
    slice_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))
    slice_scores: list[float] = field(default_factory=list)
    slice_labels: list[bool] = field(default_factory=list)


def _hist_curve(prob: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """TP/FP/FN of ``prob >= t`` for each threshold (on the 1/BINS grid), from histograms."""
    idx = np.clip(np.floor(prob.astype(np.float64) * BINS + 1e-9).astype(np.int64), 0, BINS - 1)
    pos = np.bincount(idx[truth], minlength=BINS)
    neg = np.bincount(idx[~truth], minlength=BINS)
    above_pos = np.cumsum(pos[::-1])[::-1]  # above_pos[k]: positives with bin >= k
    above_neg = np.cumsum(neg[::-1])[::-1]
    ks = np.clip(np.rint(np.asarray(thresholds) * BINS).astype(np.int64), 0, BINS - 1)
    tp, fp = above_pos[ks], above_neg[ks]
    return np.stack([tp, fp, pos.sum() - tp], axis=1).astype(np.int64)


def evaluate_case(
    models: Sequence[LoadedModel],
    store: Store,
    case_id: str,
    thresholds: Sequence[float] | np.ndarray,
    *,
    combine: str = "mean",
    details: bool = False,
    hd95: bool = False,
    batch_size: int = 16,
    bar: Any = None,
) -> CaseResult:
    """Fused prediction of one stored case scored against its truth in the original grid.

    Returns TP/FP/FN per vertebra and for the whole case at each of ``thresholds``. With
    ``details`` (a single threshold), also 2D slice counts and slice scores in the crop grid
    and, with ``hd95``, the 95 % Hausdorff distance per fractured vertebra. ``bar`` (see
    `vertebra_bar`) advances by one per vertebra predicted.
    """
    thresholds = np.round(np.asarray(thresholds, dtype=np.float64), 3)
    truth = case_truth(store, case_id)
    axis = PLANE_AXIS[models[0].plane]
    all_vids = store.vertebrae(case_id)
    crops = [
        ModelCrop(
            vid,
            store.read(case_id, vid, "image"),
            Geometry.from_dict(store.vertebra_attrs(case_id, vid)["geometry"]),
        )
        for vid in all_vids
    ]

    def tick(done: int, total: int) -> None:
        if done:
            _tick(bar, case_id, all_vids[done - 1])

    fused = fuse_crops(
        models,
        crops,
        truth.ct_geometry,
        truth.ct_shape,
        resampler=io,
        batch_size=batch_size,
        progress=tick,
    )
    del crops
    slice_rows: list[np.ndarray] = []
    slice_scores: list[float] = []
    slice_labels: list[bool] = []
    if details:
        for vid in all_vids:
            frac = store.read(case_id, vid, "fracture") > 0
            p_sl = fusion.volume_to_slices(fused.probs[vid], axis)
            f_sl = fusion.volume_to_slices(frac, axis)
            pred = p_sl >= thresholds[0]
            tp = np.count_nonzero(pred & f_sl, axis=(1, 2))
            slice_rows.append(
                np.stack(
                    [
                        tp,
                        np.count_nonzero(pred, axis=(1, 2)) - tp,
                        np.count_nonzero(f_sl, axis=(1, 2)) - tp,
                    ],
                    axis=1,
                )
            )
            slice_scores += p_sl.reshape(len(p_sl), -1).max(axis=1).tolist()
            slice_labels += cast("list[bool]", f_sl.reshape(len(f_sl), -1).any(axis=1).tolist())

    maps, box = fused.maps, truth.box  # box: the crops' bounding box in the CT grid
    vids = [m.vid for m in maps]
    results: list[VertebraResult] = []
    if combine == "vote":
        masks = [combine_maps(maps, box, "vote", float(t)).mask() > 0 for t in thresholds]
        # the vertebra score ranks by probability, not by a thresholded vote
        prob_for_score = combine_maps(maps, box, "mean", 0.5).result()
        case_curve = np.array([metrics3d.counts(m, truth.fracture) for m in masks])
    else:
        acc = combine_maps(maps, box, combine, 0.5)
        prob_for_score = acc.result()
        masks = None
        case_curve = _hist_curve(prob_for_score, truth.fracture, thresholds)
    case_curve[:, 2] += truth.outside
    for vid in vids:
        cell = truth.cells == vid
        score = vertebra_score(prob_for_score, truth.labels, truth.cells, vid)
        if masks is None:
            curve = _hist_curve(prob_for_score[cell], truth.fracture[cell], thresholds)
        else:
            curve = np.array([metrics3d.counts(m, truth.fracture, cell) for m in masks])
        r = VertebraResult(vid, score, int(np.count_nonzero(truth.fracture[cell])), curve)
        if hd95 and details:
            mask = masks[0] if masks is not None else prob_for_score >= thresholds[0]
            r.hd95 = metrics3d.hausdorff95(mask & cell, truth.fracture & cell, truth.spacing_zyx)
        results.append(r)
    out = CaseResult(case_id, thresholds, results, case_curve, truth.source)
    if details:
        out.slice_counts = np.concatenate(slice_rows) if slice_rows else np.zeros((0, 3), np.int64)
        out.slice_scores, out.slice_labels = slice_scores, slice_labels
    return out


def vertebra_bar(store: Store, case_ids: Sequence[str], desc: str) -> Any:
    """A progress bar over every vertebra of ``case_ids`` (silent off a terminal), for the
    ``bar`` argument of `evaluate_case` and `classify_case`."""
    return progress.bar(
        desc=desc, unit="vertebra", total=sum(len(store.vertebrae(c)) for c in case_ids)
    )


def _tick(bar: Any, case_id: str, vid: int) -> None:
    if bar is not None:
        bar.set_postfix_str(f"{case_id} {vertebra_name(vid)}", refresh=False)
        bar.update(1)


# -- the threshold --------------------------------------------------------------------------
def choose_threshold(
    models: Sequence[LoadedModel],
    store: Store,
    split: str = "val",
    *,
    combine: str = "mean",
    batch_size: int = 16,
    cases: Sequence[str] | None = None,
) -> tuple[float, float, list[CaseResult]]:
    """The threshold maximising pooled 3D Dice on ``split``; returns (t, Dice, case results)."""
    ids = list(cases) if cases is not None else store.case_ids(split)
    if not ids:
        raise UserError(
            f"{store.path}: no complete cases in split {split!r} to choose the "
            f"threshold on (pass --threshold)"
        )
    candidates = SWEEP_VOTE if combine == "vote" else SWEEP
    results = shared_case_results(
        models,
        store,
        ids,
        candidates,
        combine=combine,
        batch_size=batch_size,
        desc=f"threshold ({split})",
    )
    t, d = pooled_best_threshold(results)
    return t, d, results


def pooled_best_threshold(results: Sequence[CaseResult]) -> tuple[float, float]:
    """The candidate threshold (of the results' common ``thresholds``) maximising 3D Dice of
    the counts pooled over ``results``, and that Dice."""
    pooled = np.sum([r.curve for r in results], axis=0)
    dice = [metrics3d.overlap(*row)["dice"] for row in pooled]
    return metrics3d.best_threshold(results[0].thresholds, dice)


def _per_case(k: int | Sequence[int], n: int) -> list[int]:
    ks = [int(k)] * n if isinstance(k, (int, np.integer)) else [int(v) for v in k]
    if len(ks) != n:
        raise ValueError(f"{len(ks)} threshold indices for {n} case results")
    return ks


def _best_index(results: Sequence[CaseResult], candidates: np.ndarray) -> int:
    """Index of the candidate maximising pooled 3D Dice over ``results``."""
    pooled = np.sum([r.curve for r in results], axis=0)
    t, _ = metrics3d.best_threshold(candidates, [metrics3d.overlap(*row)["dice"] for row in pooled])
    return int(np.argmin(np.abs(candidates - t)))


def crossfit_indices(results: Sequence[CaseResult], fixed: float = 0.5) -> list[int]:
    """Per-case threshold indices, each chosen on cases it is not scored on (2-fold).

    The cases (in the given order) are dealt into two halves, alternately; the threshold
    that maximises pooled 3D Dice on one half is applied to the other, and the other way
    round. Pooled over both halves, the figures are honest: no case is scored at a threshold
    tuned on it. With a single case there is nothing to cross with: the ``fixed`` threshold
    (nearest candidate) is used.
    """
    if not results:
        return []
    candidates = np.asarray(results[0].thresholds)
    if len(results) < 2:
        return [int(np.argmin(np.abs(candidates - fixed)))]
    halves = (list(range(0, len(results), 2)), list(range(1, len(results), 2)))
    ks = [0] * len(results)
    for scored, tuned in (halves, halves[::-1]):
        k = _best_index([results[i] for i in tuned], candidates)
        for i in scored:
            ks[i] = k
    return ks


def rows_at(results: Sequence[CaseResult], k: int | Sequence[int] = 0) -> list[dict[str, Any]]:
    """Per-vertebra rows (the CSV's) at threshold index ``k`` of each case result (one index
    for every case, or one per case as cross-fitting gives)."""
    rows = []
    for cr, kc in zip(results, _per_case(k, len(results)), strict=True):
        threshold = float(cr.thresholds[kc])
        for v in cr.vertebrae:
            tp, fp, fn = (int(x) for x in v.curve[kc])
            s = metrics3d.overlap(tp, fp, fn)
            rows.append(
                {
                    "case_id": cr.case_id,
                    "vertebra": v.vid,
                    "name": vertebra_name(v.vid),
                    "tp": tp,
                    "fp": fp,
                    "fn": fn,
                    **{key: round(val, 6) for key, val in s.items()},
                    "score": round(v.score, 6),
                    "gt_positive": v.gt_voxels > 0,
                    "pred_positive": v.score >= threshold,
                    "gt_voxels": v.gt_voxels,
                    "pred_voxels": tp + fp,
                    "hd95_mm": v.hd95,
                }
            )
    return rows


def segmentation_metrics(
    results: Sequence[CaseResult],
    *,
    k: int | Sequence[int] = 0,
    prefix: str = "",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Flat figures at threshold index ``k`` (one for all cases, or one per case):
    pooled / mean 3D overlap, detection, CIs. ``threshold3d`` is the median of the cases'
    thresholds (the threshold itself when there is one)."""
    ks = _per_case(k, len(results))
    rows = rows_at(results, ks)
    thresholds = [float(r.thresholds[kk]) for r, kk in zip(results, ks, strict=True)]
    threshold = float(np.median(thresholds)) if results else float("nan")
    pooled = (
        np.sum([r.curve[kk] for r, kk in zip(results, ks, strict=True)], axis=0)
        if results
        else np.zeros(3)
    )
    s = metrics3d.overlap(*pooled)
    summ = metrics3d.summarize(rows)
    det = (
        metrics3d.detection([r["score"] for r in rows], [r["gt_positive"] for r in rows], threshold)
        if rows
        else {}
    )
    if rows:  # sensitivity / specificity at each case's own threshold
        pos = np.array([r["gt_positive"] for r in rows], bool)
        hit = np.array([r["pred_positive"] for r in rows], bool)
        det["sensitivity"] = float((hit & pos).sum() / pos.sum()) if pos.any() else float("nan")
        det["specificity"] = (
            float((~hit & ~pos).sum() / (~pos).sum()) if (~pos).any() else float("nan")
        )
    out = {
        "dice3d": s["dice"],
        "iou3d": s["iou"],
        "precision3d": s["precision"],
        "recall3d": s["recall"],
        "dice3d_mean": summ.get("mean_dice", float("nan")),
        "iou3d_mean": summ.get("mean_iou", float("nan")),
        "recall3d_mean": summ.get("mean_recall", float("nan")),
        "precision3d_mean": summ.get("mean_precision", float("nan")),
        "dice3d_mean_all": summ.get("mean_dice_all", float("nan")),
        "threshold3d": threshold,
        "tp": float(pooled[0]),
        "fp": float(pooled[1]),
        "fn": float(pooled[2]),
        "cases": float(len(results)),
        "vertebrae": float(len(rows)),
        **{f"vertebra_{k2}": float(v) for k2, v in det.items()},
    }
    if n_boot > 0 and rows:
        case_rows = [
            {
                "case_id": cr.case_id,
                "tp": int(cr.curve[kk][0]),
                "fp": int(cr.curve[kk][1]),
                "fn": int(cr.curve[kk][2]),
            }
            for cr, kk in zip(results, ks, strict=True)
        ]
        # pooled Dice: whole-case counts; mean Dice: vertebra rows; both resample cases
        out["dice3d_ci_low"], out["dice3d_ci_high"] = metrics3d.bootstrap_ci(
            case_rows, metrics3d.pooled_dice, n_boot=n_boot, seed=seed
        )
        out["dice3d_mean_ci_low"], out["dice3d_mean_ci_high"] = metrics3d.bootstrap_ci(
            rows, metrics3d.mean_dice, n_boot=n_boot, seed=seed
        )
    hd = [r["hd95_mm"] for r in rows if np.isfinite(r["hd95_mm"])]
    if hd:
        out["hd95_mm_mean"] = float(np.mean(hd))
    return {f"{prefix}{key}": float(v) for key, v in out.items()}


def slice_metrics(
    results: Sequence[CaseResult], threshold: float, prefix: str = ""
) -> dict[str, float]:
    """2D slice-level overlap (crop grid) and slice detection of detailed case results."""
    counts = np.concatenate([r.slice_counts for r in results]) if results else np.zeros((0, 3))
    out: dict[str, float] = {}
    if len(counts):
        s = metrics3d.overlap(*counts.sum(axis=0))
        pos = counts[:, 0] + counts[:, 2] > 0
        per = [metrics3d.overlap(*c)["dice"] for c in counts[pos]]
        out.update(
            dice2d=s["dice"],
            iou2d=s["iou"],
            dice2d_mean=float(np.mean(per)) if per else float("nan"),
        )
    scores = [s for r in results for s in r.slice_scores]
    labels = [y for r in results for y in r.slice_labels]
    if scores:
        out.update(
            {
                f"slice_{k}": float(v)
                for k, v in metrics3d.detection(scores, labels, threshold).items()
            }
        )
    return {f"{prefix}{k}": v for k, v in out.items()}


# -- classifier baseline ----------------------------------------------------------------------
@dataclass
class ClassifierCase:
    case_id: str
    vertebrae: list[tuple[int, float, int]]  # (vid, score = max slice score, gt voxels)
    slice_scores: list[float]
    slice_labels: list[bool]


def classify_case(
    lm: LoadedModel, store: Store, case_id: str, batch_size: int = 32, bar: Any = None
) -> ClassifierCase:
    """Slice scores of every crop and vertebra scores (max slice score) with 3D truth;
    ``bar`` (see `vertebra_bar`) advances by one per vertebra."""
    truth = case_truth(store, case_id)
    axis = PLANE_AXIS[lm.plane]
    verts: list[tuple[int, float, int]] = []
    scores: list[float] = []
    labels: list[bool] = []
    for vid in store.vertebrae(case_id):
        s = crop_slice_scores(lm, store.read(case_id, vid, "image"), batch_size=batch_size)
        frac = fusion.volume_to_slices(store.read(case_id, vid, "fracture") > 0, axis)
        scores += s.tolist()
        labels += cast("list[bool]", frac.reshape(len(frac), -1).any(axis=1).tolist())
        verts.append(
            (vid, float(s.max()), int(np.count_nonzero(truth.fracture[truth.cells == vid])))
        )
        _tick(bar, case_id, vid)
    return ClassifierCase(case_id, verts, scores, labels)


def _classify_all(
    lm: LoadedModel, store: Store, case_ids: Sequence[str], desc: str, batch_size: int = 32
) -> list[ClassifierCase]:
    with vertebra_bar(store, case_ids, desc) as bar:
        return [classify_case(lm, store, c, batch_size, bar=bar) for c in case_ids]


def _youden_threshold(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Score threshold maximising sensitivity + specificity - 1 (ties: closest to 0.5)."""
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    if not y.any() or y.all():
        return 0.5
    cands = np.unique(s)
    j = [((s >= t) & y).sum() / y.sum() + ((s < t) & ~y).sum() / (~y).sum() - 1 for t in cands]
    return metrics3d.best_threshold(cands, j)[0]


def classifier_metrics(
    cases: Sequence[ClassifierCase], threshold: float, prefix: str = ""
) -> dict[str, float]:
    v_scores = [s for c in cases for _, s, _ in c.vertebrae]
    v_labels = [g > 0 for c in cases for _, _, g in c.vertebrae]
    out = {
        f"vertebra_{k}": float(v)
        for k, v in metrics3d.detection(v_scores, v_labels, threshold).items()
    }
    out.update(
        {
            f"slice_{k}": float(v)
            for k, v in metrics3d.detection(
                [s for c in cases for s in c.slice_scores],
                [y for c in cases for y in c.slice_labels],
                threshold,
            ).items()
        }
    )
    out.update(threshold=float(threshold), cases=float(len(cases)), vertebrae=float(len(v_scores)))
    return {f"{prefix}{k}": v for k, v in out.items()}


# -- the command ----------------------------------------------------------------------------
def evaluate(
    model_ref: ModelRef,
    store: str | os.PathLike | Store,
    *,
    split: str = "test",
    out: str | os.PathLike = "evaluation",
    threshold: float | None = None,
    combine: str = "mean",
    hd95: bool = False,
    val_split: str = "val",
    device: str | torch.device | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    seed: int = 0,
    log_to_run: bool = True,
    workdir: str | os.PathLike = "mlruns",
    echo: Callable[[str], Any] = lambda _m: None,
) -> dict[str, Any]:
    """Evaluate ``model_ref`` on ``split`` of ``store``; write ``metrics.json`` and
    ``per_vertebra.csv`` to ``out``; log to the MLflow run if the reference is one.

    ``threshold``: fixed probability threshold; None chooses it on ``val_split`` (maximum
    pooled 3D Dice; for a classifier: maximum Youden J of vertebra detection). ``combine``:
    ``mean`` | ``max`` | ``vote`` over overlapping crops. ``hd95``: also the 95 % Hausdorff
    distance (mm) per fractured vertebra. ``workdir``: the embedded MLflow server's folder
    (run ids, logging). Returns the metrics dict (``flat`` holds the
    figures with ``<split>_`` prefixes, as logged to MLflow).
    """
    if combine not in fusion.COMBINE_METHODS:
        raise UserError(
            f"--combine: must be one of {', '.join(fusion.COMBINE_METHODS)}, got {combine!r}"
        )
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold: must be between 0 and 1, got {threshold}")
    st = store if isinstance(store, Store) else Store(store)
    st.meta  # noqa: B018 - raises UserError when the path is not a store
    ids = st.case_ids(split)
    if not ids:
        raise UserError(f"{st.path}: no complete cases in split {split!r}")
    t0 = time.perf_counter()
    models = load_model(model_ref, device=device, store=st, workdir=workdir)
    kinds = {m.kind for m in models}
    if len(kinds) > 1:
        raise UserError("--model: cannot mix segmenters and classifiers")
    report: dict[str, Any] = {
        "split": split,
        "store": st.path,
        "combine": combine,
        "model": [m.source for m in models],
        "cases": ids,
    }
    prefix = f"{split}_"
    if kinds == {"classification"}:
        lm = models[0]
        if threshold is None:
            echo(f"choosing the vertebra threshold on {val_split} (Youden J)")
            val = _classify_all(
                lm, st, st.case_ids(val_split), f"threshold ({val_split})", batch_size
            )
            threshold = _youden_threshold(
                [s for c in val for _, s, _ in c.vertebrae],
                [g > 0 for c in val for _, _, g in c.vertebrae],
            )
            report["threshold_source"] = f"{val_split} (Youden J of vertebra detection)"
        else:
            report["threshold_source"] = "given"
        echo(f"classifying {len(ids)} {split} case(s)")
        cases = _classify_all(lm, st, ids, f"evaluate ({split})", batch_size)
        flat = classifier_metrics(cases, threshold, prefix)
        rows = [
            {
                "case_id": c.case_id,
                "vertebra": vid,
                "score": round(s, 6),
                "gt_positive": g > 0,
                "pred_positive": s >= threshold,
                "gt_voxels": g,
            }
            for c in cases
            for vid, s, g in c.vertebrae
        ]
        report.update(kind="classification", threshold=threshold)
    else:
        case_thresholds: list[float] | None = None
        if threshold is None:
            echo(f"choosing the threshold on {val_split} (pooled 3D Dice)")
            threshold, val_dice, val_results = choose_threshold(
                models, st, val_split, combine=combine, batch_size=batch_size
            )
            report["threshold_source"] = f"{val_split} (maximum pooled 3D Dice)"
            report["val_dice3d_tuned"] = val_dice
            if split == val_split:  # never score a case at a threshold tuned on it
                case_thresholds = [
                    float(r.thresholds[k])
                    for r, k in zip(val_results, crossfit_indices(val_results), strict=True)
                ]
                report["threshold_source"] += (
                    f"; the {split} figures are scored at thresholds cross-fitted on its halves"
                )
        else:
            report["threshold_source"] = "given"
        echo(f"evaluating {len(ids)} {split} case(s) at threshold {threshold:.2f}")
        by_case = (
            dict(zip(st.case_ids(val_split), case_thresholds, strict=True))
            if case_thresholds
            else {}
        )
        with vertebra_bar(st, ids, f"evaluate ({split})") as bar:
            results = [
                evaluate_case(
                    models,
                    st,
                    c,
                    [by_case.get(c, threshold)],
                    combine=combine,
                    details=True,
                    hd95=hd95,
                    batch_size=batch_size,
                    bar=bar,
                )
                for c in ids
            ]
        flat = segmentation_metrics(results, prefix=prefix, n_boot=n_boot, seed=seed)
        flat.update(slice_metrics(results, threshold, prefix))
        rows = rows_at(results)
        report.update(
            kind="segmentation",
            threshold=float(np.round(threshold, 3)),
            gt_source=sorted({r.source for r in results}),
            per_case=[
                {
                    "case_id": r.case_id,
                    "threshold": float(r.thresholds[0]),
                    **{k: int(v) for k, v in zip(("tp", "fp", "fn"), r.curve[0], strict=False)},
                    **metrics3d.overlap(*r.curve[0]),
                }
                for r in results
            ],
        )
        if "val_dice3d_tuned" in report:  # optimistic (selected on val): a reference only
            flat[f"{val_split}_dice3d_tuned"] = float(report["val_dice3d_tuned"])
    flat[f"{prefix}seconds"] = time.perf_counter() - t0
    report["flat"] = flat
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = _atomic_text(
        out_dir / "metrics.json", json.dumps(_jsonable(report), indent=2) + "\n"
    )
    csv_path = _write_csv(out_dir / "per_vertebra.csv", rows)
    report["files"] = [str(metrics_path), str(csv_path)]
    run_id = models[0].run_id if len(models) == 1 else None
    if log_to_run and run_id:
        tracker = tracking.Tracker(tracking.tracking_uri(workdir))
        tracker.log_metrics(run_id, flat, step=0)
        tracker.set_tags(
            run_id,
            {f"eval.{split}.threshold": report["threshold"], f"eval.{split}.combine": combine},
        )
        for p in (metrics_path, csv_path):
            tracker.log_artifact(run_id, p, f"evaluation/{split}")
        report["logged_to_run"] = run_id
    return report


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _atomic_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: ("" if isinstance(v, float) and not np.isfinite(v) else v)
                    for k, v in r.items()
                }
            )
    return path


def format_report(report: dict[str, Any]) -> str:
    """The terminal table of an `evaluate` report."""
    f = report["flat"]
    p = f"{report['split']}_"

    def g(key: str) -> str:
        v = f.get(p + key)
        return "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"

    lines = [
        (
            f"{report['kind']} model on {report['split']} ({len(report['cases'])} cases), "
            f"threshold {report['threshold']:.3f} from {report['threshold_source']}"
        )
    ]
    if report["kind"] == "segmentation":
        lines += [
            f"{'3D (original grid)':<22}{'Dice':>8}{'IoU':>8}{'prec.':>8}{'recall':>8}",
            (
                f"{'  pooled (micro)':<22}{g('dice3d'):>8}{g('iou3d'):>8}"
                f"{g('precision3d'):>8}{g('recall3d'):>8}"
            ),
            (
                f"{'  mean, fractured':<22}{g('dice3d_mean'):>8}{g('iou3d_mean'):>8}"
                f"{g('precision3d_mean'):>8}{g('recall3d_mean'):>8}"
            ),
            (
                f"  95% CI pooled Dice [{g('dice3d_ci_low')}, {g('dice3d_ci_high')}], "
                f"mean Dice [{g('dice3d_mean_ci_low')}, {g('dice3d_mean_ci_high')}]"
            ),
            (
                f"{'2D slices':<22}{g('dice2d'):>8}{g('iou2d'):>8}   (mean Dice over fractured "
                f"slices {g('dice2d_mean')})"
            ),
        ]
        if p + "hd95_mm_mean" in f:
            lines.append(f"  HD95 mean {f[p + 'hd95_mm_mean']:.2f} mm")
    for level in ("vertebra", "slice"):
        if p + f"{level}_pr_auc" in f:
            lines.append(
                f"{level + ' detection':<22}PR-AUC {g(level + '_pr_auc')} (prevalence "
                f"{g(level + '_prevalence')}), ROC-AUC {g(level + '_roc_auc')}, sens "
                f"{g(level + '_sensitivity')}, spec {g(level + '_specificity')}"
            )
    lines += [f"wrote {x}" for x in report.get("files", [])]
    if report.get("logged_to_run"):
        lines.append(f"logged to MLflow run {report['logged_to_run']}")
    return "\n".join(lines)


# -- the fused validation shared by training workers ----------------------------------------
SOURCES = ("crops", "files", "crops+files")  # CaseResult.source, coded as its index


def shard_cases(sizes: Sequence[int], world: int) -> list[list[int]]:
    """Case indices per rank: disjoint, together all of them, balanced by ``sizes`` (the
    number of vertebrae: the fusion's work), largest first to the least loaded rank; each
    rank's indices in increasing order. Deterministic, so every rank computes the same."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += max(1, int(sizes[i]))
    return [sorted(idx) for idx in out]


Layout = Sequence[tuple[str, Sequence[int]]]  # (case id, its stored vertebrae) in split order


def _block_size(n_vertebrae: int, n_thresholds: int) -> int:
    # case: present, source, curve; per vertebra: present, score, gt voxels, hd95, curve
    return 2 + 3 * n_thresholds + n_vertebrae * (4 + 3 * n_thresholds)


def pack_results(results: dict[int, CaseResult], layout: Layout, n_thresholds: int) -> np.ndarray:
    """The case results of some cases (by index into ``layout``) as one float64 vector with a
    slot for every case of ``layout`` (zeros where a case is not among ``results``), so that
    vectors of disjoint shards summed (an all-reduce) hold every case exactly: each value
    comes from one rank and is added to zeros only."""
    sizes = [_block_size(len(vids), n_thresholds) for _, vids in layout]
    vec = np.zeros(sum(sizes), np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    for i, r in results.items():
        cid, vids = layout[i]
        if r.case_id != cid or len(r.thresholds) != n_thresholds:
            raise ValueError(f"case result {r.case_id} does not fit slot {i} ({cid})")
        at = int(starts[i])
        vec[at] = 1.0
        vec[at + 1] = SOURCES.index(r.source) if r.source in SOURCES else -1
        vec[at + 2 : at + 2 + 3 * n_thresholds] = r.curve.ravel()
        at += 2 + 3 * n_thresholds
        by_vid = {v.vid: v for v in r.vertebrae}
        for vid in vids:
            v = by_vid.get(vid)
            if v is not None:
                vec[at : at + 4] = (1.0, v.score, v.gt_voxels, v.hd95)
                vec[at + 4 : at + 4 + 3 * n_thresholds] = v.curve.ravel()
            at += 4 + 3 * n_thresholds
    return vec


def unpack_results(vec: np.ndarray, layout: Layout, thresholds: np.ndarray) -> list[CaseResult]:
    """The case results `pack_results` vectors (summed over ranks) hold, in ``layout``
    order; every case must be there."""
    thresholds = np.asarray(thresholds, np.float64)
    n = len(thresholds)
    out = []
    at = 0
    for cid, vids in layout:
        if vec[at] != 1.0:
            raise ValueError(f"case {cid}: no rank (or more than one) evaluated it")
        code = int(vec[at + 1])
        curve = np.rint(vec[at + 2 : at + 2 + 3 * n]).astype(np.int64).reshape(n, 3)
        at += 2 + 3 * n
        verts = []
        for vid in vids:
            if vec[at] == 1.0:
                verts.append(
                    VertebraResult(
                        int(vid),
                        float(vec[at + 1]),
                        int(round(vec[at + 2])),
                        np.rint(vec[at + 4 : at + 4 + 3 * n]).astype(np.int64).reshape(n, 3),
                        float(vec[at + 3]),
                    )
                )
            at += 4 + 3 * n
        source = SOURCES[code] if 0 <= code < len(SOURCES) else "unknown"
        out.append(CaseResult(cid, thresholds.copy(), verts, curve, source))
    return out


def shared_case_results(
    models: Sequence[LoadedModel],
    store: Store,
    case_ids: Sequence[str],
    candidates: np.ndarray,
    *,
    rank: int = 0,
    world: int = 1,
    all_sum: Callable[[Any], Any] | None = None,
    combine: str = "mean",
    batch_size: int = 16,
    desc: str = "fused validation",
) -> list[CaseResult]:
    """`evaluate_case` of every case of ``case_ids`` at the ``candidates``, the work shared by
    ``world`` ranks: this rank evaluates its share (`shard_cases`), the shares are packed
    (`pack_results`), summed over the ranks by ``all_sum`` (a collective every rank calls:
    e.g. `vfsearch.pipelines.train.loop.all_summer`) and unpacked, so every rank returns every
    case's results, in ``case_ids`` order, as one process would have computed them."""
    if world <= 1:
        with vertebra_bar(store, case_ids, desc) as bar:
            return [
                evaluate_case(
                    models, store, c, candidates, combine=combine, batch_size=batch_size, bar=bar
                )
                for c in case_ids
            ]
    if all_sum is None:
        raise ValueError("sharing the fused validation needs all_sum (a sum over the ranks)")
    layout = [(c, store.vertebrae(c)) for c in case_ids]
    mine = shard_cases([len(v) for _, v in layout], world)[rank]
    with vertebra_bar(store, [case_ids[i] for i in mine], desc) as bar:
        local = {
            i: evaluate_case(
                models,
                store,
                case_ids[i],
                candidates,
                combine=combine,
                batch_size=batch_size,
                bar=bar,
            )
            for i in mine
        }
    vec = pack_results(local, layout, len(candidates))
    summed = np.asarray(all_sum(vec), dtype=np.float64)
    return unpack_results(summed, layout, np.round(np.asarray(candidates, np.float64), 3))


# -- end of training -------------------------------------------------------------------------
def fused_validation_metrics(
    model: torch.nn.Module | LoadedModel | list[LoadedModel] | tuple[LoadedModel, ...],
    store: str | os.PathLike | Store,
    config: Config | None = None,
    *,
    split: str = "val",
    combine: str = "mean",
    batch_size: int = 16,
    max_cases: int | None = None,
    fixed_threshold: float = 0.5,
    rank: int = 0,
    world: int = 1,
    all_sum: Callable[[Any], Any] | None = None,
) -> dict[str, float]:
    """Fused 3D figures of a trained model (or an ensemble) on ``split``, for selection.

    ``model``: a trained module with its `vfsearch.core.config.Config` in ``config`` (eval mode is
    set here; it stays on its device), or a `LoadedModel`, or a list of them (an ensemble:
    their maps are averaged). Keys carry the ``<split>_`` prefix. Segmenters:

    * ``val_dice3d`` (what a sweep ranks by and export promotes by), ``val_iou3d``,
      ``val_precision3d``, ``val_recall3d``, ``val_dice3d_mean`` and the vertebra detection
      figures are scored at thresholds **cross-fitted** on halves of the split
      (`crossfit_indices`): no case is scored at a threshold tuned on it (one case alone:
      ``fixed_threshold``);
    * ``val_threshold3d`` is the deployment threshold, chosen on the whole split (maximum
      pooled 3D Dice over 0.01..0.99) and stored with the model; ``val_dice3d_tuned`` is the
      Dice at it, optimistic by construction (selected on the cases it scores), logged for
      reference and never used to select anything.

    ``rank`` / ``world`` / ``all_sum``: training workers sharing the work (every rank calls
    this with the same arguments; see `shared_case_results`); each rank fuses only its share
    of the cases, and every rank returns the same figures, from every case's counts.
    Classifiers: vertebra/slice detection at 0.5, computed by rank 0 alone (the other ranks
    return ``{}``).
    """
    st = store if isinstance(store, Store) else Store(store)
    if isinstance(model, LoadedModel):
        models = [model]
    elif isinstance(model, (list, tuple)):
        models = list(model)
    else:
        meta = st.meta
        # a bare module comes with its config (the caller's contract, as in training)
        models = [
            LoadedModel(
                model.eval(),
                config,  # type: ignore[arg-type]
                st.fingerprint,
                tuple(meta["spacing"]),
                float(meta["margin_mm"]),
                source="training run",
            )
        ]
    ids = st.case_ids(split)[: max_cases or None]
    if not ids:
        return {}
    prefix = f"{split}_"
    if models[0].kind == "classification":
        if rank != 0:
            return {}
        cases = _classify_all(models[0], st, ids, f"fused validation ({split})")
        return classifier_metrics(cases, 0.5, prefix)
    results = shared_case_results(
        models,
        st,
        ids,
        SWEEP_VOTE if combine == "vote" else SWEEP,
        rank=rank,
        world=world,
        all_sum=all_sum,
        combine=combine,
        batch_size=batch_size,
        desc=f"fused validation ({split})",
    )
    t, tuned_dice = pooled_best_threshold(results)
    flat = segmentation_metrics(
        results, k=crossfit_indices(results, fixed_threshold), prefix=prefix, n_boot=0
    )
    flat[f"{prefix}threshold3d"] = float(t)
    flat[f"{prefix}dice3d_tuned"] = float(tuned_dice)
    for key in ("tp", "fp", "fn"):  # 3D voxel counts; <split>_tp etc. are training's 2D ones
        flat[f"{prefix}{key}3d"] = flat.pop(f"{prefix}{key}")
    return flat


__all__ = [
    "CSV_COLUMNS",
    "TRUTH_CACHE",
    "CaseResult",
    "CaseTruth",
    "TruthCache",
    "case_truth",
    "choose_threshold",
    "classifier_metrics",
    "crossfit_indices",
    "classify_case",
    "evaluate",
    "evaluate_case",
    "format_report",
    "fused_validation_metrics",
    "pack_results",
    "pooled_best_threshold",
    "shard_cases",
    "shared_case_results",
    "truth_cache_dir",
    "truth_key",
    "unpack_results",
    "rows_at",
    "segmentation_metrics",
    "slice_metrics",
    "vertebra_bar",
]
