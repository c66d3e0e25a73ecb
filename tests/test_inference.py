"""The one inference path (`vfsearch.core.inference`): arrays in, fused map and scores out.

A test double whose probability is a known function of each voxel's HU stands in for a model.
On a CT whose spacing equals the training spacing every grid on the way (canonical, resampled,
crop, back to the CT) meets the CT's voxel centres, so the fused map must equal that function
of the CT on the voxels the crops cover, and 0 elsewhere, whatever the CT's orientation.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from vfsearch.adapters import volumes as io
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.crops import HU_MAX, HU_MIN
from vfsearch.core.geometry import Geometry
from vfsearch.core.inference import (
    DEFAULT_THRESHOLD,
    SCORE_QUANTILE,
    LoadedModel,
    ModelCrop,
    fuse_case,
    fuse_crops,
    vertebra_score,
)
from vfsearch.core.windows import normalise

torch.set_num_threads(1)  # 2-core machine shared with other test runs

FINGERPRINT = {"p0_5": -1000.0, "p99_5": 2000.0, "mean": 100.0, "std": 500.0}
GAIN = 1.5
MARGIN_MM = 2.0
# z, y, x blocks of the two vertebrae (VerSe 19 = T12, 20 = L1) in the canonical array
BLOCKS = {
    19: (slice(4, 10), slice(5, 14), slice(6, 15)),
    20: (slice(12, 19), slice(4, 13), slice(5, 16)),
}


class VoxelFunction(torch.nn.Module):
    """Test double with the segmenter's seams: the logit of each voxel of the centre slice is
    ``GAIN`` times its normalised intensity, so probability = sigmoid(GAIN * normalise(HU))."""

    output_kind = "segmentation"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def encode(self, slices):  # (N, 1, H, W)
        return slices, [slices]

    def forward_features(self, bottlenecks, skips):  # (B, T, 1, H, W), [(B, 1, H, W)]
        return {"logits": skips[0] * GAIN, "attention": []}

    def forward(self, window):  # (B, T, H, W)
        t = window.shape[1] // 2
        return {"logits": window[:, t : t + 1] * GAIN, "attention": []}


def _model(plane: str = "sagittal", spacing=(1.0, 1.0, 1.0), threshold=None) -> LoadedModel:
    config = Config(
        model=ModelConfig(depth=2), data=DataConfig(seq_len=3, plane=plane, patch_size=16)
    )
    return LoadedModel(
        VoxelFunction().eval(),
        config,
        FINGERPRINT,
        tuple(spacing),
        MARGIN_MM,
        source="voxel function",
        threshold=threshold,
    )


def _expected_prob(ct_hu: np.ndarray) -> np.ndarray:
    """What the double gives for each voxel, as the crops store it (int16 HU, clipped)."""
    stored = np.clip(np.rint(ct_hu), HU_MIN, HU_MAX).astype(np.int16)
    return torch.sigmoid(torch.from_numpy(normalise(stored, FINGERPRINT) * GAIN)).numpy()


def _covered(shape) -> np.ndarray:
    """The voxels inside some crop: each label box + the margin (1 mm voxels), clipped."""
    out = np.zeros(shape, bool)
    m = int(MARGIN_MM)
    for box in BLOCKS.values():
        out[
            tuple(
                slice(max(s.start - m, 0), min(s.stop + m, n))
                for s, n in zip(box, shape, strict=True)
            )
        ] = True
    return out


@pytest.fixture(scope="module")
def case():
    """A canonical (z, y, x) CT of random HU with two labelled vertebrae, and the same volume
    stored with x and y flipped (direction diag(-1, -1, 1), as dcm2niix writes) at an origin
    off zero: both must fuse to the same map."""
    rng = np.random.default_rng(0)
    ct = rng.uniform(-800, 1800, size=(24, 20, 21)).astype(np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    for vid, box in BLOCKS.items():
        labels[box] = vid
    canonical = Geometry((1.0, 1.0, 1.0), (-10.0, 4.0, 250.0))
    flipped = Geometry((1.0, 1.0, 1.0), (30.0, 40.0, 250.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return {"ct": ct, "labels": labels, "canonical": canonical, "flipped": flipped}


@pytest.mark.parametrize("stored", ["canonical", "flipped"])
@pytest.mark.parametrize("combine", ["mean", "max"])
def test_fused_map_is_the_models_voxel_function_on_the_covered_voxels(case, stored, combine):
    ct, labels, covered = case["ct"], case["labels"], _covered(case["ct"].shape)
    if stored == "flipped":  # the same voxels, stored with x and y reversed
        ct, labels, covered = (
            np.ascontiguousarray(a[:, ::-1, ::-1]) for a in (ct, labels, covered)
        )
    expected = np.where(covered, _expected_prob(ct), 0.0)
    progress: list[tuple[int, int]] = []
    fused = fuse_case(
        [_model()],
        ct,
        case[stored],
        labels=labels,
        combine=combine,
        resampler=io,
        progress=lambda done, total: progress.append((done, total)),
    )

    assert fused.prob.shape == ct.shape and fused.prob.dtype == np.float32
    np.testing.assert_allclose(fused.prob, expected, atol=1e-6)
    assert fused.threshold == DEFAULT_THRESHOLD  # neither given nor carried by the model
    np.testing.assert_array_equal(fused.mask, (fused.prob >= DEFAULT_THRESHOLD).astype(np.uint8))
    np.testing.assert_array_equal(fused.labels, labels)
    assert progress == [(0, 2), (1, 2), (2, 2)]
    assert sorted(fused.crop_probs) == [19, 20]
    # the score rule: the 0.99 quantile of the fused map over the vertebra's own voxels
    assert SCORE_QUANTILE == 0.99
    rows = {r["vertebra"]: r for r in fused.rows}
    assert sorted(rows) == [19, 20] and rows[20]["name"] == "L1"
    for vid in (19, 20):
        own = expected[labels == vid]
        assert rows[vid]["score"] == pytest.approx(np.quantile(own, 0.99), abs=2e-6)
        assert rows[vid]["score"] < own.max()  # a quantile, not the maximum


def test_vote_combination_and_model_threshold(case):
    """Vote: each crop votes at the threshold (the model's own here); overlaps agree, so the
    vote share is 1 where the function reaches the threshold, 0 below."""
    lm = _model(threshold=0.7)
    fused = fuse_case(
        [lm], case["ct"], case["canonical"], labels=case["labels"], combine="vote", resampler=io
    )
    expected = _expected_prob(case["ct"])
    covered = _covered(case["ct"].shape)
    assert fused.threshold == 0.7
    np.testing.assert_array_equal(fused.prob, np.where(covered & (expected >= 0.7), 1.0, 0.0))


def test_two_planes_average_and_boxes_stand_in_for_labels(case):
    """Per-plane models average (the same function: the same map); vertebrae given as boxes
    in the stored grid crop the same voxels, and the labels come back as the box masks."""
    boxes = {vid: (*(s.start for s in box), *(s.stop for s in box)) for vid, box in BLOCKS.items()}
    one = fuse_case([_model()], case["ct"], case["canonical"], labels=case["labels"], resampler=io)
    two = fuse_case(
        [_model("sagittal"), _model("axial")],
        case["ct"],
        case["canonical"],
        boxes=boxes,
        resampler=io,
    )
    np.testing.assert_allclose(two.prob, one.prob, atol=1e-6)
    np.testing.assert_array_equal(two.labels, case["labels"])  # the blocks are the boxes
    assert two.crops.vertebrae_source == "boxes" and one.crops.vertebrae_source == "labels"


def test_fuse_crops_pastes_crops_cut_out_of_the_grid_itself(case):
    """Without a resampler the crops are placed at their voxel offset on the grid (a stored
    case's resampled grid): the same map as mapping them through SimpleITK."""
    fused = fuse_case(
        [_model()], case["ct"], case["canonical"], labels=case["labels"], resampler=io
    )
    crops = [ModelCrop.of(c) for c in fused.crops.crops]
    grid, shape = case["canonical"], case["ct"].shape
    pasted = fuse_crops([_model()], crops, grid, shape, resampler=None)
    mapped = fuse_crops([_model()], crops, grid, shape, resampler=io)
    assert [m.offset for m in pasted.maps] == [m.offset for m in mapped.maps]
    for a, b in zip(pasted.maps, mapped.maps, strict=True):
        np.testing.assert_allclose(a.values, b.values, atol=1e-6)
        assert a.cover.all() and b.cover.all()


def test_vertebra_score_rule():
    prob = np.linspace(0, 1, 200, dtype=np.float32).reshape(2, 10, 10)
    labels = np.zeros(prob.shape, np.uint8)
    labels[0] = 20
    cells = np.full(prob.shape, 20, np.uint8)
    cells[1] = 21
    assert vertebra_score(prob, labels, cells, 20) == pytest.approx(
        np.quantile(prob[0], SCORE_QUANTILE)
    )
    # no labelled voxel in the region: its nearest-label cell
    assert vertebra_score(prob, labels, cells, 21) == pytest.approx(np.quantile(prob[1], 0.99))
    assert vertebra_score(prob, labels, cells, 22) == 0.0  # neither


def test_predict_arrays_writes_no_file_and_equals_the_cli_path(case, tmp_path, monkeypatch):
    """The pyfunc model's path: arrays straight into `fuse_case`, no temporary file; on a
    geometry that NIfTI stores exactly, the same map as ``vfsearch predict`` on files."""
    from vfsearch.adapters.tracking.pyfunc import predict_arrays
    from vfsearch.pipelines.predict import predict

    geometry = case["flipped"]
    ct, labels = case["ct"][:, ::-1, ::-1].copy(), case["labels"][:, ::-1, ::-1].copy()
    ct_path = io.write_volume(tmp_path / "ct.nii.gz", ct, geometry)
    lab_path = io.write_volume(tmp_path / "vertebrae.nii.gz", labels.astype(np.int16), geometry)
    summary = predict(_model(), ct_path, lab_path, tmp_path / "out", combine="max")
    from_files = io.read_volume(summary["files"][0]).array

    def no_files(*args, **kwargs):
        raise AssertionError("predict_arrays wrote a file")

    for name in ("write_volume", "write_segmentation"):
        monkeypatch.setattr(io, name, no_files)
    monkeypatch.setattr(tempfile, "mkdtemp", no_files)
    monkeypatch.setattr(tempfile, "mkstemp", no_files)
    before = set(os.listdir(tempfile.gettempdir()))
    params = {
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "direction": list(geometry.direction),
        "combine": "max",
    }
    y = predict_arrays(_model(), {"ct": ct, "vertebrae": labels.astype(np.int32)}, params)
    assert set(os.listdir(tempfile.gettempdir())) == before
    assert y.dtype == np.float32 and y.shape == ct.shape
    np.testing.assert_array_equal(y, from_files)
    several = predict_arrays([_model(), _model("axial")], {"ct": ct, "vertebrae": labels}, params)
    np.testing.assert_allclose(several, y, atol=1e-6)
