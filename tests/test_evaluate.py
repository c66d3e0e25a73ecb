"""Fused 3D evaluation of a stored split (`vfsearch.pipelines.evaluate`) on a real Zarr store."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from vfsearch.adapters import volumes as io
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.errors import UserError
from vfsearch.core.inference import LoadedModel
from vfsearch.core.metrics3d import counts, overlap
from vfsearch.pipelines.evaluate import (
    CSV_COLUMNS,
    case_truth,
    evaluate,
    format_report,
    fused_validation_metrics,
)
from vfsearch.pipelines.predict import predict

pytestmark = pytest.mark.integration
torch.set_num_threads(1)  # 2-core machine shared with other test runs

MARK_HU = 3000
FINGERPRINT = {"p0_5": -1024.0, "p99_5": 3071.0, "mean": 0.0, "std": 1000.0}


class MarkedVoxels(torch.nn.Module):
    """Test double segmenter: logits from the centre slice, ``(x - offset) * gain``.

    With gain 50 and offset 2.5 it returns the marked fracture voxels (normalised 3.0)
    exactly; a small gain gives soft, imperfect probabilities.
    """

    output_kind = "segmentation"

    def __init__(self, gain: float = 50.0, offset: float = 2.5) -> None:
        super().__init__()
        self.gain, self.offset = gain, offset
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, slices):
        return slices, [slices]

    def forward_features(self, bottlenecks, skips):
        return {"logits": (skips[0] - self.offset) * self.gain, "attention": []}

    def forward(self, window):
        t = window.shape[1] // 2
        return {"logits": (window[:, t : t + 1] - self.offset) * self.gain, "attention": []}


class MarkedSlices(torch.nn.Module):
    """Test double classifier: the centre slice holds a marked voxel -> high logit."""

    output_kind = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, window):
        t = window.shape[1] // 2
        peak = window[:, t].amax(dim=(1, 2))
        return {"logits": ((peak - 2.5) * 50.0)[:, None], "attention": []}


def _csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _loaded(module, plane="sagittal") -> LoadedModel:
    config = Config(
        model=ModelConfig(depth=3), data=DataConfig(seq_len=3, plane=plane, patch_size=32)
    )
    return LoadedModel(
        module.eval(), config, FINGERPRINT, (2.0, 2.0, 2.0), 4.0, source=type(module).__name__
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Three small phantom cases (train / val / test) whose CT marks the fracture voxels."""
    from vfsearch.core.phantom import make_case
    from vfsearch.pipelines.ingest import ingest

    root = tmp_path_factory.mktemp("evalstore")
    lines = ["case_id,ct,vertebrae,fracture,split"]
    for i, split in enumerate(("train", "val", "test")):
        case = make_case(10 + i, small=True, fracture_rate=0.3)
        z = np.flatnonzero(case.fracture.any(axis=(1, 2)))
        zs = slice(max(int(z.mean()) - 36, 0), int(z.mean()) + 36)
        ct = np.where(case.fracture > 0, MARK_HU, np.minimum(case.ct, 2000)).astype(np.int16)
        arrays = {"ct": ct[zs], "vertebrae": case.vertebrae[zs], "fracture": case.fracture[zs]}
        geom = case.geometry.shifted((zs.start, 0, 0))
        for name, arr in arrays.items():
            io.write_volume(root / f"c{i}" / f"{name}.nii.gz", arr, geom)
        lines.append(f"c{i},c{i}/ct.nii.gz,c{i}/vertebrae.nii.gz,c{i}/fracture.nii.gz,{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    path = root / "store.zarr"
    ingest(root / "manifest.csv", path, spacing=(2.0, 2.0, 2.0), margin_mm=4.0)
    return {"path": path, "root": root}


def test_perfect_segmenter_scores_one_everywhere(store, tmp_path):
    report = evaluate(_loaded(MarkedVoxels()), store["path"], split="test", out=tmp_path, n_boot=50)
    f = report["flat"]
    assert report["threshold_source"].startswith("val")
    assert report["gt_source"] == ["files"]
    for key in (
        "test_dice3d",
        "test_iou3d",
        "test_precision3d",
        "test_recall3d",
        "test_dice3d_mean",
        "test_dice2d",
        "test_iou2d",
        "test_vertebra_pr_auc",
        "test_vertebra_roc_auc",
        "test_vertebra_sensitivity",
        "test_vertebra_specificity",
        "val_dice3d_tuned",
    ):
        assert f[key] == pytest.approx(1.0), key
    assert 0 < f["test_vertebra_prevalence"] < 1
    rows = _csv(tmp_path / "per_vertebra.csv")
    assert list(rows[0])[:12] == list(CSV_COLUMNS)[:12]
    assert {r["case_id"] for r in rows} == {"c2"}
    positives = [r for r in rows if r["gt_positive"] == "True"]
    assert positives and all(float(r["dice"]) == 1.0 for r in positives)
    negatives = [r for r in rows if r["gt_positive"] == "False"]
    # empty / empty: Dice 1 under the policy
    assert negatives and all(r["tp"] == r["fp"] == r["fn"] == "0" for r in negatives)
    assert all(float(r["dice"]) == 1.0 for r in negatives)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["flat"]["test_dice3d"] == 1.0
    text = format_report(report)
    assert "PR-AUC" in text and "prevalence" in text


def test_evaluate_counts_equal_predict_on_the_source_files(store, tmp_path):
    """The store path and the new-scan path give the same voxels at the original grid."""
    soft = _loaded(MarkedVoxels(gain=3.0, offset=0.3))
    report = evaluate(
        soft, store["path"], split="test", out=tmp_path / "eval", threshold=0.4, n_boot=0, hd95=True
    )
    case = report["per_case"][0]
    root = store["root"]
    predict(
        soft,
        root / "c2" / "ct.nii.gz",
        root / "c2" / "vertebrae.nii.gz",
        tmp_path / "pred",
        threshold=0.4,
    )
    mask = io.read_volume(tmp_path / "pred" / "fracture_mask.nii.gz").array
    truth = io.read_volume(root / "c2" / "fracture.nii.gz").array
    tp, fp, fn = counts(mask, truth)
    assert (case["tp"], case["fp"], case["fn"]) == (tp, fp, fn)
    assert fp > 0  # imperfect model: the check is not vacuous
    assert report["flat"]["test_dice3d"] == pytest.approx(overlap(tp, fp, fn)["dice"])
    rows = _csv(tmp_path / "eval" / "per_vertebra.csv")
    # vertebra cells partition the region: their counts add up to the case's
    assert sum(int(r["tp"]) for r in rows) == tp
    assert sum(int(r["fp"]) for r in rows) + 0 <= fp
    assert any(r["hd95_mm"] for r in rows if r["gt_positive"] == "True")


def test_truth_rebuilt_from_crops_when_sources_are_gone(store, tmp_path):
    from vfsearch.adapters.store import Store

    st = Store(store["path"])
    from_files = case_truth(st, "c1")
    moved = store["root"] / "c1" / "fracture.moved.nii.gz"
    (store["root"] / "c1" / "fracture.nii.gz").rename(moved)
    try:
        rebuilt = case_truth(st, "c1")
    finally:
        moved.rename(store["root"] / "c1" / "fracture.nii.gz")
    assert from_files.source == "files" and "crops" in rebuilt.source
    # store spacing equals the CT's: the inverse mapping (nearest) is exact
    assert np.array_equal(rebuilt.fracture, from_files.fracture)


def test_vote_and_max_combinations_run(store, tmp_path):
    for combine in ("vote", "max"):
        report = evaluate(
            _loaded(MarkedVoxels()),
            store["path"],
            split="test",
            out=tmp_path / combine,
            combine=combine,
            n_boot=0,
        )
        assert report["flat"]["test_dice3d"] == pytest.approx(1.0), combine


def test_classifier_baseline_gets_slice_and_vertebra_detection(store, tmp_path):
    report = evaluate(_loaded(MarkedSlices()), store["path"], split="test", out=tmp_path)
    f = report["flat"]
    assert report["kind"] == "classification"
    for key in (
        "test_slice_pr_auc",
        "test_slice_roc_auc",
        "test_slice_sensitivity",
        "test_slice_specificity",
        "test_vertebra_sensitivity",
    ):
        assert f[key] == pytest.approx(1.0), key
    # a crop's margin reaches into its neighbours, so a perfect slice classifier also flags
    # the neighbour of a fractured vertebra: vertebra-level PR-AUC sits below 1
    assert f["test_vertebra_prevalence"] < f["test_vertebra_pr_auc"] <= 1.0
    assert 0 < f["test_slice_prevalence"] < f["test_vertebra_prevalence"] < 1
    rows = _csv(tmp_path / "per_vertebra.csv")
    assert rows and all(r["tp"] == "" for r in rows)
    assert "vertebra detection" in format_report(report)


def test_checkpoint_in_training_format_and_fused_validation(store, tmp_path):
    from vfsearch.core.models import build_model

    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(depth=3, base_channels=2, temporal="lstm"),
        data=DataConfig(seq_len=3, plane="sagittal", patch_size=32),
    )
    model = build_model(config.model, config.data.seq_len)
    ckpt = tmp_path / "best.pt"
    # the layout vfsearch.pipelines.train writes for best.pt
    torch.save(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "val_dice": 0.0,
            "config": config.flatten(),
            "seq_len": 3,
        },
        ckpt,
    )
    with pytest.raises(UserError, match="--store"):
        predict(
            ckpt,
            store["root"] / "c2" / "ct.nii.gz",
            store["root"] / "c2" / "vertebrae.nii.gz",
            tmp_path / "p",
        )
    report = evaluate(
        ckpt, store["path"], split="test", out=tmp_path / "e", threshold=0.5, n_boot=0
    )
    assert 0.0 <= report["flat"]["test_dice3d"] <= 1.0
    val = fused_validation_metrics(model, store["path"], config)
    for key in (
        "val_dice3d",
        "val_iou3d",
        "val_precision3d",
        "val_recall3d",
        "val_threshold3d",
        "val_dice3d_mean",
        "val_vertebra_pr_auc",
    ):
        assert key in val, key
    assert 0.0 < val["val_threshold3d"] < 1.0


