"""Batched augmentation on the training device (vfsearch.core.augment) against the per-window
CPU path (vfsearch.core.windows.augment_window), the dataset's deferral of it
(``data.augment_device``) and the training loop that applies it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from vfsearch.adapters.dataset import AUG_KEYS, WindowDataset, finish_batch
from vfsearch.adapters.store import Store, hu_histogram
from vfsearch.core import augment as A
from vfsearch.core import windows as W
from vfsearch.core.config import DataConfig, load_config
from vfsearch.core.errors import UserError

P, T = 48, 5
FILL = -1.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensors: one torch thread (several are far slower on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _shape(p: int = P) -> np.ndarray:
    """An elongated ellipse off the centre (tilted 30°): area, orientation and position
    each show in the mask, and a flip would move it to the other side."""
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float64)
    cy, cx, a = p * 0.42, p * 0.62, math.radians(30.0)
    u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
    v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
    return (u / (p * 0.22)) ** 2 + (v / (p * 0.09)) ** 2 < 1.0


def _window() -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised window of T identical slices (a ramp, air at FILL, a bright ellipse)
    and its mask (1, P, P)."""
    mask = _shape()
    ramp = np.linspace(0.0, 0.6, P)[None, :]
    img = np.where(mask, 2.0, 0.2 + ramp).astype(np.float32)
    img[:, :4] = FILL  # some air
    image = torch.from_numpy(img).repeat(T, 1, 1)
    return image, torch.from_numpy(mask.astype(np.float32))[None]


