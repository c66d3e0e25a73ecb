"""3D overlap, detection and distance metrics for fused predictions (pure numpy).

Overlap figures come from summable TP/FP/FN counts (`vfsearch.core.metrics.scores` divides them),
per vertebra, per case (summed over its vertebrae) and pooled (micro: summed over every
vertebra of the split, then divided once).

Empty-mask policy (one rule, the one of `vfsearch.core.metrics`): a ratio whose denominator is 0
is 0/0 and takes the value 1 — nothing to find and nothing claimed is perfect agreement.
Per vertebra that gives:

==========================  =====  =====  =========  ======
ground truth / prediction   Dice   IoU    precision  recall
==========================  =====  =====  =========  ======
empty / empty               1      1      1          1
empty / not empty           0      0      0          1
not empty / empty           0      0      1          0
==========================  =====  =====  =========  ======

Means over vertebrae are taken where the figure has a meaning: ``mean_dice`` and
``mean_iou`` over vertebrae with a fracture in the ground truth (so clean vertebrae cannot
inflate them; their false alarms show up in the pooled figures, in ``mean_dice_all`` and in
detection specificity), ``mean_recall`` over ground-truth-positive vertebrae,
``mean_precision`` over vertebrae with a predicted fracture. ``mean_dice_all`` averages every
vertebra under the table above.

Detection (is vertebra v fractured?) ranks vertebrae by a score: average precision (the
area under the step-wise precision-recall curve, as sklearn's ``average_precision_score``),
ROC-AUC (Mann-Whitney, ties count one half), sensitivity and specificity at a threshold, and
the prevalence of positives (the floor of PR-AUC for a random score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vfsearch.core.metrics import scores

OVERLAP_KEYS: tuple[str, ...] = ("dice", "iou", "precision", "recall")


def counts(pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """TP, FP, FN of binary ``pred`` against binary ``target`` (any equal shapes).

    Non-zero counts as positive. ``region`` (bool, same shape) restricts the count to its
    voxels. Returns int64 ``(3,)``.
    """
    p = np.asarray(pred) != 0
    t = np.asarray(target) != 0
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ")
    if region is not None:
        p = p & region
        t = t & region
    tp = int(np.count_nonzero(p & t))
    return np.array(
        [tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp], dtype=np.int64
    )


def overlap(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, IoU, precision, recall in [0, 1] from counts, under the module's empty policy
    (that of `vfsearch.core.metrics.scores`, which this delegates to: one rule for 2D and 3D)."""
    return scores((float(tp), float(fp), float(fn)), empty=1.0)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pooled and mean overlap figures of per-vertebra rows (each with ``tp, fp, fn``).

    Returns ``pooled_*`` (micro, from summed counts), ``mean_dice``/``mean_iou`` and
    ``mean_recall`` over ground-truth-positive rows, ``mean_precision`` over predicted-
    positive rows, ``mean_dice_all`` over every row (NaN where no row qualifies), the summed
    counts and the row numbers ``n_vertebrae``, ``n_positive``.
    """
    c = np.array([[r["tp"], r["fp"], r["fn"]] for r in rows], dtype=np.float64).reshape(-1, 3)
    tp, fp, fn = c.sum(axis=0)
    out: dict[str, Any] = {f"pooled_{k}": v for k, v in overlap(tp, fp, fn).items()}
    per = [overlap(*row) for row in c]
    gt_pos = (c[:, 0] + c[:, 2]) > 0
    pred_pos = (c[:, 0] + c[:, 1]) > 0

    def mean(key: str, where: np.ndarray) -> float:
        vals = [p[key] for p, w in zip(per, where, strict=True) if w]
        return float(np.mean(vals)) if vals else float("nan")

    out["mean_dice"] = mean("dice", gt_pos)
    out["mean_iou"] = mean("iou", gt_pos)
    out["mean_recall"] = mean("recall", gt_pos)
    out["mean_precision"] = mean("precision", pred_pos)
    out["mean_dice_all"] = mean("dice", np.ones(len(per), dtype=bool))
    out.update(
        tp=int(tp), fp=int(fp), fn=int(fn), n_vertebrae=len(per), n_positive=int(gt_pos.sum())
    )
    return out


# -- bootstrap ------------------------------------------------------------------------------
def bootstrap_ci(
    rows: Sequence[Mapping[str, Any]],
    statistic: Callable[[list[Mapping[str, Any]]], float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    group_key: str = "case_id",
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(rows)``, resampling whole groups.

    Rows are resampled by ``group_key`` (cases: the vertebrae of one scan are not
    independent); with a single group the vertebrae themselves are resampled. Replicates
    where the statistic is NaN (no positive vertebra drawn) are dropped. Seeded: same rows,
    same seed, same interval. Returns ``(low, high)`` (NaN, NaN when nothing is defined).
    """
    if not rows:
        return float("nan"), float("nan")
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(group_key), []).append(r)
    units = list(groups.values()) if len(groups) > 1 else [[r] for r in rows]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(units), size=len(units))
        sample = [r for i in pick for r in units[i]]
        v = statistic(sample)
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def pooled_dice(rows: Iterable[Mapping[str, Any]]) -> float:
    """Micro Dice of rows with ``tp, fp, fn`` (a `bootstrap_ci` statistic)."""
    tp = fp = fn = 0.0
    for r in rows:
        tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
    return overlap(tp, fp, fn)["dice"]


def mean_dice(rows: Iterable[Mapping[str, Any]]) -> float:
    """Mean Dice over ground-truth-positive rows, NaN if none (a `bootstrap_ci` statistic)."""
    vals = [overlap(r["tp"], r["fp"], r["fn"])["dice"] for r in rows if r["tp"] + r["fn"] > 0]
    return float(np.mean(vals)) if vals else float("nan")


