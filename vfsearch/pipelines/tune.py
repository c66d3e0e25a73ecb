"""`vfsearch tune`: Ray Tune over trial drivers, each fitting one Ray Train `TorchTrainer`
(several workers per trial) or running its one worker's loop itself (one worker per trial).

Three thin levels (DESIGN.md): ``Tuner(_trial_driver)`` -> `_trial_driver` builds and fits a
`TorchTrainer` through `vfsearch.pipelines.train.run_training` (``RunConfig.name`` derived from the
Tune trial id, ``TuneReportCallback`` forwarding rank 0's per-epoch reports) -> the worker
loop. A one-worker trial skips the middle level: `_trial_driver` runs the worker loop in the
trial's own process (`vfsearch.pipelines.train.driver.run_in_process`), reporting each
epoch's metrics and checkpoint to Tune, which retries it from its last checkpoint and reuses
its process for the next trial; no Train controller, placement group or worker actors start
(~14 s of every trial's start-up on 2 CPUs). `OptunaSearch` (TPE, seeded, define-by-run
compiled from the YAML space) proposes configs; ASHA stops trials on the per-epoch validation
Dice (``val_dice``). Each trial's last report carries ``val_dice3d``: the fused 3D Dice at
the original resolution of the trial's *best* checkpoint, so the value Optuna is told
(OptunaSearch passes on the last reported one) is the trial's best so far by construction.
Trials stopped by ASHA never reach it and are recorded in Optuna as pruned.

MLflow: one parent run per sweep (tag ``vfsearch.sweep``), one nested child run per trial
(tag ``vfsearch.run`` = the trial's Ray Train run name, so a resumed trial finds and reuses
its child run instead of creating a second one). A Tune callback tags each child with its
status (completed, stopped early, failed). The Optuna study lives in an SQLite RDB beside
the MLflow data (``<workdir>/optuna.db``) so ``optuna-dashboard`` can open it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfsearch.adapters import progress, tracking
from vfsearch.adapters.lazy import import_in_background
from vfsearch.adapters.plots import plot_importances
from vfsearch.adapters.ray_runtime import connect_ray
from vfsearch.adapters.search_space import SearchSpace, load_space, resolve_space
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker
from vfsearch.adapters.tracking.schema import (
    BEST_PREFIX,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    ENV_URI,
    FINGERPRINT_TAG,
    GIT_COMMIT_TAG,
    IMPORTANCES_DIR,
    IMPORTANCES_FILE,
    RAY_RUN_TAG,
    SEARCH_SPACE_DIR,
    SPACE_FILE_TAG,
    STATUS_TAG,
    STORE_TAG,
    SWEEP_EXPERIMENT,
    SWEEP_OF_TRIAL_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)
from vfsearch.core.config import Config, with_overrides
from vfsearch.core.errors import UserError
from vfsearch.pipelines.guards import check_cluster, check_gpu_split, is_url
from vfsearch.pipelines.train import run_training
from vfsearch.pipelines.train.driver import git_commit, run_in_process
from vfsearch.pipelines.train.worker import format_epoch

DRIVER_CPUS = 0.05  # the trial driver only waits on its TorchTrainer
DRIVER_SHARE = 0.01  # of the custom resource named by --driver-resource (one unit: 100 drivers)
SAMPLERS = ("tpe", "random")


@dataclass
class SweepContext:
    """Plain data every trial driver needs (passed with `tune.with_parameters`)."""

    store: str
    space: SearchSpace
    sweep: str
    storage: str
    mlflow_uri: str | None
    experiment: str
    parent_run_id: str | None
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float
    in_process: bool = False  # one-worker trials: the loop in the trial's process
    fault: dict[str, Any] | None = None  # test hook (see `run_training`)


SUMMARY_MODULES: tuple[str, ...] = ("optuna.importance",)  # what `_importances` imports


def trial_run_name(sweep: str, trial_id: str) -> str:
    """Ray Train run name of a trial: stable across restores (no timestamps)."""
    return f"{sweep}-{trial_id}"


def _trial_driver(config: dict[str, Any], ctx: SweepContext) -> None:
    """One Tune trial: the worker loop in this process (``ctx.in_process``: one worker,
    reporting to Tune itself), else one `TorchTrainer` whose rank-0 reports reach Tune."""
    import ray.tune

    t_launch = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = ctx.space.config_for(config)
    cfg = cfg.__class__.from_flat({**cfg.flatten(), "train.epochs": ctx.space.epochs})
    tags = {SWEEP_OF_TRIAL_TAG: ctx.sweep, TRIAL_TAG: trial_id, STATUS_TAG: "running"}
    if ctx.in_process:
        run_in_process(
            ctx.store,
            cfg,
            name=trial_run_name(ctx.sweep, trial_id),
            gpus_per_worker=ctx.gpus_per_worker,
            cpus_per_worker=ctx.cpus_per_worker,
            mlflow_uri=ctx.mlflow_uri,
            experiment=ctx.experiment,
            parent_run_id=ctx.parent_run_id,
            extra_tags=tags,
            fault=ctx.fault,
            t_launch=t_launch,
        )
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    run_training(
        ctx.store,
        cfg,
        name=trial_run_name(ctx.sweep, trial_id),
        storage=ctx.storage,
        workers=ctx.workers,
        gpus_per_worker=ctx.gpus_per_worker,
        cpus_per_worker=ctx.cpus_per_worker,
        mlflow_uri=ctx.mlflow_uri,
        experiment=ctx.experiment,
        parent_run_id=ctx.parent_run_id,
        callbacks=[TuneReportCallback()],
        progress=False,
        extra_tags=tags,
        fault=ctx.fault,
    )


def _status_callback(ctx: SweepContext):
    """A Tune callback that tags each trial's child run with how the trial ended."""
    from ray.tune import Callback

    class TrialStatus(Callback):
        def _tag(self, trial, status: str) -> None:
            if not ctx.mlflow_uri:
                return
            tracker = Tracker(ctx.mlflow_uri)
            run_id = tracker.find_run(
                ctx.experiment, RAY_RUN_TAG, trial_run_name(ctx.sweep, trial.trial_id)
            )
            if run_id is None:  # stopped before its first step: nothing was logged
                return
            tracker.set_tags(run_id, {STATUS_TAG: status})
            # a trial stopped by ASHA or killed by an error cannot end its own run
            if status != "completed" and tracker.get_run(run_id).info.status == "RUNNING":
                tracker.end_run(run_id, "KILLED" if status == "stopped early" else "FAILED")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            done = last.get(ctx.space.metric) is not None
            self._tag(trial, "completed" if done else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tag(trial, "failed")

    return TrialStatus()


def sweep_eta(
    durations: Sequence[float], remaining: int, concurrency: int, elapsed: Sequence[float] = ()
) -> float | None:
    """Seconds until a sweep ends: ``remaining`` trials (running or pending) at the mean
    duration of ``durations``, less what the running ones have done (``elapsed`` seconds
    each), ``concurrency`` at a time (None: nothing to estimate from)."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = mean * remaining - sum(min(e, mean) for e in elapsed)
    return work / max(1, min(concurrency, remaining))


def _trial_lines(space: SearchSpace, total: int, concurrency: int):
    """A Tune callback printing one line per trial result and per finished trial.

    It runs on the driver, where Tune delivers every trial's reports (rank 0's metrics,
    forwarded by ``TuneReportCallback``), so the lines need no worker output. The ETA
    (`sweep_eta`) uses the durations of the trials finished in this session (before the
    first one: the reporting trial's pace over its epochs) and how long the running ones
    have run.
    """

    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.setup()

        def setup(self, **info):  # again on a restored sweep: no clock from another process
            self.started: dict[str, float] = {}
            self.durations: list[float] = []

        def _tail(self, trials, finished=None, pace: float | None = None) -> str:
            done = sum(t.is_finished() or t is finished for t in trials)
            now = time.monotonic()
            eta = sweep_eta(
                self.durations or ([] if pace is None else [pace]),
                total - done,
                concurrency,
                [now - t for t in self.started.values()],
            )
            return f"  trials {done}/{total} done  eta {progress.duration(eta)}"

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.setdefault(trial.trial_id, time.monotonic())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "final_eval_s" in result or "val_dice" not in result:
                return  # the final (fused 3D) report: shown when the trial completes
            epoch = int(result.get("epoch", 0))
            elapsed = time.monotonic() - self.started.get(trial.trial_id, time.monotonic())
            pace = elapsed / epoch * space.epochs if epoch else None
            line = format_epoch(epoch, space.epochs, result)
            progress.say(f"trial {trial.trial_id}  {line}" + self._tail(trials, pace=pace))

        def _finished(self, trials, trial, how: str) -> None:
            start = self.started.pop(trial.trial_id, None)
            if start is not None:
                self.durations.append(time.monotonic() - start)
            progress.say(f"trial {trial.trial_id}  {how}" + self._tail(trials, finished=trial))

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            best = (
                f"best val dice {_fmt(last.get('best_val_dice'))} at epoch "
                f"{_fmt(last.get('best_epoch'))}"
            )
            if last.get(space.metric) is not None:
                how = "completed  " + "  ".join(
                    f"{name} {_fmt(last.get(name))}" for name, _ in space.objectives
                )
            else:
                how = f"stopped early after epoch {_fmt(last.get('epoch'))}"
            self._finished(trials, trial, f"{how}  ({best})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finished(trials, trial, "failed")

    return TrialLines()


def max_concurrent_trials(
    resources: dict[str, float],
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    driver_resource: str | None = None,
    in_process: bool = False,
) -> int:
    """How many trials fit the cluster at once: each needs its workers plus a tiny driver
    (a sliver of a CPU, or of ``driver_resource`` when the drivers run on a dedicated node);
    a trial run ``in_process`` is its one worker, with no driver."""
    cpus = resources.get("CPU", 0.0)
    driver_cpus = 0.0 if (driver_resource or in_process) else DRIVER_CPUS
    per_trial_cpu = workers * cpus_per_worker + driver_cpus
    fit = math.floor(cpus / per_trial_cpu + 1e-9) if per_trial_cpu > 0 else 1
    if gpus_per_worker > 0:
        fit = min(fit, math.floor(resources.get("GPU", 0.0) / (workers * gpus_per_worker) + 1e-9))
    if driver_resource and not in_process:
        fit = min(fit, math.floor(resources.get(driver_resource, 0.0) / DRIVER_SHARE + 1e-9))
    return max(1, fit)


def trial_resources(
    driver_resource: str | None,
    *,
    in_process: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> dict[str, float]:
    """What one trial asks Ray for: its driver's (`driver_resources`), or, for a trial run
    ``in_process``, its one worker's CPUs and GPU."""
    if not in_process:
        return driver_resources(driver_resource)
    out = {"cpu": cpus_per_worker}
    if gpus_per_worker > 0:
        out["gpu"] = gpus_per_worker
    return out


def driver_resources(driver_resource: str | None) -> dict[str, float]:
    """What one trial driver asks Ray for: a sliver of a CPU anywhere, or (on a cluster) a
    share of a custom resource that only the safe head node offers, so that a trial's driver
    and its Train controller never sit on a worker node that may disappear."""
    if driver_resource:
        return {"cpu": 0, driver_resource: DRIVER_SHARE}
    return {"cpu": DRIVER_CPUS}


@dataclass
class SweepSummary:
    sweep: str
    table: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    parent_run_id: str | None = None
    runs_url: str | None = None
    export_command: str | None = None
    importances: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"sweep {self.sweep}: {len(self.table)} trial(s)"]
        if self.table:
            keys = [k for k in self.table[0] if k not in ("trial_id",)]
            head = f"{'rank':>4}  {'trial':<14}" + "".join(f"{k:>14}" for k in keys)
            lines.append(head)
            for i, row in enumerate(self.table, 1):
                cells = "".join(f"{_fmt(row.get(k)):>14}" for k in keys)
                lines.append(f"{i:>4}  {row['trial_id']:<14}{cells}")
        if self.importances:
            lines.append(
                "parameter importances: "
                + ", ".join(f"{k}={v:.2f}" for k, v in self.importances.items())
            )
        if self.runs_url:
            lines.append(f"MLflow runs: {self.runs_url}")
        if self.export_command:
            lines.append(f"export the best: {self.export_command}")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "-" if value is None else str(value)[:13]


