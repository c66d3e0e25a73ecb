"""An epoch's training windows in an order that keeps locality and still mixes.

A global shuffle over every window of every vertebra makes each window a cache miss once the
decoded crops outgrow the loader's cache: the whole vertebra is decoded to use 5 slices.
`epoch_order` draws the epoch's windows exactly as a global sampler would (uniformly without
replacement, or weighted with replacement to oversample fracture windows), then orders them
so that only a few vertebrae are *open* at any time:

1. the drawn windows are grouped by vertebra and the vertebrae are shuffled;
2. the sequence of groups is cut into ``world`` equal contiguous shards, one per rank
   (at most one vertebra straddles two ranks; shorter shards wrap around, as
   `torch.utils.data.DistributedSampler` pads, so every rank runs the same number of steps);
3. each rank emits its windows from a pool of ``open_vertebrae`` groups, picking a random open
   group for every window and opening the next group when one runs dry: consecutive batches
   mix ``open_vertebrae`` vertebrae while the working set stays that small.

A window drawn twice in an epoch gets a distinct *virtual index* for each draw (`encode`), and
the epoch is part of it too: the dataset seeds its augmentation from the virtual index, so a
repeated window is augmented afresh, and persistent loader workers need no ``set_epoch``.
Pure numpy: every rank computes the same draw from (seed, epoch) and keeps its own shard.

Per-epoch validation may score a fixed, evenly spread subset of the validation windows
(`val_stride`, `strided_centres`): every ``stride``-th slice of every vertebra as a window's
centre, the same slices in every epoch and every trial, so that epochs and trials are compared
on the same windows. Neighbouring slices (1-2 mm apart) are nearly the same image, so a stride
drops little of the signal while every vertebra keeps its share.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MAX_DRAWS = 1 << 20  # draws of one window within one epoch that get distinct virtual indices

IntArray = npt.NDArray[np.int64]


def encode(index: IntArray, draw: IntArray, epoch: int, n: int) -> IntArray:
    """Virtual indices: window ``index`` (< n), its ``draw``-th repeat, in ``epoch``."""
    key = (np.int64(epoch) * MAX_DRAWS + draw.astype(np.int64)) + 1  # 0 is left for plain use
    return index.astype(np.int64) + np.int64(n) * key


def decode(virtual: int, n: int) -> tuple[int, int | None]:
    """(window index, augmentation key) of a virtual index; a plain index < n has key None."""
    if virtual < n:
        return int(virtual), None
    return int(virtual % n), int(virtual // n)


def _draws(index: IntArray) -> IntArray:
    """For each position, how many earlier positions hold the same window (0, 1, ...)."""
    order = np.argsort(index, kind="stable")
    sorted_idx = index[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_idx)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(index)]))
    out = np.empty(len(index), np.int64)
    out[order] = np.arange(len(index)) - run_start
    return out


def draw_windows(
    n_windows: int,
    count: int,
    rng: np.random.Generator,
    weights: npt.NDArray[np.float64] | None = None,
) -> IntArray:
    """The epoch's ``count`` window indices: weighted with replacement when ``weights`` are
    given (fracture oversampling), else a uniform draw without replacement (all windows
    when ``count >= n_windows``)."""
    if weights is not None:
        p = np.asarray(weights, np.float64)
        return rng.choice(n_windows, size=count, replace=True, p=p / p.sum()).astype(np.int64)
    return rng.permutation(n_windows)[:count].astype(np.int64)


def balance_groups(weights: npt.ArrayLike, groups: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``weights`` rescaled within each group so that every group holds the same total
    (relative weights inside a group kept); a group of zero total weight stays at zero."""
    w = np.asarray(weights, dtype=np.float64)
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    totals = np.bincount(inverse, weights=w)
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    per_group = float(w.sum()) / max(int(np.count_nonzero(totals > 0)), 1)
    return np.asarray(w * scale[inverse] * per_group, dtype=np.float64)


