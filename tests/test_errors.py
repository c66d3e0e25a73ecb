"""Errors name their cause (`vfsearch.core.errors.explain`): a failed cluster join says whether the
token was refused, nothing answers or the versions differ; MLflow failures the same.

The texts are the ones Ray 2.60 and MLflow 3.17 raise: built by their own code where it can
run without a cluster (version check, AuthenticationError, MLflow's REST client), else copied
from a real failed join (see each constant)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

from vfsearch.core.errors import AUTH, UNREACHABLE, VERSION, UserError, causes, classify, explain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chain(*messages: tuple[type[BaseException], str]) -> BaseException:
    """Raise ``messages[-1]``, then each earlier one ``from`` the next, as Ray wraps them."""
    inner: BaseException | None = None
    for tp, text in reversed(messages):
        try:
            if inner is None:
                raise tp(text)
            raise tp(text) from inner
        except BaseException as exc:  # noqa: BLE001 - building the chain
            inner = exc
    assert inner is not None
    return inner


# What ray.init(address=...) raised here (Ray 2.60), copied from real joins: worker.py's
# ConnectionError from node.py's RuntimeError, whose text ends with the GCS client's traceback.
GCS_JOIN = "Failed to connect to Ray cluster at {address}"
_TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File ".../ray/_private/node.py", line 996, in _init_gcs_client\n'
    "    client = GcsClient(\n"
    "             ^^^^^^^^^^\n"
    '  File "python/ray/_raylet.pyx", line 3198, in ray._raylet.GcsClient.__cinit__\n'
    '  File "python/ray/includes/gcs_client.pxi", line 78, in '
    "ray._raylet.InnerGcsClient.standalone\n"
    '  File "python/ray/includes/common.pxi", line 146, in '
    "ray._raylet.check_status_timeout_as_rpc_error\n"
)
_TOKEN_HELP = (
    " Ensure that the token for the cluster is available in a local file (e.g., "
    "~/.ray/auth_token or via RAY_AUTH_TOKEN_PATH) or as the `RAY_AUTH_TOKEN` environment "
    "variable. To generate a token for local development, use `ray get-auth-token --generate` "
    "For remote clusters, ensure that the token is propagated to all nodes of the cluster when "
    "token authentication is enabled. For more information, see: "
    "https://docs.ray.io/en/latest/ray-security/token-auth.html\n"
)
# a head with token authentication (the default of a Ray 2.60 head), joined without
# RAY_AUTH_MODE=token: refused whether or not RAY_AUTH_TOKEN holds the right token
JOIN_MODE_OFF = (
    _TRACEBACK + "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: "
    "Authentication token is missing or incorrect. Note: RAY_AUTH_MODE is currently "
    "'disabled' (not 'token')." + _TOKEN_HELP
)
# joined with RAY_AUTH_MODE=token and a wrong RAY_AUTH_TOKEN
JOIN_WRONG_TOKEN = (
    _TRACEBACK + "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: "
    "Authentication token is missing or incorrect." + _TOKEN_HELP
)
# an address where nothing listens (RAY_gcs_server_port_wait_time_s=1: one try)
JOIN_NOBODY = (
    _TRACEBACK + "ray.exceptions.RpcError: Timed out while waiting for GCS to become available.\n"
)


def _join_failure(address: str, last_error: str) -> BaseException:
    return _chain(
        (ConnectionError, GCS_JOIN.format(address=address)),
        (RuntimeError, f"Failed to connect to GCS. Last connection error: {last_error}"),
    )


def test_causes_follow_cause_then_context_once():
    a = _chain((ConnectionError, "outer"), (RuntimeError, "inner"))
    assert [str(e) for e in causes(a)] == ["outer", "inner"]
    try:
        try:
            raise KeyError("context")
        except KeyError:
            raise ValueError("during handling") from None  # suppressed, yet still __context__
    except ValueError as exc:
        assert [type(e) for e in causes(exc)] == [ValueError, KeyError]
    loop = RuntimeError("loop")
    loop.__cause__ = loop
    assert causes(loop) == [loop]


def test_version_mismatch_names_both_versions():
    from ray._private.utils import check_version_info, compute_version_info

    ray_here, python_here = compute_version_info()[:2]
    with pytest.raises(RuntimeError) as info:  # Ray's own check, as a driver runs it
        check_version_info(
            {"ray_version": "2.59.0", "python_version": "3.10.14"},
            "node 10.0.0.7",
            raise_on_mismatch=True,
        )
    assert "\n" in str(info.value)  # Ray's text spans lines
    assert classify(info.value) == VERSION
    line = explain(info.value, address="10.0.0.5:6379")
    assert line == (
        f"version mismatch: the cluster runs Ray 2.59.0 on Python 3.10.14, this "
        f"machine Ray {ray_here} on Python {python_here}; install the cluster's "
        f"versions here"
    )


def test_missing_token_is_an_authentication_failure():
    """RAY_AUTH_MODE=token without a token: ray.init raises AuthenticationError (a RayError:
    neither ConnectionError nor RuntimeError) before it contacts the cluster."""
    from ray._private.authentication.authentication_constants import (
        TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE,
    )
    from ray.exceptions import AuthenticationError

    exc = AuthenticationError(TOKEN_AUTH_ENABLED_BUT_NO_TOKEN_FOUND_ERROR_MESSAGE)
    assert classify(exc) == AUTH
    assert explain(exc) == (
        "authentication failed: RAY_AUTH_MODE=token but no token here; "
        "set RAY_AUTH_TOKEN or copy ~/.ray/auth_token from the head"
    )


@pytest.mark.parametrize(
    "last_error, advice",
    [
        (
            JOIN_MODE_OFF,
            "the cluster wants a token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or copy ~/.ray/auth_token from the head)",
        ),
        (
            JOIN_WRONG_TOKEN,
            "the cluster refused this token; set RAY_AUTH_TOKEN or copy "
            "~/.ray/auth_token from the head",
        ),
        # the server interceptor's own words, for a client that reports them as they come
        (
            "grpc status UNAUTHENTICATED: Invalid or missing authentication token",
            "the cluster refused this token; set RAY_AUTH_TOKEN or copy ~/.ray/auth_token from the "
            "head",
        ),
    ],
)
def test_refused_token_is_an_authentication_failure(last_error, advice):
    exc = _join_failure("10.0.0.5:6379", last_error)
    assert classify(exc) == AUTH  # not "unreachable", although the outer text says "connect"
    assert explain(exc, address="10.0.0.5:6379") == f"authentication failed: {advice}"


@pytest.mark.parametrize(
    "last_error",
    [
        JOIN_NOBODY,
        "ray.exceptions.RpcError: failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:127.0.0.1:6553: Failed to connect to remote host: Connection refused",
        "RpcError: Deadline Exceeded",
    ],
)
def test_unreachable_gcs_says_nothing_answers(last_error):
    exc = _join_failure("127.0.0.1:6553", last_error)
    assert classify(exc) == UNREACHABLE
    assert explain(exc, address="127.0.0.1:6553") == "nothing answers at 127.0.0.1:6553"


def test_no_local_ray_and_other_errors():
    auto = ConnectionError(
        "Could not find any running Ray instance. Please specify the one to "
        "connect to by setting `--address` flag or `RAY_ADDRESS` environment "
        "variable."
    )
    assert classify(auto) == UNREACHABLE
    assert explain(auto, address="auto").startswith("no Ray cluster runs on this machine")
    bad = ValueError("Unable to parse port number from x (full address = host:x)\nmore")
    assert classify(bad) is None
    assert (
        explain(bad, address="host:x")
        == "Unable to parse port number from x (full address = host:x)"
    )
    assert explain(RuntimeError()) == "RuntimeError"
    assert classify(ConnectionRefusedError(111, "refused")) == UNREACHABLE


# -- MLflow: real client, real HTTP -------------------------------------------------------------


@pytest.fixture
def quick_mlflow(monkeypatch):
    """MLflow's client without its own minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


