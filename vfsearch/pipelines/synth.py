"""`vfsearch synth`: write synthetic cases (or fractures simulated on real scans) to a folder.

Orchestration only: volumes come from `vfsearch.core.phantom` and are written through
`vfsearch.adapters.volumes`. Layout of ``OUT``::

    OUT/manifest.csv                 case_id,ct,vertebrae,fracture,grades[,subject] (paths
                                     relative to OUT; ``subject`` for real backgrounds)
    OUT/<case_id>/ct.nii.gz          int16 HU (a real background keeps its own pixel type)
    OUT/<case_id>/vertebrae.nii.gz   uint8 VerSe ids 11-24 (T4..L5), whole vertebrae
    OUT/<case_id>/fracture.nii.gz    uint8 0/1: deformed endplate zone + sclerotic band
    OUT/<case_id>/meta.json          case values and, per vertebra, grade, morphology, ratio

Every case folder is written under a hidden temporary name and renamed when complete, and the
manifest is replaced atomically, so an interrupted run leaves no half-written case. Same seed,
same bytes: case ``k`` uses a generator seeded by ``(seed, k)`` whatever the number of cases.

Real backgrounds (`synth_on_background`), decisions:

* ``--background`` is one CT (with ``--vertebrae``, its label map), a manifest CSV of scans
  (``case_id, ct, vertebrae[, label_scheme][, subject]``, paths relative to the CSV; an empty
  or missing ``label_scheme`` means ``--label-scheme``) or a folder. A folder is either a
  VerSe tree (``rawdata/sub-*/**/<stem>_ct.nii.gz`` + ``derivatives/.../<stem>_seg-vert_msk
  .nii.gz``, as `vfsearch ingest` reads it; subject = the ``sub-*`` folder) or holds one
  subfolder per scan: ``<name>/ct.nii.gz`` (or .nii/.mha/.mhd/.nrrd) and exactly one
  ``<name>/vertebrae*.nii.gz``; ``vertebrae_verse*`` is read as VerSe ids,
  ``vertebrae_totalseg*`` as TotalSegmentator ids, any other name by ``--label-scheme``.
  Subfolders without a ``ct.*`` are ignored. The scan's name is its case id, subfolder name or
  the CT's file name (folder name for ``ct.nii.gz``).
* ``--variants N`` writes N cases per scan, ``<scan>_v000`` .. (also for N = 1 without
  ``--fracture``); the manifest's ``subject`` column (the scan's subject, by default its name)
  makes `vfsearch ingest` keep all variants of one scan in one split. Each variant draws its
  own fractures: with probability `NO_FRACTURE_SHARE` none (intact vertebrae are seen too),
  else 1 to `MAX_FRACTURED` distinct fully imaged vertebrae, each with a Genant grade 1-3 and
  a morphology (wedge, biconcave, crush) drawn uniformly; `phantom.simulate_fractures` draws
  the sclerotic band's depth and HU rise per vertebra. Variant ``k`` of scan ``s`` uses a
  generator seeded by ``(seed, crc32(s), k)``: it does not depend on the other scans or on N.
* ``--fracture SPEC`` fixes the fractures instead: one case per scan (case id = the scan's
  name, generator ``(seed, 0)``), so it is refused with ``--variants`` above 1.
* A vertebra cut by the scan's edge (its label reaches the first or last slice along the
  canonical z axis, along which heights are measured; `phantom.fully_imaged`) cannot take a
  height-reducing fracture: named in ``--fracture`` it is refused; in variants it is never
  drawn, and one warning line per scan names the vertebrae skipped. A scan without a fully
  imaged vertebra T4..L5 is skipped with a warning (an error when no scan is left).
* Every scan is read and checked (grids, labels, ``--fracture``) before anything is written;
  scans are then read a second time while writing (the first one is kept from the check).
* Labelled vertebrae that are not fractured keep grade 0 in the manifest (the scans are taken
  to be healthy); ``meta.json`` marks the ones cut by the edge (``cut_by_edge``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vfsearch.adapters import progress
from vfsearch.adapters.volumes import Volume, read_volume, write_volume
from vfsearch.core import phantom
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry, to_canonical
from vfsearch.core.labels import SCHEMES, TARGET_IDS, name, to_verse, verse_id
from vfsearch.core.phantom import MORPHOLOGIES, fully_imaged
from vfsearch.pipelines.ingest import manifest_rows, read_verse_tree

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("case_id", "ct", "vertebrae", "fracture", "grades")
BACKGROUND_COLUMNS = (*MANIFEST_COLUMNS, "subject")
NO_FRACTURE_SHARE = 0.2  # share of background variants left without a fracture
MAX_FRACTURED = 3  # at most this many fractured vertebrae per background variant
CASE_FILES = ("ct.nii.gz", "vertebrae.nii.gz", "fracture.nii.gz", "meta.json")
_TMP_PREFIX = ".tmp-"


def case_id(index: int) -> str:
    """``0 -> "synth_000"``."""
    return f"synth_{index:03d}"


def synth_dataset(
    out: Path,
    *,
    cases: int,
    seed: int,
    spacing: tuple[float, float, float] | None,
    small: bool,
    fracture_rate: float,
    variety: float = 0.0,
) -> str:
    """Write ``cases`` phantom cases and ``manifest.csv`` into ``out``; return a summary line.

    ``spacing`` (x, y, z) mm or None for the default (0.8, 0.8, 2.0; ``small``: 2, 2, 2; with
    ``variety`` above 0, drawn per case). ``variety`` (0-1) randomises scanner and patient per
    case (`phantom.make_case`); 0 writes the standard phantom. ``out`` must be absent, empty
    or an earlier synth output (which is replaced).
    """
    out = Path(out)
    if cases < 1:
        raise UserError(f"--cases: must be at least 1, got {cases}")
    if not 0.0 <= fracture_rate <= 1.0:
        raise UserError(f"--fracture-rate: must be between 0 and 1, got {fracture_rate}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) < 0.3 or max(spacing) > 4.0):
        raise UserError(f"--spacing: each value must be between 0.3 and 4 mm, got {spacing}")
    if not 0.0 <= variety <= 1.0:  # also refuses NaN
        raise UserError(f"--variety: must be between 0 and 1, got {variety}")
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows: list[list[str]] = []
    grades_all: list[int] = []
    ids = [case_id(k) for k in range(cases)]
    for k in progress.bar(range(cases), "synth", unit="case"):
        case = phantom.make_case(
            phantom.case_rng(seed, k),
            spacing=spacing,
            small=small,
            fracture_rate=fracture_rate,
            variety=variety,
        )
        meta = {
            "case_id": ids[k],
            "seed": int(seed),
            "case_index": k,
            "generator": "vfsearch.core.phantom",
            "geometry": case.geometry.to_dict(),
            **case.info,
            "vertebrae": {str(v): m for v, m in sorted(case.meta.items())},
        }
        _write_case(out, ids[k], case.ct, case.vertebrae, case.fracture, case.geometry, meta)
        grades = {v: int(m["grade"]) for v, m in case.meta.items()}
        grades_all.extend(grades.values())
        rows.append(_manifest_row(ids[k], grades))
    _remove_stale(out, keep=set(ids))
    _write_manifest(out, rows)
    g = np.asarray(grades_all)
    sp = spacing or (phantom.SMALL_SPACING if small else phantom.DEFAULT_SPACING)
    if spacing is None and variety > 0:
        sp_text = f"spacing drawn per case (variety {variety:g})"
    else:
        sp_text = f"spacing {','.join(f'{v:g}' for v in sp)} mm" + (
            f" (variety {variety:g})" if variety > 0 else ""
        )
    n_frac = int((g > 0).sum())
    return (
        f"wrote {cases} synthetic case(s) to {out} in {time.monotonic() - start:.1f} s: "
        f"{len(g)} vertebrae, {n_frac} fractured ({100.0 * n_frac / max(1, len(g)):.0f} %, "
        f"grade 1/2/3: {(g == 1).sum()}/{(g == 2).sum()}/{(g == 3).sum()}), {sp_text}; "
        f"manifest {out / MANIFEST}"
    )


def parse_fracture_spec(spec: str) -> dict[int, tuple[int, str]]:
    """``"22:2:wedge,L1:3"`` -> ``{22: (2, "wedge"), 20: (3, "wedge")}`` (VerSe ids or names).

    Grade defaults to 2 and morphology to wedge when left out.
    """
    out: dict[int, tuple[int, str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = [p.strip() for p in item.split(":")]
        if len(parts) > 3:
            raise UserError(f"--fracture: expected vertebra:grade:morphology, got {item!r}")
        try:
            vid = verse_id(parts[0])
        except UserError:
            raise UserError(
                f"--fracture: unknown vertebra {parts[0]!r} in {item!r} "
                f"(use VerSe ids or names like T12, L1)"
            ) from None
        try:
            grade = int(parts[1]) if len(parts) > 1 and parts[1] else 2
        except ValueError:
            grade = -1
        if grade not in (1, 2, 3):
            raise UserError(f"--fracture: grade must be 1, 2 or 3 in {item!r}")
        morph = parts[2].lower() if len(parts) > 2 and parts[2] else "wedge"
        if morph not in MORPHOLOGIES:
            raise UserError(
                f"--fracture: morphology must be one of {', '.join(MORPHOLOGIES)} in {item!r}"
            )
        if vid in out:
            raise UserError(f"--fracture: vertebra {parts[0]} given twice")
        out[vid] = (grade, morph)
    if not out:
        raise UserError(f"--fracture: no vertebra given in {spec!r}")
    return out


@dataclass(frozen=True)
class Scan:
    """One real (healthy) background scan.

    ``name`` is its case-id stem, ``subject`` the person scanned (variants of scans with one
    subject share a split), ``origin`` where it was listed (for messages).
    """

    name: str
    ct: Path
    vertebrae: Path
    label_scheme: str
    subject: str
    origin: str


def synth_on_background(
    background: Path | None,
    vertebrae: Path | None,
    out: Path,
    *,
    fracture: str | None,
    seed: int,
    label_scheme: str,
    variants: int = 1,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Simulate fractures on real CTs and write the cases and one manifest into ``out``.

    ``background`` is one CT (``vertebrae`` its label map, same grid), a manifest CSV or a
    folder of scans (see the module docstring; ``vertebrae`` then None). Label maps are read
    in ``label_scheme`` ("verse" or "totalsegmentator") unless the source says otherwise; the
    written label map uses VerSe ids 11-24 (T4..L5). ``fracture`` like
    ``"22:2:wedge,L1:3:crush"`` gives one case per scan with those fractures; without it each
    scan gets ``variants`` cases with random fractures. Output volumes keep the input's grid
    (size, spacing, origin, direction) and the CT keeps its pixel type. ``warn`` receives
    warning lines (default: ``warning: ...`` on stderr). Returns a one-line summary.
    """
    warn = warn or _warn
    if background is None:
        raise UserError("--background: required with --vertebrae")
    if variants < 1:
        raise UserError(f"--variants: must be at least 1, got {variants}")
    if fracture is not None and variants > 1:
        raise UserError(
            f"--fracture: fixes one case per scan, so it cannot go with --variants "
            f"{variants} (variants draw their fractures at random)"
        )
    if label_scheme not in SCHEMES:
        raise UserError(
            f"--label-scheme: must be one of {', '.join(SCHEMES)}, got {label_scheme!r}"
        )
    out = Path(out)
    targets = parse_fracture_spec(fracture) if fracture is not None else None
    scans = background_scans(
        Path(background), None if vertebrae is None else Path(vertebrae), label_scheme
    )

    # read and check every scan before anything is written
    first: _Background | None = None
    checked: list[tuple[list[int], list[int]]] = []
    for i, scan in enumerate(scans):
        scan_bg = _read_scan(scan)
        if targets is not None:
            _check_targets(scan, scan_bg, targets)
        checked.append((scan_bg.present, scan_bg.complete))
        if i == 0:
            first = scan_bg
        del scan_bg
    _check_out(out)
    kept = list(range(len(scans)))
    if targets is None:
        kept = []
        for i, (scan, (present, complete)) in enumerate(zip(scans, checked, strict=False)):
            cut = ", ".join(name(v) for v in present if v not in complete)
            if not complete:
                warn(
                    f"{scan.vertebrae}: every vertebra T4..L5 ({cut}) is cut by the scan's "
                    f"edge; scan {scan.name} skipped"
                )
                continue
            if cut:
                warn(
                    f"{scan.vertebrae}: {cut} cut by the scan's edge; not fractured in the "
                    f"variants of {scan.name}"
                )
            kept.append(i)
        if not kept:
            raise UserError(
                f"{background}: no scan has a fully imaged vertebra T4..L5 (every "
                f"labelled vertebra is cut by the scan's edge)"
            )

    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows: list[list[str]] = []
    done: list[dict[int, dict]] = []
    loaded: tuple[int, _Background | None] = (0, first)
    res = None
    jobs = [(i, k) for i in kept for k in range(variants if targets is None else 1)]
    for i, k in progress.bar(jobs, "synth", unit="case"):
        scan = scans[i]
        if loaded[0] != i or loaded[1] is None:
            loaded = (i, None)  # drop the previous scan before reading the next
            loaded = (i, _read_scan(scan))
        bg = loaded[1]
        assert bg is not None
        if targets is None:
            cid = f"{scan.name}_v{k:03d}"
            rng = variant_rng(seed, scan.name, k)
            chosen = draw_fractures(rng, bg.complete)
        else:
            cid, rng, chosen = scan.name, phantom.case_rng(seed, 0), targets
        res = phantom.simulate_fractures(bg.ct.array, bg.labels, bg.ct.geometry, chosen, rng)
        per_vertebra = _per_vertebra(res, bg)
        meta = {
            "case_id": cid,
            "scan": scan.name,
            "subject": scan.subject,
            "variant": k if targets is None else None,
            "background": str(scan.ct),
            "vertebrae_source": str(scan.vertebrae),
            "label_scheme": scan.label_scheme,
            "seed": int(seed),
            "generator": "vfsearch.core.phantom.simulate_fractures",
            "geometry": bg.ct.geometry.to_dict(),
            "vertebrae": per_vertebra,
        }
        _write_case(
            out, cid, res.ct, res.vertebrae.astype(np.uint8), res.fracture, bg.ct.geometry, meta
        )
        grades = {v: int(per_vertebra[str(v)]["grade"]) for v in bg.present}
        rows.append([*_manifest_row(cid, grades), scan.subject])
        done.append(res.meta)
    _remove_stale(out, keep={r[0] for r in rows})
    _write_manifest(out, rows, BACKGROUND_COLUMNS)
    if targets is not None and len(rows) == 1 and res is not None:
        cid = rows[0][0]
        text = ", ".join(
            f"{m['name']} grade {m['grade']} {m['morphology']} (height ratio "
            f"{m['height_ratio_before']:.2f} -> {m['height_ratio']:.2f})"
            for m in res.meta.values()
        )
        return (
            f"simulated {text} on {scans[0].ct}; wrote {out / cid} and {out / MANIFEST} "
            f"({int(res.fracture.sum())} fracture voxels)"
        )
    fractured = [m for d in done for m in d.values()]
    g = np.asarray([m["grade"] for m in fractured], dtype=int)
    morph = [m["morphology"] for m in fractured]
    per_scan = f"{variants} per scan" if targets is None else "--fracture " + str(fracture)
    return (
        f"wrote {len(rows)} case(s) from {len(kept)} scan(s) ({per_scan}) to {out} in "
        f"{time.monotonic() - start:.1f} s: {sum(1 for d in done if not d)} without a "
        f"fracture, {len(fractured)} fractured vertebrae (grade 1/2/3: {(g == 1).sum()}/"
        f"{(g == 2).sum()}/{(g == 3).sum()}; "
        f"{'/'.join(phantom.MORPHOLOGIES)}: "
        f"{'/'.join(str(morph.count(m)) for m in phantom.MORPHOLOGIES)}); "
        f"manifest {out / MANIFEST}"
    )


