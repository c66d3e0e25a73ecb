"""Vertebra crops of one CT, as array maths: reorient, cut the region of interest, resample it
onto the training spacing, crop every T4..L5 vertebra with a margin.

The half of ingest's per-case work that reads no file. `vfsearch.pipelines.ingest` runs these
stages with its reads and checks of the source files in between (`prepare_case`), and
`crop_arrays` runs them on arrays already in memory (the inference path,
`vfsearch.core.inference.fuse_case`), so a scan is cropped for prediction exactly as its
training data was for the store.

Stages, in order::

    check_ct                 CT voxels finite numbers
    canonical                reorient to the canonical grid by permutations and flips only
    vertebrae_from_labels /  canonical bounding box of every present T4..L5 vertebra, from a
    vertebrae_from_boxes     VerSe label map or from boxes in the CT's stored grid
    resample_region          all present vertebrae + margin (+2 voxels), resampled onto
                             ``spacing`` (linear, HU rounded and clipped to int16)
    cut_vertebrae            per vertebra: robust label box + margin, clipped; image,
                             fracture and mask crops with their attributes

Resampling between grids is SimpleITK's (`vfsearch.adapters.volumes`). The stages that need
it take a `Resampler`; that module is one (its ``resample`` and ``resample_to``), so this
module imports no I/O library. Arrays are ``(z, y, x)``; boxes ``(z0, y0, x0, z1, y1, x1)``,
half-open.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry, Reorientation, to_canonical
from vfsearch.core.labels import TARGET_IDS, to_verse
from vfsearch.core.labels import name as vertebra_name
from vfsearch.core.windows import PLANE_AXIS

HU_MIN, HU_MAX = -1024, 3071  # stored crops: int16 HU clipped to this range

Box = tuple[int, int, int, int, int, int]  # (z0, y0, x0, z1, y1, x1), half-open


class Resampled(Protocol):
    """An array with the grid it lies on (`vfsearch.adapters.volumes.Volume`)."""

    array: np.ndarray
    geometry: Geometry


class Resampler(Protocol):
    """Resampling in physical space; `vfsearch.adapters.volumes` (SimpleITK) is one."""

    def resample(
        self,
        array: np.ndarray,
        geometry: Geometry,
        spacing: tuple[float, float, float],
        *,
        nearest: bool = False,
        default: float = 0.0,
    ) -> Resampled:
        """``array`` onto a grid of ``spacing`` (x, y, z mm) over the same extent, same origin
        and direction (size = round(extent / spacing)); linear, or ``nearest`` for labels."""
        ...

    def resample_to(
        self,
        array: np.ndarray,
        geometry: Geometry,
        target: Geometry,
        shape_zyx: tuple[int, int, int],
        *,
        nearest: bool = False,
        default: float = 0.0,
    ) -> np.ndarray:
        """``array`` onto the grid ``target`` of ``shape_zyx``; ``default`` outside."""
        ...


@dataclass
class Crop:
    """One vertebra crop: ``arrays`` image/fracture/mask (z, y, x) and its attributes."""

    vid: int
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Canonical:
    """The canonical grid of a CT (identity-like direction) and how the CT reached it."""

    geometry: Geometry
    shape: tuple[int, int, int]
    reorientation: Reorientation

    def onto(self, array: np.ndarray, geometry: Geometry, resampler: Resampler) -> np.ndarray:
        """A volume of the CT's space (label map, fracture mask) on this grid: reoriented,
        and resampled (nearest) only when its grid is the same space within tolerance but
        not voxel for voxel (an oblique grid)."""
        arr, g, _ = to_canonical(array, geometry)
        if (
            arr.shape == self.shape
            and np.allclose(g.origin, self.geometry.origin, atol=1e-3)
            and np.allclose(g.direction, self.geometry.direction, atol=1e-4)
        ):
            return arr
        return resampler.resample_to(arr, g, self.geometry, self.shape, nearest=True)


@dataclass
class Vertebrae:
    """The vertebrae of a case on its canonical grid.

    ``boxes``: canonical box per vertebra (None: outside the grid); ``present``: the T4..L5
    ids to crop, in order; ``labels``: canonical VerSe ids (None when given as boxes);
    ``stored_boxes``: the boxes as given, in the CT's stored index grid (boxes only).
    """

    boxes: dict[int, Box | None]
    present: list[int]
    labels: np.ndarray | None = None
    stored_boxes: Mapping[int, Box] | None = None

    @property
    def source(self) -> str:
        """``labels`` or ``boxes`` (the case attribute ``vertebrae_source``)."""
        return "boxes" if self.labels is None else "labels"


@dataclass
class Region:
    """The region of interest of a case: canonical box ``lo``..``hi`` (z, y, x), its
    geometry ``roi_geometry``, and the CT over it resampled onto ``spacing``: ``image``
    int16 HU on ``geometry``."""

    lo: np.ndarray
    hi: np.ndarray
    roi_geometry: Geometry
    spacing: tuple[float, float, float]
    image: np.ndarray
    geometry: Geometry

    @property
    def roi(self) -> tuple[slice, ...]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi, strict=True))


@dataclass
class CaseCrops:
    """The crops of one case and the grids that lead back from them to the CT.

    ``ct_geometry``/``ct_shape``: the CT as given; ``labels``: its VerSe label map on that
    grid when `crop_arrays` was given one (None otherwise).
    """

    crops: list[Crop]
    ct_geometry: Geometry
    ct_shape: tuple[int, int, int]
    canonical: Canonical
    region: Region
    vertebrae_source: str
    labels: np.ndarray | None = None

    def attrs(self) -> dict[str, Any]:
        """The case attributes of the store that describe these grids (see
        `vfsearch.pipelines.ingest`)."""
        c, r = self.canonical, self.region
        return {
            "vertebrae_source": self.vertebrae_source,
            "ct_geometry": self.ct_geometry.to_dict(),
            "ct_shape": [int(v) for v in self.ct_shape],
            "reorientation": c.reorientation.to_dict(),
            "orientation": "LPS (identity direction)",
            "canonical_geometry": c.geometry.to_dict(),
            "canonical_shape": [int(v) for v in c.shape],
            "roi_box": [int(v) for v in (*r.lo, *r.hi)],
            "resampled_geometry": r.geometry.to_dict(),
            "resampled_shape": [int(v) for v in r.image.shape],
            "resampling": {
                "spacing": list(r.spacing),
                "image": "linear",
                "labels": "nearest",
                "grid": "origin and direction of the canonical ROI, size round(extent / spacing)",
            },
        }


# -- checks ---------------------------------------------------------------------------------------
def check_ct(array: np.ndarray, source: str) -> None:
    """`UserError` unless the CT's voxels are finite numbers (``source`` names it)."""
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise UserError(f"{source}: CT contains NaN or infinite values")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{source}: CT voxels must be numbers, got {array.dtype}")


