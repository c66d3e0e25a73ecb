"""The MLflow adapter (vfsearch.adapters.tracking): embedded server lifecycle, URI resolution,
logging
over HTTP, retries, the schema of names, the package's boundary; and the ``train`` / ``ui``
commands' parsing."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vfsearch.adapters import tracking
from vfsearch.adapters.tracking import client, schema, server
from vfsearch.cli import app
from vfsearch.core.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "vfsearch"
TRACKING = PACKAGE / "adapters" / "tracking"


def test_env_uri_wins_and_file_stores_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(tmp_path / "never") == "http://tracking.example:5000"
    assert not (tmp_path / "never").exists()  # no local server was started
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri(tmp_path)


def test_retry_survives_connection_errors(monkeypatch):
    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection refused")
        return "ok"

    assert client.retry(flaky) == "ok" and len(calls) == 3

    def broken():
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        client.retry(broken)


def test_retry_rides_out_a_server_restart_then_gives_up(monkeypatch):
    """Connection errors are retried for $VFSEARCH_TRACKING_RETRY_S seconds of backoff
    (1, 2, 4, 8, 15, 15 ... s), then the last error is raised."""
    clock = [0.0]
    monkeypatch.setattr(client.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(client.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setenv(client.RETRY_ENV, "20")
    calls = []

    def down():
        calls.append(clock[0])
        raise ConnectionError("Connection refused")

    with pytest.raises(ConnectionError):
        client.retry(down)
    assert calls == [0.0, 1.0, 3.0, 7.0, 15.0]  # the next wait (15 s) would pass 20 s
    monkeypatch.setenv(client.RETRY_ENV, "300")
    calls.clear(), clock.__setitem__(0, 0.0)
    with pytest.raises(ConnectionError):
        client.retry(down)
    assert len(calls) == 24 and calls[-1] <= 300  # 15 s steps up to five minutes


def test_no_server_recorded(tmp_path):
    assert tracking.find_server(tmp_path) is None
    assert tracking.stop_server(tmp_path) is False
    assert not tracking.is_healthy("http://127.0.0.1:9")


def test_runs_url():
    assert tracking.runs_url("http://h:1/", "7") == "http://h:1/#/experiments/7/runs"


def test_a_record_of_a_dead_or_foreign_pid_is_dropped_never_signalled(tmp_path):
    """Both servers share the record/find/stop logic: a recorded pid that is gone, or alive
    but running something else (a reused pid: this test process), is not theirs."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        info = server.ServerInfo(url="http://127.0.0.1:9", pid=pid, port=9, workdir=str(tmp_path))
        board = server.DashboardInfo(
            url="http://127.0.0.1:9",
            pid=pid,
            port=9,
            workdir=str(tmp_path),
            storage="sqlite:///x.db",
        )
        server._write(server.MLFLOW, tmp_path, info)
        server._write(server.DASHBOARD, tmp_path, board)
        assert json.loads((tmp_path / "server.json").read_text())["pid"] == pid
        assert server._read(server.MLFLOW, tmp_path) == info
        assert server._read(server.DASHBOARD, tmp_path) == board
        assert tracking.find_server(tmp_path) is None  # nothing healthy answers there
        assert tracking.find_dashboard(tmp_path) is None
        assert tracking.stop_server(tmp_path) is False  # not ours: not signalled
        assert tracking.stop_dashboard(tmp_path) is False
        assert not (tmp_path / "server.json").exists()
        assert not (tmp_path / "dashboard.json").exists()


# -- the schema of names -----------------------------------------------------------------------


def _names() -> dict[str, str]:
    return {k: v for k, v in vars(schema).items() if k.isupper() and isinstance(v, str)}


def test_schema_names_are_unique_unless_documented():
    by_value: dict[str, list[str]] = {}
    for name, value in _names().items():
        by_value.setdefault(value, []).append(name)
    shared = {v: sorted(ns) for v, ns in by_value.items() if len(ns) > 1}
    undocumented = {
        v: ns for v, ns in shared.items() if not all(n in schema.SHARED_VALUES for n in ns)
    }
    assert not undocumented, f"constants sharing a value without a reason: {undocumented}"
    assert all(reason.strip() for reason in schema.SHARED_VALUES.values())