def _answering(status: int, body: bytes):
    """A local HTTP server answering every request with ``status`` and ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_mlflow_401_names_the_credentials(quick_mlflow, monkeypatch):
    from vfsearch.adapters import tracking

    # the body a basic-auth MLflow server sends (mlflow.server.auth.make_basic_auth_response)
    server = _answering(
        401,
        b"You are not authenticated. Please see "
        b"https://www.mlflow.org/docs/latest/auth/index.html"
        b"#authenticating-to-mlflow on how to authenticate.",
    )
    uri = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        with pytest.raises(UserError) as info:
            tracking.Tracker(uri).experiment_id("vfsearch")
    finally:
        server.shutdown()
    line = str(info.value)
    assert line == (
        f"MLFLOW_TRACKING_URI {uri}: authentication failed (HTTP 401): set "
        f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ), line
    assert classify(info.value.__cause__) == AUTH  # the MlflowException stays attached


def test_mlflow_403_is_a_permission_problem(quick_mlflow):
    from vfsearch.adapters import tracking

    server = _answering(403, b"Permission denied")
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(
            UserError,
            match=r"^MLflow tracking server: permission denied "
            r"\(HTTP 403\)",
        ):
            tracking.Tracker(uri).experiment_id("vfsearch")
    finally:
        server.shutdown()


def test_mlflow_nobody_listening_names_the_url(quick_mlflow):
    from vfsearch.adapters import tracking

    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(UserError) as info:
        tracking.Tracker(uri).get_experiment_by_name("x", attempts=1)
    assert str(info.value) == f"MLflow tracking server: nothing answers at {uri}"


def test_mlflow_server_that_dies_at_start_says_why(tmp_path, monkeypatch):
    """The embedded server's failure names the last line of its log, not just a timeout."""
    from vfsearch.adapters import tracking
    from vfsearch.adapters.tracking import server

    fake = [
        sys.executable,
        "-c",
        "import sys; print('Traceback ...'); "
        "print('sqlalchemy.exc.OperationalError: unable to open database file'); "
        "sys.exit(3)",
    ]
    monkeypatch.setattr(server, "_mlflow_executable", lambda: fake)
    with pytest.raises(UserError) as info:
        tracking.ensure_server(tmp_path, timeout=30)
    assert str(info.value) == (
        f"{tmp_path.resolve() / 'server.log'}: the MLflow server exited "
        f"with code 3 while starting (sqlalchemy.exc.OperationalError: "
        f"unable to open database file)"
    )