def check_same_grid(
    ct_shape: tuple[int, ...],
    ct_geometry: Geometry,
    shape: tuple[int, ...],
    geometry: Geometry,
    *,
    ct_source: str,
    source: str,
    what: str,
) -> None:
    """`UserError` unless a volume's grid (``shape``, ``geometry``) covers the CT's voxels in
    physical space (`Geometry.same_space`). ``what``: "label map", "fracture mask"."""
    if not ct_geometry.same_space(geometry, ct_shape, shape):

        def desc(g: Geometry, s: tuple[int, ...]) -> str:
            return (
                f"size {'x'.join(str(n) for n in s[::-1])}, spacing "
                f"{','.join(f'{v:.3g}' for v in g.spacing)}, origin "
                f"{','.join(f'{o:.1f}' for o in g.origin)}"
            )

        raise UserError(
            f"{source}: {what} grid differs from the CT's in physical space "
            f"({desc(geometry, shape)} vs CT {PurePath(ct_source).name}: "
            f"{desc(ct_geometry, ct_shape)})"
        )


def fracture_values(arr: np.ndarray, source: str) -> np.ndarray:
    """0/1 uint8 from a fracture mask of integers >= 0 (grades allowed: > 0 is fracture)."""
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise UserError(f"{source}: fracture mask contains NaN or infinite values")
        frac = arr != np.rint(arr)
        if frac.any():
            raise UserError(
                f"{source}: fracture mask has non-integer values (e.g. "
                f"{float(arr[frac][0]):.3g}); expected 0/1 (or integer grades)"
            )
    if arr.size and arr.min() < 0:
        raise UserError(
            f"{source}: fracture mask has negative values (min {arr.min()}); "
            f"expected 0/1 (or integer grades)"
        )
    return (arr > 0).astype(np.uint8)


