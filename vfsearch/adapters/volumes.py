"""Volume I/O and resampling: the only module that imports SimpleITK.

Reads NIfTI, MHA/MHD, NRRD and DICOM series folders (JPEG2000-compressed series included,
through GDCM) into a `Volume`: an array indexed ``(z, y, x)`` plus its `Geometry`.
Every failure a user can cause becomes a one-line `UserError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from vfsearch.adapters.files import atomic_path
from vfsearch.adapters.lazy import importer
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass
class Volume:
    """An image array ``(z, y, x)`` with the geometry that places it in scanner space."""

    array: np.ndarray
    geometry: Geometry

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


_sitk = importer("SimpleITK", setup=lambda m: m.ProcessObject_SetGlobalWarningDisplay(False))


def set_threads(n: int) -> None:
    """Threads each SimpleITK filter may use in this process (parallel ingest workers: few)."""
    _sitk().ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, int(n)))


def _geometry(image) -> Geometry:
    return Geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def to_image(array: np.ndarray, geometry: Geometry):
    """A SimpleITK image from an array (z, y, x) and its geometry."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def read_volume(path: str | os.PathLike, *, what: str = "image") -> Volume:
    """Read a 3D image file or a DICOM series folder.

    Raises `UserError` for a missing path, an unreadable or truncated file, a folder with no
    or several DICOM series, a series with a missing slice, and images that are not 3D.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    sitk = _sitk()
    if p.is_dir():
        image = _read_dicom_series(p, what)
    else:
        if p.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(p, what)
        try:
            with _quiet_stderr():
                image = sitk.ReadImage(str(p))
        except RuntimeError as exc:
            raise UserError(f"{p}: cannot read {what} ({_first_line(exc)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise UserError(f"{p}: {what} must be 3D, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(
            f"{p}: {what} must have one value per voxel, "
            f"got {image.GetNumberOfComponentsPerPixel()}"
        )
    try:
        with _quiet_stderr():
            array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:  # lazily decoded pixel data can still fail here
        raise UserError(f"{p}: cannot read {what} ({_first_line(exc)})") from None
    if (
        p.is_file()
        and p.name.lower().endswith((".nii", ".nii.gz"))
        and np.issubdtype(array.dtype, np.floating)
    ):
        # NIfTI voxels are stored x fastest, as this (z, y, x) array: put NaN back.
        nan = _nifti_nan_mask(p, what, array.size)
        if nan is not None:
            array = array.copy()
            array.reshape(-1)[nan] = np.nan
    return Volume(array, _geometry(image))


def _check_nifti_complete(p: pathlib.Path, what: str) -> None:
    """Reject a truncated NIfTI file (ITK silently fills the missing voxels with zeros)."""

    gz = p.name.lower().endswith(".gz")
    head = _nifti_read(p, what, 540)
    hdr = _nifti_header(head)
    if hdr is None:
        return  # not a header we understand: let ITK report the problem
    expected = hdr["offset"] + hdr["nbytes"]
    if not gz:
        size = p.stat().st_size
        if size < expected:
            raise UserError(f"{p}: {what} is truncated ({size} of {expected} bytes)")
        return
    # The gzip trailer holds the uncompressed size mod 2**32: a cheap check that passes for
    # every complete single-member file; otherwise decompress to be sure.
    with open(p, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", f.read(4))[0]
    if isize == expected % 2**32:
        return

    total = 0
    try:
        with gzip.open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        total = -1
    if total < expected:
        raise UserError(f"{p}: {what} is truncated or corrupt (compressed stream ends early)")


def _nifti_read(p: pathlib.Path, what: str, n: int = -1) -> bytes:

    try:
        with gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb") as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{p}: cannot read {what} ({exc})") from None


def _nifti_header(head: bytes) -> dict | None:
    """Dims, datatype, voxel offset and voxel bytes of a NIfTI-1/2 header (None: not NIfTI)."""

    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", head[70:74])
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            hsize = 348
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "hh", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            hsize = 540
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dims[1 : ndim + 1]:
        n *= max(int(d), 1)
    return {
        "endian": endian,
        "dims": dims[1 : ndim + 1],
        "datatype": datatype,
        "n": n,
        "offset": max(offset, hsize),
        "nbytes": n * bitpix // 8,
    }


def _nifti_nan_mask(p: pathlib.Path, what: str, size: int) -> np.ndarray | None:
    """Where a float NIfTI file stores NaN (ITK's reader turns NaN into 0), else None."""
    hdr = _nifti_header(_nifti_read(p, what, 540))
    dtypes = {16: "f4", 64: "f8"}
    if hdr is None or hdr["datatype"] not in dtypes or hdr["n"] != size:
        return None
    data = _nifti_read(p, what)[hdr["offset"] : hdr["offset"] + hdr["nbytes"]]
    values = np.frombuffer(data, dtype=hdr["endian"] + dtypes[hdr["datatype"]])
    nan = np.isnan(values)
    return nan if nan.any() else None


def _first_line(exc: BaseException) -> str:
    """The useful part of an ITK exception, in one line and without the C++ source path."""

    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [
        re.sub(r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", ln)
        for ln in lines
        if not ln.startswith("Exception thrown in")
    ]
    lines = [ln.removeprefix("[nrrd] ").strip() for ln in lines]
    # ITK messages end with the useful part ("... Description: ...").
    for ln in reversed(lines):
        if ln.lower().startswith("description"):
            return ln.split(":", 1)[1].strip()
    if len(lines) >= 2 and lines[-1].startswith("Reason:") and "cannot be read" in lines[-2]:
        return "pixel data cannot be read: file truncated or corrupt"
    return lines[-1] if lines else type(exc).__name__


class _quiet_stderr:
    """Silence what ITK's C++ readers print straight to file descriptor 2 (MetaIO, GDCM).

    Their failures reach us as exceptions turned into one-line `UserError`s; the raw
    C++ chatter would break the CLI's one-line error contract.
    """

    _saved: int | None

    def __enter__(self) -> None:

        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError):
            self._saved = None
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)


