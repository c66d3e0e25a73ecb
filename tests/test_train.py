"""Training on Ray Train V2 (vfsearch.pipelines.train) against a real local Ray, a real MLflow
server, a real phantom Zarr store, the real WindowDataset and the real models.

Each trainer run costs ~15-25 s of Ray start-up on a 2-core box, so the runs are few and
tiny: 32 windows per epoch, 32x32 patches, a depth-3 U-Net with 4 base channels.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import yaml

from vfsearch.core.config import load_config
from vfsearch.pipelines.train import run_training
from vfsearch.pipelines.train.loop import build_models, optimizer_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "model.depth=3",
    "model.base_channels=4",
    "data.patch_size=32",
    "data.seq_len=3",
    "model.norm=group",
    "train.batch_size=8",
    "train.max_windows_per_epoch=32",
    "train.warmup_epochs=1",
    "data.augment=0",
]
GAN = ["model.gan=true", "loss.adv_weight=0.1", "model.disc_layers=2", "model.disc_channels=4"]


def _state(ckpt_dir) -> dict:
    return torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=True)


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_two_workers_mlflow_and_staged_gan(small_store, mlflow_server, ray_local, tmp_path):
    from mlflow import MlflowClient

    cfg_file = tmp_path / "gan.yaml"
    cfg_file.write_text(yaml.safe_dump({"train": {"epochs": 2, "gan_start_epoch": 1}}))
    cfg = load_config(str(cfg_file), TINY + GAN)
    storage = tmp_path / "ray"
    summary = run_training(
        small_store,
        cfg,
        name="gan2w",
        storage=storage,
        workers=2,
        mlflow_uri=mlflow_server,
        experiment="test-train",
        config_file=cfg_file,
    )
    assert summary.epochs_done == 2
    assert summary.mlflow_run_id and summary.runs_url.endswith("/runs")

    client = MlflowClient(mlflow_server)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.depth"] == "3" and params["train.gan_start_epoch"] == "1"
    assert params["run.workers"] == "2" and params["model.gan"] == "True"
    tags = run.data.tags
    assert len(tags["dataset_fingerprint"]) == 16 and tags["git_commit"]
    assert tags["vfsearch.run"] == "gan2w"
    for key in (
        "train/loss",
        "train/dice",
        "train/bce",
        "val_dice",
        "val_iou",
        "lr",
        "epoch_time",
        "windows_per_s",
    ):
        assert sorted(_history(client, run.info.run_id, key)) == [1, 2], key
    # D and G losses exist for the adversarial epoch only
    assert sorted(_history(client, run.info.run_id, "train/d_loss")) == [2]
    assert sorted(_history(client, run.info.run_id, "train/g_loss")) == [2]
    lrs = _history(client, run.info.run_id, "lr")
    assert lrs[2] < lrs[1]  # cosine decay after the warm-up epoch
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/gan.yaml", "config/resolved.json"} <= arts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.pt"
    ]
    best = torch.load(
        client.download_artifacts(run.info.run_id, "checkpoints/best.pt", str(tmp_path)),
        weights_only=True,
    )
    assert best["epoch"] in (1, 2) and "model" in best
    # what predict needs to preprocess a new scan, and the threshold chosen on validation
    assert best["store"]["spacing"] == [2.0, 2.0, 2.0] and best["store"]["fingerprint"]
    # every run ends with the fused 3D validation of its best checkpoint (issue 5) ...
    final = run.data.metrics
    assert 0.0 <= final["val_dice3d"] <= 1.0 and 0.0 < final["val_threshold3d"] < 1.0
    assert best["threshold"] == pytest.approx(final["val_threshold3d"])
    # ... and logs pictures of it (issue 8)
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "visualisations")}
    assert pictures, "no visualisations logged"

    # staged GAN: D untouched by the segmentation-only epoch 1, trained in epoch 2
    _, disc0 = build_models(cfg)
    d_init = disc0.state_dict()
    s1, s2 = _state(storage / "gan2w" / "epoch_0001"), _state(storage / "gan2w" / "epoch_0002")
    assert all(torch.equal(d_init[k], s1["disc"][k]) for k in d_init)
    changed = [k for k in d_init if not torch.equal(s1["disc"][k], s2["disc"][k])]
    assert changed and all(
        k in changed for k, v in d_init.items() if v.is_floating_point() and k.endswith("weight")
    )
    assert s2["opt_d"]["state"] and not s1["opt_d"]["state"]
    for key in ("model", "opt_g", "sched", "scaler", "epoch", "best_metric"):
        assert key in s2
    assert os.path.isfile(storage / "gan2w" / "epoch_0002" / "rng_rank1.pt")


def test_validation_same_with_one_and_two_workers(small_store, ray_local, tmp_path):
    """lr=0 keeps the (seeded) initial weights, so both runs validate the same model: the
    all-reduced counts and Dice must agree, and TP+FN must be every positive pixel of the
    validation windows scored (the epoch is capped, so a strided subset of them)."""
    from torch.utils.data import DataLoader, Subset

    from vfsearch.adapters.dataset import WindowDataset
    from vfsearch.core.sampling import val_stride

    cfg = load_config(
        None, TINY + ["train.epochs=1", "train.lr=0", "train.max_windows_per_epoch=8"]
    )
    one = run_training(
        small_store, cfg, name="agg1", storage=tmp_path, workers=1, progress=False
    ).metrics
    two = run_training(
        small_store, cfg, name="agg2", storage=tmp_path, workers=2, progress=False
    ).metrics
    val = WindowDataset(small_store, "val", cfg.data)
    stride = val_stride(len(val), -1, 8)
    assert stride > 1 and one["val_windows"] == two["val_windows"] == len(val.strided(stride))
    positives = sum(
        float(b["target"].sum())
        for b in DataLoader(Subset(val, val.strided(stride)), batch_size=64)
    )
    assert positives > 0
    for m in (one, two):
        assert m["val_tp"] + m["val_fn"] == positives
    assert two["val_tp"] + two["val_fp"] == pytest.approx(one["val_tp"] + one["val_fp"], abs=2)
    assert two["val_dice"] == pytest.approx(one["val_dice"], abs=1e-4)
    assert two["val_iou"] == pytest.approx(one["val_iou"], abs=1e-4)
    # the final fused 3D validation, shared by the two workers (rank 0's best weights
    # broadcast, each rank fusing its cases, counts summed): the one worker's figures
    for key in ("val_tp3d", "val_fp3d", "val_fn3d", "val_threshold3d", "val_dice3d_tuned"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


def test_resume_continues_next_epoch_with_saved_optimizer(
    small_store, mlflow_server, ray_local, tmp_path
):
    from mlflow import MlflowClient

    cfg = load_config(None, TINY + ["train.epochs=3", "train.max_failures=0"])
    kw = dict(
        name="resume",
        storage=tmp_path,
        workers=1,
        mlflow_uri=mlflow_server,
        experiment="test-train",
        progress=False,
    )
    with pytest.raises(RuntimeError, match="failed"):
        run_training(small_store, cfg, fault={"raise_after_epoch": 1}, **kw)
    saved = _state(tmp_path / "resume" / "epoch_0001")
    assert saved["epoch"] == 1 and not (tmp_path / "resume" / "epoch_0002").exists()

    summary = run_training(small_store, cfg, **kw)
    assert summary.epochs_done == 3
    assert summary.metrics["resumed_from_epoch"] == 1
    assert summary.mlflow_run_id == saved["mlflow_run_id"]  # the same MLflow run continues
    client = MlflowClient(mlflow_server)
    rid = summary.mlflow_run_id
    assert client.get_run(rid).info.status == "FINISHED"
    assert client.get_run(rid).data.tags["vfsearch.resumed_from_epoch"] == "1"
    assert sorted(_history(client, rid, "val_dice")) == [1, 2, 3]  # epoch 1 not redone
    digest = _history(client, rid, "resume/optimizer_digest")
    assert digest[1] == pytest.approx(optimizer_digest(saved["opt_g"]), rel=1e-9)
    s2 = _state(tmp_path / "resume" / "epoch_0002")
    assert s2["epoch"] == 2
    # Adam's step counter continued from the saved state instead of restarting at 0
    steps1 = {float(v["step"]) for v in saved["opt_g"]["state"].values()}
    steps2 = {float(v["step"]) for v in s2["opt_g"]["state"].values()}
    assert len(steps1) == 1 and len(steps2) == 1
    assert steps2.pop() == 2 * steps1.pop()
    assert s2["sched"]["last_epoch"] == 2 * saved["sched"]["last_epoch"]


def test_sigkilled_worker_is_replaced_and_run_recovers(small_store, ray_local, tmp_path):
    cfg = load_config(
        None, TINY + ["train.epochs=3", "train.max_failures=2", "data.oversample_fracture=2"]
    )
    pid_file = tmp_path / "victim.pid"
    out: dict = {}

    def fit() -> None:
        try:
            out["summary"] = run_training(
                small_store,
                cfg,
                name="fault",
                storage=tmp_path / "ray",
                workers=2,
                progress=False,
                fault={"pid_file": str(pid_file), "epoch": 2, "batch": 1, "rank": 1},
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            out["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 400
    snapshot = tmp_path / "ray" / "fault" / "checkpoint_manager_snapshot.json"

    def epoch1_registered() -> bool:
        # Ray registers a reported checkpoint when its controller next polls the workers;
        # a worker killed before that poll would take the epoch-1 checkpoint with it
        return snapshot.is_file() and "epoch_0001" in snapshot.read_text()

    while not (pid_file.is_file() and pid_file.read_text().strip() and epoch1_registered()):
        assert thread.is_alive(), out.get("error")
        assert time.monotonic() < deadline, "the worker never reached epoch 2"
        time.sleep(0.2)
    victim = int(pid_file.read_text())
    assert victim != os.getpid()
    os.kill(victim, signal.SIGKILL)  # a training worker dies mid-epoch 2
    thread.join(timeout=500)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    summary = out["summary"]
    assert summary.epochs_done == 3
    assert summary.metrics["resumed_from_epoch"] == 1  # restarted from the epoch-1 checkpoint
