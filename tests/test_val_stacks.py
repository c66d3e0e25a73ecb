"""Per-epoch validation vertebra by vertebra, each slice encoded once: the same counts as
window by window (`eval_step`), on tiny models (pure) and on a real Zarr store (`TrainData`)."""

from __future__ import annotations

import pytest
import torch

from vfsearch.adapters.dataset import WindowDataset
from vfsearch.core import fusion
from vfsearch.core.config import load_config
from vfsearch.core.models.registry import build_model
from vfsearch.core.sampling import VAL_PER_TRAIN
from vfsearch.core.steps import eval_step, eval_volume
from vfsearch.core.windows import window_indices
from vfsearch.pipelines.train.loop import TrainData, setup, validate

CPU = torch.device("cpu")
TINY = [
    "model.depth=3",
    "model.base_channels=4",
    "data.patch_size=32",
    "data.seq_len=5",
    "model.norm=group",
]


def _model(temporal: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = load_config(None, [*TINY, f"model.temporal={temporal}"])
    return build_model(cfg.model, seq_len=cfg.data.seq_len).eval()


def _windows(slices: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = slices.shape[0]
    return torch.stack([slices[window_indices(t, seq_len, n)] for t in range(n)])


def _stacks_count_like_windows(model, windows, data) -> tuple[float, torch.Tensor]:
    """Validation counts of vertebra stacks (``data``) against window by window through the
    whole model (``windows``), at a threshold where the untrained model claims half the
    pixels: equal up to float rounding. Returns the threshold and the stacks' counts."""
    with torch.inference_mode():
        probs = torch.cat(
            [torch.sigmoid(model(b["image"])["logits"]) for b in windows.val_loader()]
        )
    threshold = float(probs.quantile(0.5))
    by_window = validate(model, windows.val_loader(), threshold, device=CPU)
    by_stack = validate(model, data.val_loader(), threshold, seq_len=5, device=CPU)
    assert by_window[0] + by_window[2] > 0 and by_window[1] > 0  # the val case has fracture
    assert (by_stack - by_window).abs().max() <= 3
    return threshold, by_stack


def _two_ranks(store, cfg, model, threshold: float) -> torch.Tensor:
    """The sum of two ranks' validation counts, each over its own vertebra stacks."""
    return sum(
        validate(
            model,
            TrainData.open(store, cfg, rank=r, world=2, device=CPU, stacks=True).val_loader(),
            threshold,
            seq_len=5,
            device=CPU,
        )
        for r in (0, 1)
    )


@pytest.mark.parametrize("temporal", ["lstm", "convlstm", "none"])
def test_centre_logits_reuse_equals_every_window_through_the_model(temporal):
    model = _model(temporal)
    slices = torch.randn(7, 32, 32)
    with torch.inference_mode():
        reuse = fusion.centre_logits(model, slices, 5, reuse=True, batch_size=3)
        naive = fusion.centre_logits(model, slices, 5, reuse=False, batch_size=4)
        direct = model(_windows(slices, 5))["logits"][:, 0]
    assert reuse.shape == (7, 32, 32)
    torch.testing.assert_close(reuse, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(naive, direct, atol=1e-5, rtol=1e-4)
    if temporal != "none":
        # the neighbours matter: shuffling the slices changes the centre predictions
        with torch.inference_mode():
            moved = fusion.centre_logits(model, slices[torch.tensor([0, 1, 2, 4, 3, 5, 6])], 5)
        assert not torch.allclose(moved[[0, 1]], reuse[[0, 1]], atol=1e-4)


def test_eval_volume_counts_every_window_like_eval_step():
    model = _model("lstm", seed=3)
    slices = torch.randn(9, 32, 32)
    windows = _windows(slices, 5)
    with torch.inference_mode():
        probs = torch.sigmoid(model(windows)["logits"])[:, 0]
    threshold = float(probs.median())  # about half the pixels predicted positive
    # the target: the per-window prediction, with a block of it cleared and one block added
    target = (probs > threshold).float()
    target[2:4, :8] = 0.0
    target[5, 20:] = 1.0
    by_window = eval_step(model, {"image": windows, "target": target[:, None]}, threshold)
    by_volume = eval_volume(model, slices, target, 5, threshold, batch_size=4)
    assert by_window[0] > 1000 and by_window[1] > 10 and by_window[2] > 10
    # identical up to the odd pixel that float rounding moves across the threshold
    assert (by_volume - by_window).abs().max() <= 3
    # each window's centre slice is scored against its own slice's target
    shifted = eval_volume(model, slices, target.roll(1, 0), 5, threshold)
    assert shifted[1] > by_window[1] + 200


def test_train_data_validates_vertebra_stacks_like_windows_on_a_real_store(small_store):
    cfg = load_config(None, [*TINY, "model.temporal=lstm", "train.batch_size=4"])
    parts, data = setup(small_store, cfg, rank=0, world=1, device=CPU)
    assert data.val_seq_len == 5  # a segmenter scored on slice t validates by vertebra
    windows = TrainData.open(small_store, cfg, rank=0, world=1, device=CPU, stacks=False)
    assert windows.val_seq_len is None
    n_windows = len(windows.val)
    stacks = list(data.val_loader())
    assert sum(s["image"].shape[0] for s in stacks) == n_windows  # every window once
    assert all(s["image"].shape[1:] == (32, 32) for s in stacks)
    model = parts.inner
    threshold, by_stack = _stacks_count_like_windows(model, windows, data)
    # two ranks' vertebra shares add up to the whole split
    assert torch.equal(_two_ranks(small_store, cfg, model, threshold), by_stack)
    # a crop larger than the cache is read whole, to the same stack
    uncached = WindowDataset(small_store, "val", cfg.data, cache_bytes=0)
    for k in range(len(uncached.items)):
        whole, cached = uncached.vertebra(k), data.val.windows.vertebra(k)
        assert (whole["case"], whole["vertebra"]) == (cached["case"], cached["vertebra"])
        assert torch.equal(whole["image"], cached["image"])
        assert torch.equal(whole["target"], cached["target"])


def test_a_classifier_and_all_slice_targets_validate_by_window(small_store):
    for overrides in (
        ["model.family=resnet18_classifier"],
        ["data.target_all_slices=true", "model.predict_all_slices=true"],
    ):
        cfg = load_config(None, [*TINY, "model.temporal=lstm", *overrides])
        _, data = setup(small_store, cfg, rank=0, world=1, device=CPU)
        assert data.val_seq_len is None, overrides


# -- a strided subset per epoch (train.val_windows) ---------------------------------------


@pytest.mark.parametrize("temporal", ["lstm", "convlstm", "none"])
def test_centre_logits_at_chosen_centres_equal_those_rows_and_encode_only_their_windows(
    temporal,
):
    model = _model(temporal)
    slices = torch.randn(13, 32, 32)
    centres = torch.tensor([1, 5, 9, 12])
    encoded: list[int] = []
    encode = model.encode
    model.encode = lambda x: (encoded.append(x.shape[0]), encode(x))[1]  # type: ignore[method-assign]
    with torch.inference_mode():
        every = fusion.centre_logits(model, slices, 5, batch_size=3)
        n_every = sum(encoded)
        encoded.clear()
        some = fusion.centre_logits(model, slices, 5, batch_size=3, centres=centres)
        n_some = sum(encoded)
        naive = fusion.centre_logits(model, slices, 5, reuse=False, centres=centres)
    assert some.shape == (4, 32, 32)
    torch.testing.assert_close(some, every[centres], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(naive, every[centres], atol=1e-5, rtol=1e-4)
    assert n_every == 13
    encoded.clear()
    with torch.inference_mode():
        fusion.centre_logits(model, slices, 5, batch_size=3, centres=torch.tensor([2, 10]))
    if temporal == "none":  # the model reads the centre alone: only the centres are encoded
        assert model.centre_only and n_some == 4 and sum(encoded) == 2
    else:
        # windows around 1, 5, 9, 12 hold slices 0-3, 3-7, 7-11, 10-12: all 13 with T=5 ...
        assert not model.centre_only and n_some == 13
        assert sum(encoded) == 10  # ... but only slices 0-4 and 8-12 around 2 and 10


def test_a_capped_epoch_validates_a_strided_subset_with_the_same_counts_per_window(
    small_store,
):
    base = [*TINY, "model.temporal=lstm", "train.batch_size=4"]
    cfg_all = load_config(None, base)
    cfg = load_config(None, [*base, "train.max_windows_per_epoch=8"])  # auto: about 8
    parts, full = setup(small_store, cfg_all, rank=0, world=1, device=CPU)
    assert full.val_stride == 1 and full.val_windows == full.val_total  # an uncapped epoch
    data = TrainData.open(small_store, cfg, rank=0, world=1, device=CPU, stacks=True)
    stride = data.val_stride
    cap = VAL_PER_TRAIN * 8
    assert stride == -(-data.val_total // cap) > 1
    assert data.val_windows <= cap + len(data.val.windows.items)  # one per vertebra at most more
    explicit = load_config(None, [*base, "train.max_windows_per_epoch=8", "train.val_windows=0"])
    assert TrainData.open(small_store, explicit, rank=0, world=1, device=CPU).val_stride == 1
    model = parts.inner
    # the reference: each chosen window through the whole model, window by window
    windows = TrainData.open(small_store, cfg, rank=0, world=1, device=CPU, stacks=False)
    assert len(windows.val) == data.val_windows  # the window path scores the same windows
    centres = [windows.val.dataset.locate(i)[1] for i in windows.val.indices]
    assert all(t % stride == stride // 2 for t in centres)  # every vertebra strided alike
    assert len({windows.val.dataset.locate(i)[0] for i in windows.val.indices}) == len(
        data.val.windows.items
    )  # ... and every vertebra represented
    threshold, by_stack = _stacks_count_like_windows(model, windows, data)
    every = validate(model, full.val_loader(), threshold, seq_len=5, device=CPU)
    assert every.sum() > 2 * by_stack.sum()  # a subset, not the whole split
    assert torch.equal(_two_ranks(small_store, cfg, model, threshold), by_stack)
