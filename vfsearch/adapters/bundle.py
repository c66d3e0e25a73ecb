"""The self-contained export bundle: one folder that runs a trained model without the
training stack (no Ray, no MLflow, no Zarr store).

Layout (`write_bundle`)::

    BUNDLE/
      config.json    format marker, flat config (``model.*`` rebuilds the network), seq_len,
                     plane, patch size, input multiple, the training store's spacing (x, y, z
                     mm), crop margin (mm) and normalisation fingerprint (HU), the threshold
                     chosen on validation, run / sweep ids, what each file is and how it was
                     checked
      weights.pt     state_dict + flat config + preprocessing, read by
                     ``torch.load(..., weights_only=True)`` (`load_checkpoint`)
      model.ts       TorchScript program: normalised window (B, T, H, W) float32 -> logits
                     (B, 1, H, W) (B, T, H, W with predict_all_slices); ``torch.jit.load`` only
      model.onnx     the same network as ONNX (opset 17), when it exports and onnxruntime
                     reproduces the eager logits; otherwise config.json says why it is absent
      model.pt2      optional (``torch_export=True``): a ``torch.export`` ExportedProgram with
                     dynamic batch, H and W (``torch.export.load(path).module()``); slower to
                     produce (tens of seconds on a small CPU), the successor of TorchScript,
                     which torch 2.13 marks deprecated
      MODEL_CARD.md  metrics, provenance, intended use and limits (by `pipelines.export`)

An **ensemble** (`write_ensemble`, ``vfsearch export --top-k K``) averages the probability maps
of K models (planes may differ; spacing and margin must agree)::

    BUNDLE/
      config.json    format marker (format_version 2), ``kind: ensemble``, the members (folder,
                     run id, plane, seq_len, own threshold), the shared spacing and margin, the
                     ensemble's threshold (chosen on validation for the averaged map) and
                     provenance
      members/0/     a complete single-model bundle of each member (its own config.json,
      members/1/     weights.pt, model.ts, model.onnx...), best first: each runs on its own
      MODEL_CARD.md  the ensemble's card

Decisions: a member folder is an ordinary bundle, so one member can be used (or shipped) alone
and every per-model check (TorchScript / ONNX parity) holds member by member; the programs stay
per member (a consumer without vfsearch averages the sigmoids), because members may slice along
different planes, which no single window program expresses. The ensemble is format version 2 so
that an older vfsearch refuses it with "upgrade" instead of missing its ``weights.pt``; single
bundles stay version 1.

Inputs of the programs: the window is CT in HU normalised with the fingerprint
(`vfsearch.core.windows.normalise`: clip to [p0_5, p99_5], minus mean, over std), slices
``T`` = seq_len along ``plane``, in-plane sides H, W multiples of ``input_multiple``
(= 2**depth); batch, H and W are dynamic. Apply a sigmoid to the logits for probabilities.

`vfsearch predict --model BUNDLE` and the MLflow pyfunc flavour rebuild the eager network(s) from
``weights.pt`` (the fusion path reuses per-slice encoder features through the model's seams,
which the flat programs do not expose); the programs are for consumers without vfsearch.
Loading: `load_checkpoint` rebuilds a model from a training checkpoint (``weights.pt`` is
one), `load_bundle`/`load_members` from a bundle; resolving other references (a run id,
``models:/...``) is `vfsearch.pipelines.predict.load_model`'s.
Layer: an adapter (torch files, json; onnx/onnxruntime optional, imported when used).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vfsearch.adapters.store import Store
from vfsearch.core.config import Config
from vfsearch.core.errors import UserError
from vfsearch.core.inference import LoadedModel
from vfsearch.core.models import build_model

if TYPE_CHECKING:
    import numpy as np
    import torch

FORMAT = "vfsearch-bundle"
FORMAT_VERSION = 1  # a single-model bundle
ENSEMBLE_FORMAT_VERSION = 2  # an ensemble of member bundles; the newest this vfsearch reads
ENSEMBLE = "ensemble"  # config.json ``kind`` of an ensemble
MEMBERS = "members"  # folder of an ensemble's member bundles
CONFIG = "config.json"
WEIGHTS = "weights.pt"
TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
EXPORTED = "model.pt2"
CARD = "MODEL_CARD.md"
ONNX_OPSET = 17
# float32 logits of a random-weight network differ by ~1e-7 between eager and traced /
# ONNX Runtime kernels; 1e-4 absolute still flags any real divergence (a wrong branch or a
# frozen shape changes logits by O(1))
PARITY_ATOL = 1e-4


def is_bundle(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a vfsearch bundle's ``config.json``."""
    cfg = Path(path) / CONFIG
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's ``config.json`` as a dict; `UserError` if ``path`` is not a bundle."""
    p = Path(path)
    if not is_bundle(p):
        raise UserError(f"{p}: not a vfsearch bundle (no {CONFIG} with format {FORMAT!r})")
    data = json.loads((p / CONFIG).read_text())
    if int(data.get("format_version", 0)) > ENSEMBLE_FORMAT_VERSION:
        raise UserError(
            f"{p}: bundle format {data.get('format_version')} is newer than this "
            f"vfsearch reads ({ENSEMBLE_FORMAT_VERSION}); upgrade vfsearch"
        )
    return data


