"""Scanner geometry that travels with every array (pure numpy).

Arrays are indexed ``(z, y, x)`` like SimpleITK's ``GetArrayFromImage``; spacing and origin
are ``(x, y, z)`` in mm like SimpleITK's ``GetSpacing``/``GetOrigin``; ``direction`` is the
row-major 3x3 matrix whose *columns* are the physical directions of the x, y and z index
axes (ITK / LPS convention). ``physical = origin + direction @ (spacing * (i, j, k))``.

The canonical orientation of vfsearch is the identity direction: index x runs to the
patient's left, y to posterior, z to superior (ITK's "LPS"). `to_canonical` reaches it by
axis permutations and flips only, so no voxel is interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))

    @property
    def matrix(self) -> np.ndarray:
        """Direction as a 3x3 array (columns = axis directions)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self, ijk_xyz: np.ndarray) -> np.ndarray:
        """Continuous index ``(..., 3)`` in **x, y, z** order to physical mm ``(..., 3)``."""
        ijk = np.asarray(ijk_xyz, dtype=np.float64)
        out: np.ndarray = np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.matrix.T
        return out

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Physical mm ``(..., 3)`` to continuous index in **x, y, z** order."""
        rel = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        out: np.ndarray = (rel @ np.linalg.inv(self.matrix).T) / np.asarray(self.spacing)
        return out

    def zyx_to_physical(self, idx_zyx: np.ndarray) -> np.ndarray:
        """Array index ``(..., 3)`` in **z, y, x** order to physical mm (x, y, z)."""
        return self.index_to_physical(np.asarray(idx_zyx, dtype=np.float64)[..., ::-1])

    def shifted(self, offset_zyx: tuple[int, int, int]) -> Geometry:
        """Geometry of a sub-array that starts at ``offset_zyx`` of this one (a crop)."""
        origin = self.zyx_to_physical(np.asarray(offset_zyx, dtype=np.float64))
        return Geometry(self.spacing, tuple(origin), self.direction)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    def same_space(
        self,
        other: Geometry,
        shape: tuple[int, ...],
        other_shape: tuple[int, ...],
        tol_mm: float | None = None,
    ) -> bool:
        """True when both grids cover the same voxels in physical space.

        Every index axis of one grid must match an index axis of the other with the same
        number of voxels and the same step vector up to sign (so the same grid stored with
        another axis order or direction compares equal), and the corner voxel centres must
        coincide. ``tol_mm`` defaults to half the smallest spacing.
        """
        if len(shape) != 3 or len(other_shape) != 3 or sorted(shape) != sorted(other_shape):
            return False
        tol = tol_mm if tol_mm is not None else 0.5 * min(min(self.spacing), min(other.spacing))
        # Edge vectors: from the first to the last voxel centre along each itk axis.
        edges_a = self.matrix * np.asarray(self.spacing) * (np.asarray(shape[::-1]) - 1)
        edges_b = other.matrix * np.asarray(other.spacing) * (np.asarray(other_shape[::-1]) - 1)
        unused = [0, 1, 2]
        for i in range(3):
            for j in unused:
                if (
                    shape[::-1][i] == other_shape[::-1][j]
                    and min(
                        np.abs(edges_a[:, i] - edges_b[:, j]).max(),
                        np.abs(edges_a[:, i] + edges_b[:, j]).max(),
                    )
                    <= tol
                ):
                    unused.remove(j)
                    break
            else:
                return False
        a = _corners(self, shape)
        b = _corners(other, other_shape)
        dist = np.abs(a[:, None, :] - b[None, :, :]).max(axis=-1)  # (8, 8) Chebyshev, mm
        return bool(dist.min(axis=1).max() <= tol and dist.min(axis=0).max() <= tol)


def _corners(geom: Geometry, shape_zyx: tuple[int, ...]) -> np.ndarray:
    z, y, x = (s - 1 for s in shape_zyx)
    idx = np.array([[k, j, i] for k in (0, z) for j in (0, y) for i in (0, x)], dtype=float)
    return geom.zyx_to_physical(idx)


@dataclass(frozen=True)
class Reorientation:
    """Permutation and flips (in numpy z, y, x axis order) applied by `to_canonical`."""

    axes: tuple[int, int, int]  # new numpy axis n takes old numpy axis axes[n]
    flips: tuple[bool, bool, bool]  # flip applied after the transpose, per new axis

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = np.transpose(array, self.axes)
        for n, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=n)
        return np.ascontiguousarray(out)

    def undo(self, array: np.ndarray) -> np.ndarray:
        out = array
        for n, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=n)
        return np.ascontiguousarray(np.transpose(out, np.argsort(self.axes)))

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "flips": list(self.flips)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reorientation:
        flips = cast("tuple[bool, bool, bool]", tuple(bool(f) for f in d["flips"]))
        return cls(tuple(d["axes"]), flips)


def canonical_reorientation(geom: Geometry) -> Reorientation:
    """The permutation/flips that bring ``geom``'s index axes closest to the identity."""
    m = geom.matrix  # columns: itk axes x, y, z
    # Assign each physical axis the index axis most aligned with it (greedy, largest first).
    order = np.dstack(np.unravel_index(np.argsort(-np.abs(m), axis=None), m.shape))[0]
    phys_of_itk: dict[int, int] = {}
    for phys, itk in order:
        if itk not in phys_of_itk and phys not in phys_of_itk.values():
            phys_of_itk[int(itk)] = int(phys)
    itk_of_phys = {p: a for a, p in phys_of_itk.items()}
    # numpy axis n <-> itk axis 2 - n; new itk axis p takes old itk axis itk_of_phys[p].
    axes = cast("tuple[int, int, int]", tuple(2 - itk_of_phys[2 - n] for n in range(3)))
    flips = cast(
        "tuple[bool, bool, bool]", tuple(bool(m[2 - n, itk_of_phys[2 - n]] < 0) for n in range(3))
    )
    return Reorientation(axes, flips)


def to_canonical(array: np.ndarray, geom: Geometry) -> tuple[np.ndarray, Geometry, Reorientation]:
    """Reorient ``array`` (z, y, x) so its direction is as close to identity as possible.

    Only permutes and flips axes: values are untouched and the physical position of every
    voxel is preserved. Returns the new array, its geometry and the `Reorientation` to undo.
    """
    ro = canonical_reorientation(geom)
    new = ro.apply(array)
    m = geom.matrix
    sp = np.asarray(geom.spacing)
    new_dir = np.zeros((3, 3))
    new_sp = np.zeros(3)
    corner_old_zyx = np.zeros(3)
    for n in range(3):  # new numpy axis n
        old_n = ro.axes[n]
        itk_new, itk_old = 2 - n, 2 - old_n
        sign = -1.0 if ro.flips[n] else 1.0
        new_dir[:, itk_new] = m[:, itk_old] * sign
        new_sp[itk_new] = sp[itk_old]
        corner_old_zyx[old_n] = array.shape[old_n] - 1 if ro.flips[n] else 0
    origin = geom.zyx_to_physical(corner_old_zyx)
    spacing = (float(new_sp[0]), float(new_sp[1]), float(new_sp[2]))
    return new, Geometry(spacing, tuple(origin), tuple(new_dir.ravel())), ro