def epoch_order(
    offsets: IntArray,
    count: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    open_vertebrae: int = 32,
    weights: npt.NDArray[np.float64] | None = None,
) -> IntArray:
    """This rank's virtual window indices for ``epoch`` (see the module docstring).

    ``offsets``: ``(n_vertebrae + 1,)`` first window of each vertebra (the dataset's index),
    so window ``i`` belongs to vertebra ``searchsorted(offsets, i, 'right') - 1``.
    ``count``: windows drawn per epoch over all ranks. Each rank gets ``ceil(count / world)``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    if open_vertebrae < 1:
        raise ValueError(f"open_vertebrae must be >= 1, got {open_vertebrae}")
    n = int(offsets[-1])
    rng = np.random.default_rng([int(seed), int(epoch)])
    drawn = draw_windows(n, int(count), rng, weights)
    virtual = encode(drawn, _draws(drawn), epoch, n)
    vertebra = np.searchsorted(offsets, drawn, side="right") - 1
    # group by vertebra, vertebrae in a random order, windows shuffled within each group
    rank_of_vertebra = rng.permutation(len(offsets) - 1)
    key = rank_of_vertebra[vertebra] * (len(drawn) + 1) + rng.permutation(len(drawn))
    order = np.argsort(key, kind="stable")
    grouped, groups = virtual[order], vertebra[order]
    per_rank = -(-len(grouped) // world)
    if per_rank * world > len(grouped):  # wrap around so every rank gets the same length
        pad = per_rank * world - len(grouped)
        grouped = np.concatenate([grouped, np.resize(grouped, pad)])
        groups = np.concatenate([groups, np.resize(groups, pad)])
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return _interleave(grouped[mine], groups[mine], open_vertebrae, rng)


def _interleave(items: IntArray, groups: IntArray, k: int, rng: np.random.Generator) -> IntArray:
    """Emit ``items`` (contiguous runs per group) drawing from ``k`` open runs at a time."""
    if len(items) == 0:
        return items
    bounds = np.r_[0, np.flatnonzero(np.diff(groups)) + 1, len(items)]
    runs = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    pool: list[tuple[IntArray, int]] = []
    nxt = 0
    out = np.empty(len(items), np.int64)
    picks = rng.random(len(items))
    for i in range(len(items)):
        while len(pool) < k and nxt < len(runs):
            pool.append((runs[nxt], 0))
            nxt += 1
        j = int(picks[i] * len(pool))
        run, pos = pool[j]
        out[i] = run[pos]
        if pos + 1 == len(run):
            pool[j] = pool[-1]
            pool.pop()
        else:
            pool[j] = (run, pos + 1)
    return out


VAL_PER_TRAIN = 1  # auto: an epoch capped to N training windows validates about N windows


def val_stride(n_val: int, val_windows: int, epoch_windows: int | None) -> int:
    """Every how many slices per-epoch validation takes a window's centre, for ``n_val``
    validation windows in all.

    ``val_windows``: 0 scores them all; ``N > 0`` about ``N`` (the stride rounds per
    vertebra: up to about one more window per two vertebrae); -1 (auto) about
    ``VAL_PER_TRAIN x epoch_windows`` when the epoch is capped to ``epoch_windows`` training
    windows (``train.max_windows_per_epoch``; None: the epoch is the whole training split),
    else all. A validation window costs about a third of a training window (no backward
    pass), so auto keeps validation near a third of the epoch's training time
    (`benchmarks/val_subset.py` measures what the subset keeps of the whole split's signal).
    """
    if val_windows < -1:
        raise ValueError(f"val_windows must be >= -1, got {val_windows}")
    cap = val_windows
    if val_windows == -1:
        cap = VAL_PER_TRAIN * epoch_windows if epoch_windows else 0
    if cap <= 0 or n_val <= cap:
        return 1
    return -(-n_val // cap)  # ceil


def strided_centres(n: int, stride: int) -> IntArray:
    """The centre slices a vertebra of ``n`` slices is validated on: every ``stride``-th,
    from the middle of the first block (slice ``stride // 2``, or the middle slice of a
    vertebra shorter than that), so that every vertebra has at least one."""
    if n < 1 or stride < 1:
        raise ValueError(f"need n >= 1 and stride >= 1, got n={n}, stride={stride}")
    first = stride // 2 if stride // 2 < n else n // 2
    return np.arange(first, n, stride, dtype=np.int64)


def working_set(order: IntArray, offsets: IntArray, n: int, window: int) -> float:
    """Mean number of distinct vertebrae among ``window`` consecutive windows of ``order``
    (a locality measure: 1 is a single vertebra at a time, ``window`` is no locality)."""
    real = np.asarray(order, np.int64) % n
    vertebra = np.searchsorted(offsets, real, side="right") - 1
    spans = [
        len(np.unique(vertebra[i : i + window]))
        for i in range(0, max(len(vertebra) - window + 1, 1), window)
    ]
    return float(np.mean(spans))
