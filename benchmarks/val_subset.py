"""Benchmark of per-epoch validation on a strided subset (``train.val_windows``) against the
whole validation split: does ASHA, and best-epoch selection, see the same signal?

On `hpo.py`'s fixed problem (its phantom store and search space, epochs capped to 48
training windows), ``--configs`` trials are drawn at random from the space and trained
``--epochs`` epochs each through the product's own set-up and training steps. After every
epoch the model scores every validation slice once (each slice as the centre of its
window); the counts of any strided subset are sums of those per-slice counts (the product's
strided validation gives the same counts, `tests/test_val_stacks.py`). Per stride
(the auto stride the product picks for this problem, and others):

* Spearman's rank correlation of the subset's Dice with the whole split's Dice over every
  (trial, epoch);
* best-epoch agreement: trials whose best epoch by the subset is their best by the whole;
* rung agreement: the top half of trials at epochs 1 and 2 (ASHA's rungs at reduction
  factor 2), by subset against by whole: the share of the top half in common;
* regret: mean whole-split Dice of the epoch the subset picks, below each trial's best.

And the time of one validation pass through the product's `validate`, whole split against
the auto subset, on the same trained model (median of ``--repeat``).

Usage: ``python benchmarks/val_subset.py [--configs 16] [--epochs 4] [--seed 0]``. Ends with
``RESULT val_stride=<auto stride> spearman=<auto> best_epoch_agreement=<auto>
rung_agreement=<auto> regret=<auto> val_speedup=<whole s / subset s>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def dice(counts: np.ndarray) -> float:
    from vfsearch.core.metrics import scores

    return scores(counts.tolist())["dice"]  # the product's rule, an empty split included


def per_slice_counts(model, data, threshold: float) -> list[np.ndarray]:
    """TP, FP, FN ``(n, 3)`` of every slice of each validation vertebra, as its window's
    centre (the stacks path, every slice)."""
    import torch

    from vfsearch.core.fusion import centre_logits
    from vfsearch.core.metrics import confusion_counts

    out = []
    model.eval()
    for k in range(len(data.val.windows.items)):
        item = data.val.windows.vertebra(k)
        with torch.inference_mode():
            logits = centre_logits(model, item["image"], data.val_seq_len, batch_size=32)
        pred = torch.sigmoid(logits) > threshold
        out.append(confusion_counts(pred, item["target"], dims=(1, 2)).numpy())  # (n, 3)
    return out


def subset(per_vertebra: list[np.ndarray], stride: int) -> np.ndarray:
    from vfsearch.core.sampling import strided_centres

    return sum(v[strided_centres(len(v), stride)].sum(0) for v in per_vertebra)


def agreement(curves: list[list[np.ndarray]], stride: int) -> dict[str, float]:
    """The figures of the module docstring for one stride; ``curves[trial][epoch]``: the
    per-slice counts."""
    from scipy.stats import spearmanr

    whole = np.array([[dice(subset(e, 1)) for e in trial] for trial in curves])
    part = np.array([[dice(subset(e, stride)) for e in trial] for trial in curves])
    n = len(curves)
    rungs = []
    for epoch in (0, 1):
        top = n // 2
        a = set(np.argsort(-whole[:, epoch], kind="stable")[:top])
        b = set(np.argsort(-part[:, epoch], kind="stable")[:top])
        rungs.append(len(a & b) / max(top, 1))
    picked = whole[np.arange(n), part.argmax(1)]
    return {
        "spearman": float(spearmanr(whole.ravel(), part.ravel()).statistic),
        "best_epoch_agreement": float(np.mean(part.argmax(1) == whole.argmax(1))),
        "rung_agreement": float(np.mean(rungs)),
        "regret": float(np.mean(whole.max(1) - picked)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=16, help="random trials")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=5, help="timed validation passes")
    args = parser.parse_args(argv)

    import optuna
    import torch
    from common import phantom_store
    from hpo import SPACE

    from vfsearch.adapters.search_space import load_space
    from vfsearch.core.config import Config
    from vfsearch.pipelines.train.hooks import Hooks
    from vfsearch.pipelines.train.loop import TrainData, setup, train_epoch, validate

    torch.set_num_threads(1)  # as in a one-CPU trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="vfsearch-bench-valsub-") as tmp:
        root = Path(tmp)
        store = phantom_store(root, cases=5, fracture_rate=0.4, split=(0.6, 0.2, 0.2))
        (root / "space.yaml").write_text(SPACE.format(epochs=args.epochs, grace=1, startup=4))
        space = load_space(root / "space.yaml")
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
        curves, stride, times = [], 1, {"whole": [], "subset": []}
        t0 = time.perf_counter()
        for i in range(args.configs):
            sampled = space.define_by_run(study.ask())
            flat = {**space.config_for(sampled).flatten(), "train.seed": args.seed + i}
            config = Config.from_flat(flat)
            parts, data = setup(store, config, rank=0, world=1, device=cpu)
            stride = data.val_stride  # the product's auto stride for this problem
            epochs = []
            for epoch in range(1, args.epochs + 1):
                batches = data.train_loader(epoch)
                train_epoch(parts, batches, epoch=epoch, rank=0, gan_active=False, hooks=Hooks())
                epochs.append(per_slice_counts(parts.inner, data, config.train.val_threshold))
            curves.append(epochs)
            if i == 0:  # the product's validate, whole split against the auto subset
                whole = Config.from_flat({**flat, "train.val_windows": 0})
                full = TrainData.open(store, whole, rank=0, world=1, device=cpu, stacks=True)
                for name, d in (("whole", full), ("subset", data)):
                    loader = d.val_loader()
                    for _ in range(args.repeat + 1):
                        t = time.perf_counter()
                        validate(
                            parts.inner,
                            loader,
                            config.train.val_threshold,
                            seq_len=d.val_seq_len,
                            device=cpu,
                        )
                        times[name].append(time.perf_counter() - t)
                    times[name] = times[name][1:]  # the first pass warms the cache
                print(
                    f"validation windows: {data.val_windows} of {data.val_total} "
                    f"(stride {stride}); one pass {statistics.median(times['whole']):.3f} s "
                    f"whole, {statistics.median(times['subset']):.3f} s subset",
                    flush=True,
                )
            best = max(dice(subset(e, 1)) for e in epochs)
            print(
                f"trial {i + 1}/{args.configs}: best whole-split Dice {best:.4f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    strides = sorted({2, 4, 6, 8, 12, stride, 2 * stride})
    print(f"\n{'stride':>8}{'spearman':>10}{'best ep':>9}{'rungs':>8}{'regret':>9}")
    figures = {}
    for s in strides:
        figures[s] = agreement(curves, s)
        f = figures[s]
        mark = "  <- auto" if s == stride else ""
        print(
            f"{s:>8}{f['spearman']:>10.3f}{f['best_epoch_agreement']:>9.2f}"
            f"{f['rung_agreement']:>8.2f}{f['regret']:>9.4f}{mark}"
        )
    auto = figures[stride]
    speedup = statistics.median(times["whole"]) / statistics.median(times["subset"])
    print(
        f"RESULT val_stride={stride} spearman={auto['spearman']:.3f} "
        f"best_epoch_agreement={auto['best_epoch_agreement']:.3f} "
        f"rung_agreement={auto['rung_agreement']:.3f} regret={auto['regret']:.4f} "
        f"val_speedup={speedup:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
