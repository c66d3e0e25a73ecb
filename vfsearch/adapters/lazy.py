"""One way to load a heavy third-party package late: on the first call, not at import.

``import vfsearch`` and ``vfsearch --help`` stay light because the adapters reach SimpleITK,
zarr, MLflow, matplotlib and friends through this helper instead of importing them at the top.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
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