def is_ensemble(config: dict[str, Any]) -> bool:
    """True when a bundle's ``config.json`` (as `read_config` returns it) is an ensemble's."""
    return config.get("kind") == ENSEMBLE


def _logits_module(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``model`` so that its forward returns the logits tensor alone (the programs'
    output): ``ModelOutput`` dicts carry a list of attention maps that ONNX cannot name."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, window):  # (B, T, H, W) -> logits
            return self.inner(window)["logits"]

    return Logits(model).eval()


def example_windows(
    seq_len: int, patch_size: int, multiple: int, *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random normalised windows for tracing and checking: ``(2, T, P, P)`` with ``P``
    the patch size rounded up to ``multiple``, and ``(3, T, P + m, P)``, a different batch
    and height, so a program whose shapes were frozen at trace time is caught."""
    import torch

    side = -(-max(patch_size, multiple) // multiple) * multiple
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, seq_len, side, side, generator=g)
    b = torch.randn(3, seq_len, side + multiple, side, generator=g)
    return a, b


def export_torchscript(
    model: torch.nn.Module, path: str | os.PathLike, example: torch.Tensor
) -> torch.jit.ScriptModule:
    """Trace ``model`` (eval mode, logits only) on ``example`` (B, T, H, W) and save it to
    ``path``; returns the loaded program. Tracing, not scripting: the forward is straight-line
    for a given config, and shape checks evaluated at trace time hold for every input whose
    sides are multiples of 2**depth (the program's contract)."""
    import torch

    wrapped = _logits_module(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on the constant shape checks
        traced = torch.jit.trace(wrapped, (example,), check_trace=False)
    torch.jit.save(traced, str(path))
    return torch.jit.load(str(path), map_location="cpu")


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, example: torch.Tensor) -> None:
    """Export ``model`` (logits only) to ONNX with dynamic batch, height and width.

    The TorchScript-based exporter (``dynamo=False``): it handles ``nn.LSTM`` natively and
    needs neither onnxscript nor a ``torch.export`` trace of the Python loops of ConvLSTM.
    """
    import torch

    wrapped = _logits_module(model)
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            input_names=["window"],
            output_names=["logits"],
            dynamic_axes={"window": axes, "logits": axes},
            opset_version=ONNX_OPSET,
        )


def export_program(
    model: torch.nn.Module, path: str | os.PathLike, example: torch.Tensor, multiple: int
) -> torch.nn.Module:
    """``torch.export`` ``model`` (logits only) with dynamic batch and H, W multiples of
    ``multiple``; save it to ``path`` (.pt2) and return the reloaded program's module."""
    import torch
    from torch.export import Dim

    wrapped = _logits_module(model)
    shapes = {
        "window": {
            0: Dim("batch", min=1, max=4096),
            2: multiple * Dim("h_blocks", min=1, max=4096 // multiple),
            3: multiple * Dim("w_blocks", min=1, max=4096 // multiple),
        }
    }
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LSTM flat-weight attribute notices
        program = torch.export.export(wrapped, (example,), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def onnx_logits(path: str | os.PathLike, window: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run an exported ONNX program with onnxruntime (CPU) on ``window`` (B, T, H, W)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    arr = window.detach().cpu().numpy() if hasattr(window, "detach") else np.asarray(window)
    return sess.run(None, {"window": arr.astype(np.float32)})[0]


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    import numpy as np

    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    b = b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def write_bundle(
    loaded: LoadedModel,
    out: str | os.PathLike,
    *,
    info: dict[str, Any] | None = None,
    card: str | None = None,
    onnx: bool = True,
    torch_export: bool = False,
    replace: bool = True,
) -> Path:
    """Write the bundle of ``loaded`` (a `LoadedModel`) to folder ``out``.

    The folder appears complete or not at all: it is built beside ``out`` and renamed into
    place (an existing bundle at ``out`` is replaced when ``replace``; any other existing,
    non-empty folder is a `UserError`). ``info``: extra provenance merged into config.json
    (run id, sweep, metric...). ``card``: MODEL_CARD.md text. ``onnx=False`` skips ONNX.
    The TorchScript program must reproduce the eager logits within `PARITY_ATOL` on two
    random windows (else `RuntimeError`: a bug, not a user error); ONNX that fails to
    export, is not installed, or disagrees is left out and the reason recorded.
    """
    dst = _check_out(out, replace)
    _check_segmenter(loaded)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-bundle-", dir=dst.parent))
    try:
        _write_model(loaded, tmp, info=info, card=card, onnx=onnx, torch_export=torch_export)
        _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_ensemble(
    members: Sequence[LoadedModel],
    out: str | os.PathLike,
    *,
    threshold: float | None,
    info: dict[str, Any] | None = None,
    member_info: Sequence[dict[str, Any]] | None = None,
    card: str | None = None,
    onnx: bool = True,
    torch_export: bool = False,
    replace: bool = True,
) -> Path:
    """Write the ensemble bundle of ``members`` (`LoadedModel`, best first) to folder ``out``
    (layout in the module docstring; atomic and ``replace`` as `write_bundle`).

    ``threshold``: the ensemble's own threshold, chosen on validation for the averaged map
    (each member folder keeps the member's own). ``member_info``: provenance of each member
    (run id, its metric...), merged into its member bundle's config.json and listed in the
    top-level one; ``info`` and ``card`` as `write_bundle`. Members must share spacing and
    margin (their crops are averaged voxel by voxel): `UserError` otherwise.
    """
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
    if member_info is not None and len(member_info) != len(members):
        raise ValueError(f"{len(member_info)} member_info entries for {len(members)} members")
    first = members[0]
    for m in members:
        _check_segmenter(m)
        if tuple(m.spacing) != tuple(first.spacing) or m.margin_mm != first.margin_mm:
            raise UserError(
                f"{m.source}: trained on crops of spacing {tuple(m.spacing)} mm / "
                f"margin {m.margin_mm} mm, {first.source} on "
                f"{tuple(first.spacing)} / {first.margin_mm}; ensemble members "
                f"must share them"
            )
    dst = _check_out(out, replace)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-bundle-", dir=dst.parent))
    try:
        rows: list[dict[str, Any]] = []
        onnx_reasons: list[tuple[int, str]] = []
        for i, m in enumerate(members):
            folder = Path(MEMBERS, str(i))
            extra = dict(member_info[i]) if member_info is not None else {}
            cfg = _write_model(
                m, tmp / folder, info=extra, card=None, onnx=onnx, torch_export=torch_export
            )
            rows.append(
                {
                    **extra,
                    "path": folder.as_posix(),
                    "run_id": cfg.get("run_id") or m.run_id or "",
                    "plane": cfg["plane"],
                    "seq_len": cfg["seq_len"],
                    "threshold": cfg["threshold"],
                    "onnx": cfg["onnx"]["status"],
                    "torch_export": cfg["torch_export"]["status"],
                }
            )
            if cfg["onnx"]["status"] != "ok":
                onnx_reasons.append((i, str(cfg["onnx"].get("reason"))))
        config = {
            "format": FORMAT,
            "format_version": ENSEMBLE_FORMAT_VERSION,
            "kind": ENSEMBLE,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "combine_members": "mean of the members' probability maps (sigmoid of their "
            "logits), crop by crop, before the crops are fused",
            MEMBERS: rows,
            "spacing": [float(s) for s in first.spacing],
            "spacing_axes": "x,y,z mm",
            "margin_mm": float(first.margin_mm),
            "threshold": threshold,
            "files": {
                "members": [r["path"] for r in rows],
                "card": CARD if card is not None else None,
            },
            "onnx": _members_onnx(onnx_reasons, len(rows)),
            **(info or {}),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, allow_nan=True) + "\n")
        if card is not None:
            (tmp / CARD).write_text(card)
        _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _members_onnx(skipped: list[tuple[int, str]], n: int) -> dict[str, Any]:
    """An ensemble's ONNX status: ok when every member has its model.onnx, else why not
    (once when every member was skipped for one reason)."""
    if not skipped:
        return {"status": "ok"}
    reasons = {r for _, r in skipped}
    if len(skipped) == n and len(reasons) == 1:
        return {"status": "skipped", "reason": reasons.pop()}
    return {"status": "skipped", "reason": "; ".join(f"member {i}: {r}" for i, r in skipped)}


def _check_out(out: str | os.PathLike, replace: bool) -> Path:
    """The bundle folder ``out``, refused when it holds something that is not a bundle."""
    dst = Path(out)
    if dst.exists():
        if not dst.is_dir():
            raise UserError(f"--out: {dst} exists and is not a folder")
        if any(dst.iterdir()) and not is_bundle(dst):
            raise UserError(
                f"--out: {dst} is a non-empty folder that is not a vfsearch "
                f"bundle; choose another folder"
            )
        if is_bundle(dst) and not replace:
            raise UserError(f"--out: {dst} already holds a bundle")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst


def _check_segmenter(loaded: LoadedModel) -> None:
    kind = getattr(loaded.model, "output_kind", "segmentation")
    if kind != "segmentation":
        raise UserError(f"{loaded.source}: a {kind} model; the bundle holds fracture segmenters")


def _write_model(
    loaded: LoadedModel,
    folder: Path,
    *,
    info: dict[str, Any] | None,
    card: str | None,
    onnx: bool,
    torch_export: bool,
) -> dict[str, Any]:
    """Write one model's files and config.json into ``folder`` (created); return the config."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    model = loaded.model
    multiple = 2 ** int(cfg.model.depth)
    device = next(model.parameters()).device
    model = model.to("cpu").eval()
    try:
        flat = cfg.flatten()
        torch.save(
            {
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": flat,
                "seq_len": int(cfg.data.seq_len),
                "fingerprint": dict(loaded.fingerprint),
                "spacing": [float(s) for s in loaded.spacing],
                "margin_mm": float(loaded.margin_mm),
                "threshold": loaded.threshold,
                "run_id": loaded.run_id or "",
            },
            folder / WEIGHTS,
        )
        a, b = example_windows(cfg.data.seq_len, cfg.data.patch_size, multiple)
        with torch.no_grad():
            eager_a, eager_b = (model(x)["logits"] for x in (a, b))
        program = export_torchscript(model, folder / TORCHSCRIPT, a)
        with torch.no_grad():
            ts_diff = max(_max_diff(program(a), eager_a), _max_diff(program(b), eager_b))
        if not ts_diff <= PARITY_ATOL:
            raise RuntimeError(
                f"TorchScript program differs from the eager model by "
                f"{ts_diff:.3g} (> {PARITY_ATOL}) on random windows"
            )
        onnx_info = (
            _onnx_or_reason(model, folder / ONNX, a, b, eager_a, eager_b)
            if onnx
            else {"file": None, "status": "skipped", "reason": "ONNX export not requested"}
        )
        pt2_info = (
            _pt2_or_reason(model, folder / EXPORTED, a, b, eager_a, eager_b, multiple)
            if torch_export
            else {
                "file": None,
                "status": "skipped",
                "reason": "torch.export not requested (--torch-export)",
            }
        )
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {k: v for k, v in flat.items() if k.startswith("model.")},
            "config": flat,
            "seq_len": int(cfg.data.seq_len),
            "plane": cfg.data.plane,
            "patch_size": int(cfg.data.patch_size),
            "input_multiple": multiple,
            "spacing": [float(s) for s in loaded.spacing],
            "spacing_axes": "x,y,z mm",
            "margin_mm": float(loaded.margin_mm),
            "fingerprint": dict(loaded.fingerprint),
            "normalisation": "clip HU to [p0_5, p99_5], subtract mean, divide by std "
            "(fingerprint values, HU)",
            "threshold": loaded.threshold,
            "input": {
                "name": "window",
                "shape": ["B", int(cfg.data.seq_len), "H", "W"],
                "dtype": "float32",
                "note": f"H, W multiples of {multiple}; slices "
                f"along the {cfg.data.plane} plane, centre slice = T // 2",
            },
            "output": {
                "name": "logits",
                "shape": [
                    "B",
                    int(cfg.data.seq_len) if cfg.model.predict_all_slices else 1,
                    "H",
                    "W",
                ],
                "note": "sigmoid -> fracture probability of the centre slice",
            },
            "files": {
                "weights": WEIGHTS,
                "torchscript": TORCHSCRIPT,
                "onnx": onnx_info["file"],
                "torch_export": pt2_info["file"],
                "card": CARD if card is not None else None,
            },
            "torchscript": {
                "file": TORCHSCRIPT,
                "method": "torch.jit.trace",
                "max_abs_diff": ts_diff,
                "torch": torch.__version__,
            },
            "onnx": onnx_info,
            "torch_export": pt2_info,
            **(info or {}),
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2, allow_nan=True) + "\n")
        if card is not None:
            (folder / CARD).write_text(card)
    finally:
        model.to(device)
    return config


def _onnx_or_reason(
    model: torch.nn.Module,
    path: Path,
    a: torch.Tensor,
    b: torch.Tensor,
    eager_a: torch.Tensor,
    eager_b: torch.Tensor,
) -> dict[str, Any]:
    """Export + onnxruntime check; on any failure remove the file and say why."""
    try:
        import onnxruntime  # noqa: F401 - only checked ONNX goes into a bundle
    except ImportError:
        return {
            "file": None,
            "status": "skipped",
            "reason": "onnxruntime is not installed (pip install onnx onnxruntime)",
        }
    try:
        export_onnx(model, path, a)
        diff = max(
            _max_diff(onnx_logits(path, a), eager_a), _max_diff(onnx_logits(path, b), eager_b)
        )
    except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure skips the variant
        return _skipped(path, f"export failed: {_first_line(exc)}")
    if not diff <= PARITY_ATOL:
        return _skipped(
            path, f"onnxruntime logits differ from eager by {diff:.3g} (> {PARITY_ATOL})"
        )
    import onnxruntime as ort

    return {
        "file": ONNX,
        "status": "ok",
        "opset": ONNX_OPSET,
        "max_abs_diff": diff,
        "checked_with": f"onnxruntime {ort.__version__}",
        "exporter": "torch.onnx (dynamo=False)",
    }


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _skipped(path: Path, reason: str) -> dict[str, Any]:
    """A variant that failed export or parity: its file removed, the reason recorded."""
    path.unlink(missing_ok=True)
    return {"file": None, "status": "skipped", "reason": reason}


def _pt2_or_reason(
    model: torch.nn.Module,
    path: Path,
    a: torch.Tensor,
    b: torch.Tensor,
    eager_a: torch.Tensor,
    eager_b: torch.Tensor,
    multiple: int,
) -> dict[str, Any]:
    """torch.export + parity check; on failure remove the file and say why."""
    import torch

    try:
        program = export_program(model, path, a, multiple)
        with torch.no_grad():
            diff = max(_max_diff(program(a), eager_a), _max_diff(program(b), eager_b))
    except Exception as exc:  # noqa: BLE001 - an unsupported construct skips the program
        return _skipped(path, f"torch.export failed: {_first_line(exc)}")
    if not diff <= PARITY_ATOL:
        return _skipped(path, f"exported program differs from eager by {diff:.3g}")
    return {
        "file": EXPORTED,
        "status": "ok",
        "max_abs_diff": diff,
        "load": "torch.export.load(path).module()",
    }


def _swap_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dst``, replacing an old bundle there."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.with_name(f".old-{dst.name}-{os.getpid()}")
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    store: str | os.PathLike | Store | None = None,
) -> LoadedModel:
    """Rebuild the model of a training checkpoint and load its weights (eval mode).

    The checkpoint is a dict read with ``weights_only=True``: ``model`` (state_dict),
    ``config`` (flat dotted config), and the training store's ``fingerprint``, ``spacing``
    and ``margin_mm`` (top level or under ``store``; else read from ``store``, the training
    store's path); ``threshold`` if one was chosen on validation.
    """
    import torch

    p = Path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(
            f"{p}: cannot read checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{p}: not a vfsearch checkpoint (expected a dict)")
    state = next((ckpt[k] for k in ("model", "model_state", "state_dict") if k in ckpt), None)
    flat = ckpt.get("config")
    if state is None or not isinstance(flat, dict):
        raise UserError(
            f"{p}: not a vfsearch checkpoint (needs 'model' weights and 'config'; "
            f"has {', '.join(sorted(map(str, ckpt))) or 'nothing'})"
        )
    config = Config.from_flat(flat, source=str(p))
    info = dict(ckpt.get("store") or {})
    fingerprint = ckpt.get("fingerprint") or info.get("fingerprint")
    spacing = ckpt.get("spacing") or info.get("spacing")
    margin = ckpt.get("margin_mm", info.get("margin_mm"))
    if (not fingerprint or not spacing or margin is None) and store is not None:
        meta = _store_meta(store)
        fingerprint = fingerprint or meta["fingerprint"]
        spacing = spacing or meta["spacing"]
        margin = margin if margin is not None else meta["margin_mm"]
    missing = [
        k
        for k, v in (("fingerprint", fingerprint), ("spacing", spacing), ("margin_mm", margin))
        if v is None or v == {} or v == []
    ]
    if missing:
        raise UserError(
            f"{p}: checkpoint lacks the training store's {', '.join(missing)} "
            f"(needed to preprocess a new scan like the training data); "
            f"pass --store with the training store"
        )
    # trained weights follow: a pretrained-encoder file named in the config is not needed
    model = build_model(config.model, config.data.seq_len, load_weights=False)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(
            f"{p}: weights do not fit the model of its config ({str(exc).splitlines()[0]})"
        ) from None
    model.to(_device(device)).eval()
    threshold = ckpt.get("threshold")
    # `missing` above has ruled out None for fingerprint, spacing and margin
    return LoadedModel(
        model,
        config,
        dict(cast("dict[str, Any]", fingerprint)),
        tuple(float(s) for s in cast("Sequence[float]", spacing)),
        float(cast(float, margin)),
        source=str(p),
        run_id=ckpt.get("run_id"),
        threshold=float(threshold) if threshold is not None else None,
    )


def _store_meta(store: str | os.PathLike | Store) -> dict[str, Any]:
    """Spacing, margin and fingerprint of a training store (path or `Store`)."""
    s = store if isinstance(store, Store) else Store(store)
    meta = s.meta
    return {
        "spacing": meta.get("spacing"),
        "margin_mm": meta.get("margin_mm"),
        "fingerprint": s.fingerprint,
    }


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_bundle(
    path: str | os.PathLike, *, device: str | torch.device | None = None
) -> LoadedModel | list[LoadedModel]:
    """Rebuild the eager model of a bundle as a `LoadedModel` (eval mode); an ensemble's as
    the list of its members (`load_members`: always a list).

    Preprocessing (spacing, margin, fingerprint) and the validation threshold come from
    config.json, which wins over what ``weights.pt`` carries.
    """
    models = load_members(path, device=device)
    return models if is_ensemble(read_config(path)) else models[0]


def load_members(
    path: str | os.PathLike, *, device: str | torch.device | None = None
) -> list[LoadedModel]:
    """The `LoadedModel` of every model of a bundle: one for a single-model bundle, the
    members (best first) for an ensemble. `vfsearch.core.inference.crop_probability` averages
    their maps.

    Every member of an ensemble carries the ensemble's threshold (chosen on validation for
    the averaged map: the one `vfsearch.core.inference.fuse_case` applies); its own stays in
    ``extra["member_threshold"]``.
    """
    p = Path(path)
    data = read_config(p)
    if not is_ensemble(data):
        return [_load_single(p, data, device)]
    rows = data.get(MEMBERS) or []
    if not rows:
        raise UserError(f"{p}: ensemble bundle lists no members")
    models = []
    for i, row in enumerate(rows):
        folder = (p / str(row.get("path", ""))).resolve()
        if not folder.is_relative_to(p.resolve()) or not is_bundle(folder):
            raise UserError(
                f"{p}: ensemble member {i} ({row.get('path')!r}) is not a bundle inside it"
            )
        lm = _load_single(folder, read_config(folder), device)
        lm.extra["member_threshold"] = lm.threshold
        threshold = data.get("threshold")
        lm.threshold = float(threshold) if threshold is not None else None
        lm.source = f"bundle {p} member {i}"
        lm.extra["ensemble"] = data
        models.append(lm)
    return models


def _load_single(p: Path, data: dict[str, Any], device: str | torch.device | None) -> LoadedModel:
    weights = p / data.get("files", {}).get("weights", WEIGHTS)
    if not weights.is_file():
        raise UserError(f"{p}: bundle lacks its weights file {weights.name}")
    lm = load_checkpoint(weights, device=device)
    lm.fingerprint = dict(data.get("fingerprint") or lm.fingerprint)
    lm.spacing = tuple(float(s) for s in (data.get("spacing") or lm.spacing))
    lm.margin_mm = float(data.get("margin_mm", lm.margin_mm))
    if data.get("threshold") is not None:
        lm.threshold = float(data["threshold"])
    lm.run_id = data.get("run_id") or lm.run_id
    lm.source = f"bundle {p}"
    lm.extra["bundle"] = data
    return lm


__all__ = [
    "CARD",
    "CONFIG",
    "ENSEMBLE",
    "ENSEMBLE_FORMAT_VERSION",
    "EXPORTED",
    "FORMAT",
    "MEMBERS",
    "ONNX",
    "PARITY_ATOL",
    "TORCHSCRIPT",
    "WEIGHTS",
    "example_windows",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "is_bundle",
    "is_ensemble",
    "load_bundle",
    "load_checkpoint",
    "load_members",
    "onnx_logits",
    "read_config",
    "write_bundle",
    "write_ensemble",
]