def _read_dicom_series(folder: pathlib.Path, what: str):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    with _quiet_stderr():
        ids = reader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise UserError(f"{folder}: no DICOM series found in folder ({what})")
    if len(ids) > 1:
        raise UserError(
            f"{folder}: folder holds {len(ids)} DICOM series "
            f"({', '.join(ids[:3])}{'...' if len(ids) > 3 else ''}); "
            f"put one series per folder"
        )
    with _quiet_stderr():
        files = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    if len(files) < 2:
        raise UserError(f"{folder}: DICOM series has {len(files)} slice; need a 3D series")
    _check_dicom_spacing(folder, files)
    reader.SetFileNames(files)
    try:
        with _quiet_stderr():
            return reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot read DICOM series ({_first_line(exc)})") from None


def _check_dicom_spacing(folder: pathlib.Path, files: tuple[str, ...]) -> None:
    """Reject a series whose slice positions have a gap (a missing file)."""
    sitk = _sitk()
    positions = []
    normal = None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            with _quiet_stderr():
                r.ReadImageInformation()
        except RuntimeError as exc:
            raise UserError(f"{f}: cannot read DICOM header ({_first_line(exc)})") from None
        if not r.HasMetaDataKey("0020|0032"):
            return  # no positions to compare; let the reader decide
        pos = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
        if normal is None:
            if r.HasMetaDataKey("0020|0037"):
                o = np.array([float(v) for v in r.GetMetaData("0020|0037").split("\\")])
                normal = np.cross(o[:3], o[3:])
            else:
                normal = np.array([0.0, 0.0, 1.0])
        positions.append(float(pos @ normal))
    steps = np.diff(np.sort(positions))
    if len(steps) == 0:
        return
    step = float(np.median(steps))
    if step <= 0 or steps.min() < 0.5 * step:
        raise UserError(
            f"{folder}: DICOM series has several slices at the same position "
            f"(several acquisitions in one series?)"
        )
    gaps = np.nonzero(steps > 1.5 * step)[0]
    if len(gaps):
        raise UserError(
            f"{folder}: DICOM series is missing slice(s): gap of {steps[gaps[0]]:.2f} "
            f"mm after slice {gaps[0] + 1} of {len(files)} (spacing {step:.2f} mm)"
        )


