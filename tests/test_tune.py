"""`vfsearch tune` end to end: a real local Ray, a real MLflow server, a real phantom store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweeps import children as _children
from sweeps import client as _client
from sweeps import write_space
from typer.testing import CliRunner

from vfsearch.adapters.tracking.schema import STATUS_TAG, SWEEP_EXPERIMENT
from vfsearch.cli import app
from vfsearch.pipelines.tune import driver_resources, max_concurrent_trials

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _space(tmp_path: Path, *, epochs: int, grace: int, params: str) -> Path:
    return write_space(tmp_path, epochs=epochs, grace=grace, params=params)


def test_max_concurrent_follows_resources():
    assert (
        max_concurrent_trials({"CPU": 2.0}, workers=1, cpus_per_worker=1.0, gpus_per_worker=0) == 1
    )
    assert (
        max_concurrent_trials(
            {"CPU": 16.0, "GPU": 4.0}, workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0
        )
        == 2
    )
    assert (
        max_concurrent_trials({"CPU": 0.5}, workers=1, cpus_per_worker=1.0, gpus_per_worker=0) == 1
    )
    # drivers on a custom resource of the head take no CPU from the workers...
    assert (
        max_concurrent_trials(
            {"CPU": 4.0, "vfsearch_driver": 1.0},
            workers=1,
            cpus_per_worker=1.0,
            gpus_per_worker=0,
            driver_resource="vfsearch_driver",
        )
        == 4
    )
    assert (
        max_concurrent_trials({"CPU": 4.0}, workers=1, cpus_per_worker=1.0, gpus_per_worker=0) == 3
    )  # ...a CPU driver does
    # ... and the resource itself bounds the drivers (0.01 each)
    assert (
        max_concurrent_trials(
            {"CPU": 64.0, "vfsearch_driver": 0.02},
            workers=1,
            cpus_per_worker=1.0,
            gpus_per_worker=0,
            driver_resource="vfsearch_driver",
        )
        == 2
    )
    assert driver_resources("vfsearch_driver") == {"cpu": 0, "vfsearch_driver": 0.01}
    assert driver_resources(None) == {"cpu": 0.05}


def test_bad_space_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  model.depth: {type: int, low: 5, high: 3}\n")
    code = (
        "import sys\nfrom vfsearch.cli import main\n"
        f"sys.argv = ['vfsearch', 'tune', '--store', {str(tmp_path)!r}, '--space', {str(bad)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n"
        "    print('ray' in sys.modules, e.code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        check=False,
    )
    assert out.stdout.split() == ["False", "2"], out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "params.model.depth: empty range" in out.stderr


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, small_store, mlflow_server, ray_local):
    """3 trials, 2 epochs, two trials at once (so two children log side by side)."""
    from vfsearch.pipelines.tune import tune

    tmp = tmp_path_factory.mktemp("smoke_sweep")
    space = _space(
        tmp,
        epochs=2,
        grace=2,
        params="  model.temporal: "
        "{type: categorical, choices: [lstm, none]}\n"
        "  loss.dice_weight: {type: float, low: 0.5, high: 1.5}",
    )
    summary = tune(
        small_store,
        space,
        num_samples=3,
        name="smoke",
        seed=0,
        workdir=tmp,
        storage=tmp / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=2,
        cpus_per_worker=0.5,
    )
    return summary, tmp


def test_smoke_sweep_logs_parent_and_children(smoke_sweep, mlflow_server):
    summary, workdir = smoke_sweep
    client, parent, children = _children(mlflow_server, "smoke")
    assert len(children) == 3
    assert len(summary.table) == 3 and summary.best is not None
    assert parent.data.tags["best_trial"] == summary.best["trial_id"]
    assert parent.data.tags["best_run_id"] in {c.info.run_id for c in children}
    for child in children:
        assert child.data.params["model.temporal"] in ("lstm", "none")
        assert 0.5 <= float(child.data.params["loss.dice_weight"]) <= 1.5
        assert child.data.params["model.base_channels"] == "4"  # fixed keys reach the run
        history = client.get_metric_history(child.info.run_id, "val_dice")
        assert sorted(m.step for m in history) == [1, 2]  # every epoch, none lost or doubled
        assert 0.0 <= child.data.metrics["val_dice3d"] <= 1.0
        assert child.data.tags[STATUS_TAG] == "completed"
    # Optuna's study persisted beside MLflow, with every trial told its fused 3D Dice
    import optuna

    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir / 'optuna.db'}")
    assert sorted(round(t.value, 6) for t in study.trials) == sorted(
        round(c.data.metrics["val_dice3d"], 6) for c in children
    )
    assert "export the best: vfsearch export --sweep smoke" in str(summary)


def test_concurrent_trials_log_without_loss(smoke_sweep, mlflow_server, tmp_path_factory):
    _, _, children = _children(mlflow_server, "smoke")
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    pairs = zip(spans, spans[1:], strict=False)
    assert any(b[0] < a[1] for a, b in pairs), "no two trials overlapped"
    # the log of the one server every trial talked to (the mlflow_server fixture's)
    logs = list(tmp_path_factory.getbasetemp().glob("mlflow*/server.log"))
    assert logs, "the MLflow server's log was not found"
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "database is locked" not in text


def test_asha_stops_a_bad_trial_and_the_next_still_runs(
    tmp_path, small_store, mlflow_server, ray_local
):
    """A trial whose validation can never find a fracture (its validation threshold is out
    of the model's reach) is stopped at the first rung; the trial after it still gets the CPUs
    (Ray once leaked the resources of stopped Train V2 trials, ray-project/ray#54305)."""
    from vfsearch.pipelines.tune import tune

    space = _space(
        tmp_path,
        epochs=3,
        grace=1,
        params=("  train.val_threshold: {type: categorical, choices: [0.000001, 0.999999]}"),
    )
    good = {"train.val_threshold": 0.000001}  # every pixel positive: Dice > 0 for sure
    bad = {"train.val_threshold": 0.999999}  # no pixel positive: Dice 0
    summary = tune(
        small_store,
        space,
        num_samples=3,
        name="asha",
        workdir=tmp_path,
        storage=tmp_path / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=1,
        initial_points=[good, bad, good],
    )
    client, _, children = _children(mlflow_server, "asha")
    assert len(children) == 3
    stopped = max(children, key=lambda c: float(c.data.params["train.val_threshold"]))
    assert stopped.data.tags[STATUS_TAG] == "stopped early"
    assert len(client.get_metric_history(stopped.info.run_id, "val_dice")) < 3
    finished = [c for c in children if c.data.tags[STATUS_TAG] == "completed"]
    assert len(finished) == 2
    assert all(len(client.get_metric_history(c.info.run_id, "val_dice")) == 3 for c in finished)
    assert {r["status"] for r in summary.table} == {"completed", "stopped early"}
    # one-worker trials run in the trial's process, which Tune hands to the next trial
    # (reuse_actors: warm imports); a stopped trial's process too
    pids = {
        json.loads(line)["pid"]
        for result in (tmp_path / "ray" / "asha").glob("*/result.json")
        for line in result.read_text().splitlines()
    }
    assert len(pids) < 3, pids


def test_interrupted_sweep_resumes_without_duplicates(
    tmp_path, small_store, mlflow_server, ray_local
):
    space = _space(
        tmp_path,
        epochs=2,
        grace=2,
        params=("  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"),
    )
    args = [
        "tune",
        "--store",
        str(small_store),
        "--space",
        str(space),
        "--num-samples",
        "3",
        "--name",
        "interrupted",
        "--workdir",
        str(tmp_path),
        "--storage",
        str(tmp_path / "ray"),
        "--max-concurrent",
        "1",
    ]
    # the sweep's driver joins the session's Ray, as a user's would join a running cluster
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfsearch", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    client = _client(mlflow_server)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:
            exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
            done = (
                client.search_runs([exp.experiment_id], f"tags.`{STATUS_TAG}` = 'completed'")
                if exp
                else []
            )
            done = [r for r in done if r.info.run_name.startswith("interrupted-")]
            if done:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(2)
        else:
            pytest.fail("no trial completed in time")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, _, before = _children(mlflow_server, "interrupted")
    assert 1 <= len(before) < 3 + 1
    first = {r.info.run_id for r in done}

    result = CliRunner().invoke(
        app, [*args, "--resume"], env={"MLFLOW_TRACKING_URI": mlflow_server}
    )
    assert result.exit_code == 0, result.output
    client, _, children = _children(mlflow_server, "interrupted")
    assert len(children) == 3  # one child per trial, none created twice
    names = [c.info.run_name for c in children]
    assert len(set(names)) == 3
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_dice")]
        assert sorted(steps) == [1, 2], (child.info.run_name, steps)
        if child.info.run_id in first:  # finished before the interrupt: not trained again
            assert "vfsearch.resumed_from_epoch" not in child.data.tags
            assert child.data.tags[STATUS_TAG] == "completed"


def test_multi_objective_sweep_tells_optuna_both_values(
    tmp_path, small_store, mlflow_server, ray_local
):
    """Dice against parameter count: Optuna gets both values of each trial, the parent run
    names the Pareto front, every child logs the cost figures."""
    import optuna

    from vfsearch.pipelines.tune import pareto_front, tune

    space = _space(
        tmp_path,
        epochs=1,
        grace=1,
        params=("  model.temporal: {type: categorical, choices: [none, lstm]}"),
    )
    text = space.read_text().replace(
        "metric: val_dice3d\nmode: max", "metric: [val_dice3d, model_params]\nmode: [max, min]"
    )
    space.write_text(text)
    summary = tune(
        small_store,
        space,
        num_samples=2,
        name="pareto",
        workdir=tmp_path,
        storage=tmp_path / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=1,
        initial_points=[{"model.temporal": "none"}, {"model.temporal": "lstm"}],
    )
    _, parent, children = _children(mlflow_server, "pareto")
    assert len(children) == 2
    by_kind = {c.data.params["model.temporal"]: c.data.metrics for c in children}
    assert by_kind["none"]["model_params"] < by_kind["lstm"]["model_params"]
    assert all(m["latency_ms"] > 0 for m in by_kind.values())
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    told = sorted(tuple(round(v, 6) for v in t.values) for t in study.trials)
    assert told == sorted(
        (round(m["val_dice3d"], 6), round(m["model_params"], 6)) for m in by_kind.values()
    )
    rows = [{"trial_id": c.data.tags["vfsearch.trial_id"], **c.data.metrics} for c in children]
    objectives = (("val_dice3d", "max"), ("model_params", "min"))
    front = {rows[i]["trial_id"] for i in pareto_front(rows, objectives)}
    assert set(parent.data.tags["pareto_trials"].split(",")) == front
    assert {r["trial_id"] for r in summary.table if r["pareto"] == "yes"} == front
    assert "pareto" in str(summary).splitlines()[1]  # the table shows the column


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--num-samples", "0"], "--num-samples: must be >= 1"),
        (["--workers-per-trial", "0"], "--workers-per-trial: must be >= 1"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial: must be >= 0"),
        (["--sampler", "grid"], "--sampler: must be one of tpe, random"),
        (["--name", "../up"], "--name: '../up' is not a valid sweep name"),
    ],
)
def test_bad_tune_options_fail_in_one_line(tmp_path, small_store, extra, needle):
    space = _space(
        tmp_path,
        epochs=1,
        grace=1,
        params=("  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"),
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfsearch",
            "tune",
            "--store",
            str(small_store),
            "--space",
            str(space),
            "--workdir",
            str(tmp_path / "wd"),
            *extra,
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and needle in out.stderr, out.stderr
    assert not (tmp_path / "wd").exists()  # nothing started, nothing written


def test_driver_resource_missing_on_the_cluster_fails_clearly(
    tmp_path, small_store, mlflow_server, ray_local
):
    space = _space(
        tmp_path,
        epochs=1,
        grace=1,
        params=("  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"),
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfsearch",
            "tune",
            "--store",
            str(small_store),
            "--space",
            str(space),
            "--workdir",
            str(tmp_path),
            "--name",
            "nodrv",
            "--address",
            ray_local.get_runtime_context().gcs_address,
            "--driver-resource",
            "no_such_resource",
        ],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        check=False,
        env=env,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --driver-resource: no node of the Ray cluster offers"), last
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    assert not exp or not client.search_runs([exp.experiment_id], "tags.`vfsearch.sweep` = 'nodrv'")
