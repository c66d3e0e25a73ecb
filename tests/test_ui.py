"""`vfsearch ui`: the MLflow server and the Optuna dashboard, and the link to a sweep's runs.

The links are checked the way a person sees them: headless Chromium loads each page, runs its
scripts against the real servers (a virtual time budget lets the fetches finish) and dumps the
rendered DOM, which must hold the sweep's trials, not an empty application shell.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from vfsearch.adapters import tracking
from vfsearch.adapters.tracking.schema import SHARED_VIEW_TAG
from vfsearch.cli import app

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed at /usr/bin/chromium (.ci/run installs it: "
    "apt-get install -y chromium)",
)


def chromium(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run headless Chromium once with a fresh profile, quiet on the network (no background
    fetches, updates or sync: nothing outside 127.0.0.1 is reachable here)."""
    with tempfile.TemporaryDirectory(prefix="vfsearch-chromium-") as profile:
        size = (
            [] if any(a.startswith("--window-size=") for a in args) else ["--window-size=1400,1000"]
        )
        cmd = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *size,
            *args,
        ]
        return subprocess.run(
            cmd,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
            check=False,
        )


def dump_dom(url: str, budget_ms: int = 20000) -> str:
    out = chromium(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


# -- the URL (pure) ----------------------------------------------------------------------------


def test_sweep_url_sorts_filters_or_opens_a_stored_view():
    url = tracking.sweep_url("http://h:1/", "7", "val_dice3d", parent_run_id="ab" * 16)
    base, _, query = url.partition("?")
    assert base == "http://h:1/#/experiments/7/runs"
    fields = dict(kv.split("=", 1) for kv in query.split("&"))
    assert unquote(fields["orderByKey"]) == "metrics.`val_dice3d`"
    assert fields["orderByAsc"] == "false"
    assert unquote(fields["searchFilter"]) == f"tags.`mlflow.parentRunId` = '{'ab' * 16}'"
    assert "orderByAsc=true" in tracking.sweep_url("http://h:1", "7", "loss", mode="min")
    assert (
        tracking.sweep_url("http://h:1", "7", "val_dice3d", share_key="k-1")
        == "http://h:1/#/experiments/7/runs?viewStateShareKey=k-1"
    )


def test_sweep_view_state_names_the_columns_to_show():
    state = tracking.sweep_view_state(
        "val_dice3d",
        parent_run_id="p" * 32,
        metrics=["val_dice3d", "val_dice"],
        params=["train.lr"],
        tags=["vfsearch.status"],
    )
    assert state["orderByKey"] == "metrics.`val_dice3d`" and state["orderByAsc"] is False
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{'p' * 32}'"
    assert state["selectedColumns"] == [
        "metrics.`val_dice3d`",
        "metrics.`val_dice`",
        "params.`train.lr`",
        "tags.`vfsearch.status`",
    ]
    assert "runsExpanded" not in state  # a shared view never carries it (the UI drops it)


def test_no_dashboard_recorded(tmp_path):
    assert tracking.find_dashboard(tmp_path) is None
    assert tracking.stop_dashboard(tmp_path) is False
    assert not tracking.dashboard_healthy("http://127.0.0.1:9")
    assert tracking.optuna_storage(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"


@pytest.mark.integration
def test_dashboard_starts_before_any_sweep_and_is_found_again(tmp_path):
    """optuna-dashboard does not create tables: on a fresh folder vfsearch creates the empty
    study storage first, so `vfsearch ui` works before the first sweep."""
    import urllib.request

    workdir = tmp_path / "mlruns"
    info = tracking.ensure_dashboard(workdir)
    try:
        assert info.url.startswith("http://127.0.0.1:") and tracking.dashboard_healthy(info.url)
        with urllib.request.urlopen(info.url + "/api/studies", timeout=10) as resp:
            assert json.loads(resp.read()) == {"study_summaries": []}
        assert tracking.ensure_dashboard(workdir) == info  # reused, not a second process
        assert json.loads((workdir / "dashboard.json").read_text())["pid"] == info.pid
    finally:
        stopped = tracking.stop_dashboard(workdir)
    assert stopped and not tracking.dashboard_healthy(info.url)
    assert tracking.find_dashboard(workdir) is None and (workdir / "optuna.db").is_file()


# -- a real sweep, both servers, a real browser ------------------------------------------------


@pytest.fixture(scope="module")
def ui_sweep(tmp_path_factory, small_store, mlflow_server, ray_local):
    """2 trials of 1 epoch, two sampled parameters; the study in the sweep's workdir."""
    from sweeps import write_space

    from vfsearch.pipelines.tune import tune

    tmp = tmp_path_factory.mktemp("ui_sweep")
    space = write_space(
        tmp,
        epochs=1,
        grace=1,
        params=(
            "  model.temporal: {type: categorical, choices: [lstm, none]}\n"
            "  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"
        ),
    )
    summary = tune(
        small_store,
        space,
        num_samples=2,
        name="uisweep",
        seed=0,
        workdir=tmp,
        storage=tmp / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=1,
        cpus_per_worker=0.5,
    )
    return summary, tmp


@pytest.mark.integration
@pytest.mark.slow
def test_tune_prints_the_sweep_view(ui_sweep, mlflow_server):
    from sweeps import children

    summary, _ = ui_sweep
    client, parent, _ = children(mlflow_server, "uisweep")
    key = f"vfsearch-sweep-{parent.info.run_id}"
    assert (
        f"MLflow runs: {mlflow_server}/#/experiments/{parent.info.experiment_id}/runs?"
        f"viewStateShareKey={key}" in str(summary)
    )
    tag = client.get_experiment(parent.info.experiment_id).tags[SHARED_VIEW_TAG + key]
    view = json.loads(tag)
    state = json.loads(view["state"])
    assert view["name"] == "sweep uisweep: trials by val_dice3d"
    assert state["orderByKey"] == "metrics.`val_dice3d`" and state["orderByAsc"] is False
    assert {"metrics.`val_dice3d`", "params.`model.temporal`", "params.`loss.dice_weight`"} <= set(
        state["selectedColumns"]
    )


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
def test_ui_serves_both_dashboards_with_the_sweeps_trials(ui_sweep, mlflow_server, monkeypatch):
    from sweeps import children

    _, workdir = ui_sweep
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["ui", "--workdir", str(workdir), "--sweep", "uisweep"])
        assert res.exit_code == 0, res.output
        lines = dict(line.split(": ", 1) for line in res.output.strip().splitlines())
        board = tracking.find_dashboard(workdir)
        assert board is not None and lines["Optuna dashboard"].strip() == f"{board.url}/dashboard"
        recorded = json.loads((workdir / "dashboard.json").read_text())
        assert (
            recorded["pid"] == board.pid
            and recorded["storage"] == f"sqlite:///{workdir.resolve() / 'optuna.db'}"
        )
        # found again, not started twice
        again = runner.invoke(app, ["ui", "--workdir", str(workdir)])
        assert again.exit_code == 0 and tracking.find_dashboard(workdir) == board

        # MLflow: the sweep's trials, sorted by the sweep metric, its column shown
        _, parent, kids = children(mlflow_server, "uisweep")
        ranked = sorted(kids, key=lambda c: -c.data.metrics.get("val_dice3d", -1.0))
        dom = dump_dom(lines["sweep uisweep in MLflow"])
        for kid in kids:
            assert kid.info.run_name in dom, f"trial {kid.info.run_name} not rendered"
        assert 'col-id="metrics.`val_dice3d`"' in dom, "the sweep metric's column is hidden"
        assert 'col-id="params.`model.temporal`"' in dom
        if ranked[0].data.metrics.get("val_dice3d") != ranked[1].data.metrics.get("val_dice3d"):
            assert dom.index(ranked[0].info.run_name) < dom.index(ranked[1].info.run_name)

        # Optuna dashboard: the study and its trials
        study = lines["sweep uisweep in the Optuna dashboard"].strip()
        assert study.startswith(f"{board.url}/dashboard/studies/")
        dom = dump_dom(study)  # the study's page: its history figure drawn by plotly
        assert "uisweep (id=" in dom and 'class="main-svg"' in dom
        dom = dump_dom(study + "/trials")  # Trials (List): one entry per trial
        assert "uisweep (id=" in dom and "2 Trials" in dom
        assert "Trial 0" in dom and "Trial 1" in dom and "Complete" in dom
    finally:
        stop = runner.invoke(app, ["ui", "--workdir", str(workdir), "--stop"])
    assert stop.exit_code == 0 and "stopped the Optuna dashboard" in stop.output
    assert tracking.find_dashboard(workdir) is None and not (workdir / "dashboard.json").exists()
    assert tracking.is_healthy(mlflow_server)  # the team server ($MLFLOW_TRACKING_URI) is not ours