def no_target_vertebra(source: str, label_scheme: str, raw_labels: np.ndarray) -> UserError:
    """The error for a label map without any T4..L5 vertebra (``raw_labels``: the map as
    given, before `vfsearch.core.labels.to_verse`, for the ids it does hold)."""
    ids = [int(v) for v in np.unique(raw_labels) if v != 0][:20]
    found = ", ".join(str(v) for v in ids) or "none"
    return UserError(
        f"{source}: no T4..L5 vertebra label (label scheme {label_scheme}: "
        f"T4..L5 = {'11..24' if label_scheme == 'verse' else '40..27'}; "
        f"found ids {found})"
    )


# -- grids and boxes -------------------------------------------------------------------------------
def box_in_grid(
    box_zyx: Sequence[int], src: Geometry, dst: Geometry, dst_shape: tuple[int, ...]
) -> Box | None:
    """Half-open voxel box of ``src`` -> the voxels of ``dst`` whose centres lie inside it."""
    z0, y0, x0, z1, y1, x1 = box_zyx
    corners = np.array(
        [
            [z, y, x]
            for z in (z0 - 0.5, z1 - 0.5)
            for y in (y0 - 0.5, y1 - 0.5)
            for x in (x0 - 0.5, x1 - 0.5)
        ]
    )
    idx = dst.physical_to_index(src.zyx_to_physical(corners))[:, ::-1]  # (8, zyx)
    lo = np.ceil(idx.min(axis=0) - 1e-6).astype(int)
    hi = np.floor(idx.max(axis=0) + 1e-6).astype(int) + 1
    lo = np.clip(lo, 0, dst_shape)
    hi = np.clip(hi, 0, dst_shape)
    if np.any(hi <= lo):
        return None
    return (*lo.tolist(), *hi.tolist())


def robust_bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the connected components of at least 10 % of the largest one."""
    cc, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(cc.ravel())[1:]
        keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
        mask = np.isin(cc, keep)
    box: tuple[slice, slice, slice] = ndimage.find_objects(mask.astype(np.uint8))[0]
    return box


# -- the stages -----------------------------------------------------------------------------------
def canonical(ct: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Canonical]:
    """The CT on its canonical grid (permutations and flips only) and that grid."""
    ct_c, geom_c, ro = to_canonical(ct, geometry)
    return ct_c, Canonical(geom_c, tuple(ct_c.shape), ro)


def vertebrae_from_labels(
    verse_labels: np.ndarray, geometry: Geometry, canon: Canonical, resampler: Resampler
) -> Vertebrae:
    """The present T4..L5 vertebrae of a VerSe label map (``geometry``: its grid, the CT's
    space) and their canonical boxes; ``present`` is empty when it has none
    (`no_target_vertebra` is the error to raise then)."""
    lab_c = canon.onto(verse_labels, geometry, resampler)
    # One pass gives every label's bounding box (and so which vertebrae are present).
    objects = ndimage.find_objects(lab_c)
    boxes: dict[int, Box | None] = {
        v: (*(s.start for s in objects[v - 1]), *(s.stop for s in objects[v - 1]))
        for v in TARGET_IDS
        if v - 1 < len(objects) and objects[v - 1]
    }
    return Vertebrae(boxes, sorted(boxes), labels=lab_c)


def vertebrae_from_boxes(
    boxes: Mapping[int, Box], ct_geometry: Geometry, canon: Canonical
) -> Vertebrae:
    """The vertebrae of boxes given in the CT's stored index grid (a bounding-box CSV)."""
    canon_boxes = {
        v: box_in_grid(b, ct_geometry, canon.geometry, canon.shape) for v, b in boxes.items()
    }
    present = [v for v in TARGET_IDS if canon_boxes.get(v)]
    return Vertebrae(canon_boxes, present, stored_boxes=boxes)


