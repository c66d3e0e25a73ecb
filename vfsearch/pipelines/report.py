"""What people look at: the dashboards (``vfsearch ui``) and a sweep's report
(``vfsearch report``).

Dashboards (`ui`): the MLflow server of the working folder
(`vfsearch.adapters.tracking.ensure_server`, or ``$MLFLOW_TRACKING_URI``) and an Optuna dashboard
on the folder's study storage (``<workdir>/optuna.db``,
`vfsearch.adapters.tracking.ensure_dashboard`), both started or found again; with a sweep name,
the links to that sweep: its MLflow runs table (the trials, best first by the sweep metric,
metric and parameter columns shown: `vfsearch.adapters.tracking.sweep_view`) and its study's
page in the dashboard. `stop_ui` stops both.

The report (`write_report`): one self-contained HTML page (every script and picture inline,
nothing fetched when it is opened, so it can be mailed or archived) holding

* the ranked trials: the sweep's child runs in MLflow, best first by the sweep metric
  (trials without it, stopped early or failed, last), with their status and sampled values;
* Optuna's own figures of the study (``optuna.visualization``: optimisation history,
  parameter importances, parallel coordinates, contour of the two most important
  parameters) as plotly figures, plotly.js inlined once;
* the best trial: its training curves and the sweep's Dice against budget (drawn by
  `vfsearch.adapters.plots` from the MLflow histories, as ``vfsearch visualize --run`` draws
  them) and the pictures its run logged under ``visualisations/`` (heatmap and attention
  montages, 3D rendering), as base64 PNGs;
* the promotion decision: the registry versions exported from the sweep's trials (tags
  written by `vfsearch.pipelines.export`: metric, value, mode) and the aliases on them, or "not
  exported yet".

The page is also logged on the sweep's parent run under ``report/``. A figure that cannot be
drawn (too few finished trials, one sampled parameter, no pictures logged) is replaced by a
one-line reason, never by an error.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfsearch.adapters import plots as viz
from vfsearch.adapters import tracking
from vfsearch.adapters.search_space import SearchSpace, load_space
from vfsearch.adapters.tracking import DashboardInfo, Tracker
from vfsearch.adapters.tracking.schema import (
    BEST_PREFIX,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    DEFAULT_EXPERIMENT,
    DEFAULT_METRIC,
    EPOCH_KEY,
    EPOCH_METRIC,
    GIT_COMMIT_TAG,
    IMPORTANCES_FILE,
    MEMBERS_TAG,
    METRIC_MODE_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    SEARCH_SPACE_DIR,
    SPACE_FILE_TAG,
    STATUS_TAG,
    STORE_TAG,
    SWEEP_EXPERIMENT,
    SWEEP_TAG,
    TRIAL_TAG,
    VISUALISATIONS_DIR,
)
from vfsearch.core.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities import Run

DEFAULT_WORKDIR = Path("mlruns")
PICTURE_ORDER = ("heatmap_case", "attention_case", "render_3d")
MAX_PICTURES = 12


# -- finding a sweep -------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep as MLflow holds it: its parent run, trials (child runs) and search space."""

    name: str
    uri: str
    parent: Run
    children: list[Run]
    space: SearchSpace | None  # when its file was logged
    metric: str
    mode: str

    @property
    def parent_id(self) -> str:
        return self.parent.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.parent.info.experiment_id

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        return (
            tuple(self.space.objectives) if self.space is not None else ((self.metric, self.mode),)
        )

    @property
    def param_keys(self) -> list[str]:
        if self.space is not None:
            return [p.key for p in self.space.params]
        keys: dict[str, None] = {}
        for c in self.children:  # no space file: the parameters that vary between trials
            for k in c.data.params:
                if len({str(o.data.params.get(k)) for o in self.children}) > 1:
                    keys[k] = None
        return sorted(keys)


