"""The MLflow pyfunc flavour of a vfsearch bundle, and the Model Registry calls of export.

``mlflow.pyfunc.load_model("models:/vfsearch-fracture@champion")`` gives a model whose
``predict`` takes a CT and its vertebra labels and returns the fused fracture probability map
on the CT's own grid, through exactly the code of ``vfsearch predict`` (preprocessing like
the training store, per-slice windows, fusion, mapping back to the scanner grid).

Input (a dict of arrays, see `signature`)::

    {"ct": float32 (z, y, x) HU, "vertebrae": int32 (z, y, x) label ids}

Params (optional, with defaults): ``spacing`` [x, y, z] mm (default 1, 1, 1), ``origin``
[x, y, z] mm (0, 0, 0), ``direction`` 9 values row-major (identity) — the CT's geometry as
SimpleITK reports it, shared by both arrays; ``label_scheme`` ``verse`` | ``totalsegmentator``;
``combine`` ``mean`` | ``max`` | ``vote``. Output: float32 (z, y, x) probabilities 0..1.

An ensemble bundle (``vfsearch export --top-k K``) loads as all its members, whose maps are
averaged crop by crop, and is thresholded at the ensemble's own validation threshold.

The logged model carries the bundle (`vfsearch.adapters.bundle`) as its artifact and the vfsearch
source as code, so the loading process needs only the pinned pip requirements (torch, numpy,
SimpleITK, scipy, mlflow), not the training stack.

An adapter: the one vfsearch module besides `vfsearch.adapters.tracking` that imports mlflow.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np

from vfsearch.core.errors import UserError

ARTIFACT_KEY = "bundle"
MODEL_NAME = "model"  # name of the LoggedModel (``log_model(name=...)``)
RUN_TAG = "vfsearch.run_id"  # on each model version: the training run it came from
# on an ensemble's version: its members' run ids, best first, comma-separated (RUN_TAG and the
# version's run are the best member's, whose run the LoggedModel is linked to)
MEMBERS_TAG = "vfsearch.members"
REQUIREMENTS = ("mlflow", "torch", "numpy", "SimpleITK", "scipy")
DEFAULT_PARAMS: dict[str, Any] = {
    "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
    "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    "label_scheme": "verse", "combine": "mean",
}


class FractureModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: bundle artifact -> `vfsearch.pipelines.predict.predict` on in-memory arrays (an
    ensemble bundle: every member, maps averaged)."""

    def load_context(self, context) -> None:  # context: MLflow's PythonModelContext
        from vfsearch.adapters.bundle import load_members

        self._loaded = load_members(context.artifacts[ARTIFACT_KEY], device="cpu")

    # no type hints on predict's arguments: MLflow 3 would derive a second, conflicting
    # signature from them; the explicit tensor signature below is the contract
    def predict(self, context, model_input, params=None):
        """``model_input``: {"ct": (z, y, x) HU, "vertebrae": (z, y, x) ids}; returns the
        fused fracture probability (z, y, x) float32 on the CT's grid."""
        return predict_arrays(self._loaded, model_input, params)


