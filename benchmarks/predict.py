"""Prediction cost: seconds per case, encoder reuse against naive windows, MONAI per slice.

One synthetic case (the phantom at its default 0.8 x 0.8 x 2 mm, 14 vertebrae T4..L5) goes
through `vfsearch.pipelines.predict.predict` with the default segmenter (Attention U-Net, depth 4,
channels 16..256, LSTM, seq_len 5, random weights): the seconds per case and the share spent
outside the model's forward passes (reading, reorienting and resampling, fusion, mapping back,
writing). Then, on the slices of a few of its vertebra crops (padded to the patch size):

* encoder reuse (each slice encoded once, windows assembled from features) against naive
  per-window inference (``seq_len`` encodings per slice); goal: >= 2.5x faster at seq_len 5;
* our per-slice cost (reuse path: encoder + LSTM + decoder per slice) against MONAI's
  ``AttentionUnet`` with the same channels on the same slices; goal: <= 1.3x.

Timings of the three are interleaved round by round (load from other processes hits each
alike) and the median is reported. Run::

    .venv/bin/python benchmarks/predict.py [--spacing 1.0] [--patch 128] [--crops 2]
        [--rounds 3] [--threads 0] [--device cpu]

The last line is ``RESULT reuse_speedup=<x> per_slice_vs_monai=<ratio>
non_model_share=<fraction> seconds_per_case=<s>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vfsearch.adapters import volumes as io
from vfsearch.core import fusion
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.inference import LoadedModel
from vfsearch.core.models import build_model
from vfsearch.core.windows import PLANE_AXIS, normalise, normalised_floor
from vfsearch.pipelines.predict import predict

FINGERPRINT = {"p0_5": -1000.0, "p99_5": 1500.0, "mean": 150.0, "std": 350.0}


def monai_attention_unet(cfg: ModelConfig) -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet

    channels = tuple(cfg.base_channels * 2**lv for lv in range(cfg.depth + 1))
    return AttentionUnet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=channels, strides=(2,) * cfg.depth
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=1.0, help="crop spacing (mm, isotropic)")
    ap.add_argument("--patch", type=int, default=128, help="patch size (data.patch_size)")
    ap.add_argument("--seq-len", type=int, default=5)
    ap.add_argument("--crops", type=int, default=2, help="vertebra crops in the comparisons")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    config = Config(
        model=ModelConfig(depth=4, base_channels=16, temporal="lstm"),
        data=DataConfig(seq_len=args.seq_len, plane="sagittal", patch_size=args.patch),
    )
    model = build_model(config.model, args.seq_len).to(dev).eval()
    lm = LoadedModel(model, config, FINGERPRINT, (args.spacing,) * 3, 8.0, source="random")

    from vfsearch.core.phantom import make_case

    t = time.perf_counter()
    case = make_case(args.seed)
    print(
        f"phantom {case.ct.shape} (z, y, x) at {case.geometry.spacing} mm in "
        f"{time.perf_counter() - t:.1f} s; crops at {args.spacing} mm, patch {args.patch}, "
        f"seq_len {args.seq_len}, device {dev}, threads {torch.get_num_threads()}"
    )
    from vfsearch.pipelines.ingest import CaseSpec, Params, prepare_case

    with tempfile.TemporaryDirectory(prefix="vfsearch-bench-") as tmp:
        ct = io.write_volume(Path(tmp, "ct.nii.gz"), case.ct, case.geometry)
        labels = io.write_volume(Path(tmp, "vertebrae.nii.gz"), case.vertebrae, case.geometry)
        # the comparisons run on the slices of a few crops, prepared like predict does
        prepared = prepare_case(
            CaseSpec("bench", str(ct), str(labels)),
            Params((args.spacing,) * 3, 8.0, "verse", "sagittal"),
        )
        warm = normalise(prepared.crops[0].arrays["image"], FINGERPRINT)
        fusion.infer_slices(
            model,
            fusion.volume_to_slices(warm, PLANE_AXIS["sagittal"]),
            args.seq_len,
            batch_size=args.batch,
            multiple=16,
            min_size=args.patch,
        )  # warm-up (allocator, lazy init)
        _sync(dev)
        summary = predict(lm, ct, labels, Path(tmp, "out"), batch_size=args.batch)
        sec = summary["seconds"]
        n_vert = len(summary["vertebrae"])
    axis = PLANE_AXIS["sagittal"]
    crops = prepared.crops[: args.crops]
    stacks = [
        fusion.volume_to_slices(normalise(c.arrays["image"], FINGERPRINT), axis) for c in crops
    ]
    n_slices = sum(len(s) for s in stacks)
    pad = normalised_floor(FINGERPRINT)
    multiple = 2**config.model.depth
    padded = []
    for s in stacks:
        ph = fusion.padded_size(s.shape[1], multiple, args.patch)
        pw = fusion.padded_size(s.shape[2], multiple, args.patch)
        padded.append(torch.from_numpy(fusion.pad_slices(s, ph, pw, pad)[0]).to(dev))
    monai = monai_attention_unet(config.model).to(dev).eval()

    def run_ours(reuse: bool) -> float:
        _sync(dev)
        start = time.perf_counter()
        for s in stacks:
            fusion.infer_slices(
                model,
                s,
                args.seq_len,
                reuse=reuse,
                batch_size=args.batch,
                pad_value=pad,
                multiple=multiple,
                min_size=args.patch,
            )
        _sync(dev)
        return time.perf_counter() - start

    def run_monai() -> float:
        _sync(dev)
        start = time.perf_counter()
        with torch.inference_mode():
            for x in padded:
                for i in range(0, len(x), args.batch):
                    torch.sigmoid(monai(x[i : i + args.batch, None])).cpu()
        _sync(dev)
        return time.perf_counter() - start

    runners = {
        "reuse": lambda: run_ours(True),
        "naive": lambda: run_ours(False),
        "monai": run_monai,
    }
    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, fn in runners.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    reuse_speedup = med["naive"] / med["reuse"]
    vs_monai = med["reuse"] / med["monai"]
    non_model = 1.0 - sec.get("model", 0.0) / sec["total"]

    print(f"case: {n_vert} vertebrae, {sec['total']:.2f} s total")
    for k in ("read_preprocess", "model", "resample", "fusion", "write"):
        v = sec.get(k, 0.0)
        print(f"  {k:<16}{v:>8.2f} s {100 * v / sec['total']:>6.1f} %")
    print(f"comparison on {len(crops)} crops, {n_slices} slices, median of {args.rounds}:")
    for k in runners:
        print(f"  {k:<8}{med[k]:>8.3f} s {1000 * med[k] / n_slices:>8.2f} ms/slice")
    print(
        f"RESULT reuse_speedup={reuse_speedup:.2f} per_slice_vs_monai={vs_monai:.2f} "
        f"non_model_share={non_model:.3f} seconds_per_case={sec['total']:.2f}"
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
