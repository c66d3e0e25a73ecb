"""Progress for a person at a terminal: tqdm bars with an ETA, and plain one-line updates.

Both show only when stdout and stderr are terminals. Piped, redirected or captured (a log
file, CI, ``| tee``), a command prints its final summary and nothing else.
``VFSEARCH_PROGRESS=1`` forces progress on, ``VFSEARCH_PROGRESS=0`` off. Bars go to stderr,
lines to stdout. A Ray worker's output is never a terminal: progress from inside a run is
sent to the driver, which decides (see `vfsearch.pipelines.train`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from typing import Any

from vfsearch.adapters.lazy import importer

_tqdm = importer("tqdm")

ENV = "VFSEARCH_PROGRESS"


def enabled() -> bool:
    """Whether to show progress: ``$VFSEARCH_PROGRESS`` if set, else stdout and stderr are
    both terminals."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return all(_isatty(s) for s in (sys.stdout, sys.stderr))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


def bar(
    iterable: Iterable[Any] | None = None,
    desc: str = "",
    *,
    unit: str = "case",
    total: int | None = None,
) -> Any:
    """A tqdm bar on stderr (count, rate, elapsed<ETA), silent unless `enabled`.

    Iterate it like ``iterable``, or without one call ``update(n)`` / ``set_postfix_str`` and
    ``close()`` (or use it as a context manager).
    """
    return _tqdm().tqdm(
        iterable,
        desc=desc,
        unit=unit,
        total=total,
        file=sys.stderr,
        disable=not enabled(),
        dynamic_ncols=True,
    )


def say(line: str) -> None:
    """Print one progress line on stdout if `enabled`."""
    if enabled():
        print(line, flush=True)


def duration(seconds: float | None) -> str:
    """``45s``, ``12m05s``, ``3h20m``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


__all__ = ["ENV", "bar", "duration", "enabled", "say"]
