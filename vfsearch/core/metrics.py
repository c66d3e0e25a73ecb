"""Overlap metrics from summable counts (pure torch).

Every figure vfsearch reports (Dice, IoU, precision, recall; in 2D per slice window now, in 3D
per vertebra later) is computed in two steps: `confusion_counts` turns a binary prediction
and target into TP/FP/FN counts, which are *summed* (over batches, over workers with an
all-reduce, over slices of a volume), and `scores` divides the totals once. Summing counts
rather than averaging per-batch ratios makes the result independent of how the data was cut
into batches or shards: two half batches summed give exactly the whole batch's figures.

Empty policy: a ratio whose denominator is 0 is 0/0 (its numerator is 0 too) and means that
there was nothing to find and nothing claimed, e.g. Dice when neither prediction nor target
contains a positive voxel. Such a ratio takes the value ``empty`` (default 1.0, perfect
agreement), as sklearn's ``zero_division`` does. Pass ``empty=0.0`` (or ``float("nan")``) to
count empty cases differently.
"""

from __future__ import annotations

import torch

COUNT_NAMES: tuple[str, str, str] = ("tp", "fp", "fn")


def confusion_counts(
    pred: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...] | None = None
) -> torch.Tensor:
    """TP, FP, FN of binary ``pred`` against binary ``target`` of the same shape.

    Args:
        pred: bool or 0/1 tensor of any shape, e.g. ``(B, 1, H, W)`` slices or ``(z, y, x)``.
        target: same shape; values > 0.5 count as positive (a 0/1 float mask is fine).
        dims: dimensions to sum over; None sums everything.

    Returns:
        float64 counts stacked on the last axis: ``(3,)`` for ``dims=None``, else the kept
        dimensions followed by 3 (``[..., 0]`` TP, ``[..., 1]`` FP, ``[..., 2]`` FN). float64
        holds integers exactly up to 2**53 and all-reduces on gloo and NCCL alike.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    p = pred.bool() if pred.dtype == torch.bool else pred > 0.5
    t = target.bool() if target.dtype == torch.bool else target > 0.5
    reduce_dims = tuple(range(p.dim())) if dims is None else dims
    tp = (p & t).sum(dim=reduce_dims, dtype=torch.float64) if p.dim() else (p & t).double()
    fp = (p & ~t).sum(dim=reduce_dims, dtype=torch.float64) if p.dim() else (p & ~t).double()
    fn = (~p & t).sum(dim=reduce_dims, dtype=torch.float64) if p.dim() else (~p & t).double()
    return torch.stack([tp, fp, fn], dim=-1)


def _ratio(num: float, den: float, empty: float) -> float:
    return empty if den == 0 else num / den


def scores(
    counts: torch.Tensor | tuple[float, float, float] | list[float], *, empty: float = 1.0
) -> dict[str, float]:
    """Dice, IoU, precision and recall (all in [0, 1]) from summed ``(tp, fp, fn)``.

    ``counts`` is a ``(3,)`` tensor (as returned by `confusion_counts` and summed) or a
    3-sequence. See the module docstring for the ``empty`` policy.
    """
    if isinstance(counts, torch.Tensor):
        if counts.shape != (3,):
            raise ValueError(f"expected counts of shape (3,), got {tuple(counts.shape)}")
        tp, fp, fn = (float(v) for v in counts.double().cpu().tolist())
    else:
        tp, fp, fn = (float(v) for v in counts)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
    }


__all__ = ["COUNT_NAMES", "confusion_counts", "scores"]