def resample_region(
    ct_c: np.ndarray,
    canon: Canonical,
    vertebrae: Vertebrae,
    *,
    spacing: Sequence[float],
    margin_mm: float,
    resampler: Resampler,
) -> Region:
    """Cut the region of interest (every present vertebra + ``margin_mm`` + 2 voxels for
    interpolation) out of the canonical CT ``ct_c`` and resample it onto ``spacing`` (x, y, z
    mm; linear, -1024 HU outside), rounded and clipped to int16 HU."""
    sp_c = np.asarray(canon.geometry.spacing)[::-1]  # zyx
    pad = np.ceil(margin_mm / sp_c).astype(int) + 2
    present = vertebrae.present
    lo = np.min([vertebrae.boxes[v][:3] for v in present], axis=0) - pad  # type: ignore[index]
    hi = np.max([vertebrae.boxes[v][3:] for v in present], axis=0) + pad  # type: ignore[index]
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, canon.shape)
    roi = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    geom_roi = canon.geometry.shifted(tuple(int(v) for v in lo))  # type: ignore[arg-type]
    target = tuple(float(s) for s in spacing)
    ct_r = resampler.resample(
        ct_c[roi].astype(np.float32),
        geom_roi,
        target,  # type: ignore[arg-type]
        default=HU_MIN,
    )
    image = np.clip(np.rint(ct_r.array), HU_MIN, HU_MAX).astype(np.int16)
    return Region(lo, hi, geom_roi, target, image, ct_r.geometry)  # type: ignore[arg-type]


def cut_vertebrae(
    region: Region,
    canon: Canonical,
    vertebrae: Vertebrae,
    fracture_c: np.ndarray | None,
    *,
    ct_geometry: Geometry,
    ct_shape: tuple[int, int, int],
    margin_mm: float,
    grades: Mapping[int, int] | None = None,
    resampler: Resampler,
    source: str = "vertebrae",
) -> CaseCrops:
    """Crop every present vertebra out of the resampled region.

    Crop box: the bounding box of the vertebra's label (components of at least 10 % of the
    largest, `robust_bbox`) or its given box, + ``margin_mm``, clipped to the region. Each
    crop holds ``image`` int16 HU, ``fracture`` uint8 (``fracture_c``, the canonical fracture
    mask, resampled nearest; zeros without one) and ``mask`` uint8 (this vertebra), and its
    attributes (`vfsearch.pipelines.ingest`); ``grades``: per VerSe id, else null. A vertebra
    too small to survive resampling is skipped; none left: `UserError` naming ``source``.
    """
    roi, geom_roi, target = region.roi, region.roi_geometry, region.spacing
    image, geom_r = region.image, region.geometry
    shape_r = image.shape
    lab_c = vertebrae.labels
    lab_r = (
        resampler.resample(lab_c[roi], geom_roi, target, nearest=True).array
        if lab_c is not None
        else None
    )
    frac_r = (
        resampler.resample(fracture_c[roi], geom_roi, target, nearest=True).array
        if fracture_c is not None
        else np.zeros(shape_r, np.uint8)
    )

    sp_r = np.asarray(target)[::-1]  # zyx
    margin = np.ceil(margin_mm / sp_r - 1e-6).astype(int)
    objects = ndimage.find_objects(lab_r) if lab_r is not None else []
    grades = grades or {}
    crops: list[Crop] = []
    for vid in vertebrae.present:
        if lab_r is not None:
            sl = objects[vid - 1] if vid - 1 < len(objects) else None
            if sl is None:
                continue  # too small to survive resampling
            sub = robust_bbox(lab_r[sl] == vid)
            box_lo = np.array([s.start + t.start for s, t in zip(sl, sub, strict=True)])
            box_hi = np.array([s.start + t.stop for s, t in zip(sl, sub, strict=True)])
        else:
            assert vertebrae.stored_boxes is not None
            b = box_in_grid(vertebrae.stored_boxes[vid], ct_geometry, geom_r, shape_r)
            if b is None:
                continue
            box_lo, box_hi = np.array(b[:3]), np.array(b[3:])
        c_lo = np.maximum(box_lo - margin, 0)
        c_hi = np.minimum(box_hi + margin, shape_r)
        crop = tuple(slice(int(a), int(b)) for a, b in zip(c_lo, c_hi, strict=True))
        if lab_r is not None:
            mask = (lab_r[crop] == vid).astype(np.uint8)
        else:
            mask = np.zeros(tuple(c_hi - c_lo), np.uint8)
            inner = zip(box_lo - c_lo, box_hi - c_lo, strict=True)
            mask[tuple(slice(int(a), int(b)) for a, b in inner)] = 1
        img = image[crop]
        fr = frac_r[crop]
        cb = vertebrae.boxes[vid]
        assert cb is not None
        partial = bool(
            any(a == 0 for a in cb[:3])
            or any(b == n for b, n in zip(cb[3:], canon.shape, strict=True))
        )
        crops.append(
            Crop(
                vid,
                {"image": img, "fracture": fr, "mask": mask},
                {
                    "verse_id": vid,
                    "name": vertebra_name(vid),
                    "grade": grades.get(vid),
                    "crop_box": [int(v) for v in (*c_lo, *c_hi)],
                    "label_box": [int(v) for v in (*box_lo, *box_hi)],
                    "shape": [int(v) for v in img.shape],
                    "geometry": geom_r.shifted(tuple(int(v) for v in c_lo)).to_dict(),  # type: ignore[arg-type]
                    "voxels": int(mask.sum()),
                    "fracture_voxels": int(fr.sum()),
                    "fractured": bool(fr[mask > 0].any()),
                    "partial": partial,
                    # fracture voxels per slice along each plane's axis (what the dataset's
                    # windows need to know without decoding the masks;
                    # windows.fracture_slice_counts)
                    "fracture_slices": {
                        plane: np.count_nonzero(
                            fr, axis=tuple(a for a in range(3) if a != ax)
                        ).tolist()
                        for plane, ax in PLANE_AXIS.items()
                    },
                },
            )
        )
    if not crops:
        raise UserError(
            f"{source}: T4..L5 labels vanish when resampled to spacing "
            f"{','.join(f'{s:g}' for s in target)} mm"
        )
    return CaseCrops(crops, ct_geometry, ct_shape, canon, region, vertebrae.source)


