"""Prediction on a new CT (`vfsearch.pipelines.predict`): lossless fusion, output geometry,
checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vfsearch.adapters import volumes as io
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry, to_canonical
from vfsearch.core.inference import LoadedModel
from vfsearch.core.metrics3d import counts, overlap
from vfsearch.pipelines.predict import load_model, predict

pytestmark = pytest.mark.integration
torch.set_num_threads(1)  # 2-core machine shared with other test runs

MARK_HU = 3000  # fracture voxels of the test CT; everything else is clipped below 2000
FINGERPRINT = {"p0_5": -1024.0, "p99_5": 3071.0, "mean": 0.0, "std": 1000.0}


class GroundTruthStandIn(torch.nn.Module):
    """Test double: 'segments' the voxels that the test CT marks as fracture (HU 3000).

    It has the segmenter's seams (encode / forward_features / forward), so prediction runs its
    real encoder-reuse path; its "features" are the slices themselves and its logits come
    from the centre slice only, so the fused map must reproduce the ground truth exactly.
    """

    output_kind = "segmentation"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode(self, slices):  # (N, 1, H, W)
        return slices, [slices]

    def forward_features(self, bottlenecks, skips):  # (B, T, 1, H, W), [(B, 1, H, W)]
        return {"logits": (skips[0] - 2.5) * 50.0, "attention": []}

    def forward(self, window):  # (B, T, H, W)
        t = window.shape[1] // 2
        return {"logits": (window[:, t : t + 1] - 2.5) * 50.0, "attention": []}


def _reorient(array: np.ndarray, geom: Geometry, axes, flips) -> tuple[np.ndarray, Geometry]:
    """Store ``array`` with other axis order/flips; every voxel keeps its physical position."""
    out = np.transpose(array, axes)
    m, sp = geom.matrix, np.asarray(geom.spacing)
    new_dir, new_sp, corner = np.zeros((3, 3)), np.zeros(3), np.zeros(3)
    for n in range(3):
        old = axes[n]
        if flips[n]:
            out = np.flip(out, axis=n)
        new_dir[:, 2 - n] = m[:, 2 - old] * (-1.0 if flips[n] else 1.0)
        new_sp[2 - n] = sp[2 - old]
        corner[old] = array.shape[old] - 1 if flips[n] else 0
    origin = geom.zyx_to_physical(corner)
    return np.ascontiguousarray(out), Geometry(tuple(new_sp), tuple(origin), tuple(new_dir.ravel()))


@pytest.fixture(scope="module")
def oblique_case(tmp_path_factory):
    """A small phantom stored with anisotropic spacing, permuted/flipped axes, origin != 0."""
    from vfsearch.core.phantom import make_case

    case = make_case(0, small=True)
    ct_c, g_c, _ = to_canonical(case.ct, case.geometry)
    lab_c = to_canonical(case.vertebrae, case.geometry)[0]
    frac_c = to_canonical(case.fracture, case.geometry)[0]
    z_frac = np.flatnonzero(frac_c.any(axis=(1, 2)))
    centre = int(z_frac.mean())
    zs = slice(max(centre - 40, 0), centre + 40)  # a few vertebrae, to keep the test fast
    ct_c, lab_c, frac_c = ct_c[zs], lab_c[zs], frac_c[zs]
    assert frac_c.any()
    ct_c = np.where(frac_c > 0, MARK_HU, np.minimum(ct_c, 2000)).astype(np.int16)
    g_c = Geometry((1.6, 2.0, 2.5), (-83.2, 41.7, 512.3))  # anisotropic, origin != 0
    axes, flips = (1, 2, 0), (True, False, True)
    arrays = [_reorient(a, g_c, axes, flips)[0] for a in (ct_c, lab_c, frac_c)]
    geom = _reorient(ct_c, g_c, axes, flips)[1]
    assert not np.allclose(geom.matrix, np.eye(3))
    folder = tmp_path_factory.mktemp("oblique")
    paths = {}
    for name, arr in zip(("ct", "vertebrae", "fracture"), arrays, strict=False):
        paths[name] = io.write_volume(folder / f"{name}.nii.gz", arr, geom)
    # the canonical spacing: crops at this spacing are the CT's voxels, reoriented only
    canon_spacing = to_canonical(arrays[0], io.read_volume(paths["ct"]).geometry)[1].spacing
    return {
        "paths": paths,
        "geometry": geom,
        "arrays": arrays,
        "spacing": canon_spacing,
        "folder": folder,
    }


def _stand_in(spacing, plane="sagittal", margin=4.0) -> LoadedModel:
    config = Config(
        model=ModelConfig(depth=3), data=DataConfig(seq_len=3, plane=plane, patch_size=32)
    )
    return LoadedModel(
        GroundTruthStandIn().eval(),
        config,
        FINGERPRINT,
        tuple(spacing),
        margin,
        source="ground-truth stand-in",
    )


def _same_geometry(a: Geometry, b: Geometry, tol=1e-4) -> bool:
    return (
        np.allclose(a.spacing, b.spacing, atol=tol)
        and np.allclose(a.origin, b.origin, atol=tol)
        and np.allclose(a.direction, b.direction, atol=tol)
    )


@pytest.mark.parametrize("plane, combine", [("sagittal", "mean"), ("axial", "vote")])
def test_fusion_and_inverse_mapping_are_lossless(oblique_case, tmp_path, plane, combine):
    p = oblique_case["paths"]
    out = tmp_path / "out"
    summary = predict(
        _stand_in(oblique_case["spacing"], plane), p["ct"], p["vertebrae"], out, combine=combine
    )
    mask = io.read_volume(out / "fracture_mask.nii.gz")
    truth = oblique_case["arrays"][2]
    assert mask.array.shape == truth.shape
    s = overlap(*counts(mask.array, truth))
    assert s["dice"] == 1.0, s
    prob = io.read_volume(out / "fracture_prob.nii.gz").array
    assert prob.dtype == np.float32 and prob.min() >= 0.0 and prob.max() <= 1.0
    # per vertebra: the fractured one scores 1 and owns the whole fracture volume
    report = json.loads((out / "vertebrae.json").read_text())
    rows = {r["vertebra"]: r for r in report["vertebrae"]}
    voxel_mm3 = float(np.prod(oblique_case["geometry"].spacing))
    labels = oblique_case["arrays"][1]
    fractured = set(np.unique(labels[truth > 0]).tolist()) - {0}
    assert fractured and fractured <= set(rows)
    assert sum(r["fracture_volume_mm3"] for r in rows.values()) == pytest.approx(
        truth.sum() * voxel_mm3, rel=1e-6
    )
    for vid, r in rows.items():
        assert (r["score"] > 0.5) == (vid in fractured), r
    assert summary["threshold"] == 0.5


def test_reuse_and_naive_paths_agree_through_predict(oblique_case, tmp_path):
    p = oblique_case["paths"]
    lm = _stand_in(oblique_case["spacing"])
    predict(lm, p["ct"], p["vertebrae"], tmp_path / "a", reuse=True)
    predict(lm, p["ct"], p["vertebrae"], tmp_path / "b", reuse=False)
    a = io.read_volume(tmp_path / "a" / "fracture_prob.nii.gz").array
    b = io.read_volume(tmp_path / "b" / "fracture_prob.nii.gz").array
    assert np.abs(a - b).max() < 1e-6


def test_output_geometry_equals_nifti_input(oblique_case, tmp_path):
    p = oblique_case["paths"]
    # a coarser model grid than the CT's: resampling is not the identity here
    predict(_stand_in((2.0, 2.0, 2.0)), p["ct"], p["vertebrae"], tmp_path)
    ct = io.read_volume(p["ct"])
    for name in ("fracture_prob.nii.gz", "fracture_mask.nii.gz"):
        v = io.read_volume(tmp_path / name)
        assert v.shape == ct.shape
        assert _same_geometry(v.geometry, ct.geometry), (name, v.geometry, ct.geometry)
    mask = io.read_volume(tmp_path / "fracture_mask.nii.gz").array
    truth = oblique_case["arrays"][2]
    assert overlap(*counts(mask, truth))["dice"] > 0.6  # resampled twice, still on target


def test_output_geometry_equals_dicom_series_input(oblique_case, tmp_path):
    ct_arr, lab_arr, frac_arr = oblique_case["arrays"]
    geom = oblique_case["geometry"]
    dicom = tmp_path / "dicom"
    io.write_dicom_series(dicom, ct_arr, geom)
    ct = io.read_volume(dicom)
    assert ct.shape == ct_arr.shape
    labels = io.write_volume(tmp_path / "vertebrae.nii.gz", lab_arr, ct.geometry)
    spacing = to_canonical(ct.array, ct.geometry)[1].spacing
    predict(_stand_in(spacing), dicom, labels, tmp_path / "out")
    for name in ("fracture_prob.nii.gz", "fracture_mask.nii.gz"):
        v = io.read_volume(tmp_path / "out" / name)
        assert v.shape == ct.shape
        assert _same_geometry(v.geometry, ct.geometry), (name, v.geometry, ct.geometry)
    mask = io.read_volume(tmp_path / "out" / "fracture_mask.nii.gz").array
    assert overlap(*counts(mask, frac_arr))["dice"] == 1.0


def _slicer_segments(image) -> dict[str, dict[str, str]]:
    """The ``SegmentN_*`` fields of a .seg.nrrd read by SimpleITK, by segment name."""
    out, i = {}, 0
    while image.HasMetaDataKey(f"Segment{i}_ID"):
        fields = {
            k.split("_", 1)[1]: image.GetMetaData(k)
            for k in image.GetMetaDataKeys()
            if k.startswith(f"Segment{i}_")
        }
        out[fields["Name"]] = fields
        i += 1
    return out


def test_slicer_segmentation_has_ct_geometry_and_named_segments(oblique_case, tmp_path):
    """segmentation.seg.nrrd, read back by SimpleITK: the CT's exact grid (anisotropic,
    permuted and flipped axes), a named, coloured segment per vertebra on layer 0 whose voxels
    are the label map's, and "fracture" (red, layer 1) whose voxels are fracture_mask.nii.gz."""
    import SimpleITK as sitk

    from vfsearch.core.labels import name
    from vfsearch.pipelines.predict import FRACTURE_COLOR, VERTEBRA_COLORS

    p = oblique_case["paths"]
    summary = predict(_stand_in(oblique_case["spacing"]), p["ct"], p["vertebrae"], tmp_path)
    path = tmp_path / "segmentation.seg.nrrd"
    assert str(path) in summary["files"]
    header = path.read_bytes().split(b"\n\n", 1)[0].decode() + "\n"  # every line ends in \n
    assert "\nkinds: list domain domain domain\n" in header  # Slicer's layered layout
    assert "\nSegmentation_MasterRepresentation:=Binary labelmap\n" in header
    assert "\nSegmentation_ContainedRepresentationNames:=Binary labelmap|\n" in header
    assert "\nSegmentation_ReferenceImageExtentOffset:=0 0 0\n" in header

    image = sitk.ReadImage(str(path))
    ct = sitk.ReadImage(str(p["ct"]))
    assert image.GetSize() == ct.GetSize()
    assert image.GetNumberOfComponentsPerPixel() == 2  # two layers
    assert image.GetSpacing() == ct.GetSpacing()
    assert image.GetOrigin() == ct.GetOrigin()
    assert image.GetDirection() == ct.GetDirection()
    layers = sitk.GetArrayFromImage(image)  # (z, y, x, layer)

    labels = oblique_case["arrays"][1]
    vids = sorted(set(np.unique(labels).tolist()) - {0})
    assert len(vids) >= 3, vids
    segments = _slicer_segments(image)
    assert set(segments) == {name(v) for v in vids} | {"fracture"}
    colours = set()
    for v in vids:
        s = segments[name(v)]
        assert (s["LabelValue"], s["Layer"], s["ID"]) == (str(v), "0", name(v)), s
        colour = tuple(float(c) for c in s["Color"].split())
        assert colour == pytest.approx(VERTEBRA_COLORS[v % len(VERTEBRA_COLORS)], abs=1e-6)
        colours.add(colour)
        assert np.array_equal(layers[..., 0] == v, labels == v), name(v)
        assert s["NameAutoGenerated"] == "0" and s["ColorAutoGenerated"] == "0"
    assert len(colours) == len(vids)  # distinct colours
    fracture = segments["fracture"]
    assert (fracture["LabelValue"], fracture["Layer"]) == ("1", "1")
    assert tuple(float(c) for c in fracture["Color"].split()) == FRACTURE_COLOR
    mask = io.read_volume(tmp_path / "fracture_mask.nii.gz").array
    assert mask.any()
    assert np.array_equal(layers[..., 1] == 1, mask > 0)
    assert set(np.unique(layers[..., 1]).tolist()) <= {0, 1}
    # the fracture lies inside its vertebra: both layers hold those voxels
    assert (layers[..., 0][mask > 0] > 0).all()
    # every segment's Extent (x, y, z index bounds) covers its layer's voxels
    for s in segments.values():
        layer = layers[..., int(s["Layer"])]
        lo_hi = [int(v) for v in s["Extent"].split()]
        zyx = np.argwhere(layer > 0)
        assert lo_hi == [
            int(zyx[:, 2].min()),
            int(zyx[:, 2].max()),
            int(zyx[:, 1].min()),
            int(zyx[:, 1].max()),
            int(zyx[:, 0].min()),
            int(zyx[:, 0].max()),
        ], s


def test_bad_inputs_are_user_errors(oblique_case, tmp_path):
    p = oblique_case["paths"]
    lm = _stand_in(oblique_case["spacing"])
    with pytest.raises(UserError, match="--combine"):
        predict(lm, p["ct"], p["vertebrae"], tmp_path, combine="median")
    with pytest.raises(UserError, match="--threshold"):
        predict(lm, p["ct"], p["vertebrae"], tmp_path, threshold=1.5)
    with pytest.raises(UserError, match="neither a checkpoint"):
        load_model(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model(bad)
    assert not (tmp_path / "fracture_prob.nii.gz").exists()