def test_schema_values_are_what_mlflow_already_holds():
    """Runs logged before a rename must still be found: the stored strings never change."""
    assert {k: v for k, v in _names().items() if k.endswith(("_TAG", "_EXPERIMENT"))} == {
        "DEFAULT_EXPERIMENT": "vfsearch",
        "SWEEP_EXPERIMENT": "vfsearch-sweeps",
        "PARENT_RUN_TAG": "mlflow.parentRunId",
        "SHARED_VIEW_TAG": "mlflow.sharedViewState.",
        "RAY_RUN_TAG": "vfsearch.run",
        "LAUNCH_TAG": "vfsearch.launch",
        "STORE_TAG": "store",
        "GIT_COMMIT_TAG": "git_commit",
        "FINGERPRINT_TAG": "dataset_fingerprint",
        "EVAL_THRESHOLD_TAG": "eval.{split}.threshold",
        "SWEEP_TAG": "vfsearch.sweep",
        "SWEEP_OF_TRIAL_TAG": "vfsearch.sweep.trial",
        "TRIAL_TAG": "vfsearch.trial_id",
        "STATUS_TAG": "vfsearch.status",
        "SPACE_FILE_TAG": "space_file",
        "BEST_TRIAL_TAG": "best_trial",
        "BEST_RUN_TAG": "best_run_id",
        "VERSION_RUN_TAG": "vfsearch.run_id",
        "MEMBERS_TAG": "vfsearch.members",
        "MEMBER_VALUES_TAG": "vfsearch.member_values",
        "TOP_K_TAG": "vfsearch.top_k",
        "METRIC_TAG": "vfsearch.metric",
        "METRIC_VALUE_TAG": "vfsearch.metric_value",
        "METRIC_MODE_TAG": "vfsearch.metric_mode",
    }
    assert (
        schema.CHECKPOINTS_DIR,
        schema.BEST_CHECKPOINT,
        schema.SEARCH_SPACE_DIR,
        schema.IMPORTANCES_FILE,
        schema.VISUALISATIONS_DIR,
        schema.BUNDLE_ARTIFACT,
        schema.LOGGED_MODEL_NAME,
    ) == (
        "checkpoints",
        "best.pt",
        "search_space",
        "importances/param_importances.json",
        "visualisations",
        "bundle",
        "model",
    )
    assert (
        schema.DEFAULT_METRIC,
        schema.EPOCH_METRIC,
        schema.THRESHOLD_METRIC,
        schema.BEST_PREFIX,
    ) == ("val_dice3d", "val_dice", "val_threshold3d", "best_")


# -- the package's boundary --------------------------------------------------------------------


