"""``vfsearch ingest``: CT + vertebra labels (+ fracture masks) into a Zarr store of crops.

Sources
    * a manifest CSV with columns ``case_id, ct, vertebrae`` and optional ``fracture``,
      ``split`` (train/val/test), ``subject`` (the person scanned; empty: the case is its own
      subject), ``grades`` (``11:0;12:2``: VerSe id or name, then grade) and ``domain`` (where
      the case comes from, e.g. ``phantom`` or ``real``: ``data.balance_domains`` gives every
      domain the same share of the training windows).
      Paths are relative to the manifest's folder. ``ct`` may be NIfTI, MHA/MHD, NRRD or a
      DICOM series folder (one series per folder). ``vertebrae`` is a label map, or a CSV of
      per-vertebra bounding boxes (see below). An empty ``fracture`` cell, or no such column,
      means "no fracture": an all-zero mask.
    * a folder holding ``manifest.csv`` (as ``vfsearch synth`` writes it);
    * a VerSe-style tree: ``rawdata/sub-*/**/<stem>_ct.nii.gz`` with
      ``derivatives/sub-*/**/<stem>_seg-vert_msk.nii.gz`` (VerSe ids) and, if present,
      ``derivatives/sub-*/**/<stem>_*fracture*.nii.gz``; the case id is ``<stem>``, the
      subject the ``sub-*`` folder (so ``sub-x_ses-a`` and ``sub-x_ses-b`` are one subject).

Label maps carry VerSe ids (default) or TotalSegmentator v2 ids (``label_scheme=
"totalsegmentator"``). Only T4..L5 count; other structures (organs, ribs, sacrum, other
vertebrae) are ignored. Float label maps are rounded to integers. A bounding-box CSV has
columns ``vertebra,x0,y0,z0,x1,y1,z1``: the vertebra as a name (``T4``, ``L1``) or an id of
the label scheme, and a half-open box ``[x0, x1) x [y0, y1) x [z0, z1)`` in voxel indices of
the CT as stored (ITK index order x, y, z); the vertebra's mask is then the whole box.

Fracture masks must hold integers >= 0 (0/1 or grade codes); every value > 0 is fracture.
Negative or non-integer values (probability maps) are rejected.

Per case
    1. read and validate everything (CT finite, label/fracture grids equal to the CT's in
       physical space, at least one T4..L5 vertebra, mask values) before anything is written;
    2. reorient to the canonical orientation (identity direction, ITK's LPS: x to the left,
       y posterior, z superior) by axis permutations and flips only (`to_canonical`);
    3. cut the region of interest (all T4..L5 labels + margin) and resample it onto
       ``spacing`` (CT linear, labels and fracture nearest) with `io.resample`;
    4. per present vertebra: crop box = bounding box of its label (components of at least
       10 % of the largest, so stray voxels do not inflate it) + ``margin_mm``, clipped to the
       image; store ``image`` int16 HU (clipped to [-1024, 3071]), ``fracture`` uint8 (every
       fracture inside the crop) and ``mask`` uint8 (this vertebra's label), chunked by
       `store.CHUNK_SLICES` slices along the axis of ``chunk_plane``.

Attributes (see `vfsearch.adapters.store`): the case keeps ``ct_geometry``/``ct_shape`` of the
original CT, ``reorientation``, ``canonical_geometry``/``canonical_shape``, ``roi_box``
(canonical grid), ``resampled_geometry``/``resampled_shape`` (the resampled ROI grid) and
``resampling``; each vertebra keeps ``crop_box`` ``[z0, y0, x0, z1, y1, x1]`` in the
resampled grid and its ``geometry`` (the resampled geometry shifted to the crop), plus
``verse_id``, ``name``, ``grade`` (manifest, else null), ``label_box``, ``voxels``,
``fracture_voxels``, ``fractured`` (fracture inside its own mask), ``partial`` (label touches
the scan's border) and ``fracture_slices`` (per plane: fracture voxels per slice).
``io.resample_to(crop, crop_geometry, ct_geometry, ct_shape)`` maps a crop (e.g. a
probability map) back onto the original CT grid.

Store level: ``dataset_id`` = hash of (source kind, resolved source path, spacing, margin,
label scheme, chunk plane). An existing store with another id is refused; the same id
resumes: complete cases are skipped, incomplete ones redone. The split is per subject, so
that no person's scans land on both sides of a split: seeded and stored (``splits`` and
``subjects`` in the store meta, ``split`` and ``subject`` on each case); a manifest
``split`` wins and holds for the subject's other cases (one subject declared in two splits
is refused before anything is written); a subject keeps the split any of its cases had in
an earlier run. With >= 3 subjects, val and test get >= 1 subject each (when their fraction
is > 0). The fingerprint (HU percentiles/mean/std over voxels inside vertebra masks;
median/min/max spacing of the original CTs in canonical x, y, z order) comes from the
complete train cases only, so normalisation learns nothing from val or test (from all
complete cases only when there is no train case; ``from_split`` and ``cases`` say which);
it is recomputed after every run, so a changed split moves it.

Errors: a `UserError` in any case stops the run with one line; complete cases stay valid,
the failed case is not written; a store created by the failed run with no complete case is
removed again.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vfsearch.adapters import progress
from vfsearch.adapters import volumes as io
from vfsearch.adapters.store import (
    CHUNK_SLICES,
    PLANE_AXIS,
    Store,
    fingerprint_from_hist,
    hu_histogram,
)
from vfsearch.adapters.volumes import Volume
from vfsearch.core import crops
from vfsearch.core.crops import Box, Crop
from vfsearch.core.errors import UserError
from vfsearch.core.labels import SCHEMES, TARGET_IDS, to_verse, totalseg_to_verse, verse_id
from vfsearch.core.labels import name as vertebra_name

SPLITS = ("train", "val", "test")
FORMAT = 1
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_BOX_COLUMNS = ("vertebra", "x0", "y0", "z0", "x1", "y1", "z1")


@dataclass(frozen=True)
class CaseSpec:
    """One case to ingest: absolute paths, plus where it was declared (for messages).

    ``subject``: the person scanned (default: the case id); a subject's cases share a split.
    ``domain``: where the case comes from (free text, "" = none); see ``data.balance_domains``.
    """

    case_id: str
    ct: str
    vertebrae: str
    fracture: str | None = None
    split: str | None = None
    grades: dict[int, int] = field(default_factory=dict)
    origin: str = ""
    subject: str = ""
    domain: str = ""

    def __post_init__(self) -> None:
        if not self.subject:
            object.__setattr__(self, "subject", self.case_id)


@dataclass(frozen=True)
class Params:
    spacing: tuple[float, float, float]
    margin_mm: float
    label_scheme: str
    chunk_plane: str


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


def discover(source: str | os.PathLike) -> tuple[str, list[CaseSpec]]:
    """The kind of ``source`` (``manifest``, ``synth`` or ``verse``) and its cases."""
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"{src}: source not found")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UserError(f"{src}: expected a manifest CSV, a synth folder or a VerSe tree")
        return "manifest", read_manifest(src)
    if (src / "manifest.csv").is_file():
        return "synth", read_manifest(src / "manifest.csv")
    if (src / "rawdata").is_dir():
        return "verse", read_verse_tree(src)
    raise UserError(f"{src}: folder holds neither manifest.csv nor a VerSe rawdata/ tree")


def manifest_rows(
    path: Path, required: tuple[str, ...] = ("case_id", "ct", "vertebrae")
) -> Iterator[tuple[int, str, Callable[[str], str]]]:
    """Rows of a manifest CSV as ``(line, case_id, cell)``: ``line`` is the file's line number,
    ``cell(column)`` is the stripped value ("" when absent). Unreadable or empty files, missing
    ``required`` columns and malformed case ids raise `UserError`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read manifest ({exc})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{path}: manifest is empty")
    header = [c.strip().lower() for c in rows[0]]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(
            f"{path}: manifest lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(header) or 'none'})"
        )
    col = {name: header.index(name) for name in header}
    for line, row in enumerate(rows[1:], start=2):

        def cell(name: str, row: list[str] = row) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        where = f"{path} line {line}"
        cid = cell("case_id")
        if not _CASE_ID.match(cid):
            raise UserError(
                f"{where}: case_id {cid!r} must start with a letter or digit and "
                f"hold only letters, digits, '.', '_' and '-'"
            )
        yield line, cid, cell


