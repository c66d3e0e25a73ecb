"""GPU benchmark: training and fused-evaluation throughput of vfsearch on one CUDA device.

One prepared script for a GPU machine (one H100/H200; sized to finish well within 8 minutes
with the defaults). It builds a small store itself (``vfsearch synth`` phantoms ingested at 1 mm by
``vfsearch ingest``, the product's store writer, in a temporary folder) and measures, with the
product's model (`vfsearch.core.models.build_model`), loss (`vfsearch.core.losses.build_loss`),
step (`vfsearch.core.steps.seg_step`) and data path (`WindowDataset` + `EpochSampler`):

* **bf16 against fp32**: step time (ms) and training windows/s of the same model (same initial
  weights, AdamW, gradient clipping as in training) on the same fixed batch already on the
  device, without and with bf16 autocast (what training uses on CUDA); repetitions
  interleaved, the median kept; ``bf16_speedup = step_ms_fp32 / step_ms_bf16``;
* **data wait**: the product's DataLoader set-up (`WindowDataset` with augmentation,
  `EpochSampler`, ``spawn`` workers, ``persistent_workers``, ``prefetch_factor``, ``pin_memory``
  on CUDA) feeding bf16 training steps (fp32 on CPU, as training does) with 1, 4 and 8 loader
  workers: ``data_wait_share_wN`` = seconds blocked in ``next(iterator)`` / seconds of the whole
  step (wait + transfer + forward + backward + optimiser), over the steps after the warm-up
  (which pays the worker start-up); epochs of the sampler follow each other as in training;
* **fused evaluation**: slices/s of crop-level inference (`crop_probability`: every slice of a
  vertebra crop as a window centre, encoder features reused) under bf16 autocast on the device,
  over every vertebra crop of the store (one crop first as warm-up);
* **peak GPU memory**: ``torch.cuda.max_memory_allocated`` over the run, GiB (0 on CPU).

GPU timing uses CUDA events or ``torch.cuda.synchronize()`` before reading the clock; warm-up
steps are never timed. Model sizes default to the GPU-sized end of
``vfsearch/search_spaces/default.yaml`` (patch 128, base 32, depth 5, ``lstm``, batch 32);
``--set key=value`` changes any config key.

Goal: data wait below 10 % of step time on an H100/H200 (``data_wait_share_w8 < 0.10``, and
the fewest workers that reach it is the number to configure in ``train.num_workers``).

Usage::

    python benchmarks/gpu.py                         # on the GPU machine (default --device cuda)
    python benchmarks/gpu.py --device cpu --quick    # tiny sizes: checks the script on a CPU

Ends with one line ``RESULT bf16_speedup=... windows_per_s_bf16=... windows_per_s_fp32=...
step_ms_bf16=... step_ms_fp32=... data_wait_share_w1=... data_wait_share_w4=...
data_wait_share_w8=... fused_slices_per_s=... peak_gpu_gib=...``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from vfsearch.adapters.dataset import EpochSampler, WindowDataset, finish_batch
from vfsearch.adapters.store import Store
from vfsearch.core.config import Config, load_config
from vfsearch.core.inference import LoadedModel, crop_probability
from vfsearch.core.losses import build_loss
from vfsearch.core.models import build_model
from vfsearch.core.steps import seg_step

GOAL_DATA_WAIT = 0.10


# -- the store ----------------------------------------------------------------------------


def build_store(root: Path, *, cases: int, small: bool) -> Path:
    """``cases`` phantoms (``vfsearch synth``; ``small``: the reduced phantom) ingested into
    ``root/store.zarr`` (1 mm, or 2 mm for ``small``), every case in the train split."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    spacing = (2.0, 2.0, 2.0) if small else (1.0, 1.0, 1.0)
    synth_dataset(root / "raw", cases=cases, seed=0, spacing=None, small=small, fracture_rate=0.5)
    ingest(
        root / "raw" / "manifest.csv",
        root / "store.zarr",
        spacing=spacing,
        margin_mm=8.0,
        split=(1.0, 0.0, 0.0),
        seed=0,
    )
    return root / "store.zarr"


# -- timing -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    """Milliseconds per call of ``fn`` over ``steps`` calls (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end)) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / steps


