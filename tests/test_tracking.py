"""The MLflow adapter (vfsearch.adapters.tracking): embedded server lifecycle, URI resolution, logging
over HTTP, retries; and the ``train`` / ``ui`` commands' parsing."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from vfsearch.adapters import tracking
from vfsearch.cli import app
from vfsearch.core.errors import UserError


def test_env_uri_wins_and_file_stores_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(tmp_path / "never") == "http://tracking.example:5000"
    assert not (tmp_path / "never").exists()  # no local server was started
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri(tmp_path)


def test_retry_survives_connection_errors(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection refused")
        return "ok"

    assert tracking._retry(flaky) == "ok" and len(calls) == 3

    def broken():
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        tracking._retry(broken)


def test_retry_rides_out_a_server_restart_then_gives_up(monkeypatch):
    """Connection errors are retried for $VFSEARCH_TRACKING_RETRY_S seconds of backoff
    (1, 2, 4, 8, 15, 15 ... s), then the last error is raised."""
    clock = [0.0]
    monkeypatch.setattr(tracking.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tracking.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    monkeypatch.setenv(tracking.RETRY_ENV, "20")
    calls = []

    def down():
        calls.append(clock[0])
        raise ConnectionError("Connection refused")

    with pytest.raises(ConnectionError):
        tracking._retry(down)
    assert calls == [0.0, 1.0, 3.0, 7.0, 15.0]  # the next wait (15 s) would pass 20 s
    monkeypatch.setenv(tracking.RETRY_ENV, "300")
    calls.clear(), clock.__setitem__(0, 0.0)
    with pytest.raises(ConnectionError):
        tracking._retry(down)
    assert len(calls) == 24 and calls[-1] <= 300  # 15 s steps up to five minutes


def test_no_server_recorded(tmp_path):
    assert tracking.find_server(tmp_path) is None
    assert tracking.stop_server(tmp_path) is False
    assert not tracking.is_healthy("http://127.0.0.1:9")


def test_runs_url():
    assert tracking.runs_url("http://h:1/", "7") == "http://h:1/#/experiments/7/runs"


@pytest.mark.integration
@pytest.mark.slow
def test_embedded_server_lifecycle_and_ui(tmp_path, monkeypatch):
    """Started once under a lock (two concurrent callers get one server), reused while
    alive, data in the working folder, printed by ``vfsearch ui``, stopped by ``--stop``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workdir = tmp_path / "mlruns"
    infos: list[tracking.ServerInfo] = []
    threads = [threading.Thread(target=lambda: infos.append(
        tracking.ensure_server(workdir, timeout=240))) for _ in range(2)]
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
        run = tr.client.get_run(rid)
        assert run.data.params == {"model.depth": "3", "train.lr": "0.1"}
        assert run.data.metrics == {"val_dice": 0.5}
        # artifacts went over HTTP into the working folder's artifact root
        assert list((workdir / "artifacts").rglob("note.txt"))
        child = tr.start_run("lifecycle", "child", parent_run_id=rid)
        assert tr.client.get_run(child).data.tags["mlflow.parentRunId"] == rid

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
