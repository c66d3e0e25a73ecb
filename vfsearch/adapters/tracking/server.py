"""The detached servers of a working folder: the MLflow tracking server and the Optuna dashboard.

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
``dashboard.json`` (log ``dashboard.log``, lock ``dashboard.lock``), found again through that
file and ``GET /api/meta``, stopped by `stop_dashboard` (``vfsearch ui --stop`` too).

Both go through one set of helpers (`_Service` says what differs): lock, record, find, spawn,
wait until healthy, stop. Nothing here imports mlflow (the dashboard's first start imports
optuna to create its empty storage).
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from vfsearch.adapters.tracking.schema import ENV_URI
from vfsearch.core.errors import UserError

ENV_PORT = "VFSEARCH_MLFLOW_PORT"  # the embedded MLflow server's port when none is given
ENV_DASHBOARD_PORT = "VFSEARCH_OPTUNA_PORT"  # the Optuna dashboard's port when none is given
DEFAULT_WORKDIR = Path("mlruns")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerInfo:
    """A running embedded server: ``url`` (http://127.0.0.1:port), ``pid``, ``port``."""

    url: str
    pid: int
    port: int
    workdir: str


@dataclass(frozen=True)
class DashboardInfo:
    """A running ``optuna-dashboard`` of a working folder: ``url``, ``pid``, ``port`` and the
    ``storage`` (``sqlite:///<workdir>/optuna.db``) it shows."""

    url: str
    pid: int
    port: int
    workdir: str
    storage: str


Info = TypeVar("Info", ServerInfo, DashboardInfo)


# -- probes -----------------------------------------------------------------------------------


def _answers(url: str, path: str, timeout: float) -> bool:
    """True when ``GET <url><path>`` answers 200."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <url>/health`` answers 200 (the MLflow server is up)."""
    return _answers(url, "/health", timeout)


def dashboard_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET <url>/api/meta`` answers 200 (the dashboard is up)."""
    return _answers(url, "/api/meta", timeout)


def _cmdline(pid: int) -> list[str] | None:
    """The command line of ``pid`` (None if it is gone): a recorded pid may have been reused
    by an unrelated process after a reboot or crash, and that one must never be signalled."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return [a.decode(errors="replace") for a in argv]


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


def _is_dashboard(pid: int) -> bool:
    """True if ``pid`` still runs optuna-dashboard (see `_cmdline`)."""
    text = " ".join(_cmdline(pid) or [])
    return "optuna-dashboard" in text or "optuna_dashboard" in text


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


def _dashboard_executable() -> list[str]:
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("optuna-dashboard")
    if found:
        return [found]
    return [sys.executable, "-c", "from optuna_dashboard._cli import main; main()"]


# -- one detached server of a working folder ------------------------------------------------------


@dataclass(frozen=True)
class _Service:
    """What differs between the two detached servers; the helpers below do the rest.

    Files in the working folder: ``<stem>.json`` (the record), ``<stem>.lock``, ``<stem>.log``.
    """

    title: str  # in error messages: "the MLflow server"
    stem: str
    info: type[ServerInfo] | type[DashboardInfo]
    healthy: Callable[[str, float], bool]
    runs_it: Callable[[int], bool]  # does this pid still run it (not a reused pid)?
    port_env: str
    port_option: str  # the CLI option naming the port, in error messages
    stale_grace: float  # seconds a recorded, alive but unhealthy one gets before it is replaced
    says_why: bool  # a failed start names the exit code and the log's last line


MLFLOW = _Service(
    "the MLflow server",
    "server",
    ServerInfo,
    lambda u, t: is_healthy(u, t),
    lambda pid: _is_mlflow_server(pid),
    ENV_PORT,
    "--port",
    30.0,
    True,
)
DASHBOARD = _Service(
    "the Optuna dashboard",
    "dashboard",
    DashboardInfo,
    lambda u, t: dashboard_healthy(u, t),
    lambda pid: _is_dashboard(pid),
    ENV_DASHBOARD_PORT,
    "--dashboard-port",
    0.0,
    False,
)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepare(workdir: str | os.PathLike[str]) -> Path:
    """The working folder, absolute and created; `UserError` when it cannot be."""
    wd = Path(workdir).resolve()
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{workdir}: cannot create the tracking folder ({exc})") from None
    return wd


def _read(svc: _Service, workdir: Path) -> ServerInfo | DashboardInfo | None:
    """The recorded server (alive or not), or None when there is no readable record."""
    try:
        data = json.loads((workdir / f"{svc.stem}.json").read_text())
        extra = {"storage": str(data["storage"])} if svc.info is DashboardInfo else {}
        return svc.info(
            url=str(data["url"]),
            pid=int(data["pid"]),
            port=int(data["port"]),
            workdir=str(data.get("workdir", workdir)),
            **extra,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(svc: _Service, workdir: Path, info: ServerInfo | DashboardInfo) -> None:
    tmp = workdir / f"{svc.stem}.json.tmp"
    tmp.write_text(json.dumps(asdict(info), indent=2))
    tmp.replace(workdir / f"{svc.stem}.json")


def _find(svc: _Service, workdir: str | os.PathLike[str]) -> ServerInfo | DashboardInfo | None:
    info = _read(svc, Path(workdir).resolve())
    if info is None or not _pid_alive(info.pid) or not svc.healthy(info.url, 2.0):
        return None
    return info


def _reuse(svc: _Service, wd: Path) -> ServerInfo | DashboardInfo | None:
    """The running server of ``wd`` if there is one (a recorded one that is alive but not yet
    healthy gets `_Service.stale_grace` seconds, then is replaced); else None."""
    info = _find(svc, wd)
    if info is not None:
        return info
    stale = _read(svc, wd)
    if stale is not None and _pid_alive(stale.pid) and svc.runs_it(stale.pid):
        if _wait_healthy(svc, stale.url, stale.pid, svc.stale_grace):
            return stale
        _terminate(stale.pid)
    return None


def _pick_port(svc: _Service, port: int | None) -> int:
    """``port``, else ``$<port_env>``, else a free one; `UserError` when it is taken."""
    port = port or int(os.environ.get(svc.port_env, "0") or 0) or _free_port()
    if _port_in_use(port):
        raise UserError(f"{svc.port_option}: {port} is already in use by another program")
    return port


def _launch(
    svc: _Service,
    wd: Path,
    cmd: list[str],
    info: Callable[[int], Info],
    timeout: float,
    env: dict[str, str] | None = None,
) -> Info:
    """Start ``cmd`` detached (own session: it outlives this command and is stopped as one
    group), with ``env`` added to this process's environment, record ``info(pid)`` and
    wait until it answers; on failure stop it, drop the record and raise `UserError`
    naming the log."""
    log_path = wd / f"{svc.stem}.log"
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(wd),
            env={**os.environ, **(env or {})},
        )
    started = info(proc.pid)
    _write(svc, wd, started)
    if not _wait_healthy(svc, started.url, proc.pid, timeout, proc):
        code = proc.poll()
        _terminate(proc.pid)
        (wd / f"{svc.stem}.json").unlink(missing_ok=True)
        if not svc.says_why:
            raise UserError(f"{log_path}: {svc.title} did not start within {timeout:.0f} s")
        # the cause is in the server's log: its last line, usually the exception
        problem = (
            f"exited with code {code} while starting"
            if code is not None
            else f"did not start within {timeout:.0f} s"
        )
        raise UserError(f"{log_path}: {svc.title} {problem}{_log_cause(log_path)}")
    return started


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


def _wait_healthy(
    svc: _Service, url: str, pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """Poll ``url`` every 0.25 s for ``timeout`` seconds; False early when the process ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if proc is None and not _pid_alive(pid):
            return False
        if svc.healthy(url, 2.0):
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


def _stop(svc: _Service, workdir: str | os.PathLike[str]) -> bool:
    wd = Path(workdir).resolve()
    if not wd.is_dir():
        return False
    with _locked(wd / f"{svc.stem}.lock"):
        info = _read(svc, wd)
        if info is None:
            return False
        running = _pid_alive(info.pid) and svc.runs_it(info.pid)
        if running:
            _terminate(info.pid)
        (wd / f"{svc.stem}.json").unlink(missing_ok=True)
        return running


# -- the MLflow server ----------------------------------------------------------------------------


def find_server(workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> ServerInfo | None:
    """The embedded server of ``workdir`` if it is recorded, alive and healthy; else None."""
    info = _find(MLFLOW, workdir)
    return info if isinstance(info, ServerInfo) else None


JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def ensure_server(
    workdir: str | os.PathLike[str] = DEFAULT_WORKDIR,
    *,
    port: int | None = None,
    timeout: float = 120.0,
    workers: int = 1,
) -> ServerInfo:
    """Return the embedded server of ``workdir``, starting it first if none is running.

    ``port``: 0 or None picks ``$VFSEARCH_MLFLOW_PORT`` or else a free port. The server is a
    detached ``mlflow server`` with ``sqlite:///<workdir>/mlflow.db`` and artifacts served
    from ``<workdir>/artifacts``, bound to 127.0.0.1. Raises `UserError` if it does not come
    up within ``timeout`` seconds (its log is ``<workdir>/server.log``).
    """
    wd = _prepare(workdir)
    with _locked(wd / f"{MLFLOW.stem}.lock"):
        found = _reuse(MLFLOW, wd)
        if isinstance(found, ServerInfo):
            return found
        port = _pick_port(MLFLOW, port)
        url = f"http://{HOST}:{port}"
        cmd = _mlflow_executable() + [
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--backend-store-uri",
            f"sqlite:///{wd / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(wd / "artifacts"),
        ]
        return _launch(
            MLFLOW,
            wd,
            cmd,
            lambda pid: ServerInfo(url=url, pid=pid, port=port, workdir=str(wd)),
            timeout,
            # MLflow 3.17 starts a job runner and seven huey consumers by default, for GenAI
            # jobs vfsearch never submits; measured on 2 cores: ready in 12.5 s against 7.9 s
            # without, 10 processes against 2, 27 s of CPU against 7 s in its first 25 s,
            # 2.3 GB resident against 0.5 GB. Setting the variable turns them back on
            env={JOB_EXECUTION: os.environ.get(JOB_EXECUTION, "false")},
        )


def stop_server(workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> bool:
    """Stop the embedded server of ``workdir``; True if one was running. Data is kept."""
    return _stop(MLFLOW, workdir)


def tracking_uri(
    workdir: str | os.PathLike[str] = DEFAULT_WORKDIR, *, port: int | None = None
) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the URL of the embedded server (started once)."""
    env = os.environ.get(ENV_URI, "").strip()
    if env:
        if env.startswith("file:") or "://" not in env:
            raise UserError(
                f"{ENV_URI}: {env!r} is a file store, which MLflow 3.17 rejects; "
                "unset it or point it to an http(s) server"
            )
        return env
    return ensure_server(workdir, port=port).url


# -- the Optuna dashboard -------------------------------------------------------------------------


def optuna_storage(workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> str:
    """SQLite URL of a working folder's Optuna studies (``<workdir>/optuna.db``)."""
    return f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"


def find_dashboard(workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> DashboardInfo | None:
    """The Optuna dashboard of ``workdir`` if it is recorded, alive and healthy; else None."""
    info = _find(DASHBOARD, workdir)
    return info if isinstance(info, DashboardInfo) else None


def ensure_dashboard(
    workdir: str | os.PathLike[str] = DEFAULT_WORKDIR,
    *,
    port: int | None = None,
    timeout: float = 120.0,
) -> DashboardInfo:
    """Return the Optuna dashboard of ``workdir``, starting it first if none is running.

    A detached ``optuna-dashboard sqlite:///<workdir>/optuna.db --host 127.0.0.1 --port P``
    (``port``: 0 or None picks ``$VFSEARCH_OPTUNA_PORT`` or else a free port), recorded in
    ``<workdir>/dashboard.json``, its log ``<workdir>/dashboard.log``. Raises `UserError` if
    it does not answer within ``timeout`` seconds.
    """
    wd = _prepare(workdir)
    with _locked(wd / f"{DASHBOARD.stem}.lock"):
        found = _reuse(DASHBOARD, wd)
        if isinstance(found, DashboardInfo):
            return found
        port = _pick_port(DASHBOARD, port)
        storage = optuna_storage(wd)
        db = wd / "optuna.db"
        if not db.is_file() or db.stat().st_size == 0:  # no sweep yet: the dashboard opens
            import optuna  # its storage without creating tables, so create them here

            optuna.storages.RDBStorage(storage)
        url = f"http://{HOST}:{port}"
        cmd = _dashboard_executable() + [storage, "--host", HOST, "--port", str(port), "--quiet"]
        return _launch(
            DASHBOARD,
            wd,
            cmd,
            lambda pid: DashboardInfo(
                url=url, pid=pid, port=port, workdir=str(wd), storage=storage
            ),
            timeout,
        )


def stop_dashboard(workdir: str | os.PathLike[str] = DEFAULT_WORKDIR) -> bool:
    """Stop the Optuna dashboard of ``workdir``; True if one was running."""
    return _stop(DASHBOARD, workdir)


__all__ = [
    "DEFAULT_WORKDIR",
    "ENV_DASHBOARD_PORT",
    "ENV_PORT",
    "DashboardInfo",
    "ServerInfo",
    "dashboard_healthy",
    "ensure_dashboard",
    "ensure_server",
    "find_dashboard",
    "find_server",
    "is_healthy",
    "optuna_storage",
    "stop_dashboard",
    "stop_server",
    "tracking_uri",
]
