"""The MLflow pyfunc flavour of a vfsearch bundle (the model only).

``mlflow.pyfunc.load_model("models:/vfsearch-fracture@champion")`` gives a model whose
``predict`` takes a CT and its vertebra labels and returns the fused fracture probability map
on the CT's own grid, through exactly the code of ``vfsearch predict``
(`vfsearch.core.inference.fuse_case`: preprocessing like the training store, per-slice
windows, mapping back to the scanner grid, fusion), on the arrays as given: nothing is
written to disk.

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

Logging and registering it, and fetching it back, is `vfsearch.adapters.tracking.registry`'s.
mlflow is imported when this module is (`FractureModel` subclasses its ``PythonModel``): only
the registry (while logging a model) and MLflow's loader import it, never ``import vfsearch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.pyfunc import PythonModel  # at import time: FractureModel's base class

from vfsearch.adapters import volumes as io
from vfsearch.adapters.bundle import load_members
from vfsearch.adapters.tracking.schema import BUNDLE_ARTIFACT as ARTIFACT_KEY
from vfsearch.core import fusion
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry
from vfsearch.core.inference import LoadedModel, fuse_case

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

DEFAULT_PARAMS: dict[str, Any] = {
    "spacing": [1.0, 1.0, 1.0],
    "origin": [0.0, 0.0, 0.0],
    "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    "label_scheme": "verse",
    "combine": "mean",
}


class FractureModel(PythonModel):
    """pyfunc wrapper: bundle artifact -> `vfsearch.core.inference.fuse_case` on in-memory
    arrays (an ensemble bundle: every member, maps averaged)."""

    def load_context(self, context) -> None:  # context: MLflow's PythonModelContext
        self._loaded = load_members(context.artifacts[ARTIFACT_KEY], device="cpu")

    # no type hints on predict's arguments: MLflow 3 would derive a second, conflicting
    # signature from them; the explicit tensor signature below is the contract
    def predict(self, context, model_input, params=None):
        """``model_input``: {"ct": (z, y, x) HU, "vertebrae": (z, y, x) ids}; returns the
        fused fracture probability (z, y, x) float32 on the CT's grid."""
        return predict_arrays(self._loaded, model_input, params)


def predict_arrays(
    loaded: LoadedModel | Sequence[LoadedModel],
    model_input: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """The fused probability map (z, y, x) float32 of CT + labels given as arrays.

    ``loaded``: a `LoadedModel` or several (per-plane models, an ensemble's members: the list
    `vfsearch.adapters.bundle.load_members` gives), whose maps are averaged.

    The arrays go straight into `vfsearch.core.inference.fuse_case`, the path of ``vfsearch
    predict`` (as the CLI reads its files: the CT as float32, the labels as int16); nothing is
    written to disk.
    """
    if not isinstance(model_input, Mapping) or not {"ct", "vertebrae"} <= set(model_input):
        raise UserError("model_input: expected a dict with arrays 'ct' and 'vertebrae' (z, y, x)")
    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    ct = np.asarray(model_input["ct"])
    labels = np.asarray(model_input["vertebrae"])
    if ct.ndim != 3 or ct.shape != labels.shape:
        raise UserError(
            f"model_input: 'ct' and 'vertebrae' must be 3D arrays of one shape, "
            f"got {ct.shape} and {labels.shape}"
        )
    combine = str(p["combine"])
    if combine not in fusion.COMBINE_METHODS:
        raise UserError(
            f"--combine: must be one of {', '.join(fusion.COMBINE_METHODS)}, got {combine!r}"
        )
    models = [loaded] if isinstance(loaded, LoadedModel) else list(loaded)
    if not models:
        raise UserError("--model: no model given")
    geometry = Geometry(tuple(p["spacing"]), tuple(p["origin"]), tuple(p["direction"]))
    fused = fuse_case(
        models,
        ct.astype(np.float32),
        geometry,
        labels=labels.astype(np.int16),
        label_scheme=str(p["label_scheme"]),
        combine=combine,
        resampler=io,
    )
    return fused.prob.astype(np.float32)


def signature() -> ModelSignature:
    """Tensor signature: inputs ``ct`` float32 and ``vertebrae`` int32 (z, y, x), output a
    float32 (z, y, x) map; geometry and options as params with defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    vol = (-1, -1, -1)
    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), vol, "ct"),
                TensorSpec(np.dtype(np.int32), vol, "vertebrae"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), vol)]),
        params=ParamSchema(
            [
                ParamSpec("spacing", "double", DEFAULT_PARAMS["spacing"], (-1,)),
                ParamSpec("origin", "double", DEFAULT_PARAMS["origin"], (-1,)),
                ParamSpec("direction", "double", DEFAULT_PARAMS["direction"], (-1,)),
                ParamSpec("label_scheme", "string", "verse"),
                ParamSpec("combine", "string", "mean"),
            ]
        ),
    )


def input_example(
    spacing: Sequence[float],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A tiny synthetic CT (air around a 300 HU block labelled vertebra L1, VerSe 20) at the
    model's training ``spacing`` (x, y, z mm), with its params: small enough to predict in
    well under a second, real enough to pass through every stage."""
    z, y, x = 20, 24, 24
    ct = np.full((z, y, x), -1000.0, np.float32)
    labels = np.zeros((z, y, x), np.int32)
    ct[5:15, 6:18, 6:18] = 300.0
    labels[5:15, 6:18, 6:18] = 20
    return ({"ct": ct, "vertebrae": labels}, {"spacing": [float(s) for s in spacing]})


__all__ = [
    "ARTIFACT_KEY",
    "DEFAULT_PARAMS",
    "FractureModel",
    "input_example",
    "predict_arrays",
    "signature",
]
