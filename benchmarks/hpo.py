"""Benchmark of the search: TPE + ASHA against random search at the same budget of trial-epochs.

On a fixed small synthetic benchmark (phantom store, tiny Attention U-Net, a 5-parameter space
where the learning rate matters most), for each seed:

* random search: Optuna's seeded random sampler, no early stopping, ``budget / epochs`` trials;
* TPE + ASHA: the product's default (`vfsearch tune`, TPE with ``startup_trials`` random
  trials first, ASHA on the per-epoch Dice), given enough trials to spend the same budget.

Both run through `vfsearch.pipelines.tune.tune` on one local Ray with one trial at a time, so
a trial's
cost in trial-epochs is counted in the order trials ran. From MLflow's child runs: the best
fused validation Dice (``val_dice3d``) found against the trial-epochs spent, per method and
seed; the share of the budget TPE + ASHA needs to reach random search's final best (goal: at
most one third; median over seeds, ``inf`` when it never does); and the share of the sweeps'
wall time spent in training steps (the workers' ``train_time``: data loading, forward,
backward, optimiser) against everything else (Ray and trial start-up, validation, the fused
3D evaluation, logging), with two of those parts per trial: the start-up (from the end of the
previous trial, or the sweep's start, to the trial's first optimiser step: Tune, the searcher,
the trial's process and set-up) and the final fused 3D evaluation (trials that reach it).

Usage: ``python benchmarks/hpo.py [--seeds 3] [--budget 24] [--epochs 4] [--trials MODE]``
(``--trials torchtrainer``: one-worker trials through a `TorchTrainer` instead of in-process,
the way to compare the two). Ends with one line ``RESULT budget_share_to_random_best=<fraction>
train_share_of_wall=<fraction> startup_s_per_trial=<s> final_eval_s_per_trial=<s>``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPACE = """
version: 1
description: hpo benchmark (fixed small synthetic problem)
metric: val_dice3d
mode: max
epochs: {epochs}
startup_trials: {startup}
scheduler: {{grace_period: {grace}, reduction_factor: 2, metric: val_dice}}
fixed:
  data.patch_size: 48
  data.seq_len: 3
  data.augment: 0.0
  model.depth: 3
  model.norm: group
  train.batch_size: 8
  train.max_windows_per_epoch: 48
  train.warmup_epochs: 0
  train.log_pictures: false
params:
  train.lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
  model.base_channels: {{type: categorical, choices: [4, 8]}}
  model.temporal: {{type: categorical, choices: [none, lstm]}}
  loss.dice_weight: {{type: float, low: 0.2, high: 2.0}}
  loss.pos_weight: {{type: float, low: 1.0, high: 20.0, log: true}}