def find_sweep(tracker: Tracker, name: str) -> Sweep:
    """The newest sweep named ``name`` (parent run tagged ``vfsearch.sweep``) with its trials and
    the search space it logged; `UserError` when there is none."""
    parent_id = tracker.find_run(SWEEP_EXPERIMENT, SWEEP_TAG, name)
    if parent_id is None:
        raise UserError(
            f"--sweep: no sweep {name!r} in MLflow experiment {SWEEP_EXPERIMENT!r} at {tracker.uri}"
        )
    parent = tracker.get_run(parent_id)
    children = tracker.search_runs(
        [parent.info.experiment_id], tracking.sweep_filter(parent_id), max_results=5000
    )
    space = _logged_space(tracker, parent_id)
    if space is not None:
        metric, mode = space.metric, space.mode
    else:  # the tags the sweep's end wrote: best_<metric>
        best = [
            k[len(BEST_PREFIX) :]
            for k in parent.data.tags
            if k.startswith(BEST_PREFIX) and k not in (BEST_TRIAL_TAG, BEST_RUN_TAG)
        ]
        metric, mode = (best[0] if best else DEFAULT_METRIC), "max"
    return Sweep(
        name=name,
        uri=tracker.uri,
        parent=parent,
        children=list(children),
        space=space,
        metric=metric,
        mode=mode,
    )


def _logged_space(tracker: Tracker, parent_id: str) -> SearchSpace | None:
    """The search space file logged on the parent run (``search_space/``), parsed; or None."""
    try:
        items = tracker.list_artifacts(parent_id, SEARCH_SPACE_DIR, attempts=3)
        files = [a.path for a in items if not a.is_dir]
        if not files:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.download_artifacts(parent_id, files[0], tmp, attempts=3)
            return load_space(local)
    except Exception:  # noqa: BLE001 - an old or edited space file: fall back on the tags
        return None


# -- the dashboards --------------------------------------------------------------------------


@dataclass
class UiLinks:
    """What ``vfsearch ui`` prints."""

    mlflow: str
    optuna: str
    sweep: str | None = None
    sweep_mlflow: str | None = None
    sweep_optuna: str | None = None

    def __str__(self) -> str:
        lines = [f"MLflow:           {self.mlflow}", f"Optuna dashboard: {self.optuna}"]
        if self.sweep:
            lines.append(f"sweep {self.sweep} in MLflow: {self.sweep_mlflow}")
            lines.append(
                f"sweep {self.sweep} in the Optuna dashboard: "
                f"{self.sweep_optuna or '(no Optuna study of that name here)'}"
            )
        return "\n".join(lines)


def study_url(dashboard_url: str, storage: str, study: str) -> str | None:
    """The dashboard page of Optuna study ``study`` in ``storage``, or None if it is absent."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        return None
    import optuna

    try:
        study_id = optuna.storages.RDBStorage(storage).get_study_id_from_name(study)
    except Exception:  # noqa: BLE001 - KeyError when absent; a foreign file: no link either
        return None
    return f"{dashboard_url.rstrip('/')}/dashboard/studies/{study_id}"


def ui(
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    *,
    port: int | None = None,
    dashboard_port: int | None = None,
    sweep: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> UiLinks:
    """``vfsearch ui``: start or find the MLflow server (unless ``$MLFLOW_TRACKING_URI``) and
    the Optuna dashboard of ``workdir``; with ``sweep``, also that sweep's two links."""
    mlflow_url = tracking.ui_url(workdir, port=port, experiment=experiment)
    board: DashboardInfo | None
    try:
        board = tracking.ensure_dashboard(workdir, port=dashboard_port)
    except UserError as exc:  # MLflow's link is still worth printing
        if dashboard_port:
            raise
        board = None
        links = UiLinks(mlflow=mlflow_url, optuna=f"(not started: {exc})")
    else:
        links = UiLinks(mlflow=mlflow_url, optuna=f"{board.url}/dashboard")
    if sweep:
        uri = tracking.tracking_uri(workdir)
        found = find_sweep(Tracker(uri), sweep)
        links.sweep = sweep
        links.sweep_mlflow = tracking.sweep_view(
            uri, found.parent_id, sweep, found.space, metric=found.metric, mode=found.mode
        )
        links.sweep_optuna = study_url(board.url, board.storage, sweep) if board else None
    return links


def stop_ui(workdir: str | os.PathLike = DEFAULT_WORKDIR) -> str:
    """``vfsearch ui --stop``: stop the MLflow server and the Optuna dashboard of ``workdir``."""
    server = tracking.stop_server(workdir)
    board = tracking.stop_dashboard(workdir)
    return "\n".join(
        [
            f"stopped the MLflow server of {workdir}"
            if server
            else f"no MLflow server running for {workdir}",
            f"stopped the Optuna dashboard of {workdir}"
            if board
            else f"no Optuna dashboard running for {workdir}",
        ]
    )


