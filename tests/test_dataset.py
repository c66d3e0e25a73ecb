"""2.5D windows (vfsearch.core.windows) and the Zarr-backed WindowDataset."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from vfsearch.adapters.dataset import EpochSampler, WindowDataset
from vfsearch.adapters.store import PLANE_AXIS, Store, hu_histogram
from vfsearch.core import windows as W
from vfsearch.core.config import Config, DataConfig, with_overrides
from vfsearch.core.errors import UserError

# identity-like normalisation: HU values come out unchanged (clip range wider than the data)
IDENTITY_FP = {"p0_5": -5000.0, "p50": 0.0, "p99_5": 5000.0, "mean": 0.0, "std": 1.0}


def write_store(
    path: Path, cases: dict, fingerprint: dict | None = None, vertebra_attrs: dict | None = None
) -> Path:
    """cases: {case_id: (split, {vid: (image int16, fracture uint8)})} → a real Zarr store."""
    store = Store(path, "a")
    store.set_meta(format=1, **({"fingerprint": fingerprint} if fingerprint else {}))
    for case_id, (split, verts) in cases.items():
        store.begin_case(case_id, {"split": split})
        hist = np.zeros(4096, np.int64)
        for vid, (image, fracture) in verts.items():
            attrs = (vertebra_attrs or {}).get((case_id, vid), {})
            store.write_vertebra(
                case_id,
                vid,
                {"image": image, "fracture": fracture, "mask": np.ones_like(fracture)},
                attrs,
            )
            hist += hu_histogram(image)
        store.finish_case(case_id, hist, {})
    return path


def index_volume(shape=(6, 7, 8)) -> np.ndarray:
    """value = 100 z + 10 y + x: each voxel names its own position."""
    z, y, x = np.indices(shape)
    return (100 * z + 10 * y + x).astype(np.int16)


# -- pure window arithmetic -----------------------------------------------------------------


def test_window_indices_replicate_edges():
    assert W.window_indices(0, 5, 10).tolist() == [0, 0, 0, 1, 2]
    assert W.window_indices(1, 5, 10).tolist() == [0, 0, 1, 2, 3]
    assert W.window_indices(4, 3, 10).tolist() == [3, 4, 5]
    assert W.window_indices(9, 5, 10).tolist() == [7, 8, 9, 9, 9]
    assert W.window_indices(0, 7, 2).tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert W.window_indices(0, 1, 1).tolist() == [0]
    with pytest.raises(ValueError):
        W.window_indices(0, 4, 10)
    with pytest.raises(IndexError):
        W.window_indices(10, 5, 10)


def test_plane_axes_agree_with_store():
    assert W.PLANE_AXIS == PLANE_AXIS
    with pytest.raises(UserError, match="data.plane"):
        W.plane_axis("oblique")


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_cut_window_slices_along_plane(plane):
    vol = index_volume()
    axis = W.plane_axis(plane)
    win = W.cut_window(vol, 1, 5, axis)
    pos = np.indices(vol.shape)[axis]  # the coordinate along the plane's axis
    expected = [0, 0, 1, 2, 3]
    in_plane = tuple(s for a, s in enumerate(vol.shape) if a != axis)
    assert win.shape == (5, *in_plane)
    for i, s in enumerate(expected):
        assert np.array_equal(win[i], np.take(vol, s, axis=axis))
        assert np.all(np.take(pos, s, axis=axis) == s)
    if plane == "sagittal":  # slices along x, in-plane (z, y)
        assert np.array_equal(win[2], vol[:, :, 1])


def test_window_has_target():
    counts = np.array([0, 0, 3, 0, 0, 0, 0, 2])
    assert W.window_has_target(counts, 3, False).tolist() == [0, 0, 1, 0, 0, 0, 0, 1]
    assert W.window_has_target(counts, 3, True).tolist() == [0, 1, 1, 1, 0, 0, 1, 1]
    assert W.window_has_target(counts, 5, True).tolist() == [1, 1, 1, 1, 1, 1, 1, 1]


def test_normalise_from_fingerprint():
    fp = {"p0_5": -100.0, "p50": 40.0, "p99_5": 300.0, "mean": 50.0, "std": 25.0}
    hu = np.array([-500, -100, 0, 50, 300, 1000], dtype=np.int16)
    expected = np.array([-6.0, -6.0, -2.0, 0.0, 10.0, 10.0], dtype=np.float32)
    out = W.normalise(hu, fp)
    assert out.dtype == np.float32 and np.allclose(out, expected)
    out_t = W.normalise(torch.from_numpy(hu), fp)
    assert out_t.dtype == torch.float32 and np.allclose(out_t.numpy(), expected)
    assert W.normalised_floor(fp) == -6.0
    with pytest.raises(UserError, match="fingerprint: missing p99_5"):
        W.normalise(hu, {"p0_5": 0, "mean": 0, "std": 1})


def test_fit_to_patch_centres_and_crops():
    arr = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    start = W.patch_start((3, 5), 4)
    assert start == (-1, 0)
    out = W.fit_to_patch(arr, 4, start, -1)
    assert out.shape == (2, 4, 4)
    assert np.all(out[:, 0] == -1) and np.array_equal(out[:, 1:4, :], arr[:, :, 0:4])
    rng = np.random.default_rng(0)
    starts = {W.patch_start((3, 9), 4, rng) for _ in range(200)}
    assert {s[0] for s in starts} == {-1, 0} and {s[1] for s in starts} == set(range(6))


def test_augment_window_same_transform_for_all_slices_and_mask():
    yy, xx = np.mgrid[0:48, 0:48]
    # an asymmetric shape (L plus a dot), so rotation and scaling change the mask
    shape = (
        ((yy > 10) & (yy < 36) & (xx > 12) & (xx < 20))
        | ((yy > 28) & (yy < 36) & (xx > 12) & (xx < 34))
        | ((yy - 14) ** 2 + (xx - 32) ** 2 < 16)
    )
    image = torch.from_numpy(np.where(shape, 8.0, -1.0).astype(np.float32)).repeat(5, 1, 1)
    mask = torch.from_numpy(shape.astype(np.float32))[None]
    changed = 0
    for seed in range(6):
        img, tgt = W.augment_window(image, mask, np.random.default_rng(seed), 1.0, fill=-1.0)
        assert img.shape == (5, 48, 48) and tgt.shape == (1, 48, 48)
        assert set(np.unique(tgt.numpy())) <= {0.0, 1.0}
        # identical slices stay identical up to the intensity noise (sigma <= 0.1)
        spread = (img - img.mean(0, keepdim=True)).std().item()
        assert spread < 0.15
        # the mask follows the image: threshold the slice mean halfway between the two levels
        mean = img.mean(0)
        lo, hi = torch.quantile(mean, 0.05), torch.quantile(mean, 0.98)
        seg = mean > (lo + hi) / 2
        t = tgt[0] > 0.5
        iou = (seg & t).sum().item() / max((seg | t).sum().item(), 1)
        assert iou > 0.85, (seed, iou)
        changed += int((t != mask[0].bool()).sum().item() > 20)
    assert changed >= 4  # the spatial transform really moved the mask


# -- the dataset over a real Zarr store ------------------------------------------------------


@pytest.fixture
def plane_store(tmp_path):
    """One vertebra whose image is its own index volume; fracture marks voxel (z=2, y=3, x=4)
    and the whole slice z=5, so each plane sees fracture in known slices."""
    img = index_volume((6, 7, 8))
    fr = np.zeros(img.shape, np.uint8)
    fr[2, 3, 4] = 1
    fr[5] = 1
    return (
        write_store(tmp_path / "s.zarr", {"c1": ("train", {22: (img, fr)})}, IDENTITY_FP),
        img,
        fr,
    )


@pytest.mark.integration
@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("all_slices", [False, True])
def test_dataset_windows_and_targets(plane_store, plane, all_slices):
    path, img, fr = plane_store
    axis = PLANE_AXIS[plane]
    ds = WindowDataset(
        path,
        "train",
        DataConfig(seq_len=3, plane=plane, patch_size=16, target_all_slices=all_slices),
    )
    n = img.shape[axis]
    assert len(ds) == n
    in_plane = [s for a, s in enumerate(img.shape) if a != axis]
    r0, c0 = (in_plane[0] - 16) // 2, (in_plane[1] - 16) // 2  # centred: negative = padding
    rows, cols = slice(-r0, -r0 + in_plane[0]), slice(-c0, -c0 + in_plane[1])
    for t in range(n):
        item = ds[t]
        assert (item["case"], item["vertebra"], item["slice"]) == ("c1", 22, t)
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        idx = W.window_indices(t, 3, n)
        expected = np.moveaxis(np.take(img, idx, axis=axis), axis, 0)
        got = item["image"].numpy()
        assert np.array_equal(got[:, rows, cols], expected)
        outside = np.ones((16, 16), bool)
        outside[rows, cols] = False
        assert np.all(got[:, outside] == W.HU_AIR)  # padding reads as air
        tgt = item["target"].numpy()
        mask = np.moveaxis(np.take(fr, idx if all_slices else [t], axis=axis), axis, 0)
        assert tgt.shape == ((3,) if all_slices else (1,)) + (16, 16)
        assert np.array_equal(tgt[:, rows, cols], mask) and tgt[:, outside].sum() == 0
        assert ds.has_fracture(t) == bool(mask.any())


@pytest.mark.integration
def test_dataset_normalises_with_store_fingerprint(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(-1000, 2000, size=(5, 9, 10)).astype(np.int16)
    fp = {"p0_5": -200.0, "p50": 100.0, "p99_5": 900.0, "mean": 150.0, "std": 300.0}
    path = write_store(
        tmp_path / "s.zarr", {"c": ("val", {20: (img, np.zeros(img.shape, np.uint8))})}, fp
    )
    ds = WindowDataset(path, "val", DataConfig(seq_len=1, plane="axial", patch_size=10))
    got = ds[2]["image"].numpy()
    # 9 rows centred in 10: one row of padding on top, which reads as the clipped floor
    assert np.allclose(got[0, 1:10, :], (np.clip(img[2], -200, 900) - 150) / 300, atol=1e-6)
    assert np.allclose(got[0, 0, :], (-200 - 150) / 300)


@pytest.mark.integration
def test_dataset_errors(tmp_path):
    img = np.zeros((4, 4, 4), np.int16)
    cases = {"c": ("train", {20: (img, np.zeros(img.shape, np.uint8))})}
    path = write_store(tmp_path / "s.zarr", cases, IDENTITY_FP)
    with pytest.raises(UserError, match="no complete cases in split 'test'"):
        len(WindowDataset(path, "test", DataConfig()))
    bare = write_store(tmp_path / "bare.zarr", cases, None)
    with pytest.raises(UserError, match="fingerprint"):
        len(WindowDataset(bare, None, DataConfig()))
    with pytest.raises(UserError, match="data.oversample_fracture"):
        with_overrides(Config(), {"data.oversample_fracture": -1})
    with pytest.raises(UserError, match="data.augment"):
        with_overrides(Config(), {"data.augment": 1.5})


def _phantom_cases(n_cases=2, verts=(20, 21), shape=(12, 20, 18), seed=0):
    """Small crops: a bright block (bone) in soft tissue, fracture in a few sagittal slices."""
    rng = np.random.default_rng(seed)
    cases = {}
    for c in range(n_cases):
        split = "train" if c < n_cases - 1 else "val"
        out = {}
        for v in verts:
            img = rng.normal(40, 30, size=shape).astype(np.int16)
            img[3:9, 5:15, 4:14] += 600
            fr = np.zeros(shape, np.uint8)
            x0 = int(rng.integers(4, 12))
            fr[6:8, 6:12, x0 : x0 + 2] = 1
            out[v] = (img, fr)
        cases[f"case{c}"] = (split, out)
    return cases


@pytest.fixture
def phantom_store(tmp_path):
    fp = {"p0_5": -50.0, "p50": 60.0, "p99_5": 750.0, "mean": 120.0, "std": 200.0}
    return write_store(tmp_path / "p.zarr", _phantom_cases(3), fp)


@pytest.mark.integration
def test_augmentation_deterministic_under_seed(phantom_store):
    data = DataConfig(seq_len=5, plane="sagittal", patch_size=32, augment=1.0)
    a = WindowDataset(phantom_store, "train", data, augment=True, seed=3)
    b = WindowDataset(phantom_store, "train", data, augment=True, seed=3)
    assert len(a) == 2 * 2 * 18
    for i in (0, 7, 40):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["target"], b[i]["target"])
    other_seed = WindowDataset(phantom_store, "train", data, augment=True, seed=4)
    assert not torch.equal(a[7]["image"], other_seed[7]["image"])
    first = a[7]["image"]
    a.set_epoch(1)
    assert not torch.equal(first, a[7]["image"])
    plain = WindowDataset(phantom_store, "train", data, augment=False)
    assert not torch.equal(first, plain[7]["image"])
    assert torch.equal(plain[7]["image"], plain[7]["image"])
    zero = WindowDataset(phantom_store, "train", replace(data, augment=0.0), augment=True)
    assert torch.equal(zero[7]["image"], plain[7]["image"])  # strength 0 is off


@pytest.mark.integration
def test_partial_reads_match_cached_reads(phantom_store):
    data = DataConfig(
        seq_len=3, plane="coronal", patch_size=16, augment=0.7, target_all_slices=True
    )
    cached = WindowDataset(phantom_store, None, data, augment=True)
    uncached = WindowDataset(phantom_store, None, data, augment=True, cache_bytes=0)
    for i in range(0, len(cached), 7):
        x, y = cached[i], uncached[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
    assert cached._cache and not uncached._cache
    tiny = WindowDataset(phantom_store, None, data, cache_bytes=12 * 20 * 18 * 3 * 2)
    for i in range(len(tiny)):
        tiny[i]
    assert len(tiny._cache) == 2 and tiny._cache_used <= tiny.cache_bytes  # LRU bound


@pytest.mark.integration
def test_pickle_drops_handles_and_cache(phantom_store):
    ds = WindowDataset(phantom_store, "train", DataConfig(patch_size=32), augment=True)
    item = ds[5]
    assert ds._cache and ds.store._root is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._cache and clone.store._root is None and clone._pid is None
    assert len(clone) == len(ds)
    assert torch.equal(clone[5]["image"], item["image"])


@pytest.mark.integration
def test_oversampling_raises_fracture_share(phantom_store):
    ds = WindowDataset(phantom_store, "train", DataConfig(plane="sagittal"))
    flags = ds.fracture_flags()
    base = flags.mean()
    assert 0 < base < 0.3  # 2 of 18 sagittal slices per vertebra
    weights = ds.sample_weights(4.0)
    assert np.all(weights[flags] == 5.0) and np.all(weights[~flags] == 1.0)
    plain = np.array(list(ds.sampler(0.0, num_samples=3000)))
    over = np.array(list(ds.sampler(4.0, num_samples=3000)))
    expected = 5 * base / (5 * base + 1 - base)
    assert flags[plain].mean() < base + 0.05
    assert abs(flags[over].mean() - expected) < 0.05 and flags[over].mean() > base + 0.2
    assert np.array_equal(
        np.array(list(ds.sampler(4.0, num_samples=50))),
        np.array(list(ds.sampler(4.0, num_samples=50))),
    )
    ranks = [list(ds.sampler(4.0, rank=r, num_replicas=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(ds) // 2) and ranks[0] != ranks[1]
    # the windows flagged really have fracture in their target
    for i in np.flatnonzero(flags)[:4]:
        assert ds[int(i)]["target"].sum() > 0


@pytest.mark.integration
def test_fracture_flags_from_ingest_attr(tmp_path):
    img = np.zeros((4, 5, 6), np.int16)
    fr = np.zeros(img.shape, np.uint8)
    fr[:, :, 1] = 1
    counts = W.fracture_slice_counts(fr)
    assert counts["sagittal"] == [0, 20, 0, 0, 0, 0] and counts["axial"] == [5, 5, 5, 5]
    # a stored attr that disagrees with the mask proves the attr is what is read
    fake = {"sagittal": [0, 0, 0, 0, 0, 7]}
    path = write_store(
        tmp_path / "s.zarr",
        {"c": ("train", {20: (img, fr)})},
        IDENTITY_FP,
        vertebra_attrs={("c", 20): {"fracture_slices": fake}},
    )
    ds = WindowDataset(path, "train", DataConfig(seq_len=3, plane="sagittal"))
    assert ds.fracture_flags().tolist() == [False] * 5 + [True]
    ds_axial = WindowDataset(path, "train", DataConfig(seq_len=3, plane="axial"))
    assert ds_axial.fracture_flags().tolist() == [True] * 4  # no attr: read from the mask
    bad = {"sagittal": [1, 2]}  # wrong length: ignored, the mask is read
    write_store(
        tmp_path / "b.zarr",
        {"c": ("train", {20: (img, fr)})},
        IDENTITY_FP,
        vertebra_attrs={("c", 20): {"fracture_slices": bad}},
    )
    ds_bad = WindowDataset(tmp_path / "b.zarr", "train", DataConfig(seq_len=3))
    assert ds_bad.fracture_flags().tolist() == [False, True] + [False] * 4


@pytest.mark.integration
def test_vertebra_without_fracture_skips_mask_decoding(tmp_path):
    img = index_volume((4, 5, 6))
    fr = np.zeros(img.shape, np.uint8)
    path = write_store(
        tmp_path / "s.zarr",
        {"c": ("train", {20: (img, fr)})},
        IDENTITY_FP,
        vertebra_attrs={("c", 20): {"fracture_slices": W.fracture_slice_counts(fr)}},
    )
    del Store(path, "a").root["cases/c/20/fracture"]  # proves the mask is never read
    ds = WindowDataset(path, "train", DataConfig(seq_len=3, patch_size=8))
    assert all(ds[i]["target"].sum() == 0 for i in range(len(ds)))
    assert not ds.fracture_flags().any()


def _collect(loader):
    out = {}
    for batch in loader:
        for j, idx in enumerate(batch["index"].tolist()):
            out[idx] = (batch["image"][j], batch["target"][j])
    return out


class _Indexed(torch.utils.data.Dataset):
    """Adds the window index to each item (so the loader's output can be matched)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "index": i}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_dataloader_workers_after_parent_read(phantom_store, context):
    data = DataConfig(seq_len=5, plane="sagittal", patch_size=32, augment=1.0)
    ds = WindowDataset(phantom_store, "train", data, augment=True, seed=1)
    reference = {i: (ds[i]["image"], ds[i]["target"]) for i in range(len(ds))}  # parent reads
    loader = torch.utils.data.DataLoader(
        _Indexed(ds), batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=context
    )
    got = _collect(loader)
    assert sorted(got) == list(range(len(ds)))
    for i, (img, tgt) in got.items():
        assert torch.equal(img, reference[i][0]) and torch.equal(tgt, reference[i][1])
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    assert list(sampler) == list(range(1, len(ds), 2))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_phantom_through_ingest_into_windows(tmp_path):
    """The real path: synthetic phantom → ingest → WindowDataset → DataLoader batch."""
    from vfsearch.pipelines import ingest, synth

    synth.synth_dataset(
        tmp_path / "src", cases=1, seed=0, spacing=None, small=True, fracture_rate=0.5
    )
    ingest.ingest(
        tmp_path / "src",
        tmp_path / "s.zarr",
        spacing=(2.0, 2.0, 2.0),
        margin_mm=8.0,
        label_scheme="verse",
        split=(1.0, 0.0, 0.0),
        seed=0,
        workers=1,
    )
    store = Store(tmp_path / "s.zarr")
    ds = WindowDataset(store.path, "train", DataConfig(seq_len=5, plane="sagittal", patch_size=64))
    masks = {(c, v): store.read(c, v, "fracture") for c, v in store.items("train")}
    assert ds.items == list(masks)
    assert len(ds) == sum(m.shape[2] for m in masks.values())
    # the flags read from ingest's attrs agree with the stored masks
    from_masks = np.concatenate([W.slice_counts(m, 2) > 0 for m in masks.values()])
    flags = ds.fracture_flags()
    assert np.array_equal(flags, from_masks) and 0 < flags.mean() < 1
    i = int(np.flatnonzero(flags)[len(np.flatnonzero(flags)) // 2])
    item = ds[i]
    key = (item["case"], item["vertebra"])
    image = store.read(*key, "image")
    t = item["slice"]
    start = W.patch_start(image.shape[:2], 64)  # sagittal in-plane (z, y)
    expect_img = W.normalise(
        W.fit_to_patch(W.cut_window(image, t, 5, 2), 64, start, W.HU_AIR), store.fingerprint
    )
    expect_tgt = W.fit_to_patch(masks[key][None, :, :, t], 64, start, 0)
    assert np.allclose(item["image"].numpy(), expect_img)
    assert np.array_equal(item["target"].numpy(), expect_tgt) and expect_tgt.sum() > 0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, sampler=ds.sampler(3.0))))
    assert batch["image"].shape == (4, 5, 64, 64) and batch["target"].shape == (4, 1, 64, 64)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_epoch_order_feeds_persistent_workers_fresh_augmentation(phantom_store):
    """The product's sampler over a real store: repeats of a window are augmented afresh,
    the next epoch differs without set_epoch reaching the (persistent) workers, and a plain
    index still reads the same window."""
    data = DataConfig(
        seq_len=5, plane="sagittal", patch_size=32, augment=1.0, oversample_fracture=4.0
    )
    ds = WindowDataset(phantom_store, "train", data, augment=True, seed=1)
    n = len(ds)
    order = ds.epoch_order(3 * n, epoch=1, open_vertebrae=2)
    assert len(order) == 3 * n and min(order) >= n  # virtual indices
    real = [v % n for v in order]
    window = max(set(real), key=real.count)  # a window drawn more than once
    repeats = [v for v in order if v % n == window]
    assert len(repeats) > 1
    images = [ds[v]["image"] for v in repeats]
    assert not torch.equal(images[0], images[1])
    assert ds[repeats[0]]["slice"] == ds[window]["slice"]  # same window, other augmentation
    sampler = EpochSampler(ds, 16, open_vertebrae=2)
    loader = torch.utils.data.DataLoader(
        _Indexed(ds), batch_size=8, num_workers=1, persistent_workers=True, sampler=sampler
    )
    sampler.set_epoch(1)
    first = _collect(loader)
    assert len(first) == len(sampler) == 16
    sampler.set_epoch(2)  # the persistent worker is reused; nothing reaches its dataset copy
    second = _collect(loader)
    assert set(first).isdisjoint(second)  # the epoch is part of every index
    for v, (img, _) in list(first.items())[:3]:
        assert torch.equal(img, ds[v]["image"])