def write_volume(
    path: str | os.PathLike, array: np.ndarray, geometry: Geometry, *, compress: bool = True
) -> pathlib.Path:
    """Write atomically (temporary file in the same folder, then rename)."""
    sitk = _sitk()
    p = pathlib.Path(path)
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(".nii.gz") else p.suffix
    with atomic_path(p, suffix) as tmp:  # the suffix tells ITK which writer to use
        sitk.WriteImage(to_image(array, geometry), str(tmp), compress)
    return p


@dataclass(frozen=True)
class Segment:
    """One named segment of a 3D Slicer segmentation: the voxels of layer ``layer`` equal to
    ``label_value``, shown as ``name`` in ``color`` (r, g, b in 0..1)."""

    id: str
    name: str
    color: tuple[float, float, float]
    label_value: int
    layer: int = 0
    tags: tuple[tuple[str, str], ...] = ()


def write_segmentation(
    path: str | os.PathLike,
    layers: Sequence[np.ndarray],
    geometry: Geometry,
    segments: Sequence[Segment],
) -> pathlib.Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``) atomically.

    ``layers``: label arrays ``(z, y, x)`` of one shape, on the grid ``geometry``; segments of
    different layers may overlap (a fracture inside its vertebra). The file is Slicer's
    layered format: a 4D NRRD ``sizes: L X Y Z``, ``kinds: list domain domain domain``, whose
    first axis is the layer (one layer: a plain 3D NRRD), with the geometry of ``geometry``
    and Slicer's ``Segmentation_*`` / ``SegmentN_*`` fields. SimpleITK reads it back as a 3D
    image with one component per layer.
    """
    sitk = _sitk()
    p = pathlib.Path(path)
    arrays = [np.asarray(a) for a in layers]
    if not arrays or any(a.ndim != 3 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError(
            f"{p}: layers must be 3D arrays of one shape, got {[a.shape for a in arrays]}"
        )
    for s in segments:
        if not 0 <= s.layer < len(arrays) or s.label_value <= 0:
            raise ValueError(f"{p}: segment {s.id!r}: layer {s.layer} / label {s.label_value}")
        texts = [s.id, s.name, *(t for kv in s.tags for t in kv)]
        if any(ch in t for t in texts for ch in "\n|"):
            raise ValueError(f"{p}: segment {s.id!r}: newline or '|' in its name or tags")
    top = max([int(a.max()) for a in arrays if a.size] + [s.label_value for s in segments] + [0])
    dtype = np.uint8 if top < 2**8 else np.uint16
    stacked = np.stack([a.astype(dtype, copy=False) for a in arrays], axis=-1)
    # one component per layer: ITK writes the components as the NRRD's first (fastest) axis
    image = (
        sitk.GetImageFromArray(stacked, isVector=True)
        if len(arrays) > 1
        else sitk.GetImageFromArray(stacked[..., 0])
    )
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    extents = [_extent(a) for a in arrays]
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        # the file holds the whole CT grid, so its extent starts at index 0
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, s in enumerate(segments):
        fields.update(
            {
                f"Segment{i}_ID": s.id,
                f"Segment{i}_Name": s.name,
                f"Segment{i}_NameAutoGenerated": "0",
                f"Segment{i}_Color": " ".join(f"{c:.6g}" for c in s.color),
                f"Segment{i}_ColorAutoGenerated": "0",
                f"Segment{i}_LabelValue": str(int(s.label_value)),
                f"Segment{i}_Layer": str(int(s.layer)),
                # Slicer crops a layer to the Extent of the first segment it reads from it and
                # shares that labelmap with the layer's other segments: give every segment its
                # layer's extent, as Slicer itself writes, or later vertebrae would be clipped.
                f"Segment{i}_Extent": extents[s.layer],
                f"Segment{i}_Tags": "".join(f"{k}:{v}|" for k, v in s.tags) or "|",
            }
        )
    for key, value in fields.items():
        image.SetMetaData(key, value)
    with atomic_path(p, ".seg.nrrd") as tmp:
        sitk.WriteImage(image, str(tmp), True)
        if len(arrays) > 1:
            _nrrd_list_axis(tmp)
    return p


def _extent(labels: np.ndarray) -> str:
    """Slicer's ``minI maxI minJ maxJ minK maxK`` (x, y, z index) of the non-zero voxels."""
    if not labels.any():
        return "0 -1 0 -1 0 -1"
    bounds = []
    for axes in ((0, 1), (0, 2), (1, 2)):  # x, then y, then z of a (z, y, x) array
        idx = np.flatnonzero(labels.any(axis=axes))
        bounds += [int(idx[0]), int(idx[-1])]
    return " ".join(map(str, bounds))


