"""MLflow adapter: the embedded tracking server and run logging over HTTP.

The only vfsearch module that imports mlflow (tests aside).

Where runs go. `tracking_uri` returns ``$MLFLOW_TRACKING_URI`` when it is set (a team server,
say); otherwise it makes sure that one local ``mlflow server`` runs for the working folder
(default ``./mlruns``) and returns its ``http://127.0.0.1:<port>`` URL. Every process (the
CLI, Ray workers, Tune trial drivers) then logs over HTTP to that one server: MLflow 3.17
rejects ``file:`` stores, and many processes opening one SQLite file directly hit "database
is locked" and migration races.

The embedded server's lifecycle:

* started on first need (`ensure_server`: ``vfsearch train``, ``vfsearch ui``...), detached
  from the starting process (its own session), so it outlives the command;
* its data lives in the working folder: ``mlflow.db`` (SQLite: experiments, runs, params,
  metrics), ``artifacts/`` (served over HTTP by the server itself), ``server.json`` (URL, pid,
  port), ``server.log``;
* reused while alive: ``server.json`` names it and ``GET /health`` confirms it; a file lock
  (``server.lock``) keeps two processes from starting two servers;
* stopped by `stop_server` (``vfsearch ui --stop``) or by ending its pid; the data stays and
  the next start picks it up.

The Optuna dashboard (`ensure_dashboard`, ``vfsearch ui``) lives the same way beside it: a
detached ``optuna-dashboard sqlite:///<workdir>/optuna.db`` on 127.0.0.1, recorded in
``dashboard.json`` (log ``dashboard.log``), found again through that file and ``GET /api/meta``,
stopped by `stop_dashboard` (``vfsearch ui --stop`` too).

The link to a sweep (`sweep_view`): MLflow 3.17's UI opens an experiment on its GenAI overview
and keeps the runs table's columns in the browser, so `sweep_url` points at the runs page
(``#/experiments/<id>/runs``) and `sweep_view` first stores the sweep's view as an experiment
tag ``mlflow.sharedViewState.<key>`` (the UI's own saved-view format: the sweep's trials, sorted
by the sweep metric, its metric, parameter and status columns shown), which the page opens
from ``?viewStateShareKey=<key>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from vfsearch.core.errors import AUTH, UNREACHABLE, UserError, classify, explain

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_PORT = "VFSEARCH_MLFLOW_PORT"
DEFAULT_WORKDIR = Path("mlruns")
HOST = "127.0.0.1"
T = TypeVar("T")


# -- the embedded server ------------------------------------------------------------------

@dataclass(frozen=True)
class ServerInfo:
    """A running embedded server: ``url`` (http://127.0.0.1:port), ``pid``, ``port``."""

    url: str
    pid: int
    port: int
    workdir: str


def _answers(url: str, path: str, timeout: float) -> bool:
    """True when ``GET <url><path>`` answers 200."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` (None if it is gone): a recorded pid may have been reused
    by an unrelated process after a reboot or crash, and that one must never be signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return [a.decode(errors="replace") for a in argv]


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <url>/health`` answers 200 (the MLflow server is up)."""
    return _answers(url, "/health", timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_mlflow_server(pid: int) -> bool:
    """True if ``pid`` still runs ``mlflow server`` (see `_cmdline`)."""
    argv = _cmdline(pid)
    names = [Path(a).name for a in argv or []]
    return "mlflow" in names and "server" in names


def _read_info(workdir: Path) -> ServerInfo | None:
    try:
        data = json.loads((workdir / "server.json").read_text())
        return ServerInfo(url=str(data["url"]), pid=int(data["pid"]), port=int(data["port"]),
                          workdir=str(data.get("workdir", workdir)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_server(workdir: str | Path = DEFAULT_WORKDIR) -> ServerInfo | None:
    """The embedded server of ``workdir`` if it is recorded, alive and healthy; else None."""
    info = _read_info(Path(workdir).resolve())
    if info is None or not _pid_alive(info.pid) or not is_healthy(info.url):
        return None
    return info


@contextlib.contextmanager
def _locked(workdir: Path, name: str = "server.lock") -> Iterator[None]:
    import fcntl

    with open(workdir / name, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((HOST, port)) == 0


def _mlflow_executable() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


def ensure_server(workdir: str | Path = DEFAULT_WORKDIR, *, port: int | None = None,
                  timeout: float = 120.0, workers: int = 1) -> ServerInfo:
    """Return the embedded server of ``workdir``, starting it first if none is running.

    ``port``: 0 or None picks ``$VFSEARCH_MLFLOW_PORT`` or else a free port. The server is a
    detached ``mlflow server`` with ``sqlite:///<workdir>/mlflow.db`` and artifacts served
    from ``<workdir>/artifacts``, bound to 127.0.0.1. Raises `UserError` if it does not come
    up within ``timeout`` seconds (its log is ``<workdir>/server.log``).
    """
    wd = Path(workdir).resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{workdir}: cannot create the tracking folder ({exc})") from None
    with _locked(wd):
        info = find_server(wd)
        if info is not None:
            return info
        stale = _read_info(wd)
        if stale is not None and _pid_alive(stale.pid) and _is_mlflow_server(stale.pid):
            # recorded process alive but not (yet) healthy: give it a moment, then replace it
            if _wait_healthy(stale.url, stale.pid, 30.0):
                return stale
            _terminate(stale.pid)
        port = port or int(os.environ.get(ENV_PORT, "0") or 0) or _free_port()
        if _port_in_use(port):
            raise UserError(f"--port: {port} is already in use by another program")
        url = f"http://{HOST}:{port}"
        cmd = _mlflow_executable() + [
            "server", "--host", HOST, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", f"sqlite:///{wd / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(wd / "artifacts"),
        ]
        log = open(wd / "server.log", "ab")
        try:
            # own session: the server outlives this command and is stopped as one group
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=str(wd))
        finally:
            log.close()
        info = ServerInfo(url=url, pid=proc.pid, port=port, workdir=str(wd))
        tmp = wd / "server.json.tmp"
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(wd / "server.json")
        if not _wait_healthy(url, proc.pid, timeout, proc):
            code = proc.poll()
            _terminate(proc.pid)
            (wd / "server.json").unlink(missing_ok=True)
            # the cause is in the server's log: its last line, usually the exception
            problem = (f"exited with code {code} while starting" if code is not None
                       else f"did not start within {timeout:.0f} s")
            raise UserError(f"{wd / 'server.log'}: the MLflow server {problem}"
                            f"{_log_cause(wd / 'server.log')}")
        return info


def _log_cause(log: Path) -> str:
    """`` (<last line of the log>)``, or nothing when the log says nothing."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((ln for ln in reversed(lines) if ln), "")
    return f" ({last[:200]})" if last else ""


def _wait_healthy(url: str, pid: int, timeout: float,
                  proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if proc is None and not _pid_alive(pid):
            return False
        if is_healthy(url, timeout=2.0):
            return True
        time.sleep(0.25)
    return False


def _terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group (it is the session leader), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if we started it in this process
            if not _pid_alive(pid):
                return
            time.sleep(0.1)


def stop_server(workdir: str | Path = DEFAULT_WORKDIR) -> bool:
    """Stop the embedded server of ``workdir``; True if one was running. Data is kept."""
    wd = Path(workdir).resolve()
    if not wd.is_dir():
        return False
    with _locked(wd):
        info = _read_info(wd)
        if info is None:
            return False
        running = _pid_alive(info.pid) and _is_mlflow_server(info.pid)
        if running:
            _terminate(info.pid)
        (wd / "server.json").unlink(missing_ok=True)
        return running


def tracking_uri(workdir: str | Path = DEFAULT_WORKDIR, *, port: int | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the URL of the embedded server (started once)."""
    env = os.environ.get(ENV_URI, "").strip()
    if env:
        if env.startswith("file:") or "://" not in env:
            raise UserError(f"{ENV_URI}: {env!r} is a file store, which MLflow 3.17 rejects; "
                            "unset it or point it to an http(s) server")
        return env
    return ensure_server(workdir, port=port).url


def runs_url(uri: str, experiment_id: str) -> str:
    """Browser link to the runs table of an experiment (3.17 opens on a GenAI overview)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs"


def ui_url(workdir: str | Path = DEFAULT_WORKDIR, *, port: int | None = None,
           experiment: str = "vfsearch") -> str:
    """``vfsearch ui``: the URL to open (the runs table of ``experiment`` when it exists).

    Uses ``$MLFLOW_TRACKING_URI`` when set, else starts or finds the embedded server.
    """
    uri = tracking_uri(workdir, port=port)
    try:
        exp = _retry(lambda: Tracker(uri).client.get_experiment_by_name(experiment), attempts=2)
    except Exception:  # noqa: BLE001 - the bare URL is still worth printing
        exp = None
    return runs_url(uri, exp.experiment_id) if exp is not None else uri


# -- the link to a sweep's runs (MLflow 3.17 UI) ------------------------------------------
# Read from the installed UI bundle (mlflow/server/js/build/static/js): the runs page takes the
# search facets searchFilter, orderByKey (``metrics.`name```), orderByAsc, startTime,
# lifecycleFilter, modelVersionFilter and datasetsFilter from the URL; the table's columns
# (``selectedColumns``) are UI state kept in the browser, and a metric column is shown only if
# it is selected. ``?viewStateShareKey=K`` (alone: any facet in the URL wins over it) loads
# facets and UI state from the experiment tag ``mlflow.sharedViewState.K``: a saved-view
# envelope {name, createdAt, updatedAt, state: JSON text} (or bare JSON). Sorting by a metric
# (or filtering) lists nested runs flat, so every trial is a visible row: none hides under a
# collapsed parent (``runsExpanded`` is not carried by a shared view).
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
MAX_VIEW_COLUMNS = 40


def metric_column(metric: str) -> str:
    """The runs table's key of a metric column (also its sort key): ``metrics.`name```."""
    return f"metrics.`{metric}`"


def sweep_filter(parent_run_id: str) -> str:
    """MLflow search filter selecting the nested runs (trials) of a sweep's parent run."""
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}'"


def sweep_view_state(metric: str, *, parent_run_id: str, mode: str = "max",
                     metrics: Sequence[str] = (), params: Sequence[str] = (),
                     tags: Sequence[str] = ()) -> dict[str, Any]:
    """The runs-table state of a sweep: its trials (children of ``parent_run_id``), best first
    by ``metric`` (``mode`` max: descending), with the columns of ``metric``, ``metrics``,
    ``params`` and ``tags`` shown (at most `MAX_VIEW_COLUMNS`)."""
    columns = [metric_column(m) for m in dict.fromkeys([metric, *metrics])]
    columns += [f"params.`{p}`" for p in dict.fromkeys(params)]
    columns += [f"tags.`{t}`" for t in dict.fromkeys(tags)]
    return {"searchFilter": sweep_filter(parent_run_id), "orderByKey": metric_column(metric),
            "orderByAsc": mode == "min", "selectedColumns": columns[:MAX_VIEW_COLUMNS],
            "runsHiddenMode": "SHOW_ALL"}


def sweep_url(uri: str, experiment_id: str, metric: str, *, parent_run_id: str | None = None,
              mode: str = "max", share_key: str | None = None) -> str:
    """Browser link to an experiment's runs table sorted by ``metric`` (best first by
    ``mode``), filtered to the trials of ``parent_run_id`` when given. With ``share_key`` (a
    view stored by `share_view`): the link that opens that view, columns included."""
    from urllib.parse import quote, urlencode

    base = runs_url(uri, experiment_id)
    if share_key:
        return f"{base}?{SHARE_KEY_PARAM}={quote(share_key, safe='')}"
    query = {"orderByKey": metric_column(metric),
             "orderByAsc": "true" if mode == "min" else "false"}
    if parent_run_id:
        query["searchFilter"] = sweep_filter(parent_run_id)
    return f"{base}?{urlencode(query, quote_via=quote)}"


def share_view(tracker: Tracker, experiment_id: str, key: str, name: str,
               state: Mapping[str, Any]) -> None:
    """Store ``state`` as the saved view ``key`` (titled ``name``) of an experiment, in the
    3.17 UI's format (it also lists it among the experiment's saved views)."""
    now = int(time.time() * 1000)
    value = json.dumps({"name": name, "createdAt": now, "updatedAt": now,
                        "state": json.dumps(dict(state), separators=(",", ":"))},
                       separators=(",", ":"))
    _retry(lambda: tracker.client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key,
                                                     value), attempts=3)


def sweep_view(uri: str, parent_run_id: str, name: str, space: Any = None, *,
               metric: str = "val_dice3d", mode: str = "max") -> str:
    """Store the runs-table view of a sweep and return the link that opens it.

    ``space``: the sweep's `vfsearch.adapters.search_space.SearchSpace` (its objectives give the sort
    metric and mode and the metric columns, its sampled keys the parameter columns); without
    it ``metric``/``mode``. When the view cannot be stored the link still sorts and filters
    (`sweep_url` without a key); when the run cannot be read, the bare ``uri``.
    """
    objectives = tuple(getattr(space, "objectives", ())) or ((metric, mode),)
    metric, mode = objectives[0]
    extra = [m for m, _ in objectives[1:]] + [getattr(space, "scheduler_metric", "val_dice")]
    params = [p.key for p in getattr(space, "params", ())]
    tracker = Tracker(uri)
    try:
        exp_id = _retry(lambda: tracker.client.get_run(parent_run_id),
                        attempts=3).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is never worth failing a finished sweep
        return uri
    key = f"vfsearch-sweep-{parent_run_id}"
    state = sweep_view_state(metric, parent_run_id=parent_run_id, mode=mode, metrics=extra,
                             params=params, tags=["vfsearch.status"])
    try:
        share_view(tracker, exp_id, key, f"sweep {name}: trials by {metric}", state)
    except Exception:  # noqa: BLE001 - sorted and filtered, default columns
        return sweep_url(uri, exp_id, metric, parent_run_id=parent_run_id, mode=mode)
    return sweep_url(uri, exp_id, metric, share_key=key)


# -- the Optuna dashboard -----------------------------------------------------------------

ENV_DASHBOARD_PORT = "VFSEARCH_OPTUNA_PORT"


@dataclass(frozen=True)
class DashboardInfo:
    """A running ``optuna-dashboard`` of a working folder: ``url``, ``pid``, ``port`` and the
    ``storage`` (``sqlite:///<workdir>/optuna.db``) it shows."""

    url: str
    pid: int
    port: int
    workdir: str
    storage: str


def optuna_storage(workdir: str | Path = DEFAULT_WORKDIR) -> str:
    """SQLite URL of a working folder's Optuna studies (``<workdir>/optuna.db``)."""
    return f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"


def dashboard_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <url>/api/meta`` answers 200 (the dashboard is up)."""
    return _answers(url, "/api/meta", timeout)


def _is_dashboard(pid: int) -> bool:
    """True if ``pid`` still runs optuna-dashboard (see `_cmdline`)."""
    text = " ".join(_cmdline(pid) or [])
    return "optuna-dashboard" in text or "optuna_dashboard" in text


def _read_dashboard(workdir: Path) -> DashboardInfo | None:
    try:
        data = json.loads((workdir / "dashboard.json").read_text())
        return DashboardInfo(url=str(data["url"]), pid=int(data["pid"]), port=int(data["port"]),
                             workdir=str(data.get("workdir", workdir)),
                             storage=str(data["storage"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_dashboard(workdir: str | Path = DEFAULT_WORKDIR) -> DashboardInfo | None:
    """The Optuna dashboard of ``workdir`` if it is recorded, alive and healthy; else None."""
    info = _read_dashboard(Path(workdir).resolve())
    if info is None or not _pid_alive(info.pid) or not dashboard_healthy(info.url):
        return None
    return info


def _dashboard_executable() -> list[str]:
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("optuna-dashboard")
    if found:
        return [found]
    return [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]


def ensure_dashboard(workdir: str | Path = DEFAULT_WORKDIR, *, port: int | None = None,
                     timeout: float = 120.0) -> DashboardInfo:
    """Return the Optuna dashboard of ``workdir``, starting it first if none is running.

    A detached ``optuna-dashboard sqlite:///<workdir>/optuna.db --host 127.0.0.1 --port P``
    (``port``: 0 or None picks ``$VFSEARCH_OPTUNA_PORT`` or else a free port), recorded in
    ``<workdir>/dashboard.json``, its log ``<workdir>/dashboard.log``. Raises `UserError` if
    it does not answer within ``timeout`` seconds.
    """
    wd = Path(workdir).resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{workdir}: cannot create the tracking folder ({exc})") from None
    with _locked(wd, "dashboard.lock"):
        info = find_dashboard(wd)
        if info is not None:
            return info
        stale = _read_dashboard(wd)
        if stale is not None and _pid_alive(stale.pid) and _is_dashboard(stale.pid):
            _terminate(stale.pid)
        port = port or int(os.environ.get(ENV_DASHBOARD_PORT, "0") or 0) or _free_port()
        if _port_in_use(port):
            raise UserError(f"--dashboard-port: {port} is already in use by another program")
        storage = optuna_storage(wd)
        db = wd / "optuna.db"
        if not db.is_file() or db.stat().st_size == 0:  # no sweep yet: the dashboard opens
            import optuna  # its storage without creating tables, so create them here

            optuna.storages.RDBStorage(storage)
        url = f"http://{HOST}:{port}"
        cmd = _dashboard_executable() + [storage, "--host", HOST, "--port", str(port),
                                         "--quiet"]
        log = open(wd / "dashboard.log", "ab")
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    cwd=str(wd))
        finally:
            log.close()
        info = DashboardInfo(url=url, pid=proc.pid, port=port, workdir=str(wd), storage=storage)
        tmp = wd / "dashboard.json.tmp"
        tmp.write_text(json.dumps(asdict(info), indent=2))
        tmp.replace(wd / "dashboard.json")
        deadline = time.monotonic() + timeout
        while not dashboard_healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                _terminate(proc.pid)
                (wd / "dashboard.json").unlink(missing_ok=True)
                raise UserError(f"{wd / 'dashboard.log'}: the Optuna dashboard did not start "
                                f"within {timeout:.0f} s")
            time.sleep(0.25)
        return info


def stop_dashboard(workdir: str | Path = DEFAULT_WORKDIR) -> bool:
    """Stop the Optuna dashboard of ``workdir``; True if one was running."""
    wd = Path(workdir).resolve()
    if not wd.is_dir():
        return False
    with _locked(wd, "dashboard.lock"):
        info = _read_dashboard(wd)
        if info is None:
            return False
        running = _pid_alive(info.pid) and _is_dashboard(info.pid)
        if running:
            _terminate(info.pid)
        (wd / "dashboard.json").unlink(missing_ok=True)
        return running


# -- logging ------------------------------------------------------------------------------

RETRY_ENV = "VFSEARCH_TRACKING_RETRY_S"  # how long a log call rides out a missing server


def _retry(fn: Callable[[], T], *, attempts: int | None = None, delay: float = 1.0) -> T:
    """Call ``fn``, retrying on connection errors (a server being restarted mid-sweep).

    MLflow's HTTP client already retries with backoff inside one call; this outer loop covers
    the window in which the port is closed altogether: it keeps trying for
    ``$VFSEARCH_TRACKING_RETRY_S`` seconds (default 300), or ``attempts`` times if given,
    waiting ``delay`` seconds at first, doubling up to 15 s.
    """
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + float(os.environ.get(RETRY_ENV, "300"))
    attempt = 0
    while True:
        try:
            return fn()
        except (ConnectionError, OSError, MlflowException) as exc:
            text = str(exc)
            transient = not isinstance(exc, MlflowException) or any(
                s in text for s in ("Connection", "connection", "Max retries", "timed out",
                                    "Temporary", "503", "502"))
            attempt += 1
            wait = min(delay * 2 ** (attempt - 1), 15.0)
            out_of_time = (attempt >= attempts if attempts is not None
                           else time.monotonic() + wait > deadline)
            if not transient or out_of_time:
                if isinstance(exc, MlflowException) and classify(exc) in (AUTH, UNREACHABLE):
                    # MLflow's message buries the cause in a urllib3 repr or an HTML body
                    env = os.environ.get(ENV_URI, "").strip()
                    raise UserError(f"{f'{ENV_URI} {env}' if env else 'MLflow tracking server'}"
                                    f": {explain(exc)}") from exc
                raise
            time.sleep(wait)


class Tracker:
    """Thin, picklable wrapper around `mlflow.MlflowClient` for one tracking URI.

    Talks to explicit run ids only (no global active run), so it is safe in Ray workers and
    in threads. The client is created lazily in each process.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"])

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created if missing (race-safe)."""
        from mlflow.exceptions import MlflowException

        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process?
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return exp.experiment_id

        return _retry(get_or_create)

    def start_run(self, experiment: str, run_name: str, *, tags: Mapping[str, Any] | None = None,
                  parent_run_id: str | None = None) -> str:
        """Create a run (nested under ``parent_run_id`` if given); returns its id."""
        exp_id = self.experiment_id(experiment)
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = _retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags))
        return run.info.run_id

    def find_run(self, experiment: str, tag: str, value: str) -> str | None:
        """Newest run of ``experiment`` whose tag ``tag`` equals ``value``, or None."""
        exp = _retry(lambda: self.client.get_experiment_by_name(experiment))
        if exp is None:
            return None
        runs = _retry(lambda: self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
            order_by=["attributes.start_time DESC"], max_results=1))
        return runs[0].info.run_id if runs else None

    def resume_run(self, run_id: str) -> None:
        """Mark an interrupted run RUNNING again."""
        _retry(lambda: self.client.update_run(run_id, status="RUNNING"))

    def run_params(self, run_id: str) -> dict[str, str]:
        return dict(_retry(lambda: self.client.get_run(run_id)).data.params)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, 100 per request), skipping ones already logged."""
        from mlflow.entities import Param

        have = self.run_params(run_id)
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
        for i in range(0, len(todo), 100):
            chunk = todo[i:i + 100]
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, params=chunk))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if items:
            _retry(lambda: self.client.log_batch(run_id, tags=items))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` in one request."""
        import math

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        for i in range(0, len(items), 1000):
            chunk = items[i:i + 1000]
            _retry(lambda chunk=chunk: self.client.log_batch(run_id, metrics=chunk))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None
                     ) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        _retry(lambda: self.client.set_terminated(run_id, status=status))

    def experiment_of(self, run_id: str) -> str:
        return _retry(lambda: self.client.get_run(run_id)).info.experiment_id


__all__ = [
    "ENV_URI", "ENV_PORT", "DEFAULT_WORKDIR", "ServerInfo", "Tracker", "ensure_server",
    "find_server", "is_healthy", "runs_url", "stop_server", "tracking_uri", "ui_url",
    "DashboardInfo", "dashboard_healthy", "ensure_dashboard", "find_dashboard", "metric_column",
    "optuna_storage", "share_view", "stop_dashboard", "sweep_filter", "sweep_url", "sweep_view",
    "sweep_view_state",
]