def tune(
    store: str | Path,
    space_path: str | Path,
    *,
    num_samples: int = 4,
    address: str | None = None,
    gpus_per_trial: float = 0.0,
    workers_per_trial: int = 1,
    max_concurrent: int | None = None,
    name: str | None = None,
    resume: bool = False,
    storage: str | Path | None = None,
    seed: int = 0,
    workdir: str | Path = "mlruns",
    mlflow_uri: str | None = None,
    cpus_per_worker: float = 1.0,
    initial_points: list[dict[str, Any]] | None = None,
    sampler: str = "tpe",
    driver_resource: str | None = None,
    in_process: bool | None = None,
    verbose: bool = False,
    echo: Callable[[str], Any] = print,
    fault: dict[str, Any] | None = None,
) -> SweepSummary:
    """Run (or ``resume``) a sweep; returns the ranked trials and where to look.

    ``initial_points``: configs (sampled keys only) to evaluate first, e.g. known-good
    settings to warm-start TPE; they go to Optuna as points to evaluate.
    ``sampler``: ``tpe`` (default) or ``random`` (Optuna's seeded random sampler: the
    baseline a TPE sweep should beat). ``driver_resource``: name of a custom Ray resource
    (default ``$VFSEARCH_DRIVER_RESOURCE``) that each trial driver requests instead of CPU,
    e.g. ``vfsearch_driver`` offered only by a cluster's head (see cluster/).
    ``in_process``: run each trial's training loop in the trial's own process instead of a
    `TorchTrainer` (default: when ``workers_per_trial`` is 1). It saves the Train controller,
    placement group and worker start-up of every trial (measured ~14 s of start-up per trial
    on 2 CPUs); Tune then keeps the trials' checkpoints, retries a failed trial from its
    last one (``train.max_failures`` of the space's fixed config) and reuses the trial
    processes (``reuse_actors``), so imports and caches stay warm. The driver resource is
    not used by such trials. ``fault``: test hook passed to every trial (see
    `vfsearch.pipelines.train.run_training`). At a terminal, one line per trial result
    (`_trial_lines`); Ray's own output (Tune's status table, worker logs) only with
    ``verbose``. A resumed sweep keeps the output settings it was started with (Tune restores
    its run config).
    """
    space = load_space(space_path)  # a bad space fails here, before Ray starts
    space_path = resolve_space(space_path)  # a packaged name -> its shipped file
    if num_samples < 1:
        raise UserError(f"--num-samples: must be >= 1, got {num_samples}")
    if workers_per_trial < 1:
        raise UserError(f"--workers-per-trial: must be >= 1, got {workers_per_trial}")
    if gpus_per_trial < 0:
        raise UserError(f"--gpus-per-trial: must be >= 0, got {gpus_per_trial}")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler: must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    in_process = workers_per_trial == 1 if in_process is None else in_process
    if in_process and workers_per_trial != 1:
        raise UserError("in-process trials have one worker (--workers-per-trial 1)")
    check_gpu_split(workers_per_trial, gpus_per_trial / workers_per_trial, "--gpus-per-trial")
    driver_resource = driver_resource or os.environ.get("VFSEARCH_DRIVER_RESOURCE") or None
    fingerprint = Store(store).fingerprint  # a bad store fails here too
    sweep = name or f"{Path(space_path).stem}-s{seed}"
    if not sweep or "/" in sweep or sweep.startswith("."):
        raise UserError(f"--name: {sweep!r} is not a valid sweep name")
    workdir = Path(workdir)
    storage = (
        str(storage)
        if storage and "://" in str(storage)
        else str(Path(storage or workdir / "ray_results").resolve())
    )
    sweep_dir = f"{storage.rstrip('/')}/{sweep}"

    import ray
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler

    # imported here: it subclasses Ray's OptunaSearch, so importing it imports ray
    from vfsearch.adapters.ray_searcher import FinalMetricOptunaSearch

    exists = rtune.Tuner.can_restore(sweep_dir)
    if resume and not exists:
        raise UserError(f"--resume: no sweep {sweep!r} under {storage} to resume")
    if exists and not resume:
        raise UserError(
            f"--name: sweep {sweep!r} already exists under {storage}; "
            f"pass --resume to continue it or choose another --name"
        )

    gpus_per_worker = gpus_per_trial / workers_per_trial
    connect_ray(
        address,
        num_cpus_needed=workers_per_trial * cpus_per_worker + (0.0 if in_process else DRIVER_CPUS),
        num_gpus_needed=gpus_per_trial,
        resources={driver_resource: 1.0} if driver_resource else None,
        verbose=verbose,
    )
    # multi-node: a tracking server, checkpoints and a store every node reaches; checked
    # before the embedded MLflow server is started, so a refused sweep leaves nothing behind
    check_cluster(
        embedded_tracking=mlflow_uri is None and not os.environ.get(ENV_URI),
        storage=storage,
        store=str(store),
    )
    mlflow_uri = mlflow_uri or tracking.tracking_uri(workdir)
    tracker = Tracker(mlflow_uri)
    parent = tracker.find_run(SWEEP_EXPERIMENT, SWEEP_TAG, sweep) if resume else None
    cluster = ray.cluster_resources()
    if driver_resource and cluster.get(driver_resource, 0.0) < DRIVER_SHARE:
        raise UserError(
            f"--driver-resource: no node of the Ray cluster offers the resource "
            f"{driver_resource!r} (start the head with --resources "
            f"'{{\"{driver_resource}\": 1}}')"
        )
    auto = max_concurrent_trials(
        cluster,
        workers=workers_per_trial,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        driver_resource=driver_resource,
        in_process=in_process,
    )
    # on a joined cluster an explicit cap may exceed what runs now: pending trials make the
    # autoscaler add nodes; a local Ray cannot grow, so there the resources bound it
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    concurrent = (
        max_concurrent if (max_concurrent and joined) else min(max_concurrent or auto, auto)
    )
    if parent is None:
        parent = tracker.start_run(
            SWEEP_EXPERIMENT,
            sweep,
            tags={
                SWEEP_TAG: sweep,
                SPACE_FILE_TAG: str(space_path),
                "seed": seed,
                GIT_COMMIT_TAG: git_commit(),
                STORE_TAG: str(store),
                FINGERPRINT_TAG: json.dumps(fingerprint, sort_keys=True)[:5000],
                "ray.version": ray.__version__,
                "ray.nodes": len(ray.nodes()),
                "ray.cluster_resources": json.dumps(cluster, sort_keys=True),
            },
        )
        tracker.log_params(
            parent,
            {
                "sweep.num_samples": num_samples,
                "sweep.seed": seed,
                "sweep.space": Path(space_path).name,
                "sweep.workers_per_trial": workers_per_trial,
                "sweep.gpus_per_trial": gpus_per_trial,
                "sweep.max_concurrent": concurrent,
                "sweep.epochs": space.epochs,
                "sweep.sampler": sampler,
                "sweep.driver_resource": driver_resource or "cpu",
                "sweep.trials_in_process": in_process,
            },
        )
        tracker.log_artifact(parent, space_path, SEARCH_SPACE_DIR)
    else:
        tracker.resume_run(parent)
    runs_url = tracking.runs_url(mlflow_uri, tracker.experiment_of(parent))
    echo(f"sweep {sweep}: {num_samples} trial(s), up to {concurrent} at once; MLflow {runs_url}")

    ctx = SweepContext(
        store=str(store) if is_url(store) else str(Path(store).resolve()),
        space=space,
        sweep=sweep,
        storage=str(Path(storage) / sweep / "trials")
        if "://" not in storage
        else f"{sweep_dir}/trials",
        mlflow_uri=mlflow_uri,
        experiment=SWEEP_EXPERIMENT,
        parent_run_id=parent,
        workers=workers_per_trial,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        in_process=in_process,
        fault=fault,
    )
    trainable = rtune.with_resources(
        rtune.with_parameters(_trial_driver, ctx=ctx),
        trial_resources(
            driver_resource,
            in_process=in_process,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        ),
    )
    # in-process trials are Tune's to retry and checkpoint (a TorchTrainer does it for its
    # own run): the space's fixed config says how often and how many (trial configs only
    # sample what the space samples; these two are sweep-wide)
    base = with_overrides(Config(), space.fixed, source=str(space_path), check=False).train
    failure_config = rtune.FailureConfig(max_failures=base.max_failures if in_process else 0)
    checkpoint_config = (
        rtune.CheckpointConfig(num_to_keep=base.keep_checkpoints + int(base.final_eval))
        if in_process
        else None
    )
    optuna_db = study_storage(workdir)
    # Per-epoch reports carry val_dice (ASHA's metric); val_dice3d arrives once, in the last
    # report, computed on the trial's best checkpoint, so the value Optuna is told (the last
    # reported) is the trial's best by construction. Trials ASHA stops before it never have
    # it and reach Optuna as pruned, which TPE ranks below every finished trial.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not verbose:  # the rest of the console noise (`ray_output` quiets Ray itself)
        import optuna

        # Tune's new output engine prints its header box even at verbose=0; the legacy one
        # prints nothing at 0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # MLflow prints two links per run it ends; the summary has the runs table's
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ..."
    try:
        if resume:
            tuner = rtune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=True)
        else:
            import optuna

            names = [m for m, _ in space.objectives]
            modes = [d for _, d in space.objectives]
            searcher = FinalMetricOptunaSearch(
                space.define_by_run,
                metric=names if space.multi_objective else names[0],
                mode=modes if space.multi_objective else modes[0],
                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.startup_trials)
                if sampler == "tpe"
                else optuna.samplers.RandomSampler(seed=seed),
                points_to_evaluate=initial_points or None,
                study_name=sweep,
                storage=optuna.storages.RDBStorage(optuna_db),
            )
            # max_t one past the last epoch: ASHA stops a trial that reaches max_t, and a
            # trial that ran all its epochs still has its final (val_dice3d) report to make
            # (a grace period covering every epoch means no early stopping: FIFO)
            scheduler = (
                ASHAScheduler(
                    time_attr="epoch",
                    metric=space.scheduler_metric,
                    mode=space.mode,
                    max_t=space.epochs + 1,
                    grace_period=space.grace_period,
                    reduction_factor=space.reduction_factor,
                )
                if space.grace_period < space.epochs
                else None
            )
            callbacks = [_status_callback(ctx)]
            if progress.enabled():
                callbacks.append(_trial_lines(space, num_samples, concurrent))
            tuner = rtune.Tuner(
                trainable,
                tune_config=rtune.TuneConfig(
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=num_samples,
                    max_concurrent_trials=concurrent,
                    # an in-process trial's successor runs in the same process: warm imports
                    reuse_actors=in_process,
                ),
                run_config=rtune.RunConfig(
                    name=sweep,
                    storage_path=storage,
                    callbacks=callbacks,
                    verbose=1 if verbose else 0,
                    failure_config=failure_config,
                    checkpoint_config=checkpoint_config,
                ),
            )
        # the sweep's summary needs Optuna's importance module, which imports scikit-learn
        # (~1.8 s): loaded while the trials run, not after them
        import_in_background(SUMMARY_MODULES)
        grid = tuner.fit()
    except BaseException:
        tracker.end_run(parent, "KILLED")
        raise
    summary = _summarise(grid, space, sweep, tracker, parent, optuna_db)
    summary.runs_url = tracking.sweep_view(mlflow_uri, parent, sweep, space) or runs_url
    return summary


