"""The Zarr v3 store of vertebra crops: the only module that imports zarr.

Layout::

    STORE.zarr/                         attrs["vfsearch"]: format, dataset_id, spacing,
                                        margin_mm, label_scheme, chunk_axis, fingerprint, ...
      cases/<case_id>/                  attrs: complete, split, ct geometry and shape,
                                        reorientation, resampled grid, source files, ...
        hu_hist                         int64 (4096,): HU histogram of the case's crops,
                                        bins -1024..3071, summed into the fingerprint
        <verse_id>/                     attrs: name, grade, crop_box, geometry, ...
          image     int16 (z, y, x)     HU, canonical orientation, resampled spacing
          fracture  uint8 (z, y, x)     0/1 fracture region
          mask      uint8 (z, y, x)     0/1 this vertebra's label

A case is written with ``complete = False`` and flipped to ``True`` only after all its
vertebrae are stored, so an interrupted ingest never leaves a half case that reads as done:
readers skip incomplete cases and a re-run deletes and redoes them.

`Store` objects are picklable and open the zarr group lazily in each process (zarr 3 can
deadlock in forked DataLoader workers once the parent has read an array).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from vfsearch.adapters.lazy import importer
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry

FORMAT = 1
ARRAYS = ("image", "fracture", "mask")
HIST_MIN, HIST_BINS = -1024, 4096
# The dataset decodes whole crops once per process and caches them; zarr costs ~0.5 ms per
# chunk, so few large chunks beat many thin ones (benchmarks/loader.py --chunk-slices N).
CHUNK_SLICES = 32
# numpy axis of the canonical (z, y, x) crop along which each plane's slices are cut
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


_zarr = importer("zarr")


class Store:
    """A vfsearch Zarr store on a local path (or any URL zarr accepts)."""

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        self.path = str(path)
        self.mode = mode
        self._root = None

    # -- pickling: handles are reopened lazily in each process ------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        Store.__init__(self, state["path"], state["mode"])

    @property
    def root(self):
        if self._root is None:
            zarr = _zarr()
            if self.mode == "r":
                if not Path(self.path, "zarr.json").is_file() and "://" not in self.path:
                    raise UserError(f"{self.path}: not a vfsearch store (run `vfsearch ingest`)")
                self._root = zarr.open_group(self.path, mode="r")
            else:
                self._root = zarr.open_group(self.path, mode="a")
        return self._root

    # -- reading ----------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        meta = dict(self.root.attrs.get("vfsearch", {}))
        if not meta:
            raise UserError(f"{self.path}: not a vfsearch store (no vfsearch attributes)")
        return meta

    @property
    def fingerprint(self) -> dict[str, Any]:
        """Dataset fingerprint: HU percentiles/mean/std over vertebra crops, spacing stats."""
        return dict(self.meta.get("fingerprint", {}))

    def case_ids(self, split: str | None = None, *, complete_only: bool = True) -> list[str]:
        if "cases" not in self.root:
            return []
        out = []
        for cid in sorted(self.root["cases"].group_keys()):
            attrs = self.root[f"cases/{cid}"].attrs
            if complete_only and not attrs.get("complete", False):
                continue
            if split is not None and attrs.get("split") != split:
                continue
            out.append(cid)
        return out

    def case_attrs(self, case_id: str) -> dict[str, Any]:
        return dict(self.root[f"cases/{case_id}"].attrs)

    def vertebrae(self, case_id: str) -> list[int]:
        return sorted(int(k) for k in self.root[f"cases/{case_id}"].group_keys())

    def vertebra_attrs(self, case_id: str, vid: int) -> dict[str, Any]:
        return dict(self.root[f"cases/{case_id}/{vid}"].attrs)

    def ct_grid(self, case_id: str) -> tuple[Geometry, tuple[int, int, int]]:
        """Geometry and shape (z, y, x) of the case's original CT in scanner space."""
        attrs = self.case_attrs(case_id)
        return Geometry.from_dict(attrs["ct_geometry"]), tuple(attrs["ct_shape"])

    def crop_geometry(self, case_id: str, vid: int) -> Geometry:
        """Geometry of a vertebra crop; ``io.resample_to(crop, this, *ct_grid)`` maps it back."""
        return Geometry.from_dict(self.vertebra_attrs(case_id, vid)["geometry"])

    def array(self, case_id: str, vid: int, name: str = "image"):
        """The zarr array itself, for partial reads (``arr[a:b]``)."""
        return self.root[f"cases/{case_id}/{vid}/{name}"]

    def read(self, case_id: str, vid: int, name: str = "image") -> np.ndarray:
        return self.array(case_id, vid, name)[...]

    def hu_hist(self, case_id: str) -> np.ndarray:
        return self.root[f"cases/{case_id}/hu_hist"][...]

    def items(self, split: str | None = None) -> list[tuple[str, int]]:
        """Every (case_id, verse_id) of complete cases in ``split``."""
        return [(cid, vid) for cid in self.case_ids(split) for vid in self.vertebrae(cid)]

    # -- writing ----------------------------------------------------------------------
    def set_meta(self, **values: Any) -> None:
        meta = dict(self.root.attrs.get("vfsearch", {}))
        meta.update(values)
        self.root.attrs["vfsearch"] = meta

    def begin_case(self, case_id: str, attrs: dict[str, Any]) -> None:
        """Create (or reset) the case group, marked incomplete."""
        cases = self.root.require_group("cases")
        if case_id in cases:
            del cases[case_id]
        group = cases.create_group(case_id)
        group.attrs.update({**attrs, "complete": False})

    def write_vertebra(
        self,
        case_id: str,
        vid: int,
        arrays: dict[str, np.ndarray],
        attrs: dict[str, Any],
        *,
        chunk_axis: int = PLANE_AXIS["sagittal"],
    ) -> None:
        """Store one vertebra crop; chunks hold `CHUNK_SLICES` slices along ``chunk_axis``."""
        zarr = _zarr()
        group = self.root[f"cases/{case_id}"].create_group(str(int(vid)))
        codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
        for name in ARRAYS:
            data = np.ascontiguousarray(arrays[name])
            chunks = list(data.shape)
            chunks[chunk_axis] = min(CHUNK_SLICES, data.shape[chunk_axis])
            arr = group.create_array(
                name, shape=data.shape, dtype=data.dtype, chunks=tuple(chunks), compressors=codec
            )
            arr[...] = data
        group.attrs.update(attrs)

    def finish_case(self, case_id: str, hu_hist: np.ndarray, attrs: dict[str, Any]) -> None:
        """Store the case's HU histogram and mark it complete (the last write of a case)."""
        group = self.root[f"cases/{case_id}"]
        arr = group.create_array("hu_hist", shape=(HIST_BINS,), dtype="int64", chunks=(HIST_BINS,))
        arr[...] = hu_hist.astype(np.int64)
        group.attrs.update({**attrs, "complete": True})

    def delete_case(self, case_id: str) -> None:
        if "cases" in self.root and case_id in self.root["cases"]:
            del self.root["cases"][case_id]


def hu_histogram(values: np.ndarray) -> np.ndarray:
    """Histogram of HU values, 1-HU bins from -1024 to 3071 (values clipped into range)."""
    idx = np.clip(np.asarray(values, dtype=np.int64) - HIST_MIN, 0, HIST_BINS - 1)
    return np.bincount(idx.ravel(), minlength=HIST_BINS).astype(np.int64)


def fingerprint_from_hist(hist: np.ndarray) -> dict[str, float]:
    """HU percentiles (0.5, 50, 99.5), mean and std from a summed `hu_histogram`."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return {}
    centres = np.arange(HIST_BINS) + HIST_MIN
    cdf = np.cumsum(hist) / total
    pct = {
        f"p{str(q).replace('.', '_')}": float(centres[np.searchsorted(cdf, q / 100)])
        for q in (0.5, 50, 99.5)
    }
    mean = float((hist * centres).sum() / total)
    std = float(np.sqrt((hist * (centres - mean) ** 2).sum() / total))
    return {**pct, "mean": mean, "std": std, "voxels": int(total)}
