"""Links into the MLflow 3.17 UI: an experiment's runs table, and a sweep's view of it.

The 3.17 UI opens an experiment on its GenAI overview, so every link points at the runs page
(``#/experiments/<id>/runs``, `runs_url`). It keeps the runs table's columns in the browser, so
`sweep_view` first stores the sweep's view as an experiment tag ``mlflow.sharedViewState.<key>``
(the UI's own saved-view format: the sweep's trials, sorted by the sweep metric, its metric,
parameter and status columns shown), which the page opens from ``?viewStateShareKey=<key>``.

Read from the installed UI bundle (mlflow/server/js/build/static/js): the runs page takes the
search facets searchFilter, orderByKey (``metrics.`name```), orderByAsc, startTime,
lifecycleFilter, modelVersionFilter and datasetsFilter from the URL; the table's columns
(``selectedColumns``) are UI state kept in the browser, and a metric column is shown only if
it is selected. ``?viewStateShareKey=K`` (alone: any facet in the URL wins over it) loads
facets and UI state from the experiment tag ``mlflow.sharedViewState.K``: a saved-view
envelope {name, createdAt, updatedAt, state: JSON text} (or bare JSON). Sorting by a metric
(or filtering) lists nested runs flat, so every trial is a visible row: none hides under a
collapsed parent (``runsExpanded`` is not carried by a shared view).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from vfsearch.adapters.tracking.client import Tracker
from vfsearch.adapters.tracking.schema import (
    DEFAULT_EXPERIMENT,
    DEFAULT_METRIC,
    EPOCH_METRIC,
    PARENT_RUN_TAG,
    SHARED_VIEW_TAG,
    STATUS_TAG,
)
from vfsearch.adapters.tracking.server import DEFAULT_WORKDIR, tracking_uri

if TYPE_CHECKING:
    from vfsearch.adapters.search_space import SearchSpace

SHARE_KEY_PARAM = "viewStateShareKey"
MAX_VIEW_COLUMNS = 40


def runs_url(uri: str, experiment_id: str) -> str:
    """Browser link to the runs table of an experiment (3.17 opens on a GenAI overview)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"


def ui_url(
    workdir: str | os.PathLike[str] = DEFAULT_WORKDIR,
    *,
    port: int | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """``vfsearch ui``: the URL to open (the runs table of ``experiment`` when it exists).

    Uses ``$MLFLOW_TRACKING_URI`` when set, else starts or finds the embedded server.
    """
    uri = tracking_uri(workdir, port=port)
    try:
        exp = Tracker(uri).get_experiment_by_name(experiment, attempts=2)
    except Exception:  # noqa: BLE001 - the bare URL is still worth printing
        exp = None
    return runs_url(uri, exp.experiment_id) if exp is not None else uri


def metric_column(metric: str) -> str:
    """The runs table's key of a metric column (also its sort key): ``metrics.`name```."""
    return f"metrics.`{metric}`"


def sweep_filter(parent_run_id: str) -> str:
    """MLflow search filter selecting the nested runs (trials) of a sweep's parent run."""
    return f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'"


def sweep_view_state(
    metric: str,
    *,
    parent_run_id: str,
    mode: str = "max",
    metrics: Sequence[str] = (),
    params: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The runs-table state of a sweep: its trials (children of ``parent_run_id``), best first
    by ``metric`` (``mode`` max: descending), with the columns of ``metric``, ``metrics``,
    ``params`` and ``tags`` shown (at most `MAX_VIEW_COLUMNS`)."""
    columns = [metric_column(m) for m in dict.fromkeys([metric, *metrics])]
    columns += [f"params.`{p}`" for p in dict.fromkeys(params)]
    columns += [f"tags.`{t}`" for t in dict.fromkeys(tags)]
    return {
        "searchFilter": sweep_filter(parent_run_id),
        "orderByKey": metric_column(metric),
        "orderByAsc": mode == "min",
        "selectedColumns": columns[:MAX_VIEW_COLUMNS],
        "runsHiddenMode": "SHOW_ALL",
    }


def sweep_url(
    uri: str,
    experiment_id: str,
    metric: str,
    *,
    parent_run_id: str | None = None,
    mode: str = "max",
    share_key: str | None = None,
) -> str:
    """Browser link to an experiment's runs table sorted by ``metric`` (best first by
    ``mode``), filtered to the trials of ``parent_run_id`` when given. With ``share_key`` (a
    view stored by `share_view`): the link that opens that view, columns included."""
    base = runs_url(uri, experiment_id)
    if share_key:
        return f"{base}?{SHARE_KEY_PARAM}={quote(share_key, safe='')}"
    query = {
        "orderByKey": metric_column(metric),
        "orderByAsc": "true" if mode == "min" else "false",
    }
    if parent_run_id:
        query["searchFilter"] = sweep_filter(parent_run_id)
    return f"{base}?{urlencode(query, quote_via=quote)}"


def share_view(
    tracker: Tracker, experiment_id: str, key: str, name: str, state: Mapping[str, Any]
) -> None:
    """Store ``state`` as the saved view ``key`` (titled ``name``) of an experiment, in the
    3.17 UI's format (it also lists it among the experiment's saved views)."""
    now = int(time.time() * 1000)
    value = json.dumps(
        {
            "name": name,
            "createdAt": now,
            "updatedAt": now,
            "state": json.dumps(dict(state), separators=(",", ":")),
        },
        separators=(",", ":"),
    )
    tracker.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, value, attempts=3)


def sweep_view(
    uri: str,
    parent_run_id: str,
    name: str,
    space: SearchSpace | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    mode: str = "max",
) -> str:
    """Store the runs-table view of a sweep and return the link that opens it.

    ``space``: the sweep's `vfsearch.adapters.search_space.SearchSpace` (its objectives give
    the sort metric and mode and the metric columns, its sampled keys the parameter columns);
    without it ``metric``/``mode``. When the view cannot be stored the link still sorts and
    filters (`sweep_url` without a key); when the run cannot be read, the bare ``uri``.
    """
    objectives = tuple(getattr(space, "objectives", ())) or ((metric, mode),)
    metric, mode = objectives[0]
    extra = [m for m, _ in objectives[1:]] + [getattr(space, "scheduler_metric", EPOCH_METRIC)]
    params = [p.key for p in getattr(space, "params", ())]
    tracker = Tracker(uri)
    try:
        exp_id = tracker.get_run(parent_run_id, attempts=3).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is never worth failing a finished sweep
        return uri
    key = f"vfsearch-sweep-{parent_run_id}"
    state = sweep_view_state(
        metric,
        parent_run_id=parent_run_id,
        mode=mode,
        metrics=extra,
        params=params,
        tags=[STATUS_TAG],
    )
    try:
        share_view(tracker, exp_id, key, f"sweep {name}: trials by {metric}", state)
    except Exception:  # noqa: BLE001 - sorted and filtered, default columns
        return sweep_url(uri, exp_id, metric, parent_run_id=parent_run_id, mode=mode)
    return sweep_url(uri, exp_id, metric, share_key=key)


__all__ = [
    "MAX_VIEW_COLUMNS",
    "SHARE_KEY_PARAM",
    "metric_column",
    "runs_url",
    "share_view",
    "sweep_filter",
    "sweep_url",
    "sweep_view",
    "sweep_view_state",
    "ui_url",
]