# -- detection ------------------------------------------------------------------------------
def _check_scores(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    return s, y


def average_precision(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray
) -> float:
    """Area under the step-wise precision-recall curve: ``sum_k (R_k - R_{k-1}) P_k``.

    Thresholds at every distinct score (tied scores enter together), as sklearn's
    ``average_precision_score``. NaN without positives.
    """
    s, y = _check_scores(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counting 1/2.

    Computed from average ranks (Mann-Whitney U). NaN without positives or negatives.
    """
    s, y = _check_scores(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # average rank (1-based) of each run of ties
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection(
    scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray, threshold: float
) -> dict[str, float]:
    """PR-AUC, ROC-AUC, sensitivity, specificity (score ``>= threshold`` is positive),
    prevalence and the numbers of positives and negatives. Undefined figures are NaN."""
    s, y = _check_scores(scores, labels)
    pred = s >= threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return {
        "pr_auc": average_precision(s, y),
        "roc_auc": roc_auc(s, y),
        "sensitivity": float((pred & y).sum() / n_pos) if n_pos else float("nan"),
        "specificity": float((~pred & ~y).sum() / n_neg) if n_neg else float("nan"),
        "prevalence": float(n_pos / s.size) if s.size else float("nan"),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


# -- threshold search -----------------------------------------------------------------------
class ThresholdSweep:
    """Summed TP/FP/FN of ``prob >= t`` for every candidate ``t = k / bins``, k = 1..bins-1.

    `add` histograms one volume's probabilities inside and outside the ground truth, so a
    whole split is scanned once whatever the number of candidates. `best` returns the
    threshold with the highest pooled Dice (ties: the one closest to 0.5).
    """

    def __init__(self, bins: int = 100) -> None:
        self.bins = int(bins)
        self.pos = np.zeros(self.bins, dtype=np.int64)
        self.neg = np.zeros(self.bins, dtype=np.int64)

    @property
    def thresholds(self) -> np.ndarray:
        return np.arange(1, self.bins) / self.bins

    def add(self, prob: np.ndarray, target: np.ndarray) -> None:
        """``prob`` float in [0, 1] and binary ``target`` of the same shape."""
        p = np.asarray(prob, dtype=np.float64).ravel()
        t = np.asarray(target).ravel() != 0
        # bin k holds k/bins <= p < (k+1)/bins, so "p >= k/bins" is "bin >= k"
        idx = np.clip(np.floor(p * self.bins + 1e-9).astype(np.int64), 0, self.bins - 1)
        self.pos += np.bincount(idx[t], minlength=self.bins)
        self.neg += np.bincount(idx[~t], minlength=self.bins)

    def merge(self, other: ThresholdSweep) -> None:
        self.pos += other.pos
        self.neg += other.neg

    def counts(self) -> np.ndarray:
        """int64 ``(bins - 1, 3)``: TP, FP, FN at each of `thresholds`."""
        tp = np.cumsum(self.pos[::-1])[::-1][1:]
        fp = np.cumsum(self.neg[::-1])[::-1][1:]
        fn = self.pos.sum() - tp
        return np.stack([tp, fp, fn], axis=1)

    def dice(self) -> np.ndarray:
        c = self.counts().astype(np.float64)
        return np.array([overlap(*row)["dice"] for row in c])

    def best(self) -> tuple[float, float]:
        """``(threshold, pooled Dice)`` maximising pooled Dice."""
        d = self.dice()
        t = self.thresholds
        best = np.flatnonzero(d >= d.max() - 1e-12)
        k = best[np.argmin(np.abs(t[best] - 0.5))]
        return float(t[k]), float(d[k])


def best_threshold(
    candidates: Sequence[float] | np.ndarray, dice: Sequence[float]
) -> tuple[float, float]:
    """The candidate with the highest Dice (ties: the one closest to 0.5)."""
    d = np.asarray(dice, dtype=np.float64)
    t = np.asarray(candidates, dtype=np.float64)
    best = np.flatnonzero(d >= np.nanmax(d) - 1e-12)
    k = best[np.argmin(np.abs(t[best] - 0.5))]
    return float(t[k]), float(d[k])


# -- distance -------------------------------------------------------------------------------
def hausdorff95(pred: np.ndarray, target: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces, in mm.

    Surfaces are the boundary voxels of each mask (voxels with a background 6-neighbour);
    the result is ``max(p95 d(pred→target), p95 d(target→pred))`` with Euclidean
    distances on the anisotropic grid (``spacing_zyx`` mm, numpy axis order). NaN when either
    mask is empty. Imports scipy (layer 0 exception: scipy.ndimage is array maths).
    """
    from scipy import ndimage

    p = np.asarray(pred) != 0
    t = np.asarray(target) != 0
    if not p.any() or not t.any():
        return float("nan")
    # work on the bounding box of both masks plus a margin: cheaper, same distances
    box = _bbox(p | t, margin=2)
    p, t = p[box], t[box]
    p_surf = p & ~ndimage.binary_erosion(p, border_value=0)
    t_surf = t & ~ndimage.binary_erosion(t, border_value=0)
    dt_t = ndimage.distance_transform_edt(~t_surf, sampling=spacing_zyx)
    dt_p = ndimage.distance_transform_edt(~p_surf, sampling=spacing_zyx)
    d1 = dt_t[p_surf]
    d2 = dt_p[t_surf]
    return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n))
        for i, n in zip(idx, mask.shape, strict=True)
    )


__all__ = [
    "OVERLAP_KEYS",
    "ThresholdSweep",
    "average_precision",
    "best_threshold",
    "bootstrap_ci",
    "counts",
    "detection",
    "hausdorff95",
    "mean_dice",
    "overlap",
    "pooled_dice",
    "roc_auc",
    "summarize",
]