def _measure(image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Statistics of one augmented window: mask area, orientation (degrees) and centroid;
    image mean and std; noise sigma (identical input slices differ by their noise only)."""
    m = target[0].numpy().astype(np.float64)
    yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
    area = m.sum()
    cy, cx = (m * yy).sum() / area, (m * xx).sum() / area
    mu20 = (m * (xx - cx) ** 2).sum()
    mu02 = (m * (yy - cy) ** 2).sum()
    mu11 = (m * (xx - cx) * (yy - cy)).sum()
    img = image.numpy().astype(np.float64)
    return {
        "area": area,
        "angle": math.degrees(0.5 * math.atan2(2 * mu11, mu20 - mu02)),
        "cx": cx,
        "cy": cy,
        "mean": img.mean(),
        "std": img.std(),
        "noise": (img[0] - img[1]).std() / math.sqrt(2.0),
    }


def _cpu_samples(n: int, strength: float = 1.0) -> dict[str, np.ndarray]:
    image, mask = _window()
    rows = [
        _measure(*W.augment_window(image, mask, np.random.default_rng([7, i]), strength, FILL))
        for i in range(n)
    ]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _device_samples(n: int, batch: int = 50, strength: float = 1.0) -> dict[str, np.ndarray]:
    image, mask = _window()
    seeds = np.random.default_rng(11).integers(2**63 - 1, size=n)
    rows = []
    for b in range(0, n, batch):
        k = min(batch, n - b)
        img, tgt = A.augment_batch(
            image.expand(k, -1, -1, -1).contiguous(),
            mask.expand(k, -1, -1, -1).contiguous(),
            torch.from_numpy(seeds[b : b + k]),
            strength,
            FILL,
        )
        rows += [_measure(img[i], tgt[i]) for i in range(k)]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


N = 600
STATS = ("area", "angle", "cx", "cy", "mean", "std", "noise")


@pytest.fixture(scope="module")
def cpu_stats() -> dict[str, np.ndarray]:
    return _cpu_samples(N)


def _mismatches(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """The statistics whose two samples differ: a two-sample KS test (p < 0.01) or means /
    standard deviations apart by more than 15% of the CPU path's spread."""
    bad = []
    for k in STATS:
        x, y = a[k], b[k]
        p = stats.ks_2samp(x, y).pvalue
        sd = x.std()
        if p < 0.01 or abs(x.mean() - y.mean()) > 0.15 * sd or abs(x.std() - y.std()) > 0.15 * sd:
            bad.append(
                f"{k}: p={p:.3g} mean {x.mean():.4g}/{y.mean():.4g} sd {sd:.4g}/{y.std():.4g}"
            )
    return bad


# -- distributions --------------------------------------------------------------------------


def test_device_parameter_distributions_match_the_cpu_path(cpu_stats):
    dev = _device_samples(N)
    assert _mismatches(cpu_stats, dev) == []
    image, mask = _window()
    base = _measure(image, mask)
    # no flips on either path: the ellipse stays right of the centre, tilted the same way
    for s in (cpu_stats, dev):
        assert (s["cx"] > P / 2).all() and (np.abs(s["angle"] - base["angle"]) < 20).all()
        assert s["area"].min() / base["area"] > 0.7 and s["area"].max() / base["area"] < 1.45


@pytest.mark.parametrize(
    "broken",
    [
        {"ROTATE_DEG": 25.0},  # rotation range too wide
        {"SCALE": 0.0},  # no scaling
        {"NOISE": 0.05},  # half the noise
        {"CONTRAST": 0.0, "BRIGHTNESS": 0.0},  # no contrast / brightness
    ],
)
def test_the_distribution_check_catches_a_wrong_range(cpu_stats, monkeypatch, broken):
    """The comparison above has the power to see a range that differs from the CPU path."""
    for name, value in broken.items():
        monkeypatch.setattr(A, name, value)
    assert _mismatches(cpu_stats, _device_samples(N)) != []


def test_every_window_of_a_batch_draws_its_own_parameters():
    """Within a batch of identical windows the spread is the full spread: no shared draws."""
    dev = _device_samples(N, batch=N // 4)
    for k in ("area", "angle", "mean", "noise"):
        per_batch = dev[k].reshape(4, -1).std(axis=1)
        assert (per_batch > 0.8 * dev[k].std()).all(), k
        # neighbours in a batch are uncorrelated
        x = dev[k].reshape(4, -1)
        r = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
        assert abs(r) < 0.15, (k, r)


def test_same_maths_as_the_cpu_path_for_the_same_parameters():
    """Given the same draws, the batched transforms equal `augment_window`'s (noise off)."""

    class Draws:  # a numpy Generator stand-in that returns chosen uniforms
        def __init__(self, values):
            self.values = list(values)

        def uniform(self, lo, hi):
            u = self.values.pop(0)  # in [0, 1)
            return lo + (hi - lo) * u

        def integers(self, high):
            return 1

    image, mask = _window()
    for u in ([0.9, 0.2, 0.8, 0.1, 0.95, 0.0], [0.1, 0.7, 0.3, 0.6, 0.2, 0.0]):
        ref_img, ref_tgt = W.augment_window(image, mask, Draws(u), 1.0, FILL)  # type: ignore[arg-type]
        v = [2 * x - 1 for x in u[:5]]
        s = 1.0
        params = {
            "angle": torch.tensor([math.radians(W.ROTATE_DEG * s) * v[0]]),
            "scale": torch.tensor([1.0 + W.SCALE * s * v[1]]),
            "contrast": torch.tensor([1.0 + W.CONTRAST * s * v[2]]),
            "brightness": torch.tensor([W.BRIGHTNESS * s * v[3]]),
            "gamma": torch.tensor([math.exp(math.log1p(W.GAMMA * s) * v[4])]),
            "sigma": torch.tensor([0.0]),
        }
        theta = A.affine_theta(params["angle"], params["scale"])
        fill = torch.tensor([FILL])
        moved, tgt = A.spatial_batch(image[None], mask[None], theta, fill, add_fill=False)
        out = A.intensity_batch(moved, params, torch.Generator(), shift=fill)
        assert torch.equal(tgt[0], ref_tgt)
        assert torch.allclose(out[0], ref_img, atol=1e-4), (out[0] - ref_img).abs().max()
        # the same draws through `params_from_uniform` give the same parameters
        drawn = A.params_from_uniform(torch.tensor([u]), torch.tensor([s]))
        for k in params:
            assert torch.allclose(drawn[k], params[k], atol=1e-6), k


# -- alignment --------------------------------------------------------------------------------


def test_spatial_transform_keeps_every_slice_and_its_mask_aligned():
    """An image whose slices equal their masks (a different mask per slice, as with
    ``target_all_slices``) still equals its transformed target, slice by slice."""
    rng = np.random.default_rng(0)
    b = 8
    masks = torch.zeros(b, T, P, P)
    for i in range(b):
        for t in range(T):
            y, x = rng.integers(8, P - 16, size=2)
            masks[i, t, y : y + int(rng.integers(4, 14)), x : x + int(rng.integers(4, 14))] = 1.0
    seeds = torch.arange(b) * 1000 + 3
    img, tgt = A.augment_batch(masks.clone(), masks.clone(), seeds, 1.0, 0.0, intensity=False)
    assert torch.equal((img >= 0.5).float(), tgt)
    assert set(tgt.unique().tolist()) <= {0.0, 1.0}
    changed = [not torch.equal(tgt[i], masks[i]) for i in range(b)]
    assert sum(changed) >= b - 1  # it did transform


def test_full_augmentation_keeps_image_and_mask_together():
    """With intensity on, the bright ellipse of the image and the target still coincide."""
    image, mask = _window()
    k = 32
    seeds = torch.from_numpy(np.random.default_rng(5).integers(2**63 - 1, size=k))
    img, tgt = A.augment_batch(
        image.expand(k, -1, -1, -1).contiguous(),
        mask.expand(k, -1, -1, -1).contiguous(),
        seeds,
        1.0,
        FILL,
    )
    for i in range(k):
        mean = img[i].mean(0)
        seg = mean > (mean.median() + mean.max()) / 2  # the background is most of it
        t = tgt[i, 0] > 0.5
        iou = (seg & t).sum().item() / max((seg | t).sum().item(), 1)
        assert iou > 0.9, (i, iou)


# -- identity and seeds -------------------------------------------------------------------------


def test_strength_zero_is_the_identity():
    image, mask = _window()
    x, y = image.repeat(4, 1, 1, 1), mask.repeat(4, 1, 1, 1)
    out_x, out_y = A.augment_batch(x, y, [1, 2, 3, 4], 0.0, FILL)
    assert torch.equal(out_x, x) and torch.equal(out_y, y)
    # one value per window: the windows of strength 0 stay as they were
    out_x, out_y = A.augment_batch(x, y, [1, 2, 3, 4], torch.tensor([0.0, 1.0, 0.0, 1.0]), FILL)
    for i, same in enumerate((True, False, True, False)):
        assert torch.equal(out_x[i], x[i]) == same and torch.equal(out_y[i], y[i]) == same


def test_same_seeds_same_result_other_seeds_other_result():
    image, mask = _window()
    x, y = image.repeat(4, 1, 1, 1), mask.repeat(4, 1, 1, 1)
    a = A.augment_batch(x, y, [10, 11, 12, 13], 1.0, FILL)
    b = A.augment_batch(x.clone(), y.clone(), [10, 11, 12, 13], 1.0, FILL)
    c = A.augment_batch(x, y, [10, 11, 12, 99], 1.0, FILL)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0][3], c[0][3])
    assert A.batch_seed([1, 2]) != A.batch_seed([2, 1]) != A.batch_seed([1, 3])
    with pytest.raises(ValueError):
        A.batch_seed([-1])


