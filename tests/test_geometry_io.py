"""Geometry round trips: to_canonical, real SimpleITK write/read, resampling, same_space."""

from __future__ import annotations

import numpy as np
import pytest

from vfsearch.adapters import volumes as io
from vfsearch.core.geometry import Geometry, canonical_reorientation, to_canonical
from vfsearch.core.labels import to_verse


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# A permuted, flipped and slightly oblique direction (like a sagittal PIR acquisition).
PERMUTED = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float)
DIRECTION = tuple((_rotation(0.1, -0.05, 0.08) @ PERMUTED).ravel())
GEOM = Geometry(spacing=(0.7, 1.3, 2.5), origin=(-120.5, 37.25, 880.0), direction=DIRECTION)
SHAPE = (9, 11, 13)  # (z, y, x)


def _phys_of_all_voxels(geom: Geometry, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return geom.zyx_to_physical(idx.reshape(-1, 3)).reshape(*shape, 3)


def test_index_physical_round_trip():
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-5, 20, size=(50, 3))
    back = GEOM.physical_to_index(GEOM.index_to_physical(ijk))
    np.testing.assert_allclose(back, ijk, atol=1e-9)
    # Index (0, 0, 0) is the origin; one step along x moves spacing_x along direction column 0.
    np.testing.assert_allclose(GEOM.index_to_physical([0, 0, 0]), GEOM.origin)
    np.testing.assert_allclose(
        GEOM.index_to_physical([1, 0, 0]) - GEOM.origin, 0.7 * GEOM.matrix[:, 0]
    )


def test_to_canonical_preserves_every_voxel_position():
    values = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)
    canon, geom_c, ro = to_canonical(values, GEOM)
    # Closest to identity: a positive, dominant diagonal.
    assert np.all(np.argmax(np.abs(geom_c.matrix), axis=0) == [0, 1, 2])
    assert np.all(np.diag(geom_c.matrix) > 0.9)
    # Spacing follows its axis: physical x was itk z (2.5 mm), y was itk x, z was itk y.
    np.testing.assert_allclose(geom_c.spacing, (2.5, 0.7, 1.3))
    assert canon.shape == (SHAPE[1], SHAPE[2], SHAPE[0])
    # Every voxel keeps its value at the same physical position.
    phys_old = _phys_of_all_voxels(GEOM, SHAPE).reshape(-1, 3)
    phys_new = _phys_of_all_voxels(geom_c, canon.shape).reshape(-1, 3)
    order = np.argsort(canon.ravel())
    np.testing.assert_allclose(phys_new[order], phys_old, atol=1e-9)
    np.testing.assert_array_equal(ro.undo(canon), values)


def test_to_canonical_identity_is_a_no_op():
    geom = Geometry((1.0, 2.0, 3.0), (5.0, 6.0, 7.0))
    arr = np.arange(24).reshape(2, 3, 4)
    canon, geom_c, ro = to_canonical(arr, geom)
    np.testing.assert_array_equal(canon, arr)
    assert geom_c == geom
    assert canonical_reorientation(geom).axes == (0, 1, 2)


@pytest.mark.integration
@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_write_read_round_trip_keeps_geometry(tmp_path, suffix):
    rng = np.random.default_rng(1)
    arr = rng.integers(-1024, 2000, size=SHAPE).astype(np.int16)
    path = io.write_volume(tmp_path / f"vol{suffix}", arr, GEOM)
    vol = io.read_volume(path)
    np.testing.assert_array_equal(vol.array, arr)
    np.testing.assert_allclose(vol.geometry.spacing, GEOM.spacing, rtol=1e-6)
    np.testing.assert_allclose(vol.geometry.origin, GEOM.origin, atol=1e-3)
    np.testing.assert_allclose(vol.geometry.direction, GEOM.direction, atol=1e-5)
    # And the canonical views of what was written and what was read agree voxel for voxel.
    a, ga, _ = to_canonical(arr, GEOM)
    b, gb, _ = to_canonical(vol.array, vol.geometry)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ga.origin, gb.origin, atol=1e-3)


@pytest.mark.integration
def test_resample_and_back_keeps_physical_position():
    """A blob resampled to 1 mm and mapped back onto the scanner grid stays where it was."""
    arr = np.zeros((20, 24, 30), np.uint8)
    arr[8:13, 9:16, 10:19] = 1
    geom = Geometry((0.8, 1.1, 2.0), (10.0, -20.0, 300.0), DIRECTION)
    canon, geom_c, _ = to_canonical(arr, geom)
    fine = io.resample(canon, geom_c, (1.0, 1.0, 1.0), nearest=True)
    back = io.resample_to(fine.array, fine.geometry, geom, arr.shape, nearest=True)

    def centroid(a, g):
        return g.zyx_to_physical(np.argwhere(a > 0).mean(axis=0))

    assert np.linalg.norm(centroid(back, geom) - centroid(arr, geom)) < 0.8
    assert np.linalg.norm(centroid(fine.array, fine.geometry) - centroid(arr, geom)) < 0.8


def test_same_space_ignores_axis_order_and_direction():
    arr = np.zeros(SHAPE)
    _, geom_c, _ = to_canonical(arr, GEOM)
    canon_shape = (SHAPE[1], SHAPE[2], SHAPE[0])
    assert GEOM.same_space(geom_c, SHAPE, canon_shape)
    assert geom_c.same_space(GEOM, canon_shape, SHAPE)
    # One voxel off, or another spacing: different grids.
    shifted = GEOM.shifted((1, 0, 0))
    assert not GEOM.same_space(shifted, SHAPE, SHAPE)
    other = Geometry((0.7, 1.3, 2.4), GEOM.origin, GEOM.direction)
    assert not GEOM.same_space(other, SHAPE, SHAPE)
    assert not GEOM.same_space(GEOM, SHAPE, (9, 11, 12))


def test_same_space_rejects_swapped_counts_with_equal_extent():
    # x: 10 voxels at 2 mm, y: 19 at 1 mm (both 18 mm) vs the counts swapped: same box corners,
    # different voxels.
    a = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    b = Geometry((1.0, 2.0, 1.0), (0.0, 0.0, 0.0))
    assert not a.same_space(b, (5, 19, 10), (5, 10, 19))


def test_to_verse_large_and_float_ids():
    labels = np.array([[[0, 11, 24, 25, 2**31 - 1, -3]]], dtype=np.int64)
    np.testing.assert_array_equal(to_verse(labels, "verse"), [[[0, 11, 24, 0, 0, 0]]])
    floats = np.array([[[27.0, 40.0000001, 41.0, 26.0, 1e9]]], dtype=np.float64)
    out = to_verse(floats, "totalsegmentator")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[24, 11, 0, 0, 0]]])