def test_bad_arguments(store, tmp_path):
    with pytest.raises(UserError, match="no complete cases"):
        evaluate(_loaded(MarkedVoxels()), store["path"], split="nope", out=tmp_path)
    with pytest.raises(UserError, match="--combine"):
        evaluate(_loaded(MarkedVoxels()), store["path"], out=tmp_path, combine="median")
    with pytest.raises(UserError, match="not a vfsearch store"):
        evaluate(_loaded(MarkedVoxels()), tmp_path / "none.zarr", out=tmp_path)


def test_cli_predict_and_evaluate(store, tmp_path):
    from typer.testing import CliRunner

    from vfsearch.cli import app
    from vfsearch.core.models import build_model

    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(depth=3, base_channels=2, temporal="none"),
        data=DataConfig(seq_len=1, plane="axial", patch_size=16),
    )
    ckpt = tmp_path / "best.pt"
    torch.save(
        {"model": build_model(config.model, 1).state_dict(), "config": config.flatten()}, ckpt
    )
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(ckpt),
            "--store",
            str(store["path"]),
            "--split",
            "test",
            "--threshold",
            "0.5",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "pooled (micro)" in r.output and (tmp_path / "e" / "per_vertebra.csv").is_file()
    c2 = store["root"] / "c2"
    args = [
        "predict",
        str(c2 / "ct.nii.gz"),
        "--model",
        str(ckpt),
        "--vertebrae",
        str(c2 / "vertebrae.nii.gz"),
        "--out",
        str(tmp_path / "p"),
        "--store",
        str(store["path"]),
    ]
    r = runner.invoke(app, args + ["--combine", "median"])
    assert r.exit_code == 2 and "--combine" in r.output
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "fracture_prob.nii.gz").is_file() and "score" in r.output


