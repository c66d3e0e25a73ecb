"""One-worker sweep trials without Ray Train: the worker loop runs in the Tune trial's own
process (`vfsearch.pipelines.train.driver.run_in_process`), reports metrics and checkpoints
to Tune, and is retried by Tune from its last checkpoint."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from sweeps import children, write_space

from vfsearch.adapters.tracking.schema import STATUS_TAG
from vfsearch.pipelines.tune import max_concurrent_trials, trial_resources


def test_a_process_freezes_its_imports_once_before_its_first_run():
    """`freeze_imports`: the first run in a process moves what exists to the permanent
    generation; a later run (after a failed one, say) freezes nothing it made."""
    from vfsearch.pipelines.train import worker

    gc.unfreeze()
    try:
        assert worker.freeze_imports() is True
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this process's modules, functions, classes...
        made_by_a_run = [[i] for i in range(1000)]  # tracked containers
        assert worker.freeze_imports() is False
        assert gc.get_freeze_count() == frozen  # none of the run's objects frozen
        assert len(made_by_a_run) == 1000
    finally:
        gc.unfreeze()


def test_both_worker_loops_freeze_the_imports_before_the_run(monkeypatch):
    """A Train worker and an in-process trial call `freeze_imports` before `run_worker`; the
    trial also collects, then freezes, after a run that finished."""
    from vfsearch.adapters import ray_backend
    from vfsearch.pipelines.train import worker

    calls: list[str] = []
    monkeypatch.setattr(worker, "freeze_imports", lambda: calls.append("freeze_imports"))
    monkeypatch.setattr(
        worker, "run_worker", lambda loop, session: calls.append(type(session).__name__)
    )
    monkeypatch.setattr(ray_backend, "prewarm_imports", lambda: None)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("gc.freeze"))
    worker.train_loop_per_worker({})
    assert calls == ["freeze_imports", "TrainSession"]
    calls.clear()
    worker.tune_trial_loop({})
    assert calls == ["freeze_imports", "TuneSession", "gc.freeze"]


def test_in_process_trials_ask_for_their_worker_and_no_driver():
    assert trial_resources(None, in_process=True, cpus_per_worker=2.0) == {"cpu": 2.0}
    assert trial_resources(
        "vfsearch_driver", in_process=True, cpus_per_worker=1.0, gpus_per_worker=0.5
    ) == {"cpu": 1.0, "gpu": 0.5}
    assert trial_resources("vfsearch_driver") == {"cpu": 0, "vfsearch_driver": 0.01}
    assert trial_resources(None) == {"cpu": 0.05}
    # no sliver of a CPU per trial for a driver: 2 CPUs hold 2 one-CPU trials, not 1
    fit = max_concurrent_trials(
        {"CPU": 2.0}, workers=1, cpus_per_worker=1.0, gpus_per_worker=0, in_process=True
    )
    assert fit == 2
    assert (
        max_concurrent_trials(
            {"CPU": 64.0, "vfsearch_driver": 0.01},
            workers=1,
            cpus_per_worker=1.0,
            gpus_per_worker=0,
            driver_resource="vfsearch_driver",
            in_process=True,
        )
        == 64
    )


@pytest.mark.integration
@pytest.mark.slow
def test_in_process_trials_report_checkpoint_and_resume_after_a_failure(
    tmp_path, small_store, mlflow_server, ray_local
):
    """Every trial fails once, right after its epoch-1 report: Tune retries it from that
    checkpoint (epoch 2 only), the MLflow run goes on, and the final report carries the fused
    3D figures; no Ray Train run is made."""
    from vfsearch.pipelines.tune import tune

    space = write_space(
        tmp_path,
        epochs=2,
        grace=2,
        params="  loss.dice_weight: {type: float, low: 0.5, high: 1.5}",
    )
    summary = tune(
        small_store,
        space,
        num_samples=2,
        name="inproc",
        workdir=tmp_path,
        storage=tmp_path / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=1,
        fault={"raise_after_epoch": 1},
    )
    assert [r["status"] for r in summary.table] == ["completed", "completed"]
    assert all(0.0 <= r["val_dice3d"] <= 1.0 for r in summary.table)

    client, parent, kids = children(mlflow_server, "inproc")
    assert parent.data.params["sweep.trials_in_process"] == "True"
    assert len(kids) == 2  # one run per trial: the retry continued the first attempt's
    for kid in kids:
        steps = sorted(m.step for m in client.get_metric_history(kid.info.run_id, "val_dice"))
        assert steps == [1, 2], steps  # epoch 1 not trained twice
        assert kid.data.tags["vfsearch.resumed_from_epoch"] == "1"
        assert kid.data.tags[STATUS_TAG] == "completed" and kid.info.status == "FINISHED"
        assert 0.0 <= kid.data.metrics["val_dice3d"] <= 1.0
        assert kid.data.metrics["final_eval_s"] > 0
        startup = client.get_metric_history(kid.info.run_id, "startup_s")
        assert [m.step for m in startup] == [1] and startup[0].value > 0

    sweep_dir = tmp_path / "ray" / "inproc"
    assert not (sweep_dir / "trials").exists()  # no TorchTrainer run folders
    trial_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and "_trial_driver" in p.name)
    assert len(trial_dirs) == 2
    for trial in trial_dirs:
        ckpts = sorted(trial.glob("checkpoint_*"), key=lambda p: p.name)
        assert ckpts, trial
        last = _load(ckpts[-1] / "best.pt")
        assert 0.0 < last["threshold"] < 1.0  # the final report's best.pt: its threshold
        assert _load(ckpts[-1] / "state.pt")["epoch"] == 2


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.integration
def test_an_epoch_run_again_after_a_lost_checkpoint_is_logged_once(small_store, mlflow_server):
    """A trial retried (or a sweep restored) from before its last epoch's checkpoint was
    registered runs that epoch again; its MLflow run, found again by launch id, keeps one
    value per step (the first attempt's), and metrics new at a step are still logged."""
    import uuid

    from sweeps import client

    from vfsearch.pipelines.train.worker import _RankZeroRun

    loop = {
        "store": str(small_store),
        "config": {"train.lr": 0.01},
        "mlflow": {
            "uri": mlflow_server,
            "experiment": "test-attempts",
            "name": "attempts",
            "parent_run_id": None,
            "launch_id": uuid.uuid4().hex,
            "tags": {},
            "params": {},
            "config_file": None,
        },
    }
    first = _RankZeroRun(loop, run_id=None, resumed_from=0, digest=0.0)
    rid = first.log_metrics({"val_dice": 0.1, "train/loss": 1.0}, step=1)
    first.log_metrics({"val_dice": 0.2}, step=2)
    # no checkpoint reached Tune: the next attempt starts afresh, with the same launch id
    again = _RankZeroRun(loop, run_id=None, resumed_from=0, digest=0.0)
    assert again.log_metrics({"val_dice": 0.15, "train/loss": 0.9}, step=1) == rid
    again.log_metrics({"val_dice": 0.25, "val_dice3d": 0.5}, step=2)
    # in the background (overlapping the checkpoint write), waited for before the report
    again.log_metrics_soon({"val_dice": 0.3}, step=3)()
    wait = again.log_metrics_soon({"bad key!": 1.0}, step=3)  # MLflow refuses the name
    with pytest.raises(Exception, match="bad key!"):
        wait()  # the background thread's error reaches the caller
    c = client(mlflow_server)
    history = {m.step: m.value for m in c.get_metric_history(rid, "val_dice")}
    assert len(c.get_metric_history(rid, "val_dice")) == 3
    assert history == {1: 0.1, 2: 0.2, 3: 0.3}
    assert [m.step for m in c.get_metric_history(rid, "val_dice3d")] == [2]
    assert [m.step for m in c.get_metric_history(rid, "train/loss")] == [1]