def test_the_tracking_package_imports_no_mlflow():
    code = (
        "import sys\nimport vfsearch.adapters.tracking\n"
        "from vfsearch.adapters.tracking import client, registry, schema, server, views\n"
        "print(sorted(m for m in ('mlflow', 'optuna', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, encoding="utf-8", check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def _reaches_into_mlflow(path: Path) -> list[str]:
    """Lines of ``path`` that use `Tracker.client`, the package's `retry`, or import mlflow
    (other than for type checking)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def typing_only(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                return True
        return False

    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("client", "_retry", "retry"):
            bad.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("vfsearch.adapters.tracking")
            and {a.name for a in node.names} & {"retry", "_retry"}
        ):
            bad.append(f"{path.name}:{node.lineno} imports retry")
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and not typing_only(node):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                bad.append(f"{path.name}:{node.lineno} imports mlflow")
    return sorted(bad, key=lambda hit: int(hit.split(":")[1].split()[0]))


def test_nothing_outside_the_tracking_package_reaches_into_mlflow():
    """Call sites use `Tracker` methods: no `tracker.client`, no `retry`, no mlflow import."""
    bad = [
        hit
        for p in sorted(PACKAGE.rglob("*.py"))
        if TRACKING not in p.parents
        for hit in _reaches_into_mlflow(p)
    ]
    assert not bad, "\n".join(bad)


def test_the_boundary_check_catches_a_planted_client_call(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def f(tracker):\n    return tracker.client.get_run('x')\n\n"
        "from vfsearch.adapters.tracking.client import retry\nimport mlflow\n"
    )
    assert _reaches_into_mlflow(planted) == [
        "planted.py:2 .client",
        "planted.py:4 imports retry",
        "planted.py:5 imports mlflow",
    ]


@pytest.mark.integration
def test_tracker_methods_against_a_real_server(mlflow_server, tmp_path):
    """The methods call sites use instead of the client: metric history (NaN kept by
    `log_metric`), artifacts up and down, a sweep's children, an experiment's saved view."""
    tr = tracking.Tracker(mlflow_server)
    parent = tr.start_run("tracker-methods", "parent")
    rid = tr.start_run("tracker-methods", "child", parent_run_id=parent)
    for step, value in enumerate((0.25, math.nan, 0.5)):
        tr.log_metric(rid, "val_dice", value, step=step)
    history = tr.get_metric_history(rid, "val_dice")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[0].value == 0.25 and math.isnan(history[1].value) and history[2].value == 0.5
    folder = tmp_path / "pics"
    (folder / "case").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "case" / "b.txt").write_text("b")
    tr.log_artifacts(rid, folder, "pics")
    listed = {(a.path, a.is_dir) for a in tr.list_artifacts(rid, "pics")}
    assert listed == {("pics/a.txt", False), ("pics/case", True)}
    local = tr.download_artifacts(rid, "pics/case/b.txt", tmp_path / "dl", attempts=2)
    assert Path(local).read_text() == "b"
    exp = tr.get_experiment_by_name("tracker-methods")
    assert exp is not None and tr.get_experiment_by_name("no-such-experiment") is None
    kids = tr.search_runs([exp.experiment_id], tracking.sweep_filter(parent))
    assert [r.info.run_id for r in kids] == [rid]
    assert {r.info.run_id for r in tr.search_all_runs([exp.experiment_id])} == {parent, rid}
    assert tr.get_run(rid).data.tags[schema.PARENT_RUN_TAG] == parent
    tr.set_experiment_tag(exp.experiment_id, schema.SHARED_VIEW_TAG + "k", "{}")
    assert tr.client.get_experiment(exp.experiment_id).tags[schema.SHARED_VIEW_TAG + "k"] == "{}"


@pytest.mark.integration
@pytest.mark.slow
def test_embedded_server_lifecycle_and_ui(tmp_path, monkeypatch):
    """Started once under a lock (two concurrent callers get one server), reused while
    alive, data in the working folder, printed by ``vfsearch ui``, stopped by ``--stop``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "mlruns"
    infos: list[tracking.ServerInfo] = []
    threads = [
        threading.Thread(target=lambda: infos.append(tracking.ensure_server(workdir, timeout=240)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(infos) == 2 and infos[0] == infos[1]  # one server, not two
        info = infos[0]
        assert info.url.startswith("http://127.0.0.1:") and tracking.is_healthy(info.url)
        recorded = json.loads((workdir / "server.json").read_text())
        assert recorded["pid"] == info.pid and recorded["url"] == info.url
        assert tracking.tracking_uri(workdir) == info.url  # reused, not restarted
        assert (workdir / "mlflow.db").is_file()

        tr = tracking.Tracker(info.url)
        rid = tr.start_run("lifecycle", "r1", tags={"vfsearch.run": "r1"})
        tr.log_params(rid, {"model.depth": 3})
        tr.log_params(rid, {"model.depth": 3, "train.lr": 0.1})  # already-logged keys skipped
        tr.log_metrics(rid, {"val_dice": 0.5, "bad": float("nan")}, step=1)
        (tmp_path / "note.txt").write_text("hello")
        tr.log_artifact(rid, tmp_path / "note.txt", "config")
        tr.end_run(rid)
        assert tr.find_run("lifecycle", "vfsearch.run", "r1") == rid
        run = tr.get_run(rid)
        assert run.data.params == {"model.depth": "3", "train.lr": "0.1"}
        assert run.data.metrics == {"val_dice": 0.5}
        # artifacts went over HTTP into the working folder's artifact root
        assert list((workdir / "artifacts").rglob("note.txt"))
        child = tr.start_run("lifecycle", "child", parent_run_id=rid)
        assert tr.get_run(child).data.tags["mlflow.parentRunId"] == rid

        runner = CliRunner()
        res = runner.invoke(app, ["ui", "--workdir", str(workdir)])
        assert res.exit_code == 0, res.output
        mlflow_line = res.output.splitlines()[0]  # then the Optuna dashboard's line
        assert mlflow_line.split()[-1] == info.url  # no "vfsearch" experiment yet: bare URL
        tr.experiment_id("vfsearch")
        res = runner.invoke(app, ["ui", "--workdir", str(workdir)])
        assert res.output.splitlines()[0].split()[-1].startswith(info.url + "/#/experiments/")
        assert tracking.find_server(workdir) == info
    finally:
        res = CliRunner().invoke(app, ["ui", "--workdir", str(workdir), "--stop"])
    assert res.exit_code == 0 and "stopped" in res.output
    assert tracking.find_server(workdir) is None and not tracking.is_healthy(info.url)
    assert not (workdir / "server.json").exists() and (workdir / "mlflow.db").is_file()


def test_train_command_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--store", str(tmp_path / "missing.zarr")])
    assert res.exit_code == 2
    assert "missing.zarr" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["train", "--store", str(tmp_path), "--set", "model.depth=9"])
    assert res.exit_code == 2 and "model.depth" in res.output
    res = runner.invoke(app, ["train", "--store", str(tmp_path), "--workers", "0"])
    assert res.exit_code == 2


def test_mlflow_artifact_bars_are_off_unless_the_user_asks(monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    client.Tracker("http://127.0.0.1:9").client  # noqa: B018 - creating the client is the point
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    client.Tracker("http://127.0.0.1:9").client  # noqa: B018
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


def test_mlflow_sends_no_telemetry_unless_the_user_asks(tmp_path):
    """Importing the tracking package turns MLflow's usage telemetry off before mlflow loads
    (a real import, in a clean process: pytest's and CI's variables would turn it off
    anyway); a user's explicit setting wins."""
    code = (
        "import vfsearch.adapters.tracking, mlflow\n"
        "from mlflow.telemetry import get_telemetry_client\n"
        "print(get_telemetry_client() is not None)"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}

    def telemetry_on(**extra: str) -> bool:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            encoding="utf-8",
            check=True,
            env={**env, **extra},
        )
        return out.stdout.strip().splitlines()[-1] == "True"

    assert not telemetry_on()
    assert telemetry_on(MLFLOW_DISABLE_TELEMETRY="false")