def read_manifest(path: Path) -> list[CaseSpec]:
    """Parse a manifest CSV; missing columns, bad values and duplicate ids raise `UserError`."""
    base = path.parent
    seen: dict[str, int] = {}
    declared: dict[str, tuple[str, int]] = {}  # subject -> (split, line) of its first split
    specs = []
    for line, cid, cell in manifest_rows(path):
        where = f"{path} line {line}"
        if cid in seen:
            raise UserError(f"{path}: duplicate case_id {cid!r} (lines {seen[cid]} and {line})")
        seen[cid] = line
        for name in ("ct", "vertebrae"):
            if not cell(name):
                raise UserError(f"{where}: empty {name} for case {cid!r}")
        split = cell("split").lower() or None
        if split is not None:
            if split not in _SPLIT_NAMES:
                raise UserError(f"{where}: split {cell('split')!r} must be train, val or test")
            split = _SPLIT_NAMES[split]
        subject = cell("subject") or cid
        if split is not None:
            first, first_line = declared.setdefault(subject, (split, line))
            if first != split:
                raise UserError(
                    f"{path}: subject {subject!r} is declared in two splits "
                    f"({first} on line {first_line}, {split} on line {line}); "
                    f"a subject's cases must share one split"
                )
        specs.append(
            CaseSpec(
                case_id=cid,
                ct=_resolve(base, cell("ct")),
                vertebrae=_resolve(base, cell("vertebrae")),
                fracture=_resolve(base, cell("fracture")) if cell("fracture") else None,
                split=split,
                grades=_parse_grades(cell("grades"), where),
                origin=where,
                subject=subject,
                domain=cell("domain"),
            )
        )
    if not specs:
        raise UserError(f"{path}: manifest has no cases")
    return specs