def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory since the last `reset_peak`, GiB (0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# -- the product's pieces -----------------------------------------------------------------


def train_parts(
    config: Config, device: torch.device, state: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
    """Model (train mode, on ``device``, ``state`` loaded if given), loss and AdamW as the
    training loop builds them."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.data.seq_len)
    if state is not None:
        model.load_state_dict(state)
    model.to(device).train()
    loss_fn = build_loss(
        config.loss, gan=False, output_kind=getattr(model, "output_kind", "segmentation")
    )
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay
    )
    return model, loss_fn, opt


def fixed_batch(ds: WindowDataset, batch_size: int, device: torch.device) -> dict[str, Any]:
    """``batch_size`` windows of the product's sampler order, collated and on ``device``."""
    order = ds.epoch_order(batch_size, epoch=0)
    batch = default_collate([ds[i] for i in order])
    return {"image": batch["image"].to(device), "target": batch["target"].to(device)}


# -- 1. bf16 against fp32 -----------------------------------------------------------------


def precision_run(
    config: Config,
    batch: dict[str, Any],
    device: torch.device,
    *,
    warmup: int,
    steps: int,
    reps: int,
) -> dict[str, dict[str, float]]:
    """Step ms (median of interleaved repetitions) and windows/s, fp32 and bf16."""
    torch.manual_seed(config.train.seed)
    state = copy.deepcopy(build_model(config.model, config.data.seq_len).state_dict())
    grad_clip = config.train.grad_clip
    ms: dict[str, list[float]] = {"fp32": [], "bf16": []}
    peaks: dict[str, float] = {}
    for _ in range(reps):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            model, loss_fn, opt = train_parts(config, device, state)

            def step(model=model, loss_fn=loss_fn, opt=opt, dtype=dtype) -> None:
                seg_step(
                    model, batch, loss_fn, opt, grad_clip=grad_clip, amp_dtype=dtype, device=device
                )

            reset_peak(device)
            for _ in range(warmup):
                step()
            ms[name].append(timed_ms(step, steps, device))
            peaks[name] = max(peaks.get(name, 0.0), peak_gib(device))
            del model, opt, step
            gc.collect()
    b = int(batch["image"].shape[0])
    out = {}
    for name, values in ms.items():
        med = statistics.median(values)
        out[name] = {
            "step_ms": med,
            "windows_per_s": b * 1e3 / med,
            "peak_gib": peaks[name],
            "spread": (max(values) - min(values)) / med,
        }
    return out


# -- 2. data wait -------------------------------------------------------------------------


def loader_for(
    ds: WindowDataset,
    sampler: EpochSampler,
    config: Config,
    workers: int,
    device: torch.device,
    prefetch: int,
) -> DataLoader:
    """The product's DataLoader set-up (``spawn``: zarr and fork do not mix)."""
    kw: dict[str, Any] = {
        "batch_size": config.train.batch_size,
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "drop_last": True,
    }
    if workers > 0:
        kw.update(
            multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=prefetch
        )
    return DataLoader(ds, sampler=sampler, **kw)


def data_wait_run(
    store: Path,
    config: Config,
    device: torch.device,
    workers: int,
    *,
    warmup: int,
    steps: int,
    prefetch: int,
    windows_per_epoch: int,
    amp_dtype: torch.dtype | None,
) -> dict[str, float]:
    """Training steps fed by the product's loader: seconds waiting in ``next()`` against
    seconds per step, after ``warmup`` steps."""
    ds = WindowDataset(
        store, "train", config.data, augment=config.data.augment > 0, seed=config.train.seed
    )
    count = min(len(ds), windows_per_epoch) if windows_per_epoch > 0 else len(ds)
    sampler = EpochSampler(ds, count)
    loader = loader_for(ds, sampler, config, workers, device, prefetch)
    reset_peak(device)
    model, loss_fn, opt = train_parts(config, device)
    per_epoch = len(loader)
    if per_epoch < 1:
        raise SystemExit(f"an epoch of {count} windows holds no batch of {config.train.batch_size}")
    wait = total = 0.0
    done = epoch = 0
    t_start = time.perf_counter()
    startup = 0.0
    while done < warmup + steps:
        sampler.set_epoch(epoch)
        it = iter(loader)
        for _ in range(per_epoch):
            if done >= warmup + steps:
                break
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            batch = finish_batch(batch, device)  # augmentation on the device (part of the step)
            seg_step(
                model,
                batch,
                loss_fn,
                opt,
                grad_clip=config.train.grad_clip,
                amp_dtype=amp_dtype,
                device=device,
            )
            sync(device)
            t2 = time.perf_counter()
            if done == 0:
                startup = t1 - t_start
            if done >= warmup:
                wait += t1 - t0
                total += t2 - t0
            done += 1
        del it
        epoch += 1
    peak = peak_gib(device)
    del loader, model, opt
    gc.collect()
    return {
        "share": wait / total,
        "peak_gib": peak,
        "step_ms": total * 1e3 / steps,
        "wait_ms": wait * 1e3 / steps,
        "windows_per_s": steps * config.train.batch_size / total,
        "startup_s": startup,
        "epochs": epoch,
    }


# -- 3. fused evaluation ------------------------------------------------------------------


def fused_run(
    store_path: Path,
    config: Config,
    device: torch.device,
    *,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    max_crops: int = 0,
) -> dict[str, float]:
    """Slices/s of `crop_probability` over every vertebra crop of the store (the first
    ``max_crops`` when > 0)."""
    from vfsearch.core.windows import PLANE_AXIS

    reset_peak(device)
    store = Store(store_path)
    meta = store.meta
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.data.seq_len).to(device).eval()
    lm = LoadedModel(
        model,
        config,
        dict(store.fingerprint),
        tuple(float(s) for s in meta["spacing"]),
        float(meta["margin_mm"]),
        source="benchmark",
    )
    items = store.items(None)
    crops = [store.read(case, vid, "image") for case, vid in items[: max_crops or len(items)]]
    axis = PLANE_AXIS[config.data.plane]

    def run(crop: np.ndarray) -> np.ndarray:
        ctx = (
            torch.autocast(device_type=device.type, dtype=amp_dtype)
            if amp_dtype
            else torch.autocast(device_type=device.type, enabled=False)
        )
        with ctx:
            return crop_probability([lm], crop, batch_size=batch_size)

    prob = run(crops[0])  # warm-up (kernels, allocator)
    assert prob.shape == crops[0].shape and np.isfinite(prob).all()
    sync(device)
    t0 = time.perf_counter()
    for crop in crops:
        run(crop)
    sync(device)
    elapsed = time.perf_counter() - t0
    slices = sum(c.shape[axis] for c in crops)
    return {
        "slices_per_s": slices / elapsed,
        "slices": slices,
        "crops": len(crops),
        "seconds": elapsed,
        "peak_gib": peak_gib(device),
    }


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, data and step counts (checks the script on a CPU)",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=None,
        help="phantom cases in the store (default 3; --quick 1 small)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 (--quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 10)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per precision and repetition (default 30)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="interleaved fp32/bf16 repetitions (median kept; default 3)",
    )
    parser.add_argument(
        "--loader-steps",
        type=int,
        default=None,
        help="timed loader-fed steps per worker count (default 120)",
    )
    parser.add_argument("--workers", default="1,4,8", help="loader worker counts")
    parser.add_argument("--prefetch", type=int, default=4, help="DataLoader prefetch_factor")
    parser.add_argument(
        "--windows-per-epoch",
        type=int,
        default=0,
        help="sampler epoch size in the data-wait runs (0: every window)",
    )
    parser.add_argument(
        "--eval-batch",
        type=int,
        default=None,
        help="crop_probability batch size (default 64; --quick 8)",
    )
    parser.add_argument(
        "--eval-crops",
        type=int,
        default=None,
        help="vertebra crops timed in the fused evaluation (default all; --quick 4)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (add --quick for tiny sizes)", file=sys.stderr)
        return 2
    q = args.quick
    cases = args.cases or (1 if q else 3)
    batch_size = args.batch_size or (4 if q else 32)
    warmup = args.warmup if args.warmup is not None else (2 if q else 10)
    steps = args.steps or (3 if q else 30)
    reps = args.reps or (1 if q else 3)
    loader_steps = args.loader_steps or (6 if q else 120)
    eval_batch = args.eval_batch or (8 if q else 64)
    eval_crops = args.eval_crops if args.eval_crops is not None else (4 if q else 0)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    sizes = (
        ["data.patch_size=32", "model.base_channels=8", "model.depth=3"]
        if q
        else ["data.patch_size=128", "model.base_channels=32", "model.depth=5"]
    )
    config = load_config(
        None,
        [
            *sizes,
            "model.temporal=lstm",
            "data.seq_len=5",
            "data.plane=sagittal",
            f"train.batch_size={batch_size}",
            *args.set,
        ],
    )
    # torch warns when workers outnumber the CPUs: the worker counts are the experiment
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # training's choice: bf16 autocast on CUDA (with train.amp), none on CPU
    train_amp = torch.bfloat16 if device.type == "cuda" and config.train.amp else None
    m, d = config.model, config.data
    print(
        f"device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; model {m.family} depth {m.depth} base {m.base_channels} temporal {m.temporal}, "
        f"seq_len {d.seq_len}, patch {d.patch_size}, plane {d.plane}, batch "
        f"{config.train.batch_size}; torch {torch.__version__}"
    )
    if device.type == "cuda":
        print(
            f"TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul "
            f"{torch.backends.cuda.matmul.allow_tf32}; cudnn.benchmark "
            f"{torch.backends.cudnn.benchmark}"
        )

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vfsearch-bench-gpu-") as tmp:
        t0 = time.perf_counter()
        store = build_store(Path(tmp), cases=cases, small=q)
        ds = WindowDataset(store, "train", config.data, augment=False, seed=config.train.seed)
        n_crops = len(ds.items)
        print(
            f"store: {cases} phantom case(s), {n_crops} vertebra crops, {len(ds)} "
            f"{d.plane} windows ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )

        batch = fixed_batch(ds, config.train.batch_size, device)
        prec = precision_run(config, batch, device, warmup=warmup, steps=steps, reps=reps)
        for name in ("fp32", "bf16"):
            r = prec[name]
            print(
                f"  {name}: {r['step_ms']:.1f} ms/step, {r['windows_per_s']:.1f} windows/s "
                f"(spread {100 * r['spread']:.0f} %), peak {r['peak_gib']:.2f} GiB",
                flush=True,
            )

        waits: dict[int, dict[str, float]] = {}
        for w in workers:
            waits[w] = data_wait_run(
                store,
                config,
                device,
                w,
                warmup=warmup,
                steps=loader_steps,
                prefetch=args.prefetch,
                windows_per_epoch=args.windows_per_epoch,
                amp_dtype=train_amp,
            )
            r = waits[w]
            print(
                f"  loader {w} worker(s): wait {100 * r['share']:.1f} % of "
                f"{r['step_ms']:.1f} ms/step, {r['windows_per_s']:.1f} windows/s "
                f"(first batch after {r['startup_s']:.1f} s, {r['epochs']} epoch(s)), peak "
                f"{r['peak_gib']:.2f} GiB",
                flush=True,
            )

        fused = fused_run(
            store,
            config,
            device,
            batch_size=eval_batch,
            amp_dtype=torch.bfloat16,
            max_crops=eval_crops,
        )
        print(
            f"  fused evaluation: {fused['slices_per_s']:.1f} slices/s over {fused['slices']} "
            f"slices, peak {fused['peak_gib']:.2f} GiB",
            flush=True,
        )
    peak = max([r["peak_gib"] for r in (*prec.values(), *waits.values(), fused)])
    wall = time.perf_counter() - t_all

    speedup = prec["fp32"]["step_ms"] / prec["bf16"]["step_ms"]
    amp_name = "bf16" if train_amp is not None else "fp32"
    print(f"\n{'measure':<44}{'value':>12}")
    rows = [
        ("train step, fp32 (ms)", f"{prec['fp32']['step_ms']:.1f}"),
        ("train step, bf16 autocast (ms)", f"{prec['bf16']['step_ms']:.1f}"),
        ("train windows/s, fp32", f"{prec['fp32']['windows_per_s']:.1f}"),
        ("train windows/s, bf16", f"{prec['bf16']['windows_per_s']:.1f}"),
        ("bf16 speed-up (fp32 ms / bf16 ms)", f"{speedup:.2f}x"),
    ]
    for w, r in waits.items():
        flag = "" if r["share"] < GOAL_DATA_WAIT else "  (> goal)"
        rows.append(
            (f"data wait, {w} worker(s), {amp_name} (% of step)", f"{100 * r['share']:.1f}{flag}")
        )
        rows.append(
            ("  loader-fed step (ms) / windows/s", f"{r['step_ms']:.1f} / {r['windows_per_s']:.0f}")
        )
    rows += [
        (
            f"fused evaluation, bf16 (slices/s; {fused['crops']} crops)",
            f"{fused['slices_per_s']:.1f}",
        ),
        ("peak GPU memory (GiB)", f"{peak:.2f}"),
        ("wall time (s)", f"{wall:.0f}"),
    ]
    for label, value in rows:
        print(f"{label:<44}{value:>12}")
    met = [w for w, r in waits.items() if r["share"] < GOAL_DATA_WAIT]
    print(
        f"goal: data wait < {100 * GOAL_DATA_WAIT:.0f} % of step time: "
        + (f"met from {min(met)} worker(s)" if met else "not met at any worker count")
        + ("" if device.type == "cuda" else " (CPU run: not the goal's setting)")
    )
    result = {
        "bf16_speedup": f"{speedup:.3f}",
        "windows_per_s_bf16": f"{prec['bf16']['windows_per_s']:.1f}",
        "windows_per_s_fp32": f"{prec['fp32']['windows_per_s']:.1f}",
        "step_ms_bf16": f"{prec['bf16']['step_ms']:.2f}",
        "step_ms_fp32": f"{prec['fp32']['step_ms']:.2f}",
        **{f"data_wait_share_w{w}": f"{r['share']:.3f}" for w, r in waits.items()},
        "fused_slices_per_s": f"{fused['slices_per_s']:.1f}",
        "peak_gpu_gib": f"{peak:.2f}",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
