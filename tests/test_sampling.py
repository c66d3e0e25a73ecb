"""Unit tests of the locality-keeping epoch order (vfsearch.core.sampling): pure numpy."""

from __future__ import annotations

import numpy as np
import pytest

from vfsearch.core import sampling
from vfsearch.core.sampling import balance_groups, decode, encode, epoch_order, working_set


def offsets_for(sizes):
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


SIZES = [40, 35, 50, 45, 38, 42, 47, 33, 41, 39, 44, 36] * 5  # 60 vertebrae, ~2,500 windows
OFFSETS = offsets_for(SIZES)
N = int(OFFSETS[-1])


def real(order):
    return np.asarray([decode(int(v), N)[0] for v in order])


def test_a_uniform_epoch_visits_every_window_once():
    order = epoch_order(OFFSETS, N, seed=3, epoch=1)
    assert len(order) == N
    assert sorted(real(order)) == list(range(N))


def test_ranks_get_equal_disjoint_shards_of_the_same_draw():
    count = N // 2 + 7
    shards = [epoch_order(OFFSETS, count, seed=5, epoch=2, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-count // 3)
    together = np.concatenate(shards)
    # every drawn window appears once; the 2 padding windows repeat earlier ones
    assert len(np.unique(together)) == count
    assert len(together) - count == 3 * len(shards[0]) - count


def test_the_working_set_stays_small_but_batches_mix_vertebrae():
    order = epoch_order(OFFSETS, N, seed=0, epoch=0, open_vertebrae=6)
    shuffled = np.random.default_rng(0).permutation(N)
    local, global_ = working_set(order, OFFSETS, N, 64), working_set(shuffled, OFFSETS, N, 64)
    assert local <= 8, local  # 6 open, plus the ones opened while others run dry
    assert global_ > 35, global_  # a global shuffle touches almost every vertebra
    assert working_set(order, OFFSETS, N, 16) >= 4  # a batch still mixes several vertebrae


def test_open_vertebrae_one_is_one_vertebra_at_a_time():
    order = epoch_order(OFFSETS, N, seed=1, epoch=0, open_vertebrae=1)
    vertebra = np.searchsorted(OFFSETS, real(order), side="right") - 1
    changes = int((np.diff(vertebra) != 0).sum())
    assert changes == len(SIZES) - 1


def test_oversampling_draws_fracture_windows_in_proportion():
    flags = np.zeros(N, bool)
    flags[::10] = True  # 10 % of windows show fracture
    weights = 1.0 + 3.0 * flags  # oversample 3: expected share 0.4 / (0.9 + 0.4)
    order = epoch_order(OFFSETS, 20_000, seed=2, epoch=0, weights=weights)
    share = flags[real(order)].mean()
    assert abs(share - 0.4 / 1.3) < 0.02, share


def test_balanced_groups_get_equal_shares_and_keep_fracture_oversampling():
    groups = np.where(np.arange(N) < N // 10, "real", "phantom")  # 10 % real windows
    flags = np.zeros(N, bool)
    flags[::5] = True
    weights = balance_groups(1.0 + 2.0 * flags, groups)
    assert weights.sum() == pytest.approx(N + 2.0 * flags.sum())  # total kept
    order = real(epoch_order(OFFSETS, 20_000, seed=3, epoch=0, weights=weights))
    assert abs((groups[order] == "real").mean() - 0.5) < 0.02  # 0.1 without balancing
    inside = order[groups[order] == "phantom"]
    assert abs(flags[inside].mean() - 3 / 7) < 0.03  # within a group, 3:1 per window as before
    # one group, or a group of zero weight, leaves the others as they were
    one = balance_groups([1.0, 3.0], ["a", "a"])
    assert one.tolist() == [1.0, 3.0]
    assert balance_groups([0.0, 2.0, 2.0], ["a", "b", "b"]).tolist() == [0.0, 2.0, 2.0]


def test_a_window_drawn_twice_gets_two_augmentation_keys():
    weights = np.ones(N)
    order = epoch_order(OFFSETS, 3 * N, seed=4, epoch=7, weights=weights)
    r = real(order)
    keys = [decode(int(v), N)[1] for v in order]
    repeated = np.flatnonzero(r == np.bincount(r).argmax())
    assert len(repeated) > 1
    assert len({keys[i] for i in repeated}) == len(repeated)
    assert len(np.unique(order)) == len(order)  # no two draws share a virtual index


def test_the_epoch_is_part_of_the_key_and_plain_indices_stay_plain():
    idx = np.array([5, 9], np.int64)
    a = encode(idx, np.zeros(2, np.int64), 1, N)
    b = encode(idx, np.zeros(2, np.int64), 2, N)
    assert [decode(int(v), N)[0] for v in a] == [5, 9] == [decode(int(v), N)[0] for v in b]
    assert decode(int(a[0]), N)[1] != decode(int(b[0]), N)[1]
    assert decode(17, N) == (17, None)


def test_the_order_is_reproducible_and_changes_with_the_epoch():
    a = epoch_order(OFFSETS, 500, seed=9, epoch=1, rank=1, world=2)
    assert np.array_equal(a, epoch_order(OFFSETS, 500, seed=9, epoch=1, rank=1, world=2))
    b = epoch_order(OFFSETS, 500, seed=9, epoch=2, rank=1, world=2)
    assert not np.array_equal(real(a), real(b))


@pytest.mark.parametrize("rank, world, k", [(2, 2, 4), (0, 1, 0)])
def test_bad_arguments_are_refused(rank, world, k):
    with pytest.raises(ValueError):
        epoch_order(OFFSETS, 10, seed=0, epoch=0, rank=rank, world=world, open_vertebrae=k)


def test_val_stride_scores_all_unless_an_epoch_is_capped_or_a_cap_is_given():
    assert sampling.val_stride(528, -1, None) == 1  # auto, the epoch is the training split
    assert sampling.VAL_PER_TRAIN == 1
    assert sampling.val_stride(528, -1, 48) == 11  # auto: about as many as the epoch, 48
    assert sampling.val_stride(40, -1, 48) == 1  # fewer than the epoch trains: all
    assert sampling.val_stride(528, 0, 48) == 1  # 0: all, even for a capped epoch
    assert sampling.val_stride(528, 100, None) == 6  # an explicit cap
    with pytest.raises(ValueError):
        sampling.val_stride(528, -2, None)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 36, 47])
@pytest.mark.parametrize("stride", [1, 2, 6, 11])
def test_strided_centres_spread_evenly_and_every_vertebra_keeps_one(n, stride):
    c = sampling.strided_centres(n, stride)
    assert len(c) >= 1 and c.min() >= 0 and c.max() < n
    assert np.all(np.diff(c) == stride)
    assert len(c) == len(range(c[0], n, stride))
    if n > stride // 2:
        assert c[0] == stride // 2 and len(c) >= n // stride  # as many as fit
    else:  # a vertebra shorter than half a stride: its middle slice
        assert c.tolist() == [n // 2]
    if stride == 1:
        assert np.array_equal(c, np.arange(n))
