"""Training learns: a small segmenter trained through the product's own path (Ray Train V2 on
a real local Ray, a real phantom Zarr store, the real losses and models) must raise the fused
3D validation Dice far above the same model's untrained value.

The margin is set so that the failures that leave a model unable to learn fail it: a broken
loss, a decoder cut off from the encoder, targets shuffled against their windows all leave
the fused Dice near the untrained value (a few hundredths), not above 0.35.
"""

from __future__ import annotations

import pytest
import torch

from vfsearch.core.config import load_config
from vfsearch.pipelines.evaluate import fused_validation_metrics
from vfsearch.pipelines.train import run_training
from vfsearch.pipelines.train.loop import build_models

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = [
    "model.depth=3",
    "model.base_channels=8",
    "data.patch_size=48",
    "data.seq_len=3",
    "model.temporal=lstm",
    "model.norm=group",
    "train.batch_size=8",
    "train.epochs=5",
    "train.max_windows_per_epoch=256",
    "train.warmup_epochs=1",
    "train.lr=3e-3",
    "data.augment=0",
    "data.oversample_fracture=2",
    "train.log_pictures=false",
]


@pytest.fixture(scope="module")
def learning_store(tmp_path_factory):
    """Eight small phantom cases at 2 mm: five train, two val, one test."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    root = tmp_path_factory.mktemp("learning")
    synth_dataset(root / "raw", cases=8, seed=3, spacing=None, small=True, fracture_rate=0.4)
    ingest(
        root / "raw" / "manifest.csv",
        root / "store.zarr",
        spacing=(2.0, 2.0, 2.0),
        margin_mm=6.0,
        split=(0.625, 0.25, 0.125),
        seed=0,
    )
    return root / "store.zarr"


def test_training_raises_fused_dice_well_above_untrained(learning_store, ray_local, tmp_path):
    cfg = load_config(None, SMALL)
    untrained, _ = build_models(cfg)  # the very initial weights of the run below
    before = fused_validation_metrics(untrained, learning_store, cfg)["val_dice3d"]

    summary = run_training(
        learning_store, cfg, name="learn", storage=tmp_path / "ray", cpus_per_worker=2
    )
    after = summary.metrics["val_dice3d"]
    print(f"fused validation Dice: untrained {before:.3f}, trained {after:.3f}")
    assert before < 0.1
    assert after > 0.35 and after - before > 0.3
    # the checkpoint on disk carries the deployment threshold chosen on validation
    best = torch.load(
        tmp_path / "ray" / "learn" / summary.checkpoint.split("/")[-1] / "best.pt",
        weights_only=True,
    )
    assert 0.0 < best["threshold"] < 1.0
    assert best["threshold"] == pytest.approx(summary.metrics["val_threshold3d"])
