"""The driver side of training: `train` (``vfsearch train``), `run_training` (one fitted run,
what a Tune trial driver calls) and `build_trainer` (its `TorchTrainer`).

* `train`: checks the store, connects to Ray (a local one, or ``--address`` /
  ``$RAY_ADDRESS``, see `vfsearch.adapters.ray_runtime`), resolves the MLflow URI, then
  `run_training`.
* `run_training`: builds the `TorchTrainer` with `build_trainer`, fits it and summarises
  the result (`TrainSummary`), marking the MLflow run FAILED if training fails.
* `build_trainer`: the plain-data ``loop`` dict (`loop_config`) every worker's
  `vfsearch.pipelines.train.worker.train_loop_per_worker` receives, and Ray's configs.
* `run_in_process`: a one-worker Tune trial's run without Ray Train: the same loop, in the
  trial's own process, reporting to Tune.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfsearch.adapters import progress as _progress  # `progress` is run_training's flag
from vfsearch.adapters.ray_runtime import connect_ray
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker, runs_url, tracking_uri
from vfsearch.adapters.tracking.schema import (
    DEFAULT_EXPERIMENT,
    ENV_URI,
    GIT_COMMIT_TAG,
    LAUNCH_TAG,
    RAY_RUN_TAG,
    STORE_TAG,
)
from vfsearch.core.config import Config
from vfsearch.core.errors import UserError
from vfsearch.pipelines.guards import check_cluster, check_gpu_split, is_url
from vfsearch.pipelines.train.worker import LineRelay, train_loop_per_worker

if TYPE_CHECKING:
    from ray.train import UserCallback
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue


def loop_config(
    store: str | Path,
    config: Config,
    *,
    name: str,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    mlflow_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    launch_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    lines: Queue | None = None,
    fault: Mapping[str, Any] | None = None,
    t_launch: float | None = None,
) -> dict[str, Any]:
    """The plain-data ``loop`` dict the worker loop receives (arguments: `build_trainer`)."""
    store = str(store) if "://" in str(store) else str(Path(store).resolve())
    mlflow = None
    if mlflow_uri:
        mlflow = {
            "uri": mlflow_uri,
            "experiment": experiment,
            "name": name,
            "parent_run_id": parent_run_id,
            "launch_id": launch_id or uuid.uuid4().hex,
            "tags": {
                RAY_RUN_TAG: name,
                GIT_COMMIT_TAG: git_commit(),
                STORE_TAG: store,
                **{k: str(v) for k, v in (tags or {}).items()},
            },
            "params": {"run.workers": workers, "run.gpus_per_worker": gpus_per_worker},
            "config_file": (
                {"name": Path(config_file).name, "text": Path(config_file).read_text()}
                if config_file
                else None
            ),
        }
    return {
        "store": store,
        "config": config.flatten(),
        "name": name,
        "mlflow": mlflow,
        "lines": lines,
        "fault": dict(fault) if fault else None,
        "cpus": cpus_per_worker,
        "t_launch": time.time() if t_launch is None else t_launch,
    }


def run_in_process(
    store: str | Path,
    config: Config,
    *,
    name: str,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    mlflow_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    fault: Mapping[str, Any] | None = None,
    t_launch: float | None = None,
) -> None:
    """One run as a one-worker Ray Tune trial, in the trial's own process.

    What `run_training` does with a one-worker `TorchTrainer`, without Ray Train: the same
    worker loop (`vfsearch.pipelines.train.worker.tune_trial_loop`) reports each epoch's
    metrics and checkpoint to Tune (``ray.tune.report``), which keeps the checkpoints, hands
    the last one back when the trial is retried (Tune's ``FailureConfig``) or its sweep
    restored, and stops the trial at a report (ASHA). Must be called inside a Tune trial,
    whose resources are the worker's (CPUs, GPU). The MLflow run's launch id derives from the
    parent run and ``name``, so a retried trial that failed before its first checkpoint
    continues the run its first attempt created.
    """
    from vfsearch.pipelines.train.worker import tune_trial_loop

    loop = loop_config(
        store,
        config,
        name=name,
        workers=1,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        mlflow_uri=mlflow_uri,
        experiment=experiment,
        parent_run_id=parent_run_id,
        launch_id=f"{parent_run_id or 'run'}-{name}",
        tags=extra_tags,
        fault=fault,
        t_launch=t_launch,
    )
    tune_trial_loop(loop)


def build_trainer(
    store: str | Path,
    config: Config,
    *,
    name: str,
    storage: str | Path,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    mlflow_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    launch_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    config_file: str | Path | None = None,
    callbacks: Sequence[UserCallback] | None = None,
    lines: Queue | None = None,
    fault: Mapping[str, Any] | None = None,
    t_launch: float | None = None,
) -> TorchTrainer:
    """The `ray.train.torch.TorchTrainer` of one training run (a Tune trial driver calls this).

    Args:
        store: Zarr store written by ``vfsearch ingest`` (a path every worker can read).
        name, storage: `ray.train.RunConfig` name and storage path; the same pair restores
            the run (no timestamps in names that must be restorable).
        workers, gpus_per_worker, cpus_per_worker: `ScalingConfig` (GPU when > 0).
        mlflow_uri: where rank 0 logs (None: no MLflow); ``experiment``, ``parent_run_id``
            (nest the run under a sweep's parent run), ``tags`` (added to the run),
            ``config_file`` (logged as an artifact), ``launch_id`` (tags the run so that a
            replaced rank 0 finds it again; default: a fresh id).
        callbacks: Ray Train ``UserCallback`` objects for `RunConfig` (Tune callbacks go on
            ``ray.tune.RunConfig`` instead).
        lines: a `ray.util.queue.Queue` that rank 0 puts its progress lines on (one per
            epoch; see `LineRelay`); None: no lines.
        fault: test hook, ``{"raise_after_epoch": k}`` or ``{"pid_file", "epoch", "batch",
            "rank"}`` (see `vfsearch.pipelines.train.hooks.fault_hooks`).
        t_launch: wall-clock start (``time.time()``) from which the workers measure
            ``startup_s``, the seconds to the first optimiser step (default: now).
    """
    # ray (and the backend subclassing Ray's) is imported here, not at the top: importing
    # vfsearch.pipelines.train must not start Ray's import
    import ray.train
    from ray.train.torch import TorchTrainer

    from vfsearch.adapters.ray_backend import PrewarmTorchConfig

    use_gpu = gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    loop = loop_config(
        store,
        config,
        name=name,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        mlflow_uri=mlflow_uri,
        experiment=experiment,
        parent_run_id=parent_run_id,
        launch_id=launch_id,
        tags=tags,
        config_file=config_file,
        lines=lines,
        fault=fault,
        t_launch=t_launch,
    )
    storage = str(storage) if "://" in str(storage) else str(Path(storage).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        torch_config=PrewarmTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        # mypy reads ray.train.RunConfig as ray.air's; at run time ray/train/__init__.py
        # rebinds it to Train V2's (logging_config, UserCallback callbacks): stub gap
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            # the final report's checkpoint (best.pt with its threshold) is kept on top of
            # the last keep_checkpoints epochs
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints + int(config.train.final_eval)
            ),
            # Ray Train's own per-report INFO lines would bury the progress lines
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks) if callbacks else None,  # type: ignore[arg-type]
        ),
    )


@dataclass
class TrainSummary:
    """What a finished training run left behind."""

    name: str
    storage: str
    checkpoint: str | None  # folder of the last checkpoint (state.pt, best.pt, meta.json)
    best_val_dice: float | None
    best_epoch: int | None
    epochs_done: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    runs_url: str | None = None

    def __str__(self) -> str:
        best = "-" if self.best_val_dice is None else f"{self.best_val_dice:.4f}"
        lines = [
            f"run {self.name}: {self.epochs_done} epochs, best val dice {best} at epoch "
            f"{self.best_epoch}",
            f"checkpoint: {self.checkpoint}",
        ]
        if self.mlflow_run_id:
            lines.append(f"mlflow run {self.mlflow_run_id}: {self.runs_url}")
        lines.append(f"resume or extend with: --name {self.name}")
        return "\n".join(lines)


@cache  # once per process: an in-process trial reuses its process for the next trial
def git_commit() -> str:
    """The vfsearch source tree's commit (``+dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _check_store(store: str | Path) -> None:
    s = Store(store)
    _ = s.meta  # raises UserError for a folder that is not a store
    for split in ("train", "val"):
        if not s.case_ids(split):
            raise UserError(
                f"{store}: no complete cases in split {split!r} "
                "(re-run `vfsearch ingest` with a different --split)"
            )


def run_training(
    store: str | Path,
    config: Config,
    *,
    name: str,
    storage: str | Path,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    mlflow_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    config_file: str | Path | None = None,
    callbacks: Sequence[UserCallback] | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    fault: Mapping[str, Any] | None = None,
) -> TrainSummary:
    """Fit one run on an already connected Ray, tracked in MLflow when ``mlflow_uri`` is set.

    Rank 0 creates the MLflow run (nested under ``parent_run_id`` if given; a run restarted
    with the same ``name`` continues the MLflow run named in its checkpoint), logs the
    flattened config as params, tags (dataset fingerprint, git commit, Ray run name),
    per-epoch metrics and at the end the config (``config/``) and best checkpoint
    (``checkpoints/best.pt``) as artifacts. If training fails, this marks the run FAILED.
    ``progress``: print rank 0's line per epoch here (default: at a terminal, see
    `vfsearch.adapters.progress`).
    """
    import ray.train

    t_launch = time.time()
    launch_id = uuid.uuid4().hex
    relay = LineRelay() if (_progress.enabled() if progress is None else progress) else None
    trainer = build_trainer(
        store,
        config,
        name=name,
        storage=storage,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        mlflow_uri=mlflow_uri,
        experiment=experiment,
        parent_run_id=parent_run_id,
        launch_id=launch_id,
        tags=extra_tags,
        config_file=config_file,
        callbacks=callbacks,
        lines=relay.queue if relay else None,
        fault=fault,
        t_launch=t_launch,
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        if mlflow_uri:
            _mark_failed(
                mlflow_uri,
                experiment,
                launch_id,
                "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
            )
        if isinstance(exc, ray.train.TrainingFailedError):
            raise RuntimeError(f"training run {name} failed: {exc}") from exc
        raise
    finally:
        if relay is not None:
            relay.close()
    ckpt = result.checkpoint
    ckpt_dir = ckpt.path if ckpt is not None else None
    meta: dict[str, Any] = {}
    if ckpt_dir and Path(ckpt_dir, "meta.json").is_file():
        meta = json.loads(Path(ckpt_dir, "meta.json").read_text())
    metrics = dict(result.metrics or {})
    run_id = meta.get("mlflow_run_id") or None
    exp_id = meta.get("mlflow_experiment_id") or None
    return TrainSummary(
        name=name,
        storage=str(storage),
        checkpoint=ckpt_dir,
        best_val_dice=meta.get("best_val_dice", metrics.get("best_val_dice")),
        best_epoch=meta.get("best_epoch", metrics.get("best_epoch")),
        epochs_done=meta.get("epoch", metrics.get("epoch")),
        metrics=metrics,
        mlflow_run_id=run_id,
        tracking_uri=mlflow_uri,
        runs_url=runs_url(mlflow_uri, exp_id) if (mlflow_uri and exp_id) else None,
    )


def _mark_failed(uri: str, experiment: str, launch_id: str, status: str) -> None:
    """End the MLflow run of a failed launch (rank 0 could not: it may have been killed)."""
    try:
        tracker = Tracker(uri)
        run_id = tracker.find_run(experiment, LAUNCH_TAG, launch_id)
        if run_id and tracker.get_run(run_id).info.status == "RUNNING":
            tracker.end_run(run_id, status)
    except Exception:  # noqa: BLE001 - keep the training error, not the logging one
        pass


def train(
    store: str | Path,
    config: Config,
    *,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    name: str | None = None,
    address: str | None = None,
    storage: str | Path | None = None,
    workdir: str | Path = "mlruns",
    mlflow_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    config_file: str | Path | None = None,
    track: bool = True,
    verbose: bool = False,
    echo: Callable[[str], Any] = print,
) -> TrainSummary:
    """``vfsearch train``: train ``config`` on ``store`` with Ray Train, tracked in MLflow.

    ``storage`` defaults to ``<workdir>/checkpoints``; ``name`` to ``train-<time>`` (pass the
    name again to resume). ``mlflow_uri`` defaults to `vfsearch.adapters.tracking.tracking_uri`
    (``$MLFLOW_TRACKING_URI`` or the embedded server of ``workdir``); ``track=False`` skips
    MLflow. One line per epoch at a terminal (`vfsearch.adapters.progress`); Ray's own output
    only with ``verbose`` (`vfsearch.adapters.ray_runtime.ray_output`).
    """
    if workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker: must be >= 0, got {gpus_per_worker}")
    if cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker: must be > 0, got {cpus_per_worker}")
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise UserError(f"--name: {name!r} is not a valid run name")
    check_gpu_split(workers, gpus_per_worker, "--gpus-per-worker")
    _check_store(store)
    name = name or time.strftime("train-%Y%m%d-%H%M%S")
    storage = storage or Path(workdir) / "checkpoints"
    connect_ray(
        address,
        num_cpus_needed=workers * cpus_per_worker,
        num_gpus_needed=workers * gpus_per_worker,
        verbose=verbose,
    )
    # before the embedded MLflow server is started: a refused run leaves nothing behind
    check_cluster(
        embedded_tracking=track and mlflow_uri is None and not os.environ.get(ENV_URI),
        storage=str(storage) if is_url(storage) else str(Path(storage).resolve()),
        store=str(store),
    )
    if mlflow_uri is None and track:
        mlflow_uri = tracking_uri(workdir)
    echo(
        f"training {name}: {workers} worker(s), store {store}, storage {storage}"
        + (f", MLflow {mlflow_uri}" if mlflow_uri else "")
    )
    return run_training(
        store,
        config,
        name=name,
        storage=storage,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        mlflow_uri=mlflow_uri,
        experiment=experiment,
        config_file=config_file,
    )


__all__ = [
    "TrainSummary",
    "build_trainer",
    "git_commit",
    "loop_config",
    "run_in_process",
    "run_training",
    "train",
]