def test_augment_device_setting():
    assert A.augment_on_device("device", cuda=False) and A.augment_on_device("auto", cuda=True)
    assert not A.augment_on_device("cpu", cuda=True)
    assert A.augment_on_device("auto", cuda=False) == (A.AUTO_ON_CPU == "device")
    with pytest.raises(UserError, match="augment_device"):
        A.augment_on_device("gpu", cuda=False)
    with pytest.raises(UserError, match="data.augment_device"):
        load_config(overrides=["data.augment_device=gpu"])
    assert load_config(overrides=["data.augment_device=device"]).data.augment_device == "device"


# -- the dataset and the training loop ------------------------------------------------------------

FP = {"p0_5": -50.0, "p50": 60.0, "p99_5": 750.0, "mean": 120.0, "std": 200.0}


def _store(path: Path) -> Path:
    """Two cases (train, val) of two small vertebra crops with a fracture block."""
    rng = np.random.default_rng(0)
    store = Store(path, "a")
    store.set_meta(format=1, fingerprint=FP)
    for c, split in enumerate(("train", "val")):
        case = f"case{c}"
        store.begin_case(case, {"split": split})
        hist = np.zeros(4096, np.int64)
        for vid in (20, 21):
            img = rng.normal(40, 30, size=(12, 24, 20)).astype(np.int16)
            img[3:9, 5:18, 4:16] += 600
            fr = np.zeros(img.shape, np.uint8)
            fr[4:8, 6:14, 6:12] = 1
            store.write_vertebra(case, vid, {"image": img, "fracture": fr, "mask": fr}, {})
            hist += hu_histogram(img)
        store.finish_case(case, hist, {})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("augment") / "s.zarr")


