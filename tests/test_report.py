"""`vfsearch report`: one self-contained page a person can share about a sweep.

Unit part: ranking, Optuna's figures of an in-memory study, the page's self-containment.
Integration part: a tiny real sweep (pictures on), the page written and logged on the parent
run, the promotion section before and after `vfsearch export`, and headless Chromium showing
that the figures actually render (plotly's SVG in the DOM, coloured pixels in a screenshot).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
from test_ui import chromium, needs_chromium
from typer.testing import CliRunner

from vfsearch.cli import app
from vfsearch.pipelines import report


def _study(params: int = 2, n: int = 8, directions=("maximize",)):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=list(directions), sampler=optuna.samplers.RandomSampler(seed=0)
    )

    def objective(trial):
        x = trial.suggest_float("train.lr", 1e-4, 1e-1, log=True)
        y = trial.suggest_categorical("model.temporal", ["lstm", "none"]) if params > 1 else "n"
        v = 0.5 - abs(x - 0.01) + (0.1 if y == "lstm" else 0.0)
        return v if len(directions) == 1 else (v, x * 1000)

    study.optimize(objective, n_trials=n)
    return study


def _fake_sweep(rows):
    info = SimpleNamespace(
        run_id="p" * 32,
        experiment_id="3",
        status="FINISHED",
        start_time=1_700_000_000_000,
        end_time=1_700_000_600_000,
    )
    parent = SimpleNamespace(
        info=info,
        data=SimpleNamespace(
            tags={"space_file": "space.yaml", "store": "s.zarr", "git_commit": "abc"},
            params={"sweep.seed": "0", "sweep.sampler": "tpe"},
        ),
    )
    space = SimpleNamespace(
        objectives=(("val_dice3d", "max"),),
        params=(SimpleNamespace(key="train.lr"), SimpleNamespace(key="model.temporal")),
    )
    return report.Sweep(
        name="demo<1>",
        uri="http://h:1",
        parent=parent,
        children=[],
        space=space,
        metric="val_dice3d",
        mode="max",
    )


def test_rank_rows_best_first_missing_last():
    rows = [
        {"k": "a", "m": 0.2},
        {"k": "b", "m": None},
        {"k": "c", "m": 0.7},
        {"k": "d", "m": float("nan")},
        {"k": "e", "m": 0.7},
    ]
    assert [r["k"] for r in report.rank_rows(rows, "m", "max")] == ["c", "e", "a", "b", "d"]
    assert [r["k"] for r in report.rank_rows(rows, "m", "min")] == ["a", "c", "e", "b", "d"]


def test_optuna_figures_of_a_study():
    figs = {f.key: f for f in report.optuna_figures(_study(), "val_dice3d")}
    assert list(figs) == ["history", "importances", "parallel", "contour"]
    assert all(f.fig is not None for f in figs.values()), {k: f.note for k, f in figs.items()}
    assert "train.lr" in figs["contour"].title and "model.temporal" in figs["contour"].title
    # one sampled parameter: no contour, and a reason instead of an error
    one = {f.key: f for f in report.optuna_figures(_study(params=1), "val_dice3d")}
    assert one["contour"].fig is None and "two sampled parameters" in one["contour"].note
    assert one["history"].fig is not None
    # multi-objective: drawn for the first objective
    multi = {
        f.key: f
        for f in report.optuna_figures(_study(directions=("maximize", "minimize")), "val_dice3d")
    }
    assert multi["history"].fig is not None and multi["contour"].fig is not None


def test_page_is_self_contained_and_holds_every_section():
    rows = [
        {
            "trial": "t1",
            "run_name": "s-t1",
            "run_id": "1" * 32,
            "status": "completed",
            "val_dice3d": 0.61,
            "val_dice": 0.5,
            "epochs": 2,
            "params": {"train.lr": 0.01, "model.temporal": "lstm"},
        },
        {
            "trial": "t0",
            "run_name": "s-t0",
            "run_id": "0" * 32,
            "status": "stopped early",
            "val_dice3d": None,
            "val_dice": 0.1,
            "epochs": 1,
            "params": {"train.lr": 0.05, "model.temporal": "none"},
        },
    ]
    png = report.Figure("curves", "Training curves", png=b"\x89PNG\r\n\x1a\nfake")
    page = report.render_html(
        sweep=_fake_sweep(rows),
        rows=rows,
        optuna_figs=report.optuna_figures(_study(), "m"),
        optuna_note="",
        curves=[png],
        pictures=[],
        other_pictures=[],
        promo={"versions": [], "aliases": {}},
        sweep_link="http://h:1/#/experiments/3/runs",
    )
    assert "<title>vfsearch sweep demo&lt;1&gt;</title>" in page  # escaped
    # plotly.js inlined exactly once, nothing loaded from elsewhere
    assert page.count("plotly.js v") >= 1
    assert len(re.findall(r"<script[^>]*\ssrc=", page)) == 0
    assert not re.search(r"<(link|img|iframe)[^>]*\s(href|src)=.https?:", page)
    assert page.count('class="plotly-graph-div"') == 4
    assert "data:image/png;base64," in page
    assert page.index("s-t1") < page.index("s-t0") and "class='best'" in page
    assert "not exported yet (vfsearch export --sweep demo&lt;1&gt;" in page
    assert "logged no pictures" in page


def test_promotion_text():
    none = {"versions": [], "aliases": {}}
    assert report.promotion_text(none, "s", "val_dice3d").startswith("not exported yet")
    v = {
        "name": "m",
        "version": "2",
        "aliases": ["champion"],
        "trial": "s-t1",
        "metric": "val_dice3d",
        "value": 0.61,
        "mode": "max",
        "members": "",
        "created": 0,
    }
    assert report.promotion_text(
        {"versions": [v], "aliases": {"m": {"champion": "2"}}}, "s", "val_dice3d"
    ) == ("promoted: models:/m@champion is version 2 (trial s-t1, val_dice3d 0.6100)")
    v = {**v, "aliases": []}
    assert report.promotion_text(
        {"versions": [v], "aliases": {"m": {"champion": "5"}}}, "s", "val_dice3d"
    ) == ("exported as m version 2 (trial s-t1), not promoted: @champion is version 5")


# -- a real sweep ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_sweep(tmp_path_factory, small_store, mlflow_server, ray_local):
    """2 trials of 2 epochs, pictures logged by each finished trial."""
    from sweeps import write_space

    from vfsearch.pipelines.tune import tune

    tmp = tmp_path_factory.mktemp("report_sweep")
    space = write_space(
        tmp,
        epochs=2,
        grace=2,
        fixed={"train.log_pictures": "true"},
        params=(
            "  model.temporal: {type: categorical, choices: [lstm, none]}\n"
            "  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"
        ),
    )
    summary = tune(
        small_store,
        space,
        num_samples=2,
        name="reportsweep",
        seed=1,
        workdir=tmp,
        storage=tmp / "ray",
        mlflow_uri=mlflow_server,
        max_concurrent=1,
        cpus_per_worker=0.5,
    )
    return summary, tmp


@pytest.mark.integration
@pytest.mark.slow
def test_report_of_a_real_sweep(report_sweep, mlflow_server, monkeypatch):
    from sweeps import children

    summary, workdir = report_sweep
    client, parent, kids = children(mlflow_server, "reportsweep")
    out = workdir / "report.html"
    result = report.write_report("reportsweep", out, workdir=workdir, mlflow_uri=mlflow_server)
    page = out.read_text(encoding="utf-8")
    best = summary.best
    assert best is not None and result.trials == 2
    for kid in kids:
        assert kid.info.run_name in page
    # ranked as the sweep ranked them
    names = {k.data.tags["vfsearch.trial_id"]: k.info.run_name for k in kids}
    first, second = summary.table[0], summary.table[1]
    if first["val_dice3d"] != second["val_dice3d"]:  # a tie may list either first
        assert page.index(names[first["trial_id"]]) < page.index(names[second["trial_id"]])
    assert {"history", "importances", "parallel", "contour", "curves", "budget"} <= set(
        result.figures
    ), result.missing
    # the best trial's own pictures, inline
    assert {"pic-heatmap_case", "pic-render_3d"} <= set(result.figures), result.missing
    assert page.count("data:image/png;base64,") >= 4
    assert len(re.findall(r"<script[^>]*\ssrc=", page)) == 0
    assert "not exported yet" in result.promotion
    # logged on the parent run
    logged = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert logged == ["report/report.html"]

    # export the best trial, then the CLI writes the page again with the decision
    from vfsearch.pipelines.export import export

    exported = export(
        sweep="reportsweep",
        name="report-test",
        onnx=False,
        mlflow_uri=mlflow_server,
        workdir=workdir,
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    res = CliRunner().invoke(
        app, ["report", "--sweep", "reportsweep", "--out", str(out), "--workdir", str(workdir)]
    )
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    line = (
        f"promoted: models:/report-test@champion is version {exported.version} (trial "
        f"{exported.run_name}"
    )
    assert line in res.output and line in page
    assert "<td>report-test</td>" in page


# After load, note where each figure landed (page coordinates) on <body>, for the screenshot.
_PROBE = """<script>addEventListener('load', () => setTimeout(() => {
const r = [...document.querySelectorAll('.plotly-graph-div, figure img')].map(e => {
  const b = e.getBoundingClientRect();
  return [e.id || e.alt, Math.round(b.left + scrollX), Math.round(b.top + scrollY),
          Math.round(b.width), Math.round(b.height)]; });
document.body.setAttribute('data-rects', JSON.stringify(r));
document.body.setAttribute('data-height', String(document.documentElement.scrollHeight));
}, 500))</script>"""


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
def test_report_figures_render_in_chromium(report_sweep, mlflow_server, tmp_path):
    """Chromium opens the page from disk (nothing else reachable), runs plotly and paints every
    figure: plotly's SVG in the DOM, and inked, coloured pixels where each figure sits in a
    screenshot of the whole page."""
    import html as html_mod
    import json

    from PIL import Image

    _, workdir = report_sweep
    out = tmp_path / "shared.html"
    report.write_report("reportsweep", out, workdir=workdir, mlflow_uri=mlflow_server, log=False)
    dom = chromium(
        "--hide-scrollbars", "--virtual-time-budget=15000", "--dump-dom", out.resolve().as_uri()
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    plots = re.findall(r'id="plot-(\w+)"', dom.stdout)
    assert set(plots) == {"history", "importances", "parallel", "contour"}
    assert dom.stdout.count('class="main-svg"') >= len(plots)  # plotly drew into every div

    probe = tmp_path / "probe.html"
    probe.write_text(
        out.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8"
    )
    dom = chromium(
        "--hide-scrollbars", "--virtual-time-budget=15000", "--dump-dom", probe.resolve().as_uri()
    )
    found = re.search(r'data-rects="([^"]*)"', dom.stdout)
    assert found, dom.stdout[-2000:]
    rects = json.loads(html_mod.unescape(found.group(1)))
    height = int(re.search(r'data-height="(\d+)"', dom.stdout).group(1))
    names = [r[0] for r in rects]
    assert {"plot-history", "plot-importances", "plot-parallel", "plot-contour"} <= set(names)
    assert any("render_3d" in n for n in names) and any("heatmap_case" in n for n in names)
    assert any("Training curves" in n for n in names)

    shot = tmp_path / "page.png"  # the whole page in one window: no scrolling, same layout
    res = chromium(
        "--hide-scrollbars",
        f"--window-size=1400,{height}",
        "--virtual-time-budget=15000",
        f"--screenshot={shot}",
        probe.resolve().as_uri(),
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, height)
    page = np.asarray(img).astype(int)
    for name, x, y, w, h in rects:
        assert w > 100 and h > 100, (name, w, h)
        px = page[y : y + h, x : x + w]
        inked = float((px.min(axis=2) < 245).mean())
        coloured = int((px.max(axis=2) - px.min(axis=2) > 60).sum())
        assert inked > 0.02, f"{name}: blank ({inked:.1%} non-white)"
        assert coloured > 300, f"{name}: no coloured marks ({coloured} pixels)"
