"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import re
import socket


class UserError(Exception):
    """Bad input: a file, an option or a value that the user must change.

    The message names the file or option and the problem, in one line.
    """

    exit_code = 2


class BadValue(UserError):
    """A bad value of a named parameter, raised by pure code that knows no option names.

    ``str()`` reads ``"<parameter>: <problem>"``; the CLI prints the parameter as its option
    (``fracture_rate`` -> ``--fracture-rate``), see `as_option`.
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter}: {problem}")
        self.parameter, self.problem = parameter, problem

    def as_option(self) -> str:
        """The message naming the command-line option instead of the parameter."""
        return f"--{self.parameter.replace('_', '-')}: {self.problem}"


def fail(subject: object, problem: str) -> UserError:
    """Build a `UserError` reading ``"<subject>: <problem>"``."""
    return UserError(f"{subject}: {problem}")


# -- why a connection failed ------------------------------------------------------------------
# A failed join or request reaches us wrapped, its cause several links down the chain (Ray's
# ConnectionError("Failed to connect to Ray cluster at ...") from a RuntimeError holding the
# GCS client's traceback; MLflow's "API request to ... failed with exception ..." holding
# urllib3's). The classes below are matched on the text of the whole chain, with the very
# messages Ray 2.60 and MLflow 3.17 raise (tests/test_errors.py holds them).

AUTH, VERSION, UNREACHABLE = "authentication", "version", "unreachable"

_VERSION = re.compile(r"version mismatch", re.I)
_VERSIONS = re.compile(
    r"cluster was started with:\s*Ray:\s*(\S+)\s*Python:\s*(\S+).*?"
    r"was started with:\s*Ray:\s*(\S+)\s*Python:\s*(\S+)",
    re.S,
)
# Ray token authentication: the GCS answers UNAUTHENTICATED ("InvalidAuthToken: ..."), or the
# client finds no token although RAY_AUTH_MODE=token (ray.exceptions.AuthenticationError)
_RAY_AUTH = re.compile(
    r"InvalidAuthToken|unauthenticated|authentication token|auth[_ ]token"
    r"|RAY_AUTH_TOKEN|AuthenticationError",
    re.I,
)
_HTTP_401 = re.compile(r"error code 401\b|\b401 Client Error|You are not authenticated")
_HTTP_403 = re.compile(r"error code 403\b|\b403 Client Error")
_NO_LOCAL_RAY = "Could not find any running Ray instance"
_UNREACHABLE = re.compile(
    r"Connection refused|Failed to connect to GCS|Failed to connect to Ray cluster|"
    r"failed to connect to all addresses|Failed to establish a new connection|"
    r"Max retries exceeded|Deadline Exceeded|UNAVAILABLE|timed out|"
    r"No route to host|Network is unreachable|Name or service not known|"
    r"nodename nor servname|Temporary failure in name resolution|" + _NO_LOCAL_RAY,
    re.I,
)
# Ray 2.60's own words for the three token problems (ray.exceptions.AuthenticationError):
_TOKEN_MODE_OFF = re.compile(r"RAY_AUTH_MODE is currently '\w+' \(not 'token'\)")
_TOKEN_MISSING = re.compile(
    r"no authentication token was found|couldn't find an authentication "
    r"token"
)
_URL = re.compile(
    r"API request to (https?://[^/\s'\"]+)|"
    r"HTTPS?ConnectionPool\(host='([^']+)', port=(\d+)\)"
)


def causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions behind it (``__cause__``, else ``__context__``), outermost
    first; each once."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        chain.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return chain


def _text(exc: BaseException) -> str:
    """The whole chain as text: class names and messages (a class can be the only clue)."""
    parts = []
    for e in causes(exc):
        try:
            message = str(e)
        except Exception:  # noqa: BLE001 - a broken __str__ must not hide the others
            message = ""
        parts.append(f"{type(e).__name__}: {message}")
    return "\n".join(parts)


def classify(exc: BaseException) -> str | None:
    """`VERSION`, `AUTH` or `UNREACHABLE` when the chain of ``exc`` shows one of those
    causes, else None. Checked in that order: a refused login also reads "failed to connect"."""
    text = _text(exc)
    if _VERSION.search(text):
        return VERSION
    if _RAY_AUTH.search(text) or _HTTP_401.search(text) or _HTTP_403.search(text):
        return AUTH
    chain = causes(exc)
    if any(
        isinstance(e, (ConnectionRefusedError, TimeoutError, socket.gaierror)) for e in chain
    ) or _UNREACHABLE.search(text):
        return UNREACHABLE
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message (its class name if it has none)."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    line = line or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def explain(exc: BaseException, *, address: str | None = None) -> str:
    """Why ``exc`` happened, in one line that says what to do about it.

    * a Ray/Python version mismatch names both sides' versions;
    * a Ray token refused, missing, or token mode off here: what to set (``RAY_AUTH_MODE``,
      ``RAY_AUTH_TOKEN``, the head's ``~/.ray/auth_token``);
    * HTTP 401/403 (an MLflow server with basic auth): check its username and password;
    * nothing listening, a timeout or an unknown host: "nothing answers at ``address``"
      (``address`` given, else the URL found in the message);
    * anything else: the first line of the message.
    """
    kind = classify(exc)
    text = _text(exc)
    if kind == VERSION:
        m = _VERSIONS.search(text)
        if m:
            return (
                f"version mismatch: the cluster runs Ray {m[1]} on Python {m[2]}, this "
                f"machine Ray {m[3]} on Python {m[4]}; install the cluster's versions here"
            )
        return f"Ray/Python version mismatch with the cluster ({first_line(exc)})"
    if kind == AUTH:
        if _HTTP_401.search(text):
            return (
                "authentication failed (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD"
            )
        if _HTTP_403.search(text):
            return (
                "permission denied (HTTP 403): the MLFLOW_TRACKING_USERNAME user lacks "
                "the right to this experiment or model"
            )
        if _TOKEN_MISSING.search(text):
            return (
                "authentication failed: RAY_AUTH_MODE=token but no token here; set "
                "RAY_AUTH_TOKEN or copy ~/.ray/auth_token from the head"
            )
        if _TOKEN_MODE_OFF.search(text):
            # joining an explicit address never turns token mode on, even with a token at
            # hand (measured on Ray 2.60): both are needed
            return (
                "authentication failed: the cluster wants a token; set RAY_AUTH_MODE=token "
                "and RAY_AUTH_TOKEN (or copy ~/.ray/auth_token from the head)"
            )
        return (
            "authentication failed: the cluster refused this token; set RAY_AUTH_TOKEN or "
            "copy ~/.ray/auth_token from the head"
        )
    if kind == UNREACHABLE:
        if _NO_LOCAL_RAY in text:
            return "no Ray cluster runs on this machine (`ray start --head` starts one)"
        where = address or _url(text)
        return f"nothing answers at {where}" if where else "nothing answers (connection failed)"
    return first_line(exc)


def _url(text: str) -> str | None:
    m = _URL.search(text)
    if not m:
        return None
    return m[1] or f"http://{m[2]}:{m[3]}"