def crop_arrays(
    ct: np.ndarray,
    ct_geometry: Geometry,
    *,
    labels: np.ndarray | None = None,
    labels_geometry: Geometry | None = None,
    boxes: Mapping[int, Box] | None = None,
    label_scheme: str = "verse",
    spacing: Sequence[float],
    margin_mm: float,
    resampler: Resampler,
    ct_source: str = "ct",
    labels_source: str = "vertebrae",
) -> CaseCrops:
    """Every stage on arrays in memory: the crops of a CT ``(z, y, x)`` HU on ``ct_geometry``.

    The vertebrae come from ``labels`` (ids of ``label_scheme``, on ``labels_geometry``,
    default the CT's: a grid of the CT's space) or from ``boxes`` (VerSe id -> box in the CT's
    stored index grid). ``spacing`` (x, y, z mm) and ``margin_mm``: the training store's.
    ``ct_source``/``labels_source`` name the inputs in errors. The returned `CaseCrops`
    carries the VerSe label map on the labels' grid as ``labels``.
    """
    check_ct(ct, ct_source)
    ct_c, canon = canonical(ct, ct_geometry)
    verse = None
    if boxes is not None:
        vertebrae = vertebrae_from_boxes(boxes, ct_geometry, canon)
    elif labels is not None:
        lab_geometry = labels_geometry or ct_geometry
        check_same_grid(
            ct.shape,
            ct_geometry,
            labels.shape,
            lab_geometry,
            ct_source=ct_source,
            source=labels_source,
            what="label map",
        )
        verse = to_verse(labels, label_scheme, source=labels_source)
        vertebrae = vertebrae_from_labels(verse, lab_geometry, canon, resampler)
        if not vertebrae.present:
            raise no_target_vertebra(labels_source, label_scheme, labels)
    else:
        raise ValueError("crop_arrays: give labels or boxes")
    region = resample_region(
        ct_c, canon, vertebrae, spacing=spacing, margin_mm=margin_mm, resampler=resampler
    )
    del ct_c
    case = cut_vertebrae(
        region,
        canon,
        vertebrae,
        None,
        ct_geometry=ct_geometry,
        ct_shape=tuple(ct.shape),
        margin_mm=margin_mm,
        resampler=resampler,
        source=labels_source,
    )
    case.labels = verse
    return case


__all__ = [
    "HU_MAX",
    "HU_MIN",
    "Box",
    "Canonical",
    "CaseCrops",
    "Crop",
    "Region",
    "Resampled",
    "Resampler",
    "Vertebrae",
    "box_in_grid",
    "canonical",
    "check_ct",
    "check_same_grid",
    "crop_arrays",
    "cut_vertebrae",
    "fracture_values",
    "no_target_vertebra",
    "resample_region",
    "robust_bbox",
    "vertebrae_from_boxes",
    "vertebrae_from_labels",
]
