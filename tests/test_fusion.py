"""Slice predictions to 3D maps and crop maps into one grid (`vfsearch.core.fusion`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vfsearch.core import fusion, windows
from vfsearch.core.config import ModelConfig


@pytest.mark.parametrize("n, seq_len", [(1, 1), (1, 5), (4, 3), (9, 5), (7, 9)])
def test_all_windows_equal_training_windows(n, seq_len):
    got = fusion.all_windows(n, seq_len)
    assert got.shape == (n, seq_len)
    for t in range(n):
        assert got[t].tolist() == windows.window_indices(t, seq_len, n).tolist()
        assert got[t, seq_len // 2] == t  # every slice is the centre of its own window


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_to_volume_inverts_volume_to_slices(axis):
    vol = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    sl = fusion.volume_to_slices(vol, axis)
    assert sl.shape[0] == vol.shape[axis]
    assert np.array_equal(sl, windows.plane_first(vol, axis))  # training's slice order
    assert np.array_equal(fusion.slices_to_volume(sl, axis), vol)


@pytest.mark.parametrize("h, w, size", [(5, 7, 16), (16, 16, 16), (1, 15, 16)])
def test_padding_matches_training_patches(h, w, size):
    rng = np.random.default_rng(0)
    sl = rng.random((2, h, w)).astype(np.float32)
    padded, inner = fusion.pad_slices(sl, size, size, value=-3.0)
    start = windows.patch_start((h, w), size)  # the centred training patch
    assert np.array_equal(padded, windows.fit_to_patch(sl, size, start, -3.0))
    assert np.array_equal(padded[:, inner[0], inner[1]], sl)
    with pytest.raises(ValueError):
        fusion.pad_slices(sl, h - 1 if h > 1 else 0, w, value=0.0)


def test_padded_size():
    assert fusion.padded_size(33, 16) == 48
    assert fusion.padded_size(32, 16) == 32
    assert fusion.padded_size(10, 16, minimum=64) == 64


def test_accumulator_mean_max_vote_with_cover_and_clipping():
    a = np.array([[[0.2, 0.8, 0.6]]], dtype=np.float32)  # (1, 1, 3) at x 0..2
    b = np.array([[[0.4, 0.2, 0.9]]], dtype=np.float32)  # (1, 1, 3) at x 1..3
    b_cover = np.array([[[True, True, False]]])  # b's last voxel is outside its crop
    c = np.array([[[1.0, 1.0]]], dtype=np.float32)  # at x 4..5: x 5 is outside the grid
    shape = (1, 1, 5)

    def run(method, threshold=0.5):
        acc = fusion.CaseAccumulator(shape, method, threshold)
        acc.add(a, (0, 0, 0))
        acc.add(b, (0, 0, 1), b_cover)
        acc.add(c, (0, 0, 4))
        return acc

    mean = run("mean")
    assert np.allclose(mean.result()[0, 0], [0.2, 0.6, 0.4, 0.0, 1.0])
    assert mean.covered[0, 0].tolist() == [True, True, True, False, True]
    assert mean.mask(0.5)[0, 0].tolist() == [0, 1, 0, 0, 1]
    assert np.allclose(run("max").result()[0, 0], [0.2, 0.8, 0.6, 0.0, 1.0])
    vote = run("vote", threshold=0.5)
    # x1: a yes, b no -> 1/2 (tie counts as fracture); x2: a yes, b no -> 1/2
    assert np.allclose(vote.result()[0, 0], [0.0, 0.5, 0.5, 0.0, 1.0])
    assert vote.mask()[0, 0].tolist() == [0, 1, 1, 0, 1]
    assert np.allclose(
        fusion.combine([(a, (0, 0, 0), None), (b, (0, 0, 1), b_cover)], shape, "mean")[0, 0],
        [0.2, 0.6, 0.4, 0.0, 0.0],
    )
    with pytest.raises(ValueError):
        fusion.CaseAccumulator(shape, "median")


def test_fuse_planes_is_the_mean():
    a = np.full((2, 3, 4), 0.2, np.float32)
    b = np.full((2, 3, 4), 0.6, np.float32)
    assert np.allclose(fusion.fuse_planes([a, b]), 0.4)
    with pytest.raises(ValueError):
        fusion.fuse_planes([a, b[:1]])


class _GroundTruthModel(torch.nn.Module):
    """Test double: 'predicts' the centre slice of its window, as logits of 0/1 input."""

    def forward(self, window):
        centre = window[:, window.shape[1] // 2 : window.shape[1] // 2 + 1]
        return {"logits": (centre - 0.5) * 40.0, "attention": []}


def test_infer_slices_places_each_centre_slice():
    rng = np.random.default_rng(0)
    mask = (rng.random((6, 10, 13)) > 0.5).astype(np.float32)
    probs = fusion.infer_slices(
        _GroundTruthModel(), mask, seq_len=3, reuse=False, batch_size=4, multiple=8
    )
    assert probs.shape == mask.shape
    assert np.array_equal(probs >= 0.5, mask > 0.5)


MODEL_CASES = [
    {"temporal": "lstm", "bidirectional": True},
    {"temporal": "lstm", "bidirectional": False, "attention": False},
    {"temporal": "convlstm", "bidirectional": True, "norm": "group"},
    {"temporal": "none"},
    {"temporal": "lstm", "predict_all_slices": True},
    {"temporal": "convlstm", "encoder": "resnet18", "depth": 3},
]


@pytest.mark.parametrize("kwargs", MODEL_CASES, ids=lambda k: "-".join(map(str, k.values())))
def test_encoder_reuse_equals_naive_window_inference(kwargs):
    from vfsearch.core.models import build_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(**{"depth": 3, "base_channels": 4, **kwargs})
    model = build_model(cfg, seq_len=5).eval()
    # random running stats, so that BatchNorm in eval is not the identity
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    rng = np.random.default_rng(1)
    slices = rng.normal(size=(7, 13, 10)).astype(np.float32)  # padded to 16x16 inside
    reuse = fusion.infer_slices(
        model, slices, 5, reuse=True, batch_size=3, pad_value=-1.0, multiple=8
    )
    naive = fusion.infer_slices(
        model, slices, 5, reuse=False, batch_size=3, pad_value=-1.0, multiple=8
    )
    assert reuse.shape == slices.shape
    assert np.abs(reuse - naive).max() < 1e-5
    assert reuse.std() > 0  # not a constant map that would make the check vacuous


def test_classifier_slice_scores_follow_windows():
    class Centre(torch.nn.Module):
        def forward(self, window):  # logit = mean of the centre slice
            return {
                "logits": window[:, window.shape[1] // 2].mean(dim=(1, 2))[:, None],
                "attention": [],
            }

    slices = np.stack([np.full((5, 6), v, np.float32) for v in (-2.0, 0.0, 3.0)])
    scores = fusion.infer_slice_scores(Centre(), slices, seq_len=3, multiple=1)
    assert np.allclose(scores, 1 / (1 + np.exp(-np.array([-2.0, 0.0, 3.0]))))
