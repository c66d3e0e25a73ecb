"""The Model Registry calls of ``vfsearch export`` and ``vfsearch predict --model models:/...``.

`log_and_register` logs a bundle as a pyfunc `LoggedModel` (`vfsearch.adapters.tracking.pyfunc`)
and registers it; `version_of_run` finds the version already exported from given runs (export's
idempotence), `champion` the version an alias points at, `set_alias` moves an alias (registry
stages are deprecated), `download_bundle` fetches a registered model's bundle.

mlflow is imported inside the functions that call it, never at import time; so are the pyfunc
model module (`FractureModel` subclasses mlflow's `PythonModel`, so importing it imports mlflow)
and `vfsearch.adapters.bundle` (torch).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vfsearch
from vfsearch.adapters.tracking.client import Tracker, retry
from vfsearch.adapters.tracking.schema import (
    BUNDLE_ARTIFACT,
    LOGGED_MODEL_NAME,
    MEMBERS_TAG,
    VERSION_RUN_TAG,
)
from vfsearch.core.errors import UserError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

# pip requirements of the pyfunc flavour: what the loading process needs (not the training stack)
REQUIREMENTS = ("mlflow", "torch", "numpy", "SimpleITK", "scipy")
# the "models from code" file: the loader imports it instead of unpickling an object
MODEL_CODE = (
    "import mlflow.models\n\nfrom vfsearch.adapters.tracking.pyfunc import "
    "FractureModel\n\nmlflow.models.set_model(FractureModel())\n"
)


def requirements() -> list[str]:
    """Pinned pip requirements of the flavour (what this environment runs)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in REQUIREMENTS:
        try:
            v = version(dist)
        except PackageNotFoundError:
            continue
        out.append(f"{dist}=={v.split('+')[0]}")
    return out


def log_and_register(
    bundle_dir: str | os.PathLike[str],
    *,
    tracker: Tracker,
    run_id: str,
    experiment_id: str,
    name: str,
    tags: Mapping[str, Any],
    spacing: Sequence[float],
) -> ModelVersion:
    """Log the bundle as a pyfunc `LoggedModel` linked to ``run_id`` and register it as a new
    version of registered model ``name`` with ``tags``; returns the `ModelVersion`.

    Only explicit `MlflowClient` calls (``tracker``'s): the model is saved locally, uploaded to
    a LoggedModel created with ``source_run_id`` and registered from ``models:/<model_id>``.
    No global tracking URI is set (mlflow's would leak into ``$MLFLOW_TRACKING_URI``), and
    the training run is not reopened, so its status and end time (the tie-break) stay.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    # here, not at the top: pyfunc imports mlflow at import time (FractureModel's base class)
    from vfsearch.adapters.tracking.pyfunc import input_example, signature

    client = tracker.client
    str_tags = {k: str(v) for k, v in tags.items()}
    with tempfile.TemporaryDirectory(prefix="vfsearch-model-") as tmp:
        # the package's sources only: each file is one upload request
        code = Path(tmp, "code", "vfsearch")
        shutil.copytree(
            Path(vfsearch.__file__).parent,
            code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        model_file = Path(tmp, "fracture_model.py")
        model_file.write_text(MODEL_CODE)
        logged = retry(
            lambda: client.create_logged_model(
                experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=str_tags
            )
        )
        try:
            local = Path(tmp, "model")
            mlflow.pyfunc.save_model(
                str(local),
                python_model=str(model_file),
                mlflow_model=Model(model_id=logged.model_id, run_id=run_id),
                artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
                signature=signature(),
                input_example=input_example(spacing),
                pip_requirements=requirements(),
                code_paths=[str(code)],
            )
            retry(lambda: client.log_model_artifacts(logged.model_id, str(local)))
            retry(lambda: client.finalize_logged_model(logged.model_id, "READY"))
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                client.finalize_logged_model(logged.model_id, "FAILED")
            raise
    try:
        retry(lambda: client.create_registered_model(name))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return retry(
        lambda: client.create_model_version(
            name,
            source=f"models:/{logged.model_id}",
            run_id=run_id,
            tags=str_tags,
            model_id=logged.model_id,
        )
    )


def exported_runs(version: ModelVersion) -> frozenset[str]:
    """The training runs a model version was exported from: an ensemble's members (tag
    ``vfsearch.members``), else its ``vfsearch.run_id`` tag or its own run id."""
    tags = dict(version.tags or {})
    if tags.get(MEMBERS_TAG):
        return frozenset(r for r in tags[MEMBERS_TAG].split(",") if r)
    run = tags.get(VERSION_RUN_TAG) or version.run_id
    return frozenset([run]) if run else frozenset()


def version_of_run(tracker: Tracker, name: str, run_id: str | Sequence[str]) -> ModelVersion | None:
    """The newest version of registered model ``name`` exported from ``run_id``, or None (also
    when ``name`` is not registered yet).

    ``run_id``: one run id, or the run ids of an ensemble's members. A version matches when it
    was exported from exactly those runs (`exported_runs`; members in any order): a single
    run never matches an ensemble that contains it, nor an ensemble a single run.
    """
    wanted = frozenset([run_id] if isinstance(run_id, str) else run_id)
    versions = tracker.search_model_versions(f"name = '{name}'")
    mine = [v for v in versions if exported_runs(v) == wanted]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def champion(tracker: Tracker, name: str, alias: str) -> ModelVersion | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return retry(lambda: tracker.client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def set_alias(tracker: Tracker, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (registry stages are deprecated)."""
    retry(lambda: tracker.client.set_registered_model_alias(name, alias, str(version)))


def download_bundle(uri: str, tracking_uri: str, dst: str | os.PathLike[str] | None = None) -> Path:
    """Download the registered model ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/V``)
    and return the folder of its bundle artifact."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    # here, not at the top: bundle imports torch, which the tracking package must not load
    from vfsearch.adapters.bundle import is_bundle

    dst = Path(dst or tempfile.mkdtemp(prefix="vfsearch-model-"))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri,
                dst_path=str(dst),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
    except MlflowException as exc:
        raise UserError(f"--model: {uri}: {str(exc).splitlines()[0]}") from None
    # the outermost bundle: an ensemble's members are bundles too
    found = sorted(
        (c.parent for c in local.rglob("config.json") if is_bundle(c.parent)),
        key=lambda p: (len(p.parts), str(p)),
    )
    if not found:
        raise UserError(f"--model: {uri} is not a vfsearch model (no bundle among its artifacts)")
    return found[0]


__all__ = [
    "REQUIREMENTS",
    "champion",
    "download_bundle",
    "exported_runs",
    "log_and_register",
    "requirements",
    "set_alias",
    "version_of_run",
]