def _nrrd_list_axis(path: pathlib.Path) -> None:
    """Mark the layer axis ``list`` instead of ITK's ``vector`` (header only; data untouched).

    ITK always writes a multi-component pixel axis as ``vector`` and ignores a kinds override
    for it; Slicer writes ``list`` and slicerio refuses any other kinds line.
    """
    data = path.read_bytes()
    end = data.find(b"\n\n")  # an attached-data NRRD header ends at its first blank line
    header, body = data[:end], data[end:]
    old = b"\nkinds: vector domain domain domain"
    if end < 0 or header.count(old) != 1:
        raise RuntimeError(
            f"{path}: unexpected NRRD header from ITK (no single "
            f"'kinds: vector domain domain domain' line)"
        )
    path.write_bytes(header.replace(old, b"\nkinds: list domain domain domain") + body)


def write_dicom_series(
    folder: str | os.PathLike,
    array: np.ndarray,
    geometry: Geometry,
    *,
    series_uid: str | None = None,
    compressor: str | None = None,
) -> list[pathlib.Path]:
    """Write an int16 CT volume as a DICOM series, one file per z slice (tests and demos).

    ``compressor="JPEG2000"`` writes JPEG 2000 lossless pixel data (transfer syntax
    1.2.840.10008.1.2.4.90) through GDCM.
    """
    sitk = _sitk()

    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    image = to_image(array.astype(np.int16), geometry)
    uid = series_uid or f"1.2.826.0.1.3680043.2.1125.{int(time.time() * 1e6)}"
    direction = geometry.direction
    tags = [
        ("0008|0060", "CT"),
        ("0020|000e", uid),
        ("0020|000d", uid + ".1"),
        ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3]))),
        ("0028|1052", "0"),
        ("0028|1053", "1"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    if compressor:
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    paths = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        for tag, value in tags:
            sl.SetMetaData(tag, value)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0018|0050", f"{geometry.spacing[2]:.6f}")
        sl.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        path = out / f"slice_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(sl)
        paths.append(path)
    return paths


def resample(
    array: np.ndarray,
    geometry: Geometry,
    spacing: tuple[float, float, float],
    *,
    nearest: bool = False,
    default: float = 0.0,
) -> Volume:
    """Resample onto a grid of ``spacing`` (x, y, z mm) with the same origin and direction.

    The new grid covers the same physical extent (size = round(extent / spacing)).
    ``nearest`` for label maps; linear interpolation otherwise.
    """
    size = [
        max(1, int(round(n * s / t)))
        for n, s, t in zip(array.shape[::-1], geometry.spacing, spacing, strict=False)
    ]
    target = Geometry(
        cast("tuple[float, float, float]", tuple(spacing)), geometry.origin, geometry.direction
    )
    shape = cast("tuple[int, int, int]", tuple(size[::-1]))
    return Volume(
        resample_to(array, geometry, target, shape, nearest=nearest, default=default),
        target,
    )


def resample_to(
    array: np.ndarray,
    geometry: Geometry,
    target: Geometry,
    shape_zyx: tuple[int, int, int],
    *,
    nearest: bool = False,
    default: float = 0.0,
) -> np.ndarray:
    """Resample ``array`` onto the grid ``target`` of ``shape_zyx`` (physical space kept)."""
    sitk = _sitk()
    src = to_image(array if array.dtype != np.bool_ else array.astype(np.uint8), geometry)
    ref = sitk.Image([int(v) for v in shape_zyx[::-1]], src.GetPixelID())
    ref.SetSpacing(target.spacing)
    ref.SetOrigin(target.origin)
    ref.SetDirection(target.direction)
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(src, ref, sitk.Transform(), interp, default, src.GetPixelID())
    return sitk.GetArrayFromImage(out)