def _resolve(base: Path, text: str) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _parse_grades(text: str, where: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        key, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out[verse_id(key)] = int(value)
        except (ValueError, UserError):
            raise UserError(
                f"{where}: grades item {item!r} must read vertebra:grade (e.g. 11:0;L1:2)"
            ) from None
    return out


def read_verse_tree(root: Path) -> list[CaseSpec]:
    """Cases of a VerSe-style tree (rawdata CTs, derivatives vertebra masks)."""
    raw = root / "rawdata"
    cts = sorted(
        {p for pattern in ("sub-*/**/*_ct.nii.gz", "sub-*/**/*_ct.nii") for p in raw.glob(pattern)}
    )
    if not cts:
        raise UserError(f"{raw}: no sub-*/..._ct.nii.gz files")
    specs: dict[str, CaseSpec] = {}
    for ct in cts:
        sub = ct.relative_to(raw).parts[0]
        stem = re.sub(r"_ct\.nii(\.gz)?$", "", ct.name)
        deriv = root / "derivatives" / sub
        masks = sorted(deriv.glob(f"**/{stem}_seg-vert_msk.nii*"))
        if not masks:
            raise UserError(f"{ct}: no matching derivatives/{sub}/{stem}_seg-vert_msk.nii.gz")
        fractures = sorted(deriv.glob(f"**/{stem}_*fracture*.nii*"))
        if stem in specs:
            raise UserError(f"{ct}: duplicate case {stem!r} (also {specs[stem].ct})")
        if not _CASE_ID.match(stem):
            raise UserError(
                f"{ct}: case id {stem!r} has characters other than letters, "
                f"digits, '.', '_' and '-'"
            )
        specs[stem] = CaseSpec(
            stem,
            str(ct),
            str(masks[0]),
            str(fractures[0]) if fractures else None,
            origin=str(ct),
            subject=sub,
        )
    return list(specs.values())


# ---------------------------------------------------------------------------------------
# One case: read and validate, reorient, resample, crop
# ---------------------------------------------------------------------------------------


@dataclass
class PreparedCase:
    """A case ready to write: case attributes, crops, HU histogram of the vertebra voxels."""

    case_id: str
    attrs: dict[str, Any]
    crops: list[Crop]
    hist: np.ndarray


def _read_boxes(path: str, ct_shape_zyx: tuple[int, int, int], scheme: str) -> dict[int, Box]:
    """Bounding-box CSV -> {verse id: (z0, y0, x0, z1, y1, x1)} in the CT's stored index grid."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read bounding-box CSV ({exc})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    missing = [c for c in _BOX_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: bounding-box CSV lacks column(s) {', '.join(missing)}")
    idx = [header.index(c) for c in _BOX_COLUMNS]
    nz, ny, nx = ct_shape_zyx
    boxes: dict[int, Box] = {}
    for line, row in enumerate(rows[1:], start=2):
        cells = [row[i].strip() if i < len(row) else "" for i in idx]
        try:
            x0, y0, z0, x1, y1, z1 = (int(c) for c in cells[1:])
        except ValueError:
            raise UserError(f"{path} line {line}: box corners must be integers") from None
        text = cells[0]
        if text.isdigit() and scheme == "totalsegmentator":
            vid = totalseg_to_verse(int(text)) or 0
        else:
            try:
                vid = verse_id(text)
            except UserError:
                raise UserError(f"{path} line {line}: unknown vertebra {text!r}") from None
        if not (0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny and 0 <= z0 < z1 <= nz):
            raise UserError(
                f"{path} line {line}: box x{x0}:{x1} y{y0}:{y1} z{z0}:{z1} is empty "
                f"or outside the CT (size {nx}x{ny}x{nz})"
            )
        if vid not in TARGET_IDS:
            continue
        if vid in boxes:
            raise UserError(f"{path} line {line}: second box for {vertebra_name(vid)}")
        boxes[vid] = (z0, y0, x0, z1, y1, x1)
    if not boxes:
        raise UserError(f"{path}: no T4..L5 vertebra box")
    return boxes


def read_ct(path: str) -> Volume:
    """Read a CT (file or DICOM series folder) and check its voxels are finite numbers."""
    ct = io.read_volume(path, what="CT")
    crops.check_ct(ct.array, path)
    return ct


def read_vertebrae(
    path: str, ct: Volume, ct_path: str, label_scheme: str
) -> tuple[Volume | None, dict[int, Box] | None]:
    """A case's vertebrae: its label map (ids as stored, grid checked against ``ct``'s, read
    from ``ct_path``) and None, or, for a bounding-box CSV, None and the boxes (VerSe id ->
    box in the CT's stored index grid)."""
    if path.lower().endswith(".csv"):
        if not Path(path).is_file():
            raise UserError(f"{path}: bounding-box CSV not found")
        return None, _read_boxes(path, ct.shape, label_scheme)
    lab = io.read_volume(path, what="vertebra label map")
    crops.check_same_grid(
        ct.shape,
        ct.geometry,
        lab.shape,
        lab.geometry,
        ct_source=ct_path,
        source=path,
        what="label map",
    )
    return lab, None


def prepare_case(spec: CaseSpec, params: Params) -> PreparedCase:
    """Read, validate, reorient, resample and crop one case (in memory; nothing written).

    The array maths is `vfsearch.core.crops`'; each file is read when its stage needs it and
    released after (large scans), and the checks run in the order of the module docstring.
    """
    ct = read_ct(spec.ct)
    ct_c, canon = crops.canonical(ct.array, ct.geometry)
    lab, boxes = read_vertebrae(spec.vertebrae, ct, spec.ct, params.label_scheme)
    if lab is None:
        assert boxes is not None
        vertebrae = crops.vertebrae_from_boxes(boxes, ct.geometry, canon)
    else:
        lab.array = to_verse(lab.array, params.label_scheme, source=spec.vertebrae)
        vertebrae = crops.vertebrae_from_labels(lab.array, lab.geometry, canon, io)
        del lab
        if not vertebrae.present:
            raw = io.read_volume(spec.vertebrae, what="vertebra label map").array
            raise crops.no_target_vertebra(spec.vertebrae, params.label_scheme, raw)
    frac_c = None
    if spec.fracture:
        frac = io.read_volume(spec.fracture, what="fracture mask")
        crops.check_same_grid(
            ct.shape,
            ct.geometry,
            frac.shape,
            frac.geometry,
            ct_source=spec.ct,
            source=spec.fracture,
            what="fracture mask",
        )
        frac.array = crops.fracture_values(frac.array, spec.fracture)
        frac_c = canon.onto(frac.array, frac.geometry, io)
        del frac
    ct_shape, ct_geometry = ct.shape, ct.geometry
    del ct

    region = crops.resample_region(
        ct_c, canon, vertebrae, spacing=params.spacing, margin_mm=params.margin_mm, resampler=io
    )
    del ct_c
    case = crops.cut_vertebrae(
        region,
        canon,
        vertebrae,
        frac_c,
        ct_geometry=ct_geometry,
        ct_shape=ct_shape,
        margin_mm=params.margin_mm,
        grades=spec.grades,
        resampler=io,
        source=spec.vertebrae,
    )
    hist = np.zeros_like(hu_histogram(np.zeros(0)))
    for crop in case.crops:
        hist += hu_histogram(crop.arrays["image"][crop.arrays["mask"] > 0])
    attrs = {
        "case_id": spec.case_id,
        "subject": spec.subject,
        "domain": spec.domain,
        "source": {
            "ct": str(Path(spec.ct).resolve()),
            "vertebrae": str(Path(spec.vertebrae).resolve()),
            "fracture": str(Path(spec.fracture).resolve()) if spec.fracture else None,
        },
        "label_scheme": params.label_scheme,
        **case.attrs(),
        "chunk_plane": params.chunk_plane,
        "chunk_axis": PLANE_AXIS[params.chunk_plane],
        "chunk_slices": CHUNK_SLICES,
        "grades": {str(k): v for k, v in spec.grades.items()},
    }
    return PreparedCase(spec.case_id, attrs, case.crops, hist)


def write_case(store: Store, prepared: PreparedCase, split: str, chunk_axis: int) -> None:
    """Write one prepared case; ``complete`` flips to true only with the last write."""
    store.begin_case(prepared.case_id, {**prepared.attrs, "split": split})
    for crop in prepared.crops:
        store.write_vertebra(
            prepared.case_id, crop.vid, crop.arrays, crop.attrs, chunk_axis=chunk_axis
        )
    store.finish_case(
        prepared.case_id,
        prepared.hist,
        {
            "vertebrae": [c.vid for c in prepared.crops],
            "names": [vertebra_name(c.vid) for c in prepared.crops],
            "fractured": [c.vid for c in prepared.crops if c.attrs["fractured"]],
        },
    )


def _run_case(
    spec: CaseSpec, params: Params, store_path: str, split: str, threads: int = 0
) -> dict[str, Any]:
    """Worker entry point (top level so that spawned processes can import it)."""
    if threads:
        io.set_threads(threads)
    store = Store(store_path, "a")
    try:
        prepared = prepare_case(spec, params)
    except UserError:
        store.delete_case(spec.case_id)  # a leftover of an earlier crash (never complete)
        raise
    write_case(store, prepared, split, PLANE_AXIS[params.chunk_plane])
    return {"case_id": spec.case_id, "vertebrae": len(prepared.crops)}


# ---------------------------------------------------------------------------------------
# Splits, store identity, fingerprint
# ---------------------------------------------------------------------------------------


def assign_splits(
    case_ids: list[str],
    fixed: dict[str, str],
    previous: dict[str, str],
    fractions: tuple[float, float, float],
    seed: int,
    subjects: dict[str, str] | None = None,
) -> dict[str, str]:
    """Subject-level split: fixed (manifest) wins, then the previous run's, then seeded draws.

    ``subjects`` maps a case to its subject (default: the case itself); every case of a
    subject gets the subject's split. A fixed or previous split of any of its cases holds for
    the whole subject (if its cases disagree, the most held-out one: test, then val, then
    train). New subjects fill the train/val/test counts the fractions ask for over all
    subjects; with >= 3 subjects val and test get at least one subject each when their
    fraction is > 0. With one case per subject this is the case-level draw of earlier
    versions (same seed, same splits).
    """
    subject = {c: (subjects or {}).get(c) or c for c in case_ids}
    groups: dict[str, list[str]] = {}
    for c in case_ids:
        groups.setdefault(subject[c], []).append(c)

    def held(cases: list[str], source: dict[str, str]) -> str | None:
        found = {source[c] for c in cases if source.get(c)}
        return max(found, key=SPLITS.index) if found else None

    n = len(groups)
    out = {g: held(cases, fixed) or held(cases, previous) for g, cases in groups.items()}
    target = {s: int(round(n * f)) for s, f in zip(SPLITS, fractions, strict=False)}
    if n >= 3:
        for s, f in zip(SPLITS[1:], fractions[1:], strict=False):
            if f > 0:
                target[s] = max(1, target[s])
    target["train"] = max(0, n - target["val"] - target["test"])
    counts = {s: sum(1 for v in out.values() if v == s) for s in SPLITS}
    deficit = {s: target[s] - counts[s] for s in SPLITS}
    todo = sorted(c for c, v in out.items() if v is None)
    order = np.random.default_rng(seed).permutation(len(todo))
    for i in order:
        best = max(SPLITS, key=lambda s: (deficit[s], -SPLITS.index(s)))
        out[todo[i]] = best
        deficit[best] -= 1
    return {c: out[subject[c]] for c in case_ids}  # type: ignore[misc]


def dataset_id(kind: str, source: Path, params: Params) -> str:
    payload = {
        "format": FORMAT,
        "kind": kind,
        "source": str(Path(source).expanduser().resolve()),
        "spacing": [float(s) for s in params.spacing],
        "margin_mm": float(params.margin_mm),
        "label_scheme": params.label_scheme,
        "chunk_plane": params.chunk_plane,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _open_store(out: Path, meta: dict[str, Any]) -> tuple[Store, bool, bool]:
    """Open ``out`` for this dataset; returns (store, created_by_us, pre-existing empty dir)."""
    created, empty_dir = not out.exists(), False
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a Zarr store")
        if not (out / "zarr.json").is_file():
            if any(out.iterdir()):
                raise UserError(f"{out}: exists and is not a vfsearch store (no zarr.json)")
            empty_dir = True
    store = Store(out, "a")
    try:
        root = store.root
        old = dict(root.attrs.get("vfsearch", {}))
        has_cases = "cases" in root
    except Exception as exc:  # noqa: BLE001 - any zarr failure means "not our store"
        raise UserError(f"{out}: cannot open as a Zarr group ({type(exc).__name__})") from None
    if old.get("dataset_id") not in (None, meta["dataset_id"]):
        diff = [
            k
            for k in ("source", "kind", "spacing", "margin_mm", "label_scheme", "chunk_plane")
            if old.get(k) != meta.get(k)
        ]
        detail = "; ".join(f"{k} {old.get(k)!r} here" for k in diff) or "other settings"
        raise UserError(
            f"{out}: store belongs to another dataset ({detail}); use another --out or delete it"
        )
    if not old and has_cases:
        raise UserError(f"{out}: exists and is not a vfsearch store (no vfsearch attributes)")
    store.set_meta(**meta)
    root.require_group("cases")  # here, not racing in parallel workers
    return store, created, empty_dir


def _fingerprint(store: Store) -> dict[str, Any]:
    """Fingerprint of the train cases (of all complete cases only if there is no train case)."""
    ids, from_split = store.case_ids("train"), "train"
    if not ids:
        ids, from_split = store.case_ids(), "all"
    hist = None
    spacings = []
    for cid in ids:
        h = store.hu_hist(cid)
        hist = h if hist is None else hist + h
        spacings.append(store.case_attrs(cid)["canonical_geometry"]["spacing"])
    fp: dict[str, Any] = fingerprint_from_hist(hist) if hist is not None else {}
    if spacings:
        sp = np.asarray(spacings, dtype=np.float64)
        fp.update(
            spacing_median=np.median(sp, axis=0).tolist(),
            spacing_min=sp.min(axis=0).tolist(),
            spacing_max=sp.max(axis=0).tolist(),
        )
    fp.update(cases=len(ids), from_split=from_split)
    return fp


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------


def ingest(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    margin_mm: float = 8.0,
    label_scheme: str = "verse",
    split: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    workers: int = 1,
    chunk_plane: str = "sagittal",
) -> str:
    """Ingest ``source`` into the Zarr store ``out``; returns a one-line summary.

    ``spacing`` (x, y, z) mm of the stored crops; ``margin_mm`` around each vertebra's label
    box; ``chunk_plane`` (axial, coronal, sagittal) picks the axis whose consecutive slices
    share chunks. See the module docstring for sources, layout and guarantees.
    """
    if label_scheme not in SCHEMES:
        raise UserError(
            f"--label-scheme: must be one of {', '.join(SCHEMES)}, got {label_scheme!r}"
        )
    if chunk_plane not in PLANE_AXIS:
        raise UserError(
            f"--chunk-plane: must be one of {', '.join(PLANE_AXIS)}, got {chunk_plane!r}"
        )
    spacing_xyz = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    if len(spacing_xyz) != 3 or min(spacing_xyz) <= 0:
        raise UserError(f"--spacing: expected three positive numbers, got {spacing_xyz}")
    if margin_mm < 0:
        raise UserError(f"--margin: must be >= 0 mm, got {margin_mm}")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
        raise UserError(f"--split: expected train,val,test fractions summing to 1, got {split}")
    if workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    params = Params(spacing_xyz, float(margin_mm), label_scheme, chunk_plane)
    src = Path(source).expanduser()
    kind, specs = discover(src)
    for spec in specs:  # fail fast, before anything is written
        for path, what in (
            (spec.ct, "CT"),
            (spec.vertebrae, "vertebra labels"),
            (spec.fracture, "fracture mask"),
        ):
            if path is not None and not Path(path).exists():
                raise UserError(
                    f"{path}: {what} of case {spec.case_id!r} not found ({spec.origin})"
                )

    out_path = Path(out).expanduser()
    did = dataset_id(kind, src, params)
    meta = {
        "format": FORMAT,
        "dataset_id": did,
        "kind": kind,
        "source": str(src.resolve()),
        "spacing": list(spacing_xyz),
        "margin_mm": margin_mm,
        "label_scheme": label_scheme,
        "chunk_plane": chunk_plane,
        "chunk_axis": PLANE_AXIS[chunk_plane],
    }
    store, created, empty_dir = _open_store(out_path, meta)
    try:
        complete = set(store.case_ids())
        old = store.root.attrs.get("vfsearch", {})
        previous = dict(old.get("splits", {}))
        subjects = dict(old.get("subjects", {}))
        for cid in complete:  # the split a case was written with is the one it keeps
            attrs = store.case_attrs(cid)
            previous[cid] = attrs.get("split", previous.get(cid))
            subjects[cid] = attrs.get("subject", subjects.get(cid, cid))
        subjects.update({s.case_id: s.subject for s in specs})  # the source's word wins
        all_ids = sorted(set(previous) | {s.case_id for s in specs})
        subjects = {cid: subjects.get(cid, cid) for cid in all_ids}
        plan = assign_splits(
            all_ids, {s.case_id: s.split for s in specs if s.split}, previous, split, seed, subjects
        )
        store.set_meta(splits=plan, subjects=subjects, split_fractions=list(split), split_seed=seed)
        domains = {s.case_id: s.domain for s in specs}
        for cid in complete:  # a manifest split, subject or domain overrides the stored one
            attrs = store.case_attrs(cid)
            updates = [("split", plan[cid]), ("subject", subjects[cid])]
            if cid in domains:
                updates.append(("domain", domains[cid]))
            for key, value in updates:
                if attrs.get(key, "" if key == "domain" else None) != value:
                    store.root[f"cases/{cid}"].attrs[key] = value
        todo = [s for s in specs if s.case_id not in complete]
        done = _run_all(todo, params, str(out_path), plan, workers)
    except BaseException as exc:
        _finish_meta(store)
        if isinstance(exc, UserError) and created and not store.case_ids():
            _remove_store(out_path, empty_dir)
        raise
    _finish_meta(store)
    counts = {s: len(store.case_ids(s)) for s in SPLITS}
    n_vert = len(store.items())
    return (
        f"{out_path}: {len(done)} case(s) ingested, {len(specs) - len(todo)} already "
        f"complete; {sum(counts.values())} cases ({counts['train']} train, {counts['val']} "
        f"val, {counts['test']} test), {n_vert} vertebrae"
    )


def _finish_meta(store: Store) -> None:
    with contextlib.suppress(Exception):  # never mask the error that got us here
        store.set_meta(fingerprint=_fingerprint(store))


def _remove_store(path: Path, keep_dir: bool) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if keep_dir:
        path.mkdir(exist_ok=True)


def _run_all(
    todo: list[CaseSpec], params: Params, store_path: str, plan: dict[str, str], workers: int
) -> list[str]:
    done: list[str] = []
    bar = progress.bar(desc="ingest", unit="case", total=len(todo))

    def case_done(case_id: str) -> None:
        done.append(case_id)
        bar.set_postfix_str(case_id, refresh=False)
        bar.update(1)

    try:
        if workers == 1 or len(todo) <= 1:
            for spec in todo:
                _run_case(spec, params, store_path, plan[spec.case_id])
                case_done(spec.case_id)
            return done
        import multiprocessing
        from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {
                pool.submit(_run_case, s, params, store_path, plan[s.case_id], threads): s.case_id
                for s in todo
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    if fut.exception() is not None:
                        for p in pending:
                            p.cancel()
                        # Let running cases finish (they end complete), then report.
                        wait(pending)
                        raise fut.exception()  # type: ignore[misc]
                    case_done(futures[fut])
        return done
    finally:
        bar.close()


__all__ = [
    "ingest",
    "discover",
    "read_manifest",
    "read_verse_tree",
    "prepare_case",
    "read_ct",
    "read_vertebrae",
    "write_case",
    "assign_splits",
    "dataset_id",
    "CaseSpec",
    "Params",
    "PreparedCase",
    "Crop",
    "SPLITS",
]