def predict_arrays(loaded: Any, model_input: Mapping[str, Any],
                   params: Mapping[str, Any] | None = None) -> np.ndarray:
    """The fused probability map (z, y, x) float32 of CT + labels given as arrays.

    ``loaded``: any model reference `vfsearch.pipelines.predict.load_model` takes, e.g. the list of
    `LoadedModel` of a bundle (`vfsearch.adapters.bundle.load_members`).

    The arrays are written as temporary NIfTI files with the given geometry and run through
    `vfsearch.pipelines.predict.predict`, so this path is the CLI's path, byte for byte.
    """
    from vfsearch.adapters import volumes as io
    from vfsearch.core.geometry import Geometry
    from vfsearch.pipelines.predict import predict

    if not isinstance(model_input, Mapping) or not {"ct", "vertebrae"} <= set(model_input):
        raise UserError("model_input: expected a dict with arrays 'ct' and 'vertebrae' "
                        "(z, y, x)")
    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    ct = np.asarray(model_input["ct"])
    labels = np.asarray(model_input["vertebrae"])
    if ct.ndim != 3 or ct.shape != labels.shape:
        raise UserError(f"model_input: 'ct' and 'vertebrae' must be 3D arrays of one shape, "
                        f"got {ct.shape} and {labels.shape}")
    geometry = Geometry(tuple(p["spacing"]), tuple(p["origin"]), tuple(p["direction"]))
    with tempfile.TemporaryDirectory(prefix="vfsearch-pyfunc-") as tmp:
        ct_path = io.write_volume(Path(tmp, "ct.nii"), ct.astype(np.float32), geometry,
                                  compress=False)
        lab_path = io.write_volume(Path(tmp, "vertebrae.nii"), labels.astype(np.int16),
                                   geometry, compress=False)
        summary = predict(loaded, ct_path, lab_path, Path(tmp, "out"),
                          label_scheme=str(p["label_scheme"]), combine=str(p["combine"]))
        return io.read_volume(summary["files"][0], what="probability map").array \
            .astype(np.float32)


