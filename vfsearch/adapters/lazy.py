"""One way to load a heavy third-party package late: on the first call, not at import.

``import vfsearch`` and ``vfsearch --help`` stay light because the adapters reach SimpleITK,
zarr, MLflow, matplotlib and friends through this helper instead of importing them at the top.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable, Iterable
from types import ModuleType


def importer(
    name: str, setup: Callable[[ModuleType], object] | None = None
) -> Callable[[], ModuleType]:
    """A function returning module ``name``, imported on its first call (``setup`` runs once)."""

    @functools.cache
    def load() -> ModuleType:
        module = importlib.import_module(name)
        if setup is not None:
            setup(module)
        return module

    load.__name__ = load.__qualname__ = f"load_{name.replace('.', '_')}"
    load.__doc__ = f"The {name} module, imported on first use."
    return load


def import_in_background(names: Iterable[str]) -> threading.Thread:
    """Import modules ``names`` in order in a daemon thread, and return it started: the
    first real use then finds them loaded (or waits on the import lock for the one under
    way). An import that fails stops the thread quietly: the real use imports it again and
    reports the error (unless the package itself records a failed optional import, as
    Optuna's ``try_import`` does, for the feature that needs it)."""
    names = tuple(names)

    def work() -> None:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - see the docstring
                return

    thread = threading.Thread(target=work, name="vfsearch-prewarm", daemon=True)
    thread.start()
    return thread
