"""Benchmark of `vfsearch train` on Ray Train V2 (local Ray, embedded MLflow server).

Measures, in one process and one local Ray:

* fixed cost per run: seconds from the start of a run to its first optimiser step
  (``startup_s``, measured by the worker against the driver's launch time, MLflow run
  creation included), next to a bare `TorchTrainer` whose loop does nothing but note the time
  it starts; goal: vfsearch adds at most 25 % to Ray's own start-up;
* throughput (training windows/s, all workers together, rank 0's clock) with 1 and 2
  workers, from the last epoch (the first pays data-cache warm-up).

Usage: ``python benchmarks/train.py [--windows 96] [--epochs 2] [--reps 2]`` (medians of
interleaved repetitions; the ratio is the mean over 1 and 2 workers). Ends with one line
``RESULT startup_vs_bare=<ratio> windows_per_s_1w=<rate> windows_per_s_2w=<rate>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def bare_loop(cfg: dict) -> None:
    """Does nothing but record when it started (the first moment a step could run)."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(cfg["out"]).write_text(repr(time.time() - cfg["t_launch"]))
    ray.train.report({"done": 1.0})


def bare_run(n_workers: int, storage: Path, tag: str) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = storage / f"{tag}.txt"
    t_launch = time.time()
    TorchTrainer(
        bare_loop,
        train_loop_config={"out": str(out), "t_launch": t_launch},
        scaling_config=ray.train.ScalingConfig(num_workers=n_workers),
        run_config=ray.train.RunConfig(name=tag, storage_path=str(storage)),
    ).fit()
    return float(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=96, help="training windows per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="repetitions (medians reported)")
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    args = parser.parse_args(argv)

    import ray
    from common import phantom_store

    from vfsearch.adapters import tracking
    from vfsearch.core.config import load_config
    from vfsearch.pipelines.train import run_training

    with tempfile.TemporaryDirectory(prefix="vfsearch-bench-train-") as tmp:
        root = Path(tmp)
        phantom_store(root, cases=3, fracture_rate=0.3, split=(0.34, 0.33, 0.33))
        uri = tracking.ensure_server(root / "mlruns").url  # one-time cost, not per run
        cfg = load_config(
            None,
            [
                "model.depth=4",
                "model.base_channels=8",
                "data.patch_size=48",
                "data.seq_len=5",
                f"train.epochs={args.epochs}",
                "train.batch_size=8",
                f"train.max_windows_per_epoch={args.windows}",
                "data.augment=0.5",
                *args.set,
            ],
        )
        ray.init(num_cpus=max(2, os.cpu_count() or 1))
        try:
            storage = root / "ray"
            bare_run(1, storage, "warmup")  # first trainer of a session pays extra imports
            bare: dict[int, list[float]] = {1: [], 2: []}
            ours: dict[int, list[float]] = {1: [], 2: []}
            rates: dict[int, list[float]] = {1: [], 2: []}
            # interleaved repetitions: a shared machine's load drifts between runs
            for rep in range(args.reps):
                for n in (1, 2):
                    bare[n].append(bare_run(n, storage, f"bare{n}w-{rep}"))
                    summary = run_training(
                        root / "store.zarr",
                        cfg,
                        name=f"vfs{n}w-{rep}",
                        storage=storage,
                        workers=n,
                        mlflow_uri=uri,
                        experiment="bench-train",
                        progress=False,
                    )
                    ours[n].append(float(summary.metrics["startup_s"]))
                    rates[n].append(float(summary.metrics["windows_per_s"]))
                    print(
                        f"{n} worker(s), rep {rep}: bare TorchTrainer start-up "
                        f"{bare[n][-1]:.2f} s; vfsearch start to first optimiser step "
                        f"{ours[n][-1]:.2f} s (worker set-up "
                        f"{summary.metrics['worker_setup_s']:.2f} s), x"
                        f"{ours[n][-1] / bare[n][-1]:.3f}; {rates[n][-1]:.1f} windows/s",
                        flush=True,
                    )
        finally:
            ray.shutdown()
            tracking.stop_server(root / "mlruns")
    med = statistics.median
    for n in (1, 2):
        print(
            f"{n} worker(s): median bare {med(bare[n]):.2f} s, vfsearch {med(ours[n]):.2f} s, "
            f"x{med(ours[n]) / med(bare[n]):.3f}; {med(rates[n]):.1f} windows/s"
        )
    ratio = statistics.mean(med(ours[n]) / med(bare[n]) for n in (1, 2))
    rates = {n: med(v) for n, v in rates.items()}  # type: ignore[misc]
    print(
        f"RESULT startup_vs_bare={ratio:.3f} windows_per_s_1w={rates[1]:.2f} "
        f"windows_per_s_2w={rates[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
