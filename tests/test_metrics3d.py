"""3D overlap, detection and distance metrics (`vfsearch.core.metrics3d`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vfsearch.core import metrics3d as m


def _cube(shape, start, size=6):
    a = np.zeros(shape, dtype=np.uint8)
    a[tuple(slice(s, s + size) for s in start)] = 1
    return a


def test_two_cubes_offset_by_two_voxels():
    a = _cube((12, 12, 12), (2, 2, 2))
    b = _cube((12, 12, 12), (4, 4, 4))
    tp, fp, fn = m.counts(b, a)
    assert (tp, fp, fn) == (64, 152, 152)
    s = m.overlap(tp, fp, fn)
    assert round(s["dice"], 4) == 0.2963
    assert round(s["iou"], 4) == 0.1739


@pytest.mark.integration
def test_dice_iou_equal_simpleitk_label_overlap():
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    for trial in range(5):
        shape = tuple(rng.integers(5, 14, size=3))
        pred = (rng.random(shape) < rng.uniform(0.1, 0.6)).astype(np.uint8)
        target = (rng.random(shape) < rng.uniform(0.1, 0.6)).astype(np.uint8)
        f = sitk.LabelOverlapMeasuresImageFilter()
        f.Execute(sitk.GetImageFromArray(target), sitk.GetImageFromArray(pred))
        s = m.overlap(*m.counts(pred, target))
        assert s["dice"] == pytest.approx(f.GetDiceCoefficient(), abs=1e-12), trial
        assert s["iou"] == pytest.approx(f.GetJaccardCoefficient(), abs=1e-12), trial


def test_precision_recall_from_hand_counts():
    pred = np.zeros((3, 4, 5), dtype=bool)
    target = np.zeros_like(pred)
    pred[0, :2, :] = True  # 10 voxels
    target[0, 1:, :] = True  # 15 voxels; overlap row 1 -> 5 voxels
    tp, fp, fn = m.counts(pred, target)
    assert (tp, fp, fn) == (5, 5, 10)
    s = m.overlap(tp, fp, fn)
    assert s["precision"] == 5 / 10
    assert s["recall"] == 5 / 15
    region = np.zeros_like(pred)
    region[0, 1] = True  # only the overlapping row
    assert m.counts(pred, target, region).tolist() == [5, 0, 0]


@pytest.mark.parametrize(
    "gt_empty, pred_empty, expected",
    [
        (True, True, {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}),
        (True, False, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 1.0}),
        (False, True, {"dice": 0.0, "iou": 0.0, "precision": 1.0, "recall": 0.0}),
    ],
)
def test_empty_mask_policy(gt_empty, pred_empty, expected):
    target = np.zeros((4, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(target)
    if not gt_empty:
        target[1, 1, 1:3] = 1
    if not pred_empty:
        pred[2, 2, 2] = 1
    assert m.overlap(*m.counts(pred, target)) == expected


def test_summarize_means_follow_policy_and_pooled_is_micro():
    rows = [
        {"case_id": "a", "tp": 8, "fp": 2, "fn": 0},  # positive, dice 16/18
        {"case_id": "a", "tp": 0, "fp": 0, "fn": 0},  # clean negative: dice 1
        {"case_id": "b", "tp": 0, "fp": 4, "fn": 0},  # false alarm: dice 0
        {"case_id": "b", "tp": 0, "fp": 0, "fn": 6},  # missed: dice 0
    ]
    s = m.summarize(rows)
    assert s["pooled_dice"] == pytest.approx(16 / (16 + 6 + 6))
    assert s["pooled_precision"] == pytest.approx(8 / 14)
    assert s["pooled_recall"] == pytest.approx(8 / 14)
    assert s["mean_dice"] == pytest.approx((16 / 18 + 0) / 2)  # GT-positive rows only
    assert s["mean_dice_all"] == pytest.approx((16 / 18 + 1 + 0 + 0) / 4)
    assert s["mean_recall"] == pytest.approx((1 + 0) / 2)
    assert s["mean_precision"] == pytest.approx((0.8 + 0) / 2)  # predicted-positive rows
    assert (s["n_vertebrae"], s["n_positive"]) == (4, 2)
    # pooling is additive: two halves' counts summed give the whole
    half = m.summarize(rows[:2]), m.summarize(rows[2:])
    assert half[0]["tp"] + half[1]["tp"] == s["tp"]
    assert half[0]["fn"] + half[1]["fn"] == s["fn"]


def _ap_reference(scores, labels):
    # brute force: precision at each positive's score threshold, averaged over positives,
    # with tied scores entering together (sklearn's definition)
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    total = 0.0
    prev_recall = 0.0
    for t in sorted(set(s), reverse=True):
        pred = s >= t
        tp = (pred & y).sum()
        precision = tp / pred.sum()
        recall = tp / y.sum()
        total += (recall - prev_recall) * precision
        prev_recall = recall
    return total


def _auc_reference(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=False) if y]
    neg = [s for s, y in zip(scores, labels, strict=False) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 0, 1, 0, 0]
    # PR: thresholds .9 (P=1, R=.5), .8, .7 (P=2/3, R=1) -> .5*1 + .5*2/3
    assert m.average_precision(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ROC: positive pairs won: .9 beats 3 negatives, .7 beats 2 of 3 -> 5/6
    assert m.roc_auc(scores, labels) == pytest.approx(5 / 6)


@pytest.mark.parametrize("seed", range(4))
def test_auc_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 40
    scores = np.round(rng.random(n), 1)  # many ties
    labels = rng.random(n) < 0.3
    labels[0], labels[1] = True, False
    assert m.average_precision(scores, labels) == pytest.approx(_ap_reference(scores, labels))
    assert m.roc_auc(scores, labels) == pytest.approx(_auc_reference(scores, labels))


def test_detection_sens_spec_prevalence():
    d = m.detection([0.9, 0.2, 0.6, 0.4, 0.1], [1, 1, 0, 0, 0], threshold=0.5)
    assert d["sensitivity"] == 0.5
    assert d["specificity"] == pytest.approx(2 / 3)
    assert d["prevalence"] == pytest.approx(0.4)
    assert (d["n_pos"], d["n_neg"]) == (2, 3)
    nan = m.detection([0.1, 0.2], [0, 0], threshold=0.5)
    assert np.isnan(nan["pr_auc"]) and np.isnan(nan["roc_auc"]) and np.isnan(nan["sensitivity"])
    assert nan["specificity"] == 1.0


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    rows = [
        {
            "case_id": f"c{i // 3}",
            "tp": int(rng.integers(0, 20)),
            "fp": int(rng.integers(0, 10)),
            "fn": int(rng.integers(0, 10)),
        }
        for i in range(30)
    ]
    a = m.bootstrap_ci(rows, m.pooled_dice, n_boot=300, seed=5)
    b = m.bootstrap_ci(rows, m.pooled_dice, n_boot=300, seed=5)
    assert a == b
    assert a[0] < m.pooled_dice(rows) < a[1]
    lo, hi = m.bootstrap_ci(rows, m.mean_dice, n_boot=300, seed=5)
    assert lo < m.mean_dice(rows) < hi
    # identical cases: no variability -> zero-width interval
    same = [{"case_id": f"c{i}", "tp": 5, "fp": 1, "fn": 1} for i in range(5)]
    lo, hi = m.bootstrap_ci(same, m.pooled_dice, n_boot=50, seed=0)
    assert lo == pytest.approx(hi)


def test_threshold_sweep_matches_direct_counts():
    rng = np.random.default_rng(1)
    prob = rng.random((6, 7, 8)).astype(np.float32)
    target = (prob + rng.normal(0, 0.3, prob.shape)) > 0.7
    sweep = m.ThresholdSweep(bins=20)
    sweep.add(prob[:3], target[:3])
    other = m.ThresholdSweep(bins=20)
    other.add(prob[3:], target[3:])
    sweep.merge(other)  # summable like every count
    for t, row in zip(sweep.thresholds, sweep.counts(), strict=False):
        assert row.tolist() == m.counts(prob >= t, target).tolist(), t
    t_best, d_best = sweep.best()
    direct = [m.overlap(*m.counts(prob >= t, target))["dice"] for t in sweep.thresholds]
    assert d_best == pytest.approx(max(direct))
    assert m.overlap(*m.counts(prob >= t_best, target))["dice"] == pytest.approx(d_best)


def test_hausdorff95_of_shifted_cube_in_mm():
    a = _cube((20, 20, 20), (5, 5, 5), size=8)
    b = _cube((20, 20, 20), (8, 5, 5), size=8)  # shifted 3 voxels along z
    hd = m.hausdorff95(a, b, spacing_zyx=(2.0, 1.0, 1.0))
    assert hd == pytest.approx(6.0)  # 3 voxels x 2 mm
    assert m.hausdorff95(a, a, (1.0, 1.0, 1.0)) == 0.0
    assert np.isnan(m.hausdorff95(a, np.zeros_like(a), (1.0, 1.0, 1.0)))