@pytest.mark.slow
def test_mlflow_run_reference_loads_and_receives_the_figures(
    store, tmp_path, mlflow_server, monkeypatch
):
    from vfsearch.adapters import tracking
    from vfsearch.core.models import build_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    torch.manual_seed(0)
    config = Config(
        model=ModelConfig(depth=3, base_channels=2, temporal="none"),
        data=DataConfig(seq_len=1, plane="axial", patch_size=16),
    )
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save(
        {
            "model": build_model(config.model, 1).state_dict(),
            "epoch": 1,
            "val_dice": 0.0,
            "config": config.flatten(),
            "seq_len": 1,
        },
        ckpt_dir / "best.pt",
    )
    tracker = tracking.Tracker(mlflow_server)
    # what vfsearch.pipelines.train leaves in a run: the store tag and checkpoints/best.pt
    run_id = tracker.start_run("eval-test", "trained", tags={"store": str(store["path"])})
    tracker.log_artifact(run_id, ckpt_dir / "best.pt", "checkpoints")
    tracker.end_run(run_id)
    report = evaluate(
        run_id, store["path"], split="test", out=tmp_path / "e", threshold=0.5, n_boot=0
    )
    assert report["logged_to_run"] == run_id
    run = tracker.client.get_run(run_id)
    assert run.data.metrics["test_dice3d"] == pytest.approx(report["flat"]["test_dice3d"])
    assert "test_vertebra_pr_auc" in run.data.metrics
    logged = {a.path for a in tracker.client.list_artifacts(run_id, "evaluation/test")}
    assert logged == {"evaluation/test/metrics.json", "evaluation/test/per_vertebra.csv"}
    c2 = store["root"] / "c2"  # predict by run id: preprocessing from the run's store tag
    summary = predict(run_id, c2 / "ct.nii.gz", c2 / "vertebrae.nii.gz", tmp_path / "p")
    assert len(summary["vertebrae"]) > 0