# -- the ranked trials -----------------------------------------------------------------------


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rank_rows(
    rows: Sequence[dict[str, Any]], metric: str, mode: str = "max"
) -> list[dict[str, Any]]:
    """Rows best first by ``metric`` (``mode`` max: higher first); rows without a finite value
    last, in their given order (ties keep their order too)."""
    sign = -1.0 if mode == "max" else 1.0
    indexed = list(enumerate(rows))
    indexed.sort(
        key=lambda ir: (
            (0, sign * ir[1][metric], ir[0]) if _finite(ir[1].get(metric)) else (1, 0.0, ir[0])
        )
    )
    return [r for _, r in indexed]


def trial_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per trial (child run), ranked: trial, run, status, objectives, val_dice, epochs
    and the sampled values."""
    rows = []
    for c in sorted(sweep.children, key=lambda c: c.info.start_time or 0):
        m, tags = c.data.metrics, c.data.tags
        row: dict[str, Any] = {
            "trial": tags.get(TRIAL_TAG) or c.info.run_name,
            "run_name": c.info.run_name,
            "run_id": c.info.run_id,
            "status": tags.get(STATUS_TAG) or c.info.status.lower(),
        }
        for name, _ in sweep.objectives:
            row[name] = m.get(name)
        row["val_dice"] = m.get(EPOCH_METRIC)
        row["epochs"] = int(m[EPOCH_KEY]) if _finite(m.get(EPOCH_KEY)) else None
        row["params"] = {k: c.data.params.get(k) for k in sweep.param_keys}
        rows.append(row)
    return rank_rows(rows, sweep.metric, sweep.mode)


# -- Optuna's figures ------------------------------------------------------------------------


@dataclass
class Figure:
    """One figure of the page: ``fig`` (a plotly figure) or ``png`` (bytes), else ``note``
    saying why it is missing."""

    key: str
    title: str
    fig: Any = None
    png: bytes | None = None
    note: str = ""
    caption: str = ""


def load_study(storage: str, name: str) -> tuple[Any | None, str]:
    """(study, "") or (None, why not) for Optuna study ``name`` in ``storage``."""
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file():
        return None, f"no Optuna storage at {storage[len('sqlite:///') :]}"
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage), ""
    except KeyError:
        return None, f"no Optuna study named {name!r} in {storage}"
    except Exception as exc:  # noqa: BLE001 - an unreadable file: say so on the page
        return None, f"{storage}: {type(exc).__name__}: {exc}"


def optuna_figures(
    study: Any, metric: str, *, logged_importances: dict[str, float] | None = None
) -> list[Figure]:
    """Optuna's optimisation history, parameter importances, parallel coordinates and contour
    of the two most important parameters of ``study`` (the first objective of a
    multi-objective study, named ``metric``)."""
    import optuna
    from optuna import visualization as ov

    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    # Optuna's default importance evaluator ranks a value to minimise (as
    # vfsearch.pipelines.tune does)
    maximise = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    imp_target = (lambda t: (-1.0 if maximise else 1.0) * t.values[0]) if multi else None
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    names = sorted({k for t in done for k in t.params})
    figures = []

    def attempt(key: str, title: str, draw, needs: str = "") -> None:
        if needs:
            figures.append(Figure(key, title, note=needs))
            return
        try:
            with warnings.catch_warnings():  # the sign of imp_target is deliberate
                warnings.simplefilter("ignore")
                fig = draw()
            fig.update_layout(title=title, height=460, margin={"t": 60})
            figures.append(Figure(key, title, fig=fig))
        except Exception as exc:  # noqa: BLE001 - too few trials or distinct values
            figures.append(Figure(key, title, note=f"not drawn: {str(exc).splitlines()[0]}"))

    attempt(
        "history",
        f"Optimisation history ({metric})",
        lambda: ov.plot_optimization_history(study, target=target, target_name=metric),
        "" if done else "no finished trial",
    )
    importances: dict[str, float] = {}
    if len(done) >= 2 and names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = {
                    k: float(v)
                    for k, v in optuna.importance.get_param_importances(
                        study, target=imp_target
                    ).items()
                }
        except Exception:  # noqa: BLE001 - fall back on what the sweep logged
            importances = dict(logged_importances or {})
    attempt(
        "importances",
        f"Parameter importances ({metric})",
        lambda: ov.plot_param_importances(study, target=imp_target, target_name=metric),
        ""
        if len(done) >= 2 and names
        else "needs at least two finished trials with sampled parameters",
    )
    attempt(
        "parallel",
        f"Parallel coordinates ({metric})",
        lambda: ov.plot_parallel_coordinate(study, target=target, target_name=metric),
        "" if done and names else "no finished trial with sampled parameters",
    )
    ranked = [k for k, _ in sorted(importances.items(), key=lambda kv: -kv[1]) if k in names]
    top = (ranked + [n for n in names if n not in ranked])[:2]
    attempt(
        "contour",
        f"Contour of {' and '.join(top) or 'the two most important parameters'} ({metric})",
        lambda: ov.plot_contour(study, params=top, target=target, target_name=metric),
        ""
        if len(top) == 2 and len(done) >= 2
        else "needs two sampled parameters and at least two finished trials",
    )
    return figures


# -- the best trial --------------------------------------------------------------------------


def _png(path: str | os.PathLike) -> bytes:
    return Path(path).read_bytes()


def curve_figures(
    tracker: Tracker, sweep: Sweep, best: dict[str, Any] | None, tmp: Path
) -> list[Figure]:
    """The best trial's training curves and the sweep's ``val_dice`` against budget, drawn by
    `vfsearch.adapters.plots` from the MLflow histories
    (`vfsearch.pipelines.visualize.run_history`/`sweep_data`)."""
    # here, not at the top: visualize imports torch, which `vfsearch ui` (this module) needs not
    from vfsearch.pipelines.visualize import run_history, sweep_data

    figures = []
    if best is not None:
        history = run_history(tracker, best["run_id"])
        # the per-epoch curves; the end-of-trial figures (one point each) and the raw
        # TP/FP/FN counts would only crowd the panels
        curves = {
            k: v
            for k, v in history.items()
            if len(v) > 1 and k != EPOCH_KEY and not k.endswith(("_tp", "_fp", "_fn"))
        }
        history = curves or history
        if history:
            figures.append(
                Figure(
                    "curves",
                    f"Training curves of trial {best['trial']}",
                    png=_png(
                        viz.plot_training_curves(
                            history,
                            tmp / "curves.png",
                            title=f"trial {best['trial']} ({best['run_name']})",
                        )
                    ),
                )
            )
        else:
            figures.append(Figure("curves", "Training curves", note="the run logged no metric"))
    trials, _ = sweep_data(tracker, sweep.parent_id, metric=EPOCH_METRIC)
    if trials:
        figures.append(
            Figure(
                "budget",
                "val_dice against budget, every trial",
                png=_png(viz.plot_budget(trials, tmp / "budget.png", metric=EPOCH_METRIC)),
            )
        )
    return figures


def _walk(tracker: Tracker, run_id: str, path: str, depth: int = 0) -> list[str]:
    out = []
    for item in tracker.list_artifacts(run_id, path, attempts=3):
        if item.is_dir:
            if depth < 3:
                out += _walk(tracker, run_id, item.path, depth + 1)
        else:
            out.append(item.path)
    return out


def _caption(stem: str) -> str:
    if stem == "heatmap_case":
        return "fracture probability over the CT through each flagged vertebra"
    if stem == "attention_case":
        return "attention-gate coefficients on the model's own slice (finest level first)"
    if stem == "render_3d":
        return "spine surface and predicted fracture regions, 4 views"
    kind, _, what = stem.partition("_")
    return f"{kind} of {what}" if what else stem


def picture_figures(tracker: Tracker, run_id: str, tmp: Path) -> tuple[list[Figure], list[str]]:
    """The pictures the run logged under ``visualisations/``: of the shallowest folder holding
    PNGs (the training-time case folder; `export` logs deeper ones), its case montages
    (heatmaps, attention, 3D rendering; else every PNG); and the names of what is left out."""
    try:
        files = [f for f in _walk(tracker, run_id, VISUALISATIONS_DIR) if f.endswith(".png")]
    except Exception:  # noqa: BLE001 - no artifacts at all
        files = []
    folders = sorted({f.rsplit("/", 1)[0] for f in files}, key=lambda d: (d.count("/"), d))
    if not folders:
        return [], []
    chosen = folders[0]
    pngs = [f for f in files if f.rsplit("/", 1)[0] == chosen]
    # the case montages already hold every flagged vertebra's row: its own files repeat them
    montages = [f for f in pngs if Path(f).stem in PICTURE_ORDER]
    others = [Path(f).name for f in pngs if f not in montages] if montages else []
    pngs = montages or pngs

    def order(p: str) -> tuple:
        stem = Path(p).stem
        return (PICTURE_ORDER.index(stem) if stem in PICTURE_ORDER else len(PICTURE_ORDER), stem)

    figures = []
    for path in sorted(pngs, key=order)[:MAX_PICTURES]:
        local = tracker.download_artifacts(run_id, path, tmp, attempts=3)
        stem = Path(path).stem
        figures.append(Figure(f"pic-{stem}", path, png=_png(local), caption=_caption(stem)))
    return figures, [f"{chosen}/{n}" for n in others] + folders[1:]


# -- the promotion decision ------------------------------------------------------------------


def promotion(tracker: Tracker, sweep: Sweep) -> dict[str, Any]:
    """The registry versions exported from the sweep's trials and the aliases of their models:
    ``{"versions": [{name, version, aliases, run_id, trial, metric, value, mode, created}],
    "aliases": {model: {alias: version}}}`` (empty lists: not exported yet)."""
    by_id = {c.info.run_id: c for c in sweep.children}
    ids = sorted(by_id)
    versions = []
    for i in range(0, len(ids), 100):
        chunk = ", ".join(f"'{r}'" for r in ids[i : i + 100])
        versions += tracker.search_model_versions(f"run_id IN ({chunk})", attempts=3)
    rows: list[dict[str, Any]] = []
    aliases: dict[str, dict[str, str]] = {}
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        tags = dict(v.tags or {})
        child = by_id.get(v.run_id)
        value: Any = tags.get(METRIC_VALUE_TAG)
        with contextlib.suppress(ValueError):
            value = float(value) if value is not None else None
        rows.append(
            {
                "name": v.name,
                "version": str(v.version),
                "aliases": sorted(getattr(v, "aliases", None) or []),
                "run_id": v.run_id,
                "trial": child.info.run_name if child else v.run_id,
                "metric": tags.get(METRIC_TAG),
                "value": value,
                "mode": tags.get(METRIC_MODE_TAG),
                "members": tags.get(MEMBERS_TAG, ""),
                "created": v.creation_timestamp,
            }
        )
        if v.name not in aliases:
            try:
                model = tracker.get_registered_model(v.name, attempts=3)
                aliases[v.name] = {a: str(ver) for a, ver in (model.aliases or {}).items()}
            except Exception:  # noqa: BLE001 - deleted meanwhile
                aliases[v.name] = {}
    for row in rows:  # a searched version may not list its aliases: the model's own do
        held = {a for a, ver in aliases.get(row["name"], {}).items() if ver == row["version"]}
        row["aliases"] = sorted(held | set(row["aliases"]))
    return {"versions": rows, "aliases": aliases}


def promotion_text(promo: dict[str, Any], sweep: str, metric: str) -> str:
    """One line: what the registry says about the sweep (the page's headline)."""
    versions = promo["versions"]
    if not versions:
        return (
            f"not exported yet (vfsearch export --sweep {sweep} --metric {metric} "
            f"promotes its best trial)"
        )
    held = [v for v in versions if v["aliases"]]
    if held:
        return "; ".join(
            f"promoted: models:/{v['name']}@{a} is version {v['version']} (trial "
            f"{v['trial']}, {v['metric']} {_num(v['value'])})"
            for v in held
            for a in v["aliases"]
        )
    parts = []
    for v in versions:
        now = promo["aliases"].get(v["name"], {})
        where = (
            ", ".join(f"@{a} is version {ver}" for a, ver in sorted(now.items())) or "no alias set"
        )
        parts.append(
            f"exported as {v['name']} version {v['version']} (trial {v['trial']}), "
            f"not promoted: {where}"
        )
    return "; ".join(parts)


# -- the page --------------------------------------------------------------------------------


def _num(v: Any) -> str:
    if _finite(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    return "-" if v is None else html.escape(str(v))


def _when(ms: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232b;
background:#fff}
header{background:#1f3a5f;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header a{color:#cfe3ff}main{padding:8px 28px 40px;max-width:1500px}
h2{border-bottom:2px solid #dbe3ec;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #dbe3ec;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f5f9}tr.best td{background:#eaf6ea;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#6b7480;font-style:italic}.decision{font-size:15px;padding:10px 14px;
border-left:4px solid #1f3a5f;background:#f2f5f9}.plot{margin:12px 0 24px}
figure{margin:12px 0 24px}figure img{max-width:100%;border:1px solid #dbe3ec}
figcaption{color:#4a5560;font-size:13px}.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px}
@media (max-width:1100px){.grid{grid-template-columns:1fr}}
"""


def render_html(
    *,
    sweep: Sweep,
    rows: list[dict[str, Any]],
    optuna_figs: list[Figure],
    optuna_note: str,
    curves: list[Figure],
    pictures: list[Figure],
    other_pictures: Sequence[str],
    promo: dict[str, Any],
    sweep_link: str,
    generated: float | None = None,
) -> str:
    """The report page: every script and picture inline (plotly.js once, PNGs as base64)."""
    e = html.escape
    parent = sweep.parent
    tags = parent.data.tags
    best = rows[0] if rows and _finite(rows[0].get(sweep.metric)) else None
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>vfsearch sweep {e(sweep.name)}</title><style>{_CSS}</style></head><body>",
    ]
    out.append(
        f"<header><h1>Sweep {e(sweep.name)}</h1><div>{len(rows)} trial(s): "
        + ", ".join(f"{n} {e(s)}" for s, n in sorted(statuses.items()))
        + f" &middot; ranked by <b>{e(sweep.metric)}</b> ({e(sweep.mode)})"
        + (
            f" &middot; best: trial {e(str(best['trial']))}, {e(sweep.metric)} "
            f"{_num(best[sweep.metric])}"
            if best
            else " &middot; no finished trial"
        )
        + "</div></header><main>"
    )
    # summary
    facts = [
        (
            "MLflow parent run",
            f"{e(parent.info.run_id)} ({e(parent.info.status)}, "
            f"experiment {e(sweep.experiment_id)})",
        ),
        ("MLflow runs table", f"<a href='{e(sweep_link)}'>{e(sweep_link)}</a>"),
        ("started / ended", f"{_when(parent.info.start_time)} / {_when(parent.info.end_time)}"),
        ("search space", e(tags.get(SPACE_FILE_TAG, "-"))),
        ("store", e(tags.get(STORE_TAG, "-"))),
        (
            "seed / sampler",
            f"{e(parent.data.params.get('sweep.seed', '-'))} / "
            f"{e(parent.data.params.get('sweep.sampler', '-'))}",
        ),
        ("git commit", e(tags.get(GIT_COMMIT_TAG, "-"))),
    ]
    out.append(
        "<h2 id='summary'>Summary</h2><table>"
        + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
        + "</table>"
    )
    out.append(
        f"<p class='decision' id='decision'>Promotion: "
        f"{e(promotion_text(promo, sweep.name, sweep.metric))}</p>"
    )
    # ranked trials
    objectives = [m for m, _ in sweep.objectives]
    cols = ["rank", "trial", "status", *objectives, "val_dice", "epochs", *sweep.param_keys]
    out.append(
        "<h2 id='trials'>Trials, best first</h2><table id='trials-table'><tr>"
        + "".join(f"<th>{e(c)}</th>" for c in cols)
        + "</tr>"
    )
    for i, r in enumerate(rows, 1):
        cells = [str(i), e(str(r["trial"])), e(r["status"])]
        cells += [_num(r.get(m)) for m in objectives]
        cells += [_num(r.get("val_dice")), _num(r.get("epochs"))]
        cells += [e(str(r["params"].get(k, "-"))) for k in sweep.param_keys]
        cls = " class='best'" if best is r else ""
        out.append(
            f"<tr{cls} title='{e(r['run_name'])} ({e(r['run_id'])})'>"
            + "".join(
                f"<td class='num'>{c}</td>" if j and c[:1].isdigit() else f"<td>{c}</td>"
                for j, c in enumerate(cells)
            )
            + "</tr>"
        )
    out.append("</table>")
    if not rows:
        out.append("<p class='note'>no trial logged a run</p>")
    # Optuna
    out.append("<h2 id='optuna'>Optuna's figures of the study</h2>")
    if optuna_note:
        out.append(f"<p class='note'>{e(optuna_note)}</p>")
    plotly_included = False
    for f in optuna_figs:
        if f.fig is None:
            out.append(f"<h3>{e(f.title)}</h3><p class='note' id='{f.key}'>{e(f.note)}</p>")
            continue
        out.append(
            f"<div class='plot' id='{f.key}'>"
            + f.fig.to_html(
                full_html=False,
                include_plotlyjs=not plotly_included,
                div_id=f"plot-{f.key}",
                config={"displaylogo": False, "responsive": True},
            )
            + "</div>"
        )
        plotly_included = True
    # best trial
    out.append(
        "<h2 id='best'>Best trial"
        + (f": {e(str(best['trial']))} ({e(best['run_name'])})" if best else "")
        + "</h2>"
    )
    if best is not None:
        params = (
            ", ".join(f"{e(k)} = {e(str(v))}" for k, v in best["params"].items())
            or "no sampled parameters"
        )
        out.append(
            f"<p>{e(sweep.metric)} {_num(best[sweep.metric])}; {params}; MLflow run "
            f"{e(best['run_id'])}</p>"
        )
    for f in curves:
        out.append(_figure_html(f))
    out.append("<h3 id='pictures'>Pictures logged by the best trial</h3>")
    if pictures:
        out.append(
            "<div class='grid'>"
            + "".join(_figure_html(f) for f in pictures if not f.key.endswith("render_3d"))
            + "</div>"
        )
        out += [_figure_html(f) for f in pictures if f.key.endswith("render_3d")]
        if other_pictures:
            out.append(
                "<p class='note'>also logged on that run (not shown): "
                + ", ".join(e(p) for p in other_pictures)
                + "</p>"
            )
    else:
        out.append(
            "<p class='note'>the best trial logged no pictures under visualisations/ "
            "(train.log_pictures off, or no finished trial)</p>"
        )
    # registry
    out.append("<h2 id='promotion'>Promotion decision</h2>")
    out.append(f"<p class='decision'>{e(promotion_text(promo, sweep.name, sweep.metric))}</p>")
    if promo["versions"]:
        out.append(
            "<table><tr><th>model</th><th>version</th><th>aliases</th><th>trial</th>"
            "<th>metric</th><th>value</th><th>mode</th><th>registered</th></tr>"
        )
        for v in promo["versions"]:
            out.append(
                "<tr>"
                + "".join(
                    f"<td>{c}</td>"
                    for c in (
                        e(v["name"]),
                        e(v["version"]),
                        e(", ".join(v["aliases"]) or "-"),
                        e(v["trial"]) + (" (ensemble)" if v["members"] else ""),
                        e(str(v["metric"] or "-")),
                        _num(v["value"]),
                        e(str(v["mode"] or "-")),
                        _when(v["created"]),
                    )
                )
                + "</tr>"
            )
        out.append("</table>")
        for name, al in sorted(promo["aliases"].items()):
            out.append(
                f"<p>aliases of {e(name)}: "
                + (
                    ", ".join(f"@{e(a)} &rarr; version {e(v)}" for a, v in sorted(al.items()))
                    or "none"
                )
                + "</p>"
            )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(generated or time.time()))
    out.append(f"<p class='note'>written by vfsearch report on {stamp}</p></main></body></html>")
    return "\n".join(out)


def _figure_html(f: Figure) -> str:
    e = html.escape
    if f.png is None:
        return f"<h3>{e(f.title)}</h3><p class='note' id='{f.key}'>{e(f.note)}</p>"
    data = base64.b64encode(f.png).decode("ascii")
    cap = e(f.title) + (f": {e(f.caption)}" if f.caption else "")
    return (
        f"<figure id='{e(f.key)}'><img alt='{e(f.title)}' "
        f"src='data:image/png;base64,{data}'><figcaption>{cap}</figcaption></figure>"
    )


# -- the command -----------------------------------------------------------------------------


@dataclass
class ReportSummary:
    path: str
    sweep: str
    trials: int
    best: str | None
    figures: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    promotion: str = ""
    artifact: str | None = None
    sweep_link: str = ""

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path}: sweep {self.sweep}, {self.trials} trial(s), best "
            f"{self.best or '-'}",
            f"figures: {', '.join(self.figures) or 'none'}",
        ]
        lines += [f"  not drawn: {m}" for m in self.missing]
        lines.append(f"promotion: {self.promotion}")
        if self.artifact:
            lines.append(f"logged on the sweep's parent run as {self.artifact}")
        lines.append(f"MLflow: {self.sweep_link}")
        return "\n".join(lines)


def write_report(
    sweep: str,
    out: str | os.PathLike,
    *,
    workdir: str | os.PathLike = DEFAULT_WORKDIR,
    mlflow_uri: str | None = None,
    log: bool = True,
) -> ReportSummary:
    """``vfsearch report``: write the self-contained page of sweep ``sweep`` to ``out`` (the
    module docstring says what it holds) and, with ``log``, log it on the sweep's parent run
    under ``report/``. ``mlflow_uri``: default ``$MLFLOW_TRACKING_URI`` or the embedded server
    of ``workdir``; the Optuna study is read from ``<workdir>/optuna.db``."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give the path of the .html file")
    uri = mlflow_uri or tracking.tracking_uri(workdir)
    tracker = Tracker(uri)
    found = find_sweep(tracker, sweep)
    rows = trial_rows(found)
    best = rows[0] if rows and _finite(rows[0].get(found.metric)) else None
    study, optuna_note = load_study(tracking.optuna_storage(workdir), sweep)
    logged = _logged_importances(tracker, found.parent_id)
    figs = optuna_figures(study, found.metric, logged_importances=logged) if study else []
    promo = promotion(tracker, found)
    link = tracking.sweep_view(
        uri, found.parent_id, sweep, found.space, metric=found.metric, mode=found.mode
    )
    with tempfile.TemporaryDirectory(prefix="vfsearch-report-") as tmp:
        curves = curve_figures(tracker, found, best, Path(tmp))
        pictures, others = picture_figures(tracker, best["run_id"], Path(tmp)) if best else ([], [])
        page = render_html(
            sweep=found,
            rows=rows,
            optuna_figs=figs,
            optuna_note=optuna_note,
            curves=curves,
            pictures=pictures,
            other_pictures=others,
            promo=promo,
            sweep_link=link,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".tmp-{out.name}")
    tmp_out.write_text(page, encoding="utf-8")
    os.replace(tmp_out, out)
    artifact = None
    if log:
        tracker.log_artifact(found.parent_id, out, "report")
        artifact = f"report/{out.name}"
    every = [*figs, *curves, *pictures]
    return ReportSummary(
        path=str(out),
        sweep=sweep,
        trials=len(rows),
        best=f"trial {best['trial']} ({found.metric} {_num(best[found.metric])})" if best else None,
        figures=[f.key for f in every if f.fig is not None or f.png is not None],
        missing=[f"{f.key}: {f.note}" for f in every if f.fig is None and f.png is None]
        + ([optuna_note] if optuna_note else []),
        promotion=promotion_text(promo, sweep, found.metric),
        artifact=artifact,
        sweep_link=link,
    )


def _logged_importances(tracker: Tracker, parent_id: str) -> dict[str, float]:
    """The parameter importances `vfsearch.pipelines.tune` logged on the parent run, or {}."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.download_artifacts(parent_id, IMPORTANCES_FILE, tmp, attempts=2)
            return {str(k): float(v) for k, v in json.loads(Path(local).read_text()).items()}
    except Exception:  # noqa: BLE001 - none logged (fewer than 2 finished trials)
        return {}


__all__ = [
    "Figure",
    "ReportSummary",
    "Sweep",
    "UiLinks",
    "find_sweep",
    "load_study",
    "optuna_figures",
    "promotion",
    "promotion_text",
    "rank_rows",
    "render_html",
    "stop_ui",
    "study_url",
    "trial_rows",
    "ui",
    "write_report",
]