def signature() -> Any:
    """Tensor signature: inputs ``ct`` float32 and ``vertebrae`` int32 (z, y, x), output a
    float32 (z, y, x) map; geometry and options as params with defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    vol = (-1, -1, -1)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), vol, "ct"),
                       TensorSpec(np.dtype(np.int32), vol, "vertebrae")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), vol)]),
        params=ParamSchema([
            ParamSpec("spacing", "double", DEFAULT_PARAMS["spacing"], (-1,)),
            ParamSpec("origin", "double", DEFAULT_PARAMS["origin"], (-1,)),
            ParamSpec("direction", "double", DEFAULT_PARAMS["direction"], (-1,)),
            ParamSpec("label_scheme", "string", "verse"),
            ParamSpec("combine", "string", "mean"),
        ]))


def input_example(spacing: tuple[float, float, float]) -> tuple[dict[str, np.ndarray],
                                                                 dict[str, Any]]:
    """A tiny synthetic CT (air around a 300 HU block labelled vertebra L1, VerSe 20) at the
    model's training ``spacing`` (x, y, z mm), with its params: small enough to predict in
    well under a second, real enough to pass through every stage."""
    z, y, x = 20, 24, 24
    ct = np.full((z, y, x), -1000.0, np.float32)
    labels = np.zeros((z, y, x), np.int32)
    ct[5:15, 6:18, 6:18] = 300.0
    labels[5:15, 6:18, 6:18] = 20
    return ({"ct": ct, "vertebrae": labels},
            {"spacing": [float(s) for s in spacing]})


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


def log_and_register(bundle_dir: str | os.PathLike, *, client: Any, run_id: str,
                     experiment_id: str, name: str, tags: Mapping[str, Any],
                     spacing: tuple[float, float, float]) -> Any:
    """Log the bundle as a pyfunc `LoggedModel` linked to ``run_id`` and register it as a new
    version of registered model ``name`` with ``tags``; returns the `ModelVersion`.

    Only explicit `MlflowClient` calls (``client``): the model is saved locally, uploaded to a
    LoggedModel created with ``source_run_id`` and registered from ``models:/<model_id>``.
    No global tracking URI is set (mlflow's would leak into ``$MLFLOW_TRACKING_URI``), and
    the training run is not reopened, so its status and end time (the tie-break) stay.
    """
    import shutil

    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    import vfsearch
    from vfsearch.adapters.tracking import _retry

    str_tags = {k: str(v) for k, v in tags.items()}
    with tempfile.TemporaryDirectory(prefix="vfsearch-model-") as tmp:
        # the package's sources only: each file is one upload request
        code = Path(tmp, "code", "vfsearch")
        shutil.copytree(Path(vfsearch.__file__).parent, code,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # models from code: the loader imports this file instead of unpickling an object
        model_file = Path(tmp, "fracture_model.py")
        model_file.write_text("import mlflow.models\n\nfrom vfsearch.adapters.tracking.pyfunc import "
                              "FractureModel\n\nmlflow.models.set_model(FractureModel())\n")
        logged = _retry(lambda: client.create_logged_model(
            experiment_id, name=MODEL_NAME, source_run_id=run_id, tags=str_tags))
        try:
            local = Path(tmp, "model")
            mlflow.pyfunc.save_model(
                str(local), python_model=str(model_file),
                mlflow_model=Model(model_id=logged.model_id, run_id=run_id),
                artifacts={ARTIFACT_KEY: str(bundle_dir)}, signature=signature(),
                input_example=input_example(spacing), pip_requirements=requirements(),
                code_paths=[str(code)])
            _retry(lambda: client.log_model_artifacts(logged.model_id, str(local)))
            _retry(lambda: client.finalize_logged_model(logged.model_id, "READY"))
        except BaseException:
            try:
                client.finalize_logged_model(logged.model_id, "FAILED")
            except Exception:  # noqa: BLE001, S110 - keep the original error
                pass
            raise
    try:
        _retry(lambda: client.create_registered_model(name))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return _retry(lambda: client.create_model_version(
        name, source=f"models:/{logged.model_id}", run_id=run_id, tags=str_tags,
        model_id=logged.model_id))


def exported_runs(version: Any) -> frozenset[str]:
    """The training runs a model version was exported from: an ensemble's members (tag
    ``vfsearch.members``), else its ``vfsearch.run_id`` tag or its own run id."""
    tags = dict(version.tags or {})
    if tags.get(MEMBERS_TAG):
        return frozenset(r for r in tags[MEMBERS_TAG].split(",") if r)
    run = tags.get(RUN_TAG) or version.run_id
    return frozenset([run]) if run else frozenset()


def version_of_run(client: Any, name: str, run_id: str | Sequence[str]) -> Any | None:
    """The newest version of registered model ``name`` exported from ``run_id``, or None (also
    when ``name`` is not registered yet).

    ``run_id``: one run id, or the run ids of an ensemble's members. A version matches when it
    was exported from exactly those runs (`exported_runs`; members in any order): a single
    run never matches an ensemble that contains it, nor an ensemble a single run.
    """
    from vfsearch.adapters.tracking import _retry

    wanted = frozenset([run_id] if isinstance(run_id, str) else run_id)
    versions = _retry(lambda: client.search_model_versions(f"name = '{name}'"))
    mine = [v for v in versions if exported_runs(v) == wanted]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def champion(client: Any, name: str, alias: str) -> Any | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    from vfsearch.adapters.tracking import _retry

    try:
        return _retry(lambda: client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                              "NOT_FOUND"):
            return None
        raise


def set_alias(client: Any, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (registry stages are deprecated)."""
    from vfsearch.adapters.tracking import _retry

    _retry(lambda: client.set_registered_model_alias(name, alias, str(version)))


def download_bundle(uri: str, tracking_uri: str, dst: str | os.PathLike | None = None) -> Path:
    """Download the registered model ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/V``)
    and return the folder of its bundle artifact."""
    from mlflow.exceptions import MlflowException

    from vfsearch.adapters.bundle import is_bundle

    dst = Path(dst or tempfile.mkdtemp(prefix="vfsearch-model-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri,
            registry_uri=tracking_uri))
    except MlflowException as exc:
        raise UserError(f"--model: {uri}: {str(exc).splitlines()[0]}") from None
    # the outermost bundle: an ensemble's members are bundles too
    found = sorted((c.parent for c in local.rglob("config.json") if is_bundle(c.parent)),
                   key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise UserError(f"--model: {uri} is not a vfsearch model (no bundle among its "
                        f"artifacts)")
    return found[0]


__all__ = ["ARTIFACT_KEY", "DEFAULT_PARAMS", "MEMBERS_TAG", "RUN_TAG", "FractureModel",
           "champion", "download_bundle", "exported_runs", "input_example", "log_and_register",
           "predict_arrays", "requirements", "set_alias", "signature", "version_of_run"]