def _case(case_id: str, curve: list[tuple[int, int, int]]):
    from vfsearch.pipelines.evaluate import CaseResult

    return CaseResult(case_id, np.array([0.25, 0.5, 0.75]), [], np.array(curve, np.int64), "files")


def test_crossfit_scores_each_half_at_the_other_halfs_threshold():
    """Honest selection: a case is never scored at a threshold tuned on it."""
    from vfsearch.pipelines.evaluate import crossfit_indices, segmentation_metrics

    low = [(10, 0, 0), (5, 0, 5), (0, 0, 10)]  # best at 0.25
    high = [(10, 30, 0), (10, 10, 0), (10, 0, 0)]  # best at 0.75
    results = [_case("a", low), _case("b", high), _case("c", low), _case("d", high)]
    # halves a,c (both best at 0.25) and b,d (best at 0.75) are each scored at the other's
    assert crossfit_indices(results) == [2, 0, 2, 0]
    honest = segmentation_metrics(results, k=crossfit_indices(results), n_boot=0)
    # a and c at 0.75 find nothing, b and d at 0.25 add 30 false positives each
    assert (honest["tp"], honest["fp"], honest["fn"]) == (20, 60, 20)
    tuned = max(segmentation_metrics(results, k=k, n_boot=0)["dice3d"] for k in range(3))
    assert honest["dice3d"] < tuned  # the tuned figure is the optimistic one
    assert crossfit_indices(results[:1], fixed=0.5) == [1]  # one case: the fixed threshold