def test_dataset_defers_augmentation_with_a_seed_per_draw(store, monkeypatch):
    data = DataConfig(
        seq_len=5,
        plane="sagittal",
        patch_size=32,
        augment=1.0,
        oversample_fracture=4.0,
        augment_device="device",
    )
    ds = WindowDataset(store, "train", data, augment=True, seed=1)
    cpu = WindowDataset(store, "train", replace(data, augment_device="cpu"), augment=True, seed=1)
    assert ds.device_augment and not cpu.device_augment
    n = len(ds)
    order = ds.epoch_order(3 * n, epoch=1, open_vertebrae=2)
    real = [v % n for v in order]
    window = max(set(real), key=real.count)
    repeats = [v for v in order if v % n == window][:2]
    items = [ds[v] for v in repeats]
    assert set(AUG_KEYS) <= set(items[0]) and not set(AUG_KEYS) & set(cpu[repeats[0]])
    assert items[0]["aug_seed"] != items[1]["aug_seed"]  # a window drawn twice: two seeds
    assert ds[repeats[0]]["aug_seed"] == items[0]["aug_seed"]  # reproducible
    assert items[0]["aug_strength"] == 1.0 and items[0]["aug_fill"] == W.normalised_floor(FP)
    # the loader's window is not augmented beyond its patch position: the CPU path's is
    plain = ds[repeats[0]]["image"]
    assert plain.min() >= W.normalised_floor(FP) - 1e-6
    batch = torch.utils.data.default_collate([ds[v] for v in repeats + repeats])
    out = finish_batch(batch, torch.device("cpu"))
    assert not set(AUG_KEYS) & set(out) and out["case"] == batch["case"]
    assert out["image"].shape == batch["image"].shape and out["target"].shape == (4, 1, 32, 32)
    assert not torch.equal(out["image"][0], batch["image"][0])  # augmented
    assert not torch.equal(out["image"][0], out["image"][1])  # repeats augmented afresh
    again = finish_batch(
        torch.utils.data.default_collate([ds[v] for v in repeats * 2]), torch.device("cpu")
    )
    assert torch.equal(again["image"], out["image"])  # same draws, same batch
    # without augmentation nothing is deferred and finish_batch leaves the batch alone
    off = WindowDataset(store, "train", replace(data, augment=0.0), augment=True)
    b = torch.utils.data.default_collate([off[0], off[1]])
    assert "aug_seed" not in b and finish_batch(b, torch.device("cpu")) is b
    # auto: on the device where CUDA is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert WindowDataset(store, "train", replace(data, augment_device="auto")).device_augment


@pytest.mark.parametrize("where", ["device", "cpu"])
def test_train_epoch_with_each_augmentation_path(store, where):
    from vfsearch.pipelines.train.hooks import Hooks
    from vfsearch.pipelines.train.loop import setup, train_epoch

    config = load_config(
        overrides=[
            "model.depth=3",
            "model.base_channels=4",
            "model.norm=group",
            "data.patch_size=32",
            "data.seq_len=3",
            "train.batch_size=4",
            "train.max_windows_per_epoch=12",
            "train.num_workers=0",
            "data.augment=1.0",
            f"data.augment_device={where}",
        ]
    )
    parts, data = setup(store, config, rank=0, world=1, device=torch.device("cpu"))
    assert data.train.device_augment == (where == "device")
    seen: list[torch.Tensor] = []
    step = parts.step

    def spy(batch, gan_active):
        assert not set(AUG_KEYS) & set(batch)  # augmented before the step
        seen.append(batch["image"])
        return step(batch, gan_active)

    parts.step = spy  # type: ignore[method-assign]
    loader = list(data.train_loader(1))
    sums = train_epoch(parts, loader, epoch=1, rank=0, gan_active=False, hooks=Hooks())
    assert sums.batches == 3 and sums.windows == 12
    assert all(math.isfinite(v) for v in sums.terms.values()) and sums.terms
    if where == "device":
        assert all("aug_seed" in b for b in loader)
        # the step saw the loader's windows augmented (padding below air: rotation + noise)
        assert all(not torch.equal(s, b["image"]) for s, b in zip(seen, loader, strict=True))