def pareto_front(rows: list[dict[str, Any]], objectives: tuple[tuple[str, str], ...]) -> set[int]:
    """Indices of the rows no other row dominates (at least as good in every objective and
    better in one); rows missing an objective (stopped, failed) are never on the front."""

    def values(row: dict[str, Any]) -> list[float] | None:
        out = []
        for name, mode in objectives:
            v = row.get(name)
            if not isinstance(v, (int, float)) or math.isnan(v):
                return None
            out.append(v if mode == "max" else -v)  # larger is better from here on
        return out

    scored = [(i, v) for i, v in ((i, values(r)) for i, r in enumerate(rows)) if v is not None]
    front = set()
    for i, a in scored:
        dominated = any(
            all(x >= y for x, y in zip(b, a, strict=True)) and b != a for j, b in scored if j != i
        )
        if not dominated:
            front.add(i)
    return front


def study_storage(workdir: str | Path) -> str:
    """SQLite URL of the Optuna studies (beside MLflow's data, readable by optuna-dashboard)."""
    path = Path(workdir).resolve() / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _summarise(
    grid, space: SearchSpace, sweep: str, tracker: Tracker, parent: str, optuna_db: str
) -> SweepSummary:
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        row: dict[str, Any] = {
            "trial_id": str(trial_id),
            **{name: m.get(name) for name, _ in space.objectives},
        }
        row.update(
            {
                "val_dice": m.get("best_val_dice", m.get("val_dice")),
                "epoch": m.get("epoch"),
                "status": "failed"
                if result.error
                else ("completed" if m.get(space.metric) is not None else "stopped early"),
            }
        )
        rows.append(row)
    sign = -1 if space.mode == "max" else 1

    def key(row: dict[str, Any]) -> tuple:
        v = row[space.metric]
        ok = isinstance(v, (int, float)) and not math.isnan(v)
        return (0 if ok else 1, sign * v if ok else 0.0)

    rows.sort(key=key)
    if space.multi_objective:
        front = pareto_front(rows, space.objectives)
        for i, row in enumerate(rows):
            row["pareto"] = "yes" if i in front else ""
    summary = SweepSummary(sweep=sweep, table=rows, parent_run_id=parent)
    best = rows[0] if rows and key(rows[0])[0] == 0 else None
    summary.best = best
    tags: dict[str, Any] = {
        "vfsearch.finished_trials": sum(r["status"] == "completed" for r in rows)
    }
    if best is not None:
        best_run = tracker.find_run(
            SWEEP_EXPERIMENT, RAY_RUN_TAG, trial_run_name(sweep, best["trial_id"])
        )
        tags.update(
            {
                BEST_TRIAL_TAG: best["trial_id"],
                BEST_RUN_TAG: best_run or "",
                f"{BEST_PREFIX}{space.metric}": best[space.metric],
            }
        )
        tracker.log_metrics(parent, {f"{BEST_PREFIX}{space.metric}": best[space.metric]}, 0)
        summary.export_command = f"vfsearch export --sweep {sweep} --metric {space.metric}"
    if space.multi_objective:
        tags["pareto_trials"] = ",".join(r["trial_id"] for r in rows if r.get("pareto"))
    tracker.set_tags(parent, tags)
    summary.importances = _importances(sweep, optuna_db, tracker, parent)
    tracker.end_run(parent, "FINISHED")
    return summary


