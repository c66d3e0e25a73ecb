"""On a CUDA device: bf16 training learns, crop-level inference and `vfsearch predict` run on
the device, and the device computes what the CPU computes.

Marked ``gpu`` and skipped where no CUDA device exists. Run on a GPU machine with
``python -m pytest -m gpu -q`` (next to ``python benchmarks/gpu.py``). Data: one small
``vfsearch synth`` phantom ingested at 2 mm (the product's store writer); models: the product's
`build_model` at a small size.
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from vfsearch.adapters.dataset import WindowDataset
from vfsearch.adapters.store import Store
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.inference import LoadedModel, crop_probability
from vfsearch.core.losses import build_loss
from vfsearch.core.models import build_model
from vfsearch.core.steps import logits_of, seg_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
DATA = DataConfig(seq_len=5, plane="sagittal", patch_size=48, augment=0.0)
MODEL = ModelConfig(depth=3, base_channels=16, temporal="lstm")
CONFIG = Config(model=MODEL, data=DATA)
# CUDA against CPU: fp32 with TF32 off differs by summation order only; bf16 autocast keeps
# 8 bits of mantissa, so its tolerance is a share of the output's scale
T = TypeVar("T")
FP32_TOL = 1e-4
BF16_TOL = 5e-2


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    """One small synthetic CT (``vfsearch synth --small``) and its store (ingest at 2 mm)."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    root = tmp_path_factory.mktemp("gpu")
    synth_dataset(root / "raw", cases=1, seed=0, spacing=None, small=True, fracture_rate=1.0)
    ingest(
        root / "raw" / "manifest.csv",
        root / "store.zarr",
        spacing=(2.0, 2.0, 2.0),
        margin_mm=6.0,
        split=(1.0, 0.0, 0.0),
        seed=0,
    )
    with (root / "raw" / "manifest.csv").open() as f:
        row = next(csv.DictReader(f))
    return {
        "store": root / "store.zarr",
        "ct": root / "raw" / row["ct"],
        "vertebrae": root / "raw" / row["vertebrae"],
    }


@pytest.fixture
def no_tf32():
    """fp32 comparisons without TF32 (cuDNN convolutions use it by default on Ampere+)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(MODEL, DATA.seq_len)


def _calibrated(store: Path) -> torch.nn.Module:
    """A fresh model (CPU, eval mode) whose batch-norm statistics are those of the phantom's
    windows, so that its outputs vary as a trained model's do (at random initialisation
    they are nearly constant, and a comparison of them would prove little)."""
    model = _model()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one batch sets the statistics
            m.reset_running_stats()
    with torch.no_grad():
        model.train()(_batch(store)["image"])
    return model.eval()


def _batch(store: Path, size: int = 8) -> dict[str, torch.Tensor]:
    """``size`` windows of the phantom, half of them with fracture in the target."""
    ds = WindowDataset(store, "train", DATA)
    flags = ds.fracture_flags()
    with_f, without = np.flatnonzero(flags), np.flatnonzero(~flags)
    assert len(with_f) >= size // 2
    pick = [
        *with_f[np.linspace(0, len(with_f) - 1, size // 2).astype(int)],
        *without[np.linspace(0, len(without) - 1, size - size // 2).astype(int)],
    ]
    batch = default_collate([ds[int(i)] for i in pick])
    return {"image": batch["image"], "target": batch["target"]}


def _loaded(model: torch.nn.Module, store: Path) -> LoadedModel:
    s = Store(store)
    return LoadedModel(
        model.eval(),
        CONFIG,
        dict(s.fingerprint),
        tuple(float(v) for v in s.meta["spacing"]),
        float(s.meta["margin_mm"]),
        source="test",
    )


def _fractured_crop(store: Path) -> np.ndarray:
    s = Store(store)
    case, vid = next((c, v) for c, v in s.items(None) if s.read(c, v, "fracture").any())
    return s.read(case, vid, "image")


def _device_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """``fn()`` and the peak CUDA memory it allocated (0: nothing ran on the device)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


def _close(
    actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, tol: float
) -> float:
    """Largest difference as a share of the expected output's scale; asserts it is <= tol."""
    a = torch.as_tensor(actual).float().cpu()
    e = torch.as_tensor(expected).float().cpu()
    assert a.shape == e.shape
    assert torch.isfinite(a).all()
    err = float((a - e).abs().max() / e.abs().max().clamp_min(1e-6))
    assert err <= tol, f"CUDA differs from CPU by {err:.2e} of the output's scale (> {tol})"
    return err


# -- (a) bf16 training ------------------------------------------------------------------------