def variant_rng(seed: int, scan: str, k: int) -> np.random.Generator:
    """Generator of variant ``k`` of scan ``scan`` (independent of the other scans and of N)."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(scan.encode("utf-8")), int(k)])
    )


def draw_fractures(rng: np.random.Generator, complete: list[int]) -> dict[int, tuple[int, str]]:
    """Random fractures of one variant among the fully imaged vertebrae ``complete``.

    None with probability `NO_FRACTURE_SHARE`, else 1..`MAX_FRACTURED` distinct vertebrae,
    each ``(grade 1-3, morphology)`` drawn uniformly.
    """
    if not complete or rng.random() < NO_FRACTURE_SHARE:
        return {}
    n = int(rng.integers(1, min(MAX_FRACTURED, len(complete)) + 1))
    chosen = sorted(int(v) for v in rng.choice(np.asarray(complete), size=n, replace=False))
    return {
        v: (int(rng.integers(1, 4)), str(MORPHOLOGIES[int(rng.integers(len(MORPHOLOGIES)))]))
        for v in chosen
    }


def background_scans(background: Path, vertebrae: Path | None, label_scheme: str) -> list[Scan]:
    """The scans ``--background`` names: one CT (with ``vertebrae``), a manifest or a folder."""
    background = Path(background).expanduser()
    if vertebrae is not None:
        sid = _background_case_id(background)
        return [
            Scan(sid, background, Path(vertebrae).expanduser(), label_scheme, sid, str(background))
        ]
    if background.is_file() and background.suffix.lower() == ".csv":
        scans = _scans_from_manifest(background, label_scheme)
    elif background.is_dir() and (background / "rawdata").is_dir():
        scans = _scans_from_verse_tree(background, label_scheme)
    elif background.is_dir():
        scans = _scans_from_folder(background, label_scheme)
    elif not background.exists():
        raise UserError(f"{background}: --background not found")
    else:
        raise UserError(
            f"--vertebrae: required when --background is one CT ({background}); "
            f"or give a folder or a manifest CSV of scans"
        )
    seen: dict[str, str] = {}
    for scan in scans:
        if scan.name in seen:
            raise UserError(
                f"{scan.origin}: scan name {scan.name!r} is also used by "
                f"{seen[scan.name]}; scan names must be unique"
            )
        seen[scan.name] = scan.origin
    return scans


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_SCHEME_TAGS = {
    "verse": "verse",
    "totalseg": "totalsegmentator",
    "totalsegmentator": "totalsegmentator",
}


def _scans_from_manifest(path: Path, label_scheme: str) -> list[Scan]:
    scans = []
    for line, sid, cell in manifest_rows(path):
        where = f"{path} line {line}"
        for key in ("ct", "vertebrae"):
            if not cell(key):
                raise UserError(f"{where}: empty {key} for scan {sid!r}")
        scheme = cell("label_scheme").lower() or label_scheme
        if scheme not in SCHEMES:
            raise UserError(
                f"{where}: label_scheme {cell('label_scheme')!r} must be one of "
                f"{', '.join(SCHEMES)}"
            )
        scans.append(
            Scan(
                sid,
                _resolve(path.parent, cell("ct")),
                _resolve(path.parent, cell("vertebrae")),
                scheme,
                cell("subject") or sid,
                where,
            )
        )
    if not scans:
        raise UserError(f"{path}: manifest has no scans")
    return scans


def _scans_from_folder(root: Path, label_scheme: str) -> list[Scan]:
    scans = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        cts = [sub / f"ct{x}" for x in _IMAGE_SUFFIXES if (sub / f"ct{x}").is_file()]
        if not cts:
            continue
        if len(cts) > 1:
            raise UserError(f"{sub}: several CTs ({', '.join(p.name for p in cts)}); keep one")
        labels = sorted(
            p
            for p in sub.iterdir()
            if p.is_file() and p.name.lower().startswith("vertebrae") and _image_stem(p.name)
        )
        if len(labels) != 1:
            raise UserError(
                f"{sub}: expected one vertebrae*.nii.gz label map next to "
                f"{cts[0].name}, found "
                f"{', '.join(p.name for p in labels) if labels else 'none'}"
            )
        tag = (_image_stem(labels[0].name) or "")[len("vertebrae") :].strip("_-.").lower()
        sid = re.sub(r"[^A-Za-z0-9_.-]+", "_", sub.name).strip("._-") or "scan"
        scans.append(
            Scan(sid, cts[0], labels[0], _SCHEME_TAGS.get(tag, label_scheme), sid, str(sub))
        )
    if not scans:
        raise UserError(
            f"{root}: no scans found (expected <name>/ct.nii.gz with "
            f"<name>/vertebrae*.nii.gz, or a VerSe rawdata/ tree); for one CT, "
            f"give --vertebrae"
        )
    return scans


def _scans_from_verse_tree(root: Path, label_scheme: str) -> list[Scan]:
    return [
        Scan(s.case_id, Path(s.ct), Path(s.vertebrae), label_scheme, s.subject, s.origin)
        for s in read_verse_tree(root)
    ]


@dataclass
class _Background:
    ct: Volume  # array (z, y, x) as stored and geometry
    labels: np.ndarray  # VerSe ids T4..L5 (uint8), as stored
    present: list[int]
    complete: list[int]  # present and fully imaged (not cut by the scan's edge)


def _read_scan(scan: Scan) -> _Background:
    ct = read_volume(scan.ct, what="CT")
    lab = read_volume(scan.vertebrae, what="vertebra labels")
    if ct.shape != lab.shape or not ct.geometry.same_space(lab.geometry, ct.shape, lab.shape):
        raise UserError(
            f"{scan.vertebrae}: label grid (size {lab.shape[::-1]}, spacing "
            f"{_fmt(lab.geometry.spacing)}) does not match the CT {scan.ct} (size "
            f"{ct.shape[::-1]}, spacing {_fmt(ct.geometry.spacing)})"
        )
    labels = to_verse(lab.array, scan.label_scheme, source=str(scan.vertebrae))
    del lab
    present = [int(v) for v in np.unique(labels) if v in TARGET_IDS]
    if not present:
        raise UserError(
            f"{scan.vertebrae}: no vertebra T4..L5 in the label map "
            f"(label scheme {scan.label_scheme!r}; try --label-scheme)"
        )
    lab_c = to_canonical(labels, ct.geometry)[2].apply(labels)
    complete = [v for v in present if _complete(lab_c == v)]
    return _Background(ct, labels, present, complete)


def _check_targets(scan: Scan, bg: _Background, targets: dict[int, tuple[int, str]]) -> None:
    for vid in targets:
        if vid not in bg.present:
            raise UserError(
                f"--fracture: {name(vid)} ({vid}) is not in {scan.vertebrae} "
                f"(present: {', '.join(name(v) for v in bg.present)})"
            )
        if vid not in bg.complete:
            raise UserError(
                f"--fracture: {name(vid)} ({vid}) is cut by the scan's edge in "
                f"{scan.vertebrae} (its label reaches the first or last slice "
                f"along the height axis), so it cannot take a height-reducing "
                f"fracture; fully imaged: "
                f"{', '.join(name(v) for v in bg.complete) or 'none'}"
            )


def _per_vertebra(res, bg: _Background) -> dict[str, dict]:
    """meta.json entries for every labelled vertebra of a simulated case."""
    _, geom_c, ro = to_canonical(res.vertebrae, bg.ct.geometry)
    sp_zyx = geom_c.spacing[::-1]
    new_c = ro.apply(res.vertebrae)
    out: dict[str, dict] = {}
    for v in bg.present:
        cut = v not in bg.complete
        if v in res.meta:
            out[str(v)] = {**res.meta[v], "cut_by_edge": cut}
            continue
        h = phantom.measure_heights(new_c, v, sp_zyx)
        out[str(v)] = {
            "name": name(v),
            "grade": 0,
            "morphology": "none",
            "height_ratio": round(h["ratio"], 4),
            "heights_mm": [round(x, 2) for x in h["heights_mm"]],
            "cut_by_edge": cut,
            "note": (
                "cut by the scan's edge: not simulated, heights are of the imaged part"
                if cut
                else "not simulated (the scan's own state is unknown)"
            ),
        }
    return out


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _fmt(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _complete(mask: np.ndarray) -> bool:
    """A vertebra is fully imaged when its label does not touch the first or last z slice.

    ``mask`` must be in canonical orientation: axis 0 is then z, the axis body heights are
    measured along (`phantom.fully_imaged`, which `simulate_fractures` also enforces).
    """
    return fully_imaged(mask)


def _image_stem(filename: str) -> str | None:
    """``"vertebrae_verse.nii.gz" -> "vertebrae_verse"``; None for other files."""
    low = filename.lower()
    for suffix in _IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _resolve(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _background_case_id(background: Path) -> str:
    stem = background.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower() in ("ct", "image", "img", "") or background.is_dir():
        stem = background.parent.name if not background.is_dir() else background.name
    cid = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._-") or "background"
    return cid


def _is_synth_output(out: Path) -> bool:
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    try:
        with manifest.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            listed = {row[0] for row in reader if row}
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    if tuple(header) not in (MANIFEST_COLUMNS, BACKGROUND_COLUMNS):
        return False
    for entry in out.iterdir():
        if entry.name == MANIFEST or entry.name.startswith(_TMP_PREFIX):
            continue
        if not entry.is_dir() or not (
            entry.name in listed or re.fullmatch(r"synth_\d+", entry.name)
        ):
            return False
    return True


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_synth_output(out):
        raise UserError(
            f"{out}: folder is not empty and is not an earlier synth output; "
            f"choose a new or empty folder"
        )


def _write_case(
    out: Path,
    cid: str,
    ct: np.ndarray,
    vertebrae: np.ndarray,
    fracture: np.ndarray,
    geometry: Geometry,
    meta: dict,
) -> Path:
    """Write one case folder under a temporary name, then rename it into place."""
    tmp = out / f"{_TMP_PREFIX}{cid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_volume(tmp / "ct.nii.gz", ct, geometry)
        write_volume(tmp / "vertebrae.nii.gz", vertebrae.astype(np.uint8), geometry)
        write_volume(tmp / "fracture.nii.gz", fracture.astype(np.uint8), geometry)
        (tmp / "meta.json").write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True) + "\n")
        final = out / cid
        if final.exists():
            old = out / f"{_TMP_PREFIX}old-{cid}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_stale(out: Path, keep: set[str]) -> None:
    """Drop case folders of an earlier synth run that the new manifest will not list."""
    for entry in out.iterdir():
        if (
            entry.is_dir()
            and entry.name not in keep
            and (
                re.fullmatch(r"synth_\d+", entry.name)
                or entry.name.startswith(_TMP_PREFIX)
                or (entry / "meta.json").is_file()
            )
        ):
            shutil.rmtree(entry, ignore_errors=True)


def _manifest_row(cid: str, grades: dict[int, int]) -> list[str]:
    return [
        cid,
        f"{cid}/ct.nii.gz",
        f"{cid}/vertebrae.nii.gz",
        f"{cid}/fracture.nii.gz",
        ";".join(f"{v}:{g}" for v, g in sorted(grades.items())),
    ]


def _write_manifest(
    out: Path, rows: list[list[str]], columns: tuple[str, ...] = MANIFEST_COLUMNS
) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    tmp = out / f"{_TMP_PREFIX}{MANIFEST}"
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out / MANIFEST)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