def _importances(sweep: str, optuna_db: str, tracker: Tracker, parent: str) -> dict[str, float]:
    """Optuna's parameter importances, logged on the parent as JSON and a bar plot."""
    import optuna

    try:
        study = optuna.load_study(study_name=sweep, storage=optuna_db)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < 2:
            return {}
        # multi-objective: importances for the first (ranking) objective, as a value to
        # minimise (what Optuna's default PED-ANOVA evaluator ranks for)
        sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = (lambda t: sign * t.values[0]) if len(study.directions) > 1 else None
        importances = {
            k: float(v)
            for k, v in optuna.importance.get_param_importances(study, target=target).items()
        }
    except (RuntimeError, ValueError, KeyError):  # too few distinct values to rank
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, Path(IMPORTANCES_FILE).name)  # read back by report and visualize
        path.write_text(json.dumps(importances, indent=2))
        tracker.log_artifact(parent, path, IMPORTANCES_DIR)
        png = Path(tmp, "param_importances.png")
        plot_importances(importances, png)
        tracker.log_artifact(parent, png, IMPORTANCES_DIR)
    return importances


__all__ = [
    "SweepSummary",
    "driver_resources",
    "max_concurrent_trials",
    "pareto_front",
    "study_storage",
    "sweep_eta",
    "trial_resources",
    "trial_run_name",
    "tune",
]
