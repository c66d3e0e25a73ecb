"""MLflow adapter: the only vfsearch package that imports mlflow (tests aside).

* `server`: the detached servers of a working folder: the embedded ``mlflow server`` every
  process logs to over HTTP (`tracking_uri`, `ensure_server`...) and the Optuna dashboard
  beside it (`ensure_dashboard`...);
* `client`: `Tracker`, every MLflow client call vfsearch makes, each retried while a server
  restarts;
* `views`: links into the MLflow UI (`runs_url`, `sweep_url`, `sweep_view`...);
* `registry`: the Model Registry calls of export and predict;
* `schema`: every tag, experiment, artifact and metric name vfsearch stores in MLflow;
* `pyfunc`: the pyfunc model of an export bundle.

Importing this package imports no mlflow (nor `registry` and `pyfunc`): the calls do.

It does set one MLflow default for the process and the servers it starts, before anything
here imports mlflow: no usage telemetry (``MLFLOW_DISABLE_TELEMETRY``). MLflow 3 otherwise
sends usage records from every process that imports it (each trial's too), and writes an
installation id under the home folder; a platform for patients' scans sends nothing
anywhere unless asked. A user's explicit setting wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from vfsearch.adapters.tracking.client import Tracker
from vfsearch.adapters.tracking.schema import ENV_URI, SHARED_VIEW_TAG
from vfsearch.adapters.tracking.server import (
    DEFAULT_WORKDIR,
    ENV_PORT,
    DashboardInfo,
    ServerInfo,
    dashboard_healthy,
    ensure_dashboard,
    ensure_server,
    find_dashboard,
    find_server,
    is_healthy,
    optuna_storage,
    stop_dashboard,
    stop_server,
    tracking_uri,
)
from vfsearch.adapters.tracking.views import (
    metric_column,
    runs_url,
    share_view,
    sweep_filter,
    sweep_url,
    sweep_view,
    sweep_view_state,
    ui_url,
)

__all__ = [
    "ENV_URI",
    "ENV_PORT",
    "DEFAULT_WORKDIR",
    "ServerInfo",
    "Tracker",
    "ensure_server",
    "find_server",
    "is_healthy",
    "runs_url",
    "stop_server",
    "tracking_uri",
    "ui_url",
    "DashboardInfo",
    "dashboard_healthy",
    "ensure_dashboard",
    "find_dashboard",
    "metric_column",
    "optuna_storage",
    "share_view",
    "stop_dashboard",
    "sweep_filter",
    "sweep_url",
    "sweep_view",
    "sweep_view_state",
    "SHARED_VIEW_TAG",
]