def test_bf16_training_steps_lower_the_loss_on_cuda(phantom):
    batch = {k: v.to(CUDA) for k, v in _batch(phantom["store"]).items()}
    model = _model().to(CUDA).train()
    loss_fn = build_loss(CONFIG.loss, output_kind=model.output_kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = [
        seg_step(model, batch, loss_fn, opt, grad_clip=1.0, amp_dtype=torch.bfloat16, device=CUDA)[
            "loss"
        ]
        for _ in range(40)
    ]
    assert np.isfinite(losses).all(), losses
    assert np.mean(losses[-5:]) < 0.75 * losses[0], losses
    # autocast reached the model (bf16 activations), the weights stayed fp32 on the device
    with torch.no_grad(), torch.autocast(CUDA.type, dtype=torch.bfloat16):
        assert logits_of(model.eval()(batch["image"])).dtype == torch.bfloat16
    assert all(p.device.type == CUDA.type and p.dtype == torch.float32 for p in model.parameters())


# -- (b) inference on the device --------------------------------------------------------------


def test_crop_inference_runs_on_cuda(phantom, no_tf32):
    crop = _fractured_crop(phantom["store"])
    lm = _loaded(_calibrated(phantom["store"]).to(CUDA), phantom["store"])
    prob, used = _device_bytes(lambda: crop_probability([lm], crop, batch_size=8))
    assert used > 0  # the model ran on the device
    assert prob.shape == crop.shape and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    assert prob.std() > 1e-3  # a map, not a constant
    # the encoder-reuse path and the plain one agree on the device as well
    naive = crop_probability([lm], crop, batch_size=8, reuse=False)
    assert np.abs(prob - naive).max() < 1e-4
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        prob_bf16 = crop_probability([lm], crop, batch_size=8)
    assert prob_bf16.dtype == np.float32 and np.abs(prob_bf16 - prob).max() < BF16_TOL


def test_predict_command_on_cuda_matches_cpu(phantom, tmp_path, no_tf32):
    from typer.testing import CliRunner

    from vfsearch.adapters.volumes import read_volume
    from vfsearch.cli import app

    s = Store(phantom["store"])
    ckpt = tmp_path / "model.pt"
    torch.save(
        {
            "model": _calibrated(phantom["store"]).state_dict(),
            "config": CONFIG.flatten(),
            "fingerprint": dict(s.fingerprint),
            "spacing": list(s.meta["spacing"]),
            "margin_mm": float(s.meta["margin_mm"]),
            "threshold": 0.5,
        },
        ckpt,
    )
    maps = {}
    for name, device in (("device", CUDA), ("cpu", CPU)):
        out = tmp_path / name
        result, used = _device_bytes(
            lambda out=out, device=device: CliRunner().invoke(
                app,
                [
                    "predict",
                    str(phantom["ct"]),
                    "--model",
                    str(ckpt),
                    "--vertebrae",
                    str(phantom["vertebrae"]),
                    "--out",
                    str(out),
                    "--device",
                    str(device),
                ],
            )
        )
        assert result.exit_code == 0, result.output
        assert (used > 0) == (name == "device"), (name, used)  # --device picks where it runs
        maps[name] = read_volume(out / "fracture_prob.nii.gz").array
        assert (out / "fracture_mask.nii.gz").is_file() and (out / "vertebrae.json").is_file()
    ct = read_volume(phantom["ct"]).array
    assert maps["device"].shape == ct.shape
    assert np.isfinite(maps["device"]).all() and maps["device"].max() > 0
    assert np.abs(maps["device"] - maps["cpu"]).max() < FP32_TOL


# -- (c) the device computes what the CPU computes --------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_output_matches_cpu(phantom, no_tf32, precision):
    image = _batch(phantom["store"])["image"]
    cpu_model = _calibrated(phantom["store"])
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    with torch.no_grad():
        ref = cpu_model(image)  # fp32 on the CPU: the reference for both
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = cuda_model(image.to(CUDA))
    assert out["logits"].device.type == CUDA.type and out["logits"].dtype == dtype
    tol = BF16_TOL if precision == "bf16" else FP32_TOL
    _close(out["logits"], ref["logits"], tol)
    assert len(out["attention"]) == len(ref["attention"]) > 0
    for a, r in zip(out["attention"], ref["attention"], strict=True):
        _close(a, r, tol)
    # the verdict that matters: the same pixels above 0.5 (all but a sliver in bf16)
    same = (torch.sigmoid(out["logits"].float().cpu()) > 0.5) == (
        torch.sigmoid(ref["logits"]) > 0.5
    )
    assert same.float().mean() > (0.95 if precision == "bf16" else 0.9999)