# -- a real failed join, through the command line ----------------------------------------------


@pytest.mark.integration
def test_train_address_where_nothing_listens_exits_2_naming_it(small_store, tmp_path):
    """`vfsearch train --address 127.0.0.1:<free port>`: exit code 2 and one line on stderr
    saying nothing answers there (a fresh process: this one may already run a Ray)."""
    address = f"127.0.0.1:{_free_port()}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))
    }
    env.update(
        {
            # one GCS try with short connect timeouts (Ray 2.60 reads these at start): seconds, not
            # the ~2 minutes of vfsearch's default 3 tries
            "RAY_gcs_server_port_wait_time_s": "1",
            "RAY_py_gcs_connect_timeout_s": "2",
            "RAY_gcs_rpc_server_connect_timeout_s": "1",
            # the tracking URI is only resolved before the join: no MLflow server starts
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            "PYTHONIOENCODING": "utf-8",
        }
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfsearch",
            "train",
            "--store",
            str(small_store),
            "--address",
            address,
            "--workdir",
            str(tmp_path / "mlruns"),
        ],
        capture_output=True,
        encoding="utf-8",
        env=env,
        timeout=180,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [
        f"error: --address: cannot join the Ray cluster at {address}: nothing answers at {address}"
    ], out.stderr


def test_pure_code_names_the_parameter_and_the_cli_names_the_option(tmp_path):
    """Layer 0 knows no command-line words: its error names the parameter; `vfsearch synth`
    prints the same problem against the option, one line, exit 2."""
    from typer.testing import CliRunner

    from vfsearch.cli import app
    from vfsearch.core.errors import BadValue
    from vfsearch.core.phantom import make_case

    with pytest.raises(BadValue) as info:
        make_case(0, fracture_rate=1.5)
    assert str(info.value).startswith("fracture_rate: ") and "--" not in str(info.value)
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "out"), "--fracture-rate", "1.5"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: --fracture-rate: ")
