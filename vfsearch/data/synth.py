"""`vfsearch synth`: write synthetic cases (or fractures simulated on a real scan) to a folder.

Orchestration only: volumes come from `vfsearch.data.phantom` and are written through
`vfsearch.data.io`. Layout of ``OUT``::

    OUT/manifest.csv                 case_id,ct,vertebrae,fracture,grades (paths relative to OUT)
    OUT/<case_id>/ct.nii.gz          int16 HU (a real background keeps its own pixel type)
    OUT/<case_id>/vertebrae.nii.gz   uint8 VerSe ids 11-24 (T4..L5), whole vertebrae
    OUT/<case_id>/fracture.nii.gz    uint8 0/1: deformed endplate zone + sclerotic band
    OUT/<case_id>/meta.json          case values and, per vertebra, grade, morphology, ratio

Every case folder is written under a hidden temporary name and renamed when complete, and the
manifest is replaced atomically, so an interrupted run leaves no half-written case. Same seed,
same bytes: case ``k`` uses a generator seeded by ``(seed, k)`` whatever the number of cases.
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
from pathlib import Path

import numpy as np

from vfsearch.errors import UserError

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("case_id", "ct", "vertebrae", "fracture", "grades")
CASE_FILES = ("ct.nii.gz", "vertebrae.nii.gz", "fracture.nii.gz", "meta.json")
_TMP_PREFIX = ".tmp-"


def case_id(index: int) -> str:
    """``0 -> "synth_000"``."""
    return f"synth_{index:03d}"


def synth_dataset(out: Path, *, cases: int, seed: int,
                  spacing: tuple[float, float, float] | None, small: bool,
                  fracture_rate: float) -> str:
    """Write ``cases`` phantom cases and ``manifest.csv`` into ``out``; return a summary line.

    ``spacing`` (x, y, z) mm or None for the default (0.8, 0.8, 2.0; ``small``: 2, 2, 2).
    ``out`` must be absent, empty or an earlier synth output (which is replaced).
    """
    from vfsearch.data import phantom

    out = Path(out)
    if cases < 1:
        raise UserError(f"--cases: must be at least 1, got {cases}")
    if not 0.0 <= fracture_rate <= 1.0:
        raise UserError(f"--fracture-rate: must be between 0 and 1, got {fracture_rate}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) < 0.3 or max(spacing) > 4.0):
        raise UserError(f"--spacing: each value must be between 0.3 and 4 mm, got {spacing}")
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows, grades_all = [], []
    ids = [case_id(k) for k in range(cases)]
    for k in _progress(range(cases), "synth"):
        case = phantom.make_case(phantom.case_rng(seed, k), spacing=spacing, small=small,
                                 fracture_rate=fracture_rate)
        meta = {"case_id": ids[k], "seed": int(seed), "case_index": k,
                "generator": "vfsearch.data.phantom", "geometry": case.geometry.to_dict(),
                **case.info, "vertebrae": {str(v): m for v, m in sorted(case.meta.items())}}
        _write_case(out, ids[k], case.ct, case.vertebrae, case.fracture, case.geometry, meta)
        grades = {v: int(m["grade"]) for v, m in case.meta.items()}
        grades_all.extend(grades.values())
        rows.append(_manifest_row(ids[k], grades))
    _remove_stale(out, keep=set(ids))
    _write_manifest(out, rows)
    g = np.asarray(grades_all)
    sp = spacing or (phantom.SMALL_SPACING if small else phantom.DEFAULT_SPACING)
    n_frac = int((g > 0).sum())
    return (f"wrote {cases} synthetic case(s) to {out} in {time.monotonic() - start:.1f} s: "
            f"{len(g)} vertebrae, {n_frac} fractured ({100.0 * n_frac / max(1, len(g)):.0f} %, "
            f"grade 1/2/3: {(g == 1).sum()}/{(g == 2).sum()}/{(g == 3).sum()}), spacing "
            f"{','.join(f'{v:g}' for v in sp)} mm; manifest {out / MANIFEST}")


def parse_fracture_spec(spec: str) -> dict[int, tuple[int, str]]:
    """``"22:2:wedge,L1:3"`` -> ``{22: (2, "wedge"), 20: (3, "wedge")}`` (VerSe ids or names).

    Grade defaults to 2 and morphology to wedge when left out.
    """
    from vfsearch.data.labels import verse_id
    from vfsearch.data.phantom import MORPHOLOGIES

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
            raise UserError(f"--fracture: unknown vertebra {parts[0]!r} in {item!r} "
                            f"(use VerSe ids or names like T12, L1)") from None
        try:
            grade = int(parts[1]) if len(parts) > 1 and parts[1] else 2
        except ValueError:
            grade = -1
        if grade not in (1, 2, 3):
            raise UserError(f"--fracture: grade must be 1, 2 or 3 in {item!r}")
        morph = parts[2].lower() if len(parts) > 2 and parts[2] else "wedge"
        if morph not in MORPHOLOGIES:
            raise UserError(f"--fracture: morphology must be one of {', '.join(MORPHOLOGIES)} "
                            f"in {item!r}")
        if vid in out:
            raise UserError(f"--fracture: vertebra {parts[0]} given twice")
        out[vid] = (grade, morph)
    if not out:
        raise UserError(f"--fracture: no vertebra given in {spec!r}")
    return out


def synth_on_background(background: Path | None, vertebrae: Path | None, out: Path, *,
                        fracture: str | None, seed: int, label_scheme: str) -> str:
    """Simulate fractures on a real CT and write one case and a manifest into ``out``.

    ``vertebrae`` is the label map of ``background`` (same grid) in ``label_scheme``
    ("verse" or "totalsegmentator"); the written label map uses VerSe ids 11-24 (T4..L5).
    ``fracture`` like ``"22:2:wedge,L1:3:crush"``; default: one random, fully imaged vertebra,
    grade 2, random morphology. Output volumes keep the input's grid (size, spacing, origin,
    direction) and the CT keeps its pixel type.
    """
    from vfsearch.data import phantom
    from vfsearch.data.geometry import to_canonical
    from vfsearch.data.io import read_volume
    from vfsearch.data.labels import TARGET_IDS, name, to_verse

    if background is None:
        raise UserError("--background: required with --vertebrae")
    if vertebrae is None:
        raise UserError("--vertebrae: required with --background (the scan's vertebra labels)")
    background, vertebrae, out = Path(background), Path(vertebrae), Path(out)
    targets = parse_fracture_spec(fracture) if fracture is not None else None
    ct = read_volume(background, what="CT")
    lab = read_volume(vertebrae, what="vertebra labels")
    if ct.shape != lab.shape or not ct.geometry.same_space(lab.geometry, ct.shape, lab.shape):
        raise UserError(f"{vertebrae}: label grid (size {lab.shape[::-1]}, spacing "
                        f"{_fmt(lab.geometry.spacing)}) does not match the CT {background} (size "
                        f"{ct.shape[::-1]}, spacing {_fmt(ct.geometry.spacing)})")
    labels = to_verse(lab.array, label_scheme, source=str(vertebrae))
    present = [int(v) for v in np.unique(labels) if v in TARGET_IDS]
    if not present:
        raise UserError(f"{vertebrae}: no vertebra T4..L5 in the label map "
                        f"(label scheme {label_scheme!r}; try --label-scheme)")
    rng = phantom.case_rng(seed, 0)
    lab_c = to_canonical(labels, ct.geometry)[2].apply(labels)
    if targets is None:
        complete = [v for v in present if _complete(lab_c == v)] or present
        vid = int(rng.choice(complete))
        targets = {vid: (2, str(rng.choice(phantom.MORPHOLOGIES)))}
    for vid in targets:
        if vid not in present:
            raise UserError(f"--fracture: {name(vid)} ({vid}) is not in {vertebrae} (present: "
                            f"{', '.join(name(v) for v in present)})")
    _check_out(out)
    res = phantom.simulate_fractures(ct.array, labels, ct.geometry, targets, rng)
    _, geom_c, ro = to_canonical(res.vertebrae, ct.geometry)
    sp_zyx = tuple(geom_c.spacing[::-1])
    new_c = ro.apply(res.vertebrae)
    per_vertebra: dict[str, dict] = {}
    for v in present:
        if v in res.meta:
            per_vertebra[str(v)] = res.meta[v]
        else:
            h = phantom.measure_heights(new_c, v, sp_zyx)
            per_vertebra[str(v)] = {
                "name": name(v), "grade": 0, "morphology": "none",
                "height_ratio": round(h["ratio"], 4),
                "heights_mm": [round(x, 2) for x in h["heights_mm"]],
                "note": "not simulated (the scan's own state is unknown)"}
    cid = _background_case_id(background)
    meta = {"case_id": cid, "background": str(background), "vertebrae_source": str(vertebrae),
            "label_scheme": label_scheme, "seed": int(seed),
            "generator": "vfsearch.data.phantom.simulate_fractures",
            "geometry": ct.geometry.to_dict(), "vertebrae": per_vertebra}
    out.mkdir(parents=True, exist_ok=True)
    _write_case(out, cid, res.ct, res.vertebrae.astype(np.uint8), res.fracture, ct.geometry, meta)
    _remove_stale(out, keep={cid})
    grades = {v: int(per_vertebra[str(v)]["grade"]) for v in present}
    _write_manifest(out, [_manifest_row(cid, grades)])
    done = ", ".join(f"{m['name']} grade {m['grade']} {m['morphology']} (height ratio "
                     f"{m['height_ratio_before']:.2f} -> {m['height_ratio']:.2f})"
                     for m in res.meta.values())
    return (f"simulated {done} on {background}; wrote {out / cid} and {out / MANIFEST} "
            f"({int(res.fracture.sum())} fracture voxels)")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _fmt(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _complete(mask: np.ndarray) -> bool:
    """A vertebra is fully imaged when it does not touch the first or last z slice."""
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    return bool(len(zs)) and zs[0] > 0 and zs[-1] < mask.shape[0] - 1


def _background_case_id(background: Path) -> str:
    stem = background.name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem.lower() in ("ct", "image", "img", "") or background.is_dir():
        stem = background.parent.name if not background.is_dir() else background.name
    cid = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "background"
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
    if tuple(header) != MANIFEST_COLUMNS:
        return False
    for entry in out.iterdir():
        if entry.name == MANIFEST or entry.name.startswith(_TMP_PREFIX):
            continue
        if not entry.is_dir() or not (entry.name in listed or re.fullmatch(r"synth_\d+",
                                                                              entry.name)):
            return False
    return True


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not _is_synth_output(out):
        raise UserError(f"{out}: folder is not empty and is not an earlier synth output; "
                        f"choose a new or empty folder")


def _write_case(out: Path, cid: str, ct: np.ndarray, vertebrae: np.ndarray,
                fracture: np.ndarray, geometry, meta: dict) -> Path:
    """Write one case folder under a temporary name, then rename it into place."""
    from vfsearch.data.io import write_volume

    tmp = out / f"{_TMP_PREFIX}{cid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_volume(tmp / "ct.nii.gz", ct, geometry)
        write_volume(tmp / "vertebrae.nii.gz", vertebrae.astype(np.uint8), geometry)
        write_volume(tmp / "fracture.nii.gz", fracture.astype(np.uint8), geometry)
        (tmp / "meta.json").write_text(json.dumps(_jsonable(meta), indent=1, sort_keys=True)
                                       + "\n")
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
        if entry.is_dir() and entry.name not in keep and (
                re.fullmatch(r"synth_\d+", entry.name) or entry.name.startswith(_TMP_PREFIX)
                or (entry / "meta.json").is_file()):
            shutil.rmtree(entry, ignore_errors=True)


def _manifest_row(cid: str, grades: dict[int, int]) -> list[str]:
    return [cid, f"{cid}/ct.nii.gz", f"{cid}/vertebrae.nii.gz", f"{cid}/fracture.nii.gz",
            ";".join(f"{v}:{g}" for v, g in sorted(grades.items()))]


def _write_manifest(out: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
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


def _progress(items, desc: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:  # a plain counter instead
        return _counter(items, desc)
    return tqdm(items, desc=desc, unit="case", file=sys.stderr, disable=None)


def _counter(items, desc: str):
    items = list(items)
    tty = sys.stderr.isatty()
    for i, item in enumerate(items, 1):
        yield item
        if tty:
            print(f"\r{desc}: {i}/{len(items)}", end="" if i < len(items) else "\n",
                  file=sys.stderr, flush=True)