"""


def trial_costs(uri: str, sweep: str) -> list[dict]:
    """Each child run of ``sweep`` in the order it started: epochs spent, val_dice3d (None
    for trials ASHA stopped), seconds in training steps and in the final evaluation (None
    when not reached), the wall clock time of the first optimiser step and of the run's end
    (seconds), and the worker's own start-up figure (``startup_s``: the trial function's
    entry to the first step)."""
    from mlflow import MlflowClient

    from vfsearch.adapters.tracking.schema import SWEEP_EXPERIMENT, SWEEP_TAG

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    parent = client.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'")[0]
    kids = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    rows = []
    for kid in sorted(kids, key=lambda r: r.info.start_time):
        rid, m = kid.info.run_id, kid.data.metrics
        steps = {h.step for h in client.get_metric_history(rid, "val_dice")}
        train = sum(h.value for h in client.get_metric_history(rid, "train_time"))
        epochs_s = sum(h.value for h in client.get_metric_history(rid, "epoch_time"))
        first = client.get_metric_history(rid, "first_step_unix_s")
        rows.append(
            {
                "epochs": len(steps),
                "value": m.get("val_dice3d"),
                "train_time": train,
                "val_time": epochs_s - train,
                "final_eval_s": m.get("final_eval_s"),
                "startup_s": m.get("startup_s"),
                "first_step_at": min(h.value for h in first) if first else None,
                "end_at": kid.info.end_time / 1000 if kid.info.end_time else None,
            }
        )
    return rows


def startups(rows: list[dict], t_start: float) -> list[float]:
    """Seconds from the end of the previous trial (the first: the sweep's start) to each
    trial's first optimiser step; trials run one at a time."""
    out, previous_end = [], t_start
    for row in rows:
        if row["first_step_at"] is not None and previous_end is not None:
            out.append(row["first_step_at"] - previous_end)
        previous_end = row["end_at"]
    return out


def best_curve(rows: list[dict], budget: int) -> list[float]:
    """``curve[b]``: best val_dice3d among trials finished within ``b`` trial-epochs."""
    curve = [0.0] * (budget + 1)
    spent, best = 0, 0.0
    for row in rows:
        spent += row["epochs"]
        if spent > budget:
            break
        if row["value"] is not None and not math.isnan(row["value"]):
            best = max(best, row["value"])
        for b in range(spent, budget + 1):
            curve[b] = best
    return curve


def share_to_reach(curve: list[float], target: float) -> float:
    """Smallest share of the budget at which ``curve`` reaches ``target`` (inf: never)."""
    budget = len(curve) - 1
    for b, value in enumerate(curve):
        if value >= target - 1e-9 and b > 0:
            return b / budget
    return math.inf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=24, help="trial-epochs per method")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a full trial")
    parser.add_argument("--startup", type=int, default=4, help="TPE's random start trials")
    parser.add_argument(
        "--tpe-trials",
        type=int,
        default=None,
        help="trials TPE + ASHA may start (default: 2 x budget / epochs)",
    )
    parser.add_argument(
        "--trials",
        choices=("auto", "torchtrainer"),
        default="auto",
        help="how one-worker trials run: the product's default (in-process) or a TorchTrainer",
    )
    args = parser.parse_args(argv)
    if args.budget % args.epochs:
        parser.error("--budget must be a multiple of --epochs")

    from common import phantom_store

    from vfsearch.adapters import tracking
    from vfsearch.adapters.ray_runtime import start_local_ray
    from vfsearch.pipelines.tune import tune

    n_random = args.budget // args.epochs
    n_tpe = args.tpe_trials or 2 * n_random
    with tempfile.TemporaryDirectory(prefix="vfsearch-bench-hpo-") as tmp:
        root = Path(tmp)
        store = phantom_store(root, cases=5, fracture_rate=0.4, split=(0.6, 0.2, 0.2))
        uri = tracking.ensure_server(root / "mlruns", timeout=240).url
        spaces = {}
        for method, grace in (("random", args.epochs), ("tpe_asha", 1)):
            spaces[method] = root / f"{method}.yaml"
            spaces[method].write_text(
                SPACE.format(epochs=args.epochs, grace=grace, startup=args.startup)
            )
        import ray

        curves: dict[str, list[list[float]]] = {"random": [], "tpe_asha": []}
        shares, wall, train, val = [], 0.0, 0.0, 0.0
        first_trials, later_trials, worker_startups, final_evals = [], [], [], []
        n_trials = 0
        try:
            start_local_ray(num_cpus=2)
            for seed in range(args.seeds):
                for method in ("random", "tpe_asha"):
                    sweep = f"{method}-s{seed}"
                    t0, t0_wall = time.perf_counter(), time.time()
                    tune(
                        store,
                        spaces[method],
                        seed=seed,
                        name=sweep,
                        num_samples=n_random if method == "random" else n_tpe,
                        sampler="random" if method == "random" else "tpe",
                        max_concurrent=1,
                        workdir=root / "mlruns",
                        storage=root / "ray",
                        mlflow_uri=uri,
                        echo=lambda s: None,
                        in_process=False if args.trials == "torchtrainer" else None,
                    )
                    wall += time.perf_counter() - t0
                    rows = trial_costs(uri, sweep)
                    train += sum(r["train_time"] for r in rows)
                    val += sum(r["val_time"] for r in rows)
                    n_trials += len(rows)
                    starts = startups(rows, t0_wall)
                    first_trials += starts[:1]
                    later_trials += starts[1:]
                    worker_startups += [r["startup_s"] for r in rows if r["startup_s"]]
                    final_evals += [r["final_eval_s"] for r in rows if r["final_eval_s"]]
                    curves[method].append(best_curve(rows, args.budget))
                    used = sum(r["epochs"] for r in rows)
                    done = [r["value"] for r in rows if r["value"] is not None]
                    print(
                        f"seed {seed} {method:>8}: {len(rows)} trials, {used} trial-epochs "
                        f"run, {len(done)} finished, best within budget "
                        f"{curves[method][-1][-1]:.4f}; {time.perf_counter() - t0:.0f} s, "
                        f"training steps {sum(r['train_time'] for r in rows):.0f} s",
                        flush=True,
                    )
                target = curves["random"][-1][-1]
                shares.append(share_to_reach(curves["tpe_asha"][-1], target))
                print(
                    f"seed {seed}: TPE+ASHA reaches random's best {target:.4f} at "
                    f"{shares[-1]:.3f} of the budget",
                    flush=True,
                )
        finally:
            ray.shutdown()
            tracking.stop_server(root / "mlruns")

    print(f"\nbest val_dice3d (mean of {args.seeds} seeds) against trial-epochs spent:")
    print(f"{'budget':>8}" + "".join(f"{m:>12}" for m in curves))
    for b in sorted({max(1, round(args.budget * f)) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 1)}):
        print(
            f"{b:>8}"
            + "".join(f"{statistics.mean(c[b] for c in curves[m]):>12.4f}" for m in curves)
        )
    share = statistics.median(shares)
    share_of_wall = train / wall if wall else float("nan")
    # a trial's start-up: the later trials of each sweep (the first one also carries the
    # sweep's own set-up, shown apart)
    startup = statistics.mean(later_trials or first_trials or [math.nan])
    final_eval = statistics.mean(final_evals or [math.nan])
    print(
        f"per-seed shares: {', '.join(f'{s:.3f}' for s in shares)}; sweeps' wall time "
        f"{wall:.0f} s for {n_trials} trials, of which training steps {train:.0f} s and "
        f"per-epoch validation {val:.0f} s ({val / max(n_trials, 1):.2f} s per trial)"
    )
    print(
        f"start-up per trial: {startup:.2f} s from the previous trial's end to the first "
        f"step (first trial of a sweep, with the sweep's set-up: "
        f"{statistics.mean(first_trials or [math.nan]):.2f} s; inside the trial: "
        f"{statistics.mean(worker_startups or [math.nan]):.2f} s); final fused evaluation "
        f"{final_eval:.2f} s per trial that reached it ({len(final_evals)})"
    )
    print(
        f"RESULT budget_share_to_random_best={share:.3f} train_share_of_wall={share_of_wall:.3f}"
        f" startup_s_per_trial={startup:.2f} final_eval_s_per_trial={final_eval:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
