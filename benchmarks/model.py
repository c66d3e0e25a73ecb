"""Parameter count and forward+backward throughput of the segmenter variants vs MONAI.

Each variant of ``attention_unet`` (temporal ``lstm``, ``convlstm``, ``none``; depth 4,
channels 16-32-64-128 + 256 bottleneck) reads windows of 5 slices at 128 x 128; MONAI's
``AttentionUnet`` with the same channels reads the centre slice. Timings are interleaved
round by round (so load from other processes hits every model alike) and the median per
model is reported. Run::

    .venv/bin/python benchmarks/model.py [--batch 4] [--rounds 5] [--threads 2] [--device cpu]

The last line is ``RESULT lstm_vs_monai=<ours/MONAI time per window> convlstm_vs_monai=...
none_vs_monai=...``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from vfsearch.core.config import ModelConfig
from vfsearch.core.models import build_model

SIDE, SEQ_LEN = 128, 5
BASE = ModelConfig(depth=4, base_channels=16)
VARIANTS = {
    "lstm": replace(BASE, temporal="lstm"),
    "convlstm": replace(BASE, temporal="convlstm"),
    "none": replace(BASE, temporal="none"),
    "lstm_no_attention": replace(BASE, temporal="lstm", attention=False),
    "lstm_resnet18": replace(BASE, temporal="lstm", encoder="resnet18"),
}


def monai_attention_unet() -> torch.nn.Module:
    from monai.networks.nets import AttentionUnet

    channels = tuple(BASE.base_channels * 2**lv for lv in range(BASE.depth + 1))
    return AttentionUnet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=channels, strides=(2,) * BASE.depth
    )


def step_time(
    model: torch.nn.Module, x: torch.Tensor, ours: bool, iters: int, device: str
) -> float:
    """Seconds per forward+backward of one batch (mean over ``iters``)."""

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for _ in range(iters):
        out = model(x)
        logits = out["logits"] if ours else out
        logits.float().mean().backward()
        model.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="windows per batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=2, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = args.device
    window = torch.randn(args.batch, SEQ_LEN, SIDE, SIDE, device=dev)
    centre = window[:, SEQ_LEN // 2 : SEQ_LEN // 2 + 1].contiguous()
    models: dict[str, tuple[torch.nn.Module, torch.Tensor, bool]] = {
        name: (build_model(cfg, SEQ_LEN).to(dev).train(), window, True)
        for name, cfg in VARIANTS.items()
    }
    models["monai"] = (monai_attention_unet().to(dev).train(), centre, False)
    for model, x, ours in models.values():  # warm-up (allocator, lazy init)
        step_time(model, x, ours, 1, dev)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, (model, x, ours) in models.items():
            times[name].append(step_time(model, x, ours, args.iters, dev))
    per_window = {name: statistics.median(ts) / args.batch for name, ts in times.items()}
    print(
        f"device={dev} threads={torch.get_num_threads()} batch={args.batch} "
        f"side={SIDE} seq_len={SEQ_LEN} rounds={args.rounds}x{args.iters}"
    )
    print(f"{'model':<20}{'params':>12}{'windows/s':>12}{'ms/window':>12}{'vs MONAI':>10}")
    for name, (model, _, _) in models.items():
        params = sum(p.numel() for p in model.parameters())
        t = per_window[name]
        print(
            f"{name:<20}{params:>12,}{1 / t:>12.2f}{1000 * t:>12.1f}"
            f"{t / per_window['monai']:>10.2f}"
        )
    ratio = {k: per_window[k] / per_window["monai"] for k in ("lstm", "convlstm", "none")}
    print("RESULT " + " ".join(f"{k}_vs_monai={v:.2f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
