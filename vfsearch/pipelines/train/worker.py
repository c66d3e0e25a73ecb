"""What runs in each Ray Train worker: `train_loop_per_worker`, rank 0's MLflow run
(`_RankZeroRun`), the progress lines (`format_epoch`, `LineRelay`) and the final evaluation.

One process per worker: DDP (gloo on CPU, NCCL on GPU), an `EpochSampler` shard of the
train split, validation on the whole validation split every epoch from all-reduced TP/FP/FN,
one ``ray.train.report`` (a barrier) with a checkpoint per epoch, early stopping, and at the
end the fused 3D validation of the best weights, shared by the ranks (each fuses its own
cases; the per-threshold counts are summed). A one-worker Tune trial runs the same loop in
the trial's own process (`tune_trial_loop`): the few calls to Ray go through a `Session`
(`vfsearch.adapters.ray_backend`), Ray Train's or Ray Tune's. The pieces live in
`vfsearch.pipelines.train.loop` (training), `.checkpoint` (files) and `.hooks` (fault drill).

Console: Ray's own output stays in its log files unless ``verbose``
(`vfsearch.adapters.ray_runtime.ray_output`); at a terminal rank 0 sends one line per epoch
(losses, validation Dice, windows/s, ETA) to the driver, which prints it (`LineRelay`).

MLflow: only rank 0 logs (`_RankZeroRun`). It creates the run (or continues the one named in
its checkpoint) in a background thread started after the first optimiser step, so tracking
adds nothing to the start-up; params (flattened config), tags (dataset fingerprint, git
commit, run name), per-epoch metrics, and at the end the config and the best checkpoint as
artifacts.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import nn

from vfsearch.adapters.progress import duration
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker
from vfsearch.adapters.tracking.schema import (
    BEST_CHECKPOINT,
    CHECKPOINTS_DIR,
    FINGERPRINT_TAG,
    LAUNCH_TAG,
)
from vfsearch.core.config import Config
from vfsearch.core.steps import autocast
from vfsearch.pipelines.evaluate import fused_validation_metrics
from vfsearch.pipelines.train.checkpoint import restore, save_checkpoint, seed_everything
from vfsearch.pipelines.train.hooks import fault_hooks
from vfsearch.pipelines.train.loop import (
    Parts,
    Reduce,
    TrainState,
    all_summer,
    best_snapshot,
    optimizer_digest,
    run_epoch,
    setup,
)
from vfsearch.pipelines.visualize import log_visualisations

if TYPE_CHECKING:
    from ray.util.queue import Queue


class Session(Protocol):
    """What the worker loop asks of Ray (`vfsearch.adapters.ray_backend`: `TrainSession` in a
    `TorchTrainer` worker, `TuneSession` in a one-worker Tune trial run in-process)."""

    def rank_world(self) -> tuple[int, int]: ...

    def device(self) -> torch.device: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def get_checkpoint(self) -> Any: ...

    def report(self, metrics: dict[str, Any], folder: str, dir_name: str) -> None: ...


def freeze_imports() -> bool:
    """Once per process, before its first run builds anything: what the imports left (Ray,
    torch, vfsearch: ~480,000 objects) leaves the garbage collector's view, so that the
    automatic full collections during the run walk only what it creates. Measured in fresh
    one-epoch trial processes (2-CPU box, three each): full collections from the process's
    start to the trial's end took 1.14-1.66 s without, 0.86-1.09 s with (most of the rest
    runs during Ray's and torch's imports, before any vfsearch code). Only while nothing is
    frozen yet: a later run in the same process finds this freeze (or `tune_trial_loop`'s
    after a collection) and freezes nothing, so a failed run's garbage stays collectable.
    True when this call froze."""
    if gc.get_freeze_count():
        return False
    gc.freeze()
    return True


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs. ``loop`` is plain data (see `build_trainer`)."""
    from vfsearch.adapters.ray_backend import TrainSession

    freeze_imports()
    run_worker(loop, TrainSession())


def tune_trial_loop(loop: dict[str, Any]) -> None:
    """The same loop as the only worker of a one-worker Ray Tune trial, in the trial's own
    process (`vfsearch.adapters.ray_backend.TuneSession`): no Train controller, placement
    group or worker actor to start. The process may run the next trial too (Tune's
    ``reuse_actors``): its imports stay warm, and what this trial held is released here
    (a collection, then `gc.freeze` so that the next one does not walk every module again)."""
    from vfsearch.adapters.ray_backend import TuneSession, prewarm_imports

    freeze_imports()
    prewarm_imports()  # the first trial in a process: overlaps the model and data set-up
    finished = False
    try:
        run_worker(loop, TuneSession())
        finished = True
    finally:
        gc.collect()  # data loaders, models and optimisers of this trial
        if finished:
            # what survives (modules, caches: ~475,000 objects with torch, Ray and MLflow
            # imported) leaves the collector's view: a full collection cost ~0.3-0.4 s per
            # trial, now it sees only what the next trial creates (the automatic ones too).
            # Not after a failure: its traceback may still hold the trial's tensors
            gc.freeze()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_worker(loop: dict[str, Any], session: Session) -> None:
    """One worker's whole run: set-up, restore, the epochs, the end (`_finish`)."""
    t_entry = time.time()
    config = Config.from_flat(loop["config"])
    tc = config.train
    rank, world = session.rank_world()
    device = session.device()
    parts, data = setup(
        loop["store"],
        config,
        rank=rank,
        world=world,
        device=device,
        cpus=loop.get("cpus", 1.0),
        prepare=session.prepare_model,
    )
    state = _restore_or_start(parts, session, rank=rank, world=world, seed=tc.seed)

    tracker = (
        _RankZeroRun(
            loop,
            run_id=state.run_id,
            resumed_from=state.resumed_from,
            digest=optimizer_digest(parts.opt_g.state_dict()),
        )
        if rank == 0 and loop.get("mlflow")
        else None
    )
    echo = _line_sender(loop.get("lines") if rank == 0 else None)
    if state.resumed_from:
        echo(f"resumed from epoch {state.resumed_from} of run {loop.get('name')}")
    if data.val_stride > 1:
        echo(
            f"per-epoch validation: {data.val_windows} of {data.val_total} windows, one slice "
            f"in {data.val_stride} of each vertebra (train.val_windows); val_dice3d at the "
            f"end scores every slice"
        )
    hooks = fault_hooks(loop.get("fault"))
    clock = _StartClock(loop.get("t_launch"), t_entry, tracker)
    hooks.after_step.append(clock)
    keep_best = (
        partial(
            best_snapshot,
            parts.inner,
            config=loop["config"],
            seq_len=config.data.seq_len,
            store_info=data.store_info,
        )
        if rank == 0
        else None
    )
    report = partial(
        _save_and_report,
        parts,
        state,
        session=session,
        rank=rank,
        world=world,
        loop=loop,
        tracker=tracker,
    )
    all_sum = all_summer(device, world)

    metrics: dict[str, Any] = {}
    epoch_times: list[float] = []
    for epoch in range(state.epoch + 1, tc.epochs + 1):
        metrics, stop = run_epoch(
            parts, data, state, tc, epoch=epoch, hooks=hooks, all_sum=all_sum, keep_best=keep_best
        )
        if not state.resumed_from:
            metrics.update(clock.metrics())
        # rank 0 logs before the report barrier, so that the other ranks wait there rather
        # than inside the next epoch's timed training phase; the MLflow round trip overlaps
        # the checkpoint write, and is waited for before the report
        logged = None
        if tracker is not None:
            state.run_id = tracker.ready()
            logged = tracker.log_metrics_soon(metrics, step=epoch)
        epoch_times.append(metrics["epoch_time"])  # this attempt's: remaining x mean is the ETA
        eta = 0.0 if stop else (tc.epochs - epoch) * sum(epoch_times) / len(epoch_times)
        echo(format_epoch(epoch, tc.epochs, metrics, eta))
        report(metrics, f"epoch_{epoch:04d}", before_report=logged)
        hooks.epoch_end(epoch, rank)
        if stop:
            echo(
                f"early stop: no val_dice gain for {state.since_best} epochs "
                f"(best {state.best_metric:.4f} at epoch {state.best_epoch})"
            )
            break
    del data  # the training loader's processes are not needed for the final evaluation
    _finish(
        loop,
        config,
        parts,
        state,
        metrics,
        tracker=tracker,
        report=report,
        rank=rank,
        world=world,
        all_sum=all_sum,
    )


# -- the pieces the worker calls ----------------------------------------------------------


def _restore_or_start(
    parts: Parts, session: Session, *, rank: int, world: int, seed: int
) -> TrainState:
    """Continue from Ray's last checkpoint of this run if there is one, else start afresh
    (every rank seeded differently)."""
    checkpoint = session.get_checkpoint()
    if checkpoint is None:
        seed_everything(seed + rank)
        return TrainState()
    with checkpoint.as_directory() as d:
        return restore(d, parts, rank=rank, world=world, seed=seed)


def _save_and_report(
    parts: Parts,
    state: TrainState,
    metrics: dict[str, Any],
    dir_name: str,
    *,
    session: Session,
    rank: int,
    world: int,
    loop: Mapping[str, Any],
    tracker: _RankZeroRun | None,
    before_report: Callable[[], Any] | None = None,
) -> None:
    """Every rank's share of the checkpoint (`save_checkpoint`), and one report (Ray Train's
    ``report``, or Tune's for a trial run in-process). ``before_report``: called between
    the two (to wait for work that overlapped the checkpoint write)."""
    with tempfile.TemporaryDirectory(prefix="vfsearch-ckpt-") as tmp:
        try:
            save_checkpoint(
                tmp,
                parts,
                state,
                rank=rank,
                world=world,
                config=loop["config"],
                name=loop.get("name", ""),
                experiment_id=tracker.experiment_id if tracker else "",
                metrics=metrics,
            )
        except BaseException:
            if before_report is not None:
                # let the overlapping work end first: a retry reads what it logged
                with contextlib.suppress(Exception):
                    before_report()
            raise
        if before_report is not None:
            before_report()
        # a barrier: every rank reports once; the folders merge into one
        session.report(metrics if rank == 0 else {}, tmp, dir_name)


class _StartClock:
    """``after_step`` hook: seconds from the launch (``startup_s``) and from the worker loop's
    entry (``worker_setup_s``) to this attempt's first optimiser step, and that step's wall
    clock time (``first_step_unix_s``, for start-up measured across processes). That step also
    starts rank 0's MLflow set-up, which then overlaps the first epoch, not the start-up."""

    def __init__(
        self, t_launch: float | None, t_entry: float, tracker: _RankZeroRun | None
    ) -> None:
        self.t_launch, self.t_entry, self.tracker = t_launch, t_entry, tracker
        self.first_step_s: float | None = None
        self.worker_setup_s = 0.0
        self.first_step_at = 0.0

    def __call__(self, epoch: int, batch: int, rank: int) -> None:
        if self.first_step_s is not None:
            return
        now = time.time()
        self.first_step_s = now - float(self.t_launch or now)
        self.worker_setup_s = now - self.t_entry
        self.first_step_at = now
        if self.tracker is not None:
            self.tracker.start()  # MLflow set-up overlaps the first epoch, not start-up

    def metrics(self) -> dict[str, float]:
        if self.first_step_s is None:
            return {}
        return {
            "startup_s": self.first_step_s,
            "worker_setup_s": self.worker_setup_s,
            "first_step_unix_s": self.first_step_at,
        }


def _finish(
    loop: Mapping[str, Any],
    config: Config,
    parts: Parts,
    state: TrainState,
    metrics: dict[str, Any],
    *,
    tracker: _RankZeroRun | None,
    report: Callable[[dict[str, Any], str], None],
    rank: int,
    world: int,
    all_sum: Reduce,
) -> None:
    """The end of a run: the fused 3D validation of the best weights, shared by every rank
    (its threshold goes into rank 0's best.pt), rank 0's pictures, a last checkpoint and
    report, the MLflow run finished."""
    model = parts.inner
    final = _final_evaluation(
        loop, config, parts, state.best, rank=rank, world=world, all_sum=all_sum
    )
    if final:
        metrics = {**metrics, **final}
        if state.best is not None and "val_threshold3d" in final:
            state.best["threshold"] = float(final["val_threshold3d"])
        if tracker is not None:
            tracker.log_metrics(final, step=int(metrics.get("epoch", 0)))
            _log_pictures(loop, config, model, tracker, final.get("val_threshold3d"))
    # a last barrier: Tune (and Optuna) see the fused 3D figures of the best model (rank 0's
    # dict is the one forwarded), and the last checkpoint's best.pt carries the deployment
    # threshold and its meta.json the final figures
    if config.train.final_eval:
        report(metrics, f"final_{state.epoch:04d}")
    if tracker is not None:
        tracker.finish(state.best)


def _final_evaluation(
    loop: Mapping[str, Any],
    config: Config,
    parts: Parts,
    best_state: Mapping[str, Any] | None,
    *,
    rank: int,
    world: int,
    all_sum: Reduce,
) -> dict[str, float]:
    """The fused 3D validation figures (``val_dice3d`` ...) of the best weights, on every rank.

    Every slice of every validation vertebra is predicted, fused into 3D and mapped back to
    the original CT grid (`vfsearch.pipelines.evaluate.fused_validation_metrics`). The work is
    shared: rank 0's best weights are broadcast, each rank fuses its own share of the cases
    on its device (bf16 autocast on CUDA with ``train.amp``), and the per-threshold TP/FP/FN
    of every case are summed across ranks, so that every rank chooses the threshold on the
    whole split and returns the same figures. The model is left holding the best weights.
    Classifiers are scored by rank 0 alone (no fusion to share).
    """
    if not config.train.final_eval:
        return {}
    model = parts.inner
    if not _best_weights_everywhere(model, best_state, rank=rank, world=world, all_sum=all_sum):
        return {}
    t0 = time.perf_counter()
    with autocast(parts.device, parts.amp_dtype):
        out = fused_validation_metrics(
            model, loop["store"], config, split="val", rank=rank, world=world, all_sum=all_sum
        )
    out = {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
    out["final_eval_s"] = time.perf_counter() - t0
    # the cost side of a multi-objective sweep (Dice against size or speed)
    out["model_params"] = float(sum(p.numel() for p in model.parameters()))
    if rank == 0:
        out["latency_ms"] = _latency_ms(model, config)
    return out


def _best_weights_everywhere(
    model: nn.Module,
    best_state: Mapping[str, Any] | None,
    *,
    rank: int,
    world: int,
    all_sum: Reduce,
) -> bool:
    """Load rank 0's best weights into ``model`` on every rank (a broadcast when distributed;
    only rank 0 keeps best.pt). False everywhere when rank 0 has none."""
    has_best = float(all_sum([1.0 if (rank == 0 and best_state is not None) else 0.0])[0])
    if has_best < 0.5:
        return False
    if rank == 0:
        assert best_state is not None
        model.load_state_dict(best_state["model"])
    if world > 1 and dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            for tensor in model.state_dict().values():  # the same order on every rank
                dist.broadcast(tensor, src=0)
    return True


def _latency_ms(model: nn.Module, config: Config, *, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass on one window, on the model's device."""
    param = next(model.parameters())
    size = config.data.patch_size
    x = torch.zeros(1, config.data.seq_len, size, size, device=param.device)
    sync = torch.cuda.synchronize if param.device.type == "cuda" else (lambda: None)
    times = []
    model.eval()
    with torch.inference_mode():
        for i in range(repeats + 2):  # two warm-up passes
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return 1000.0 * sorted(times)[len(times) // 2]


def _log_pictures(
    loop: Mapping[str, Any],
    config: Config,
    model: nn.Module,
    tracker: _RankZeroRun,
    threshold: float | None,
) -> None:
    """Heatmap, attention and 3D pictures of the best model on one validation case."""
    if not config.train.log_pictures:
        return
    try:
        # the run's metrics were logged before this (ready() has set the tracker)
        log_visualisations(
            cast(Tracker, tracker.tracker),
            tracker.ready(),
            model,
            loop["store"],
            config,
            threshold=threshold,
        )
    except Exception as exc:  # noqa: BLE001 - pictures must never fail a finished run
        _write_line(f"warning: could not log pictures ({type(exc).__name__}: {exc})")


# -- console lines ------------------------------------------------------------------------


def format_epoch(
    epoch: int, epochs: int, m: Mapping[str, float], eta_s: float | None = None
) -> str:
    """One epoch's line: losses, validation Dice/IoU, lr, windows/s, seconds (and ETA)."""
    terms = " ".join(
        f"{k.split('/', 1)[1]} {v:.4f}"
        for k, v in m.items()
        if k.startswith("train/")
        and k not in ("train/loss", "train/grad_norm", "train/d_loss", "train/g_loss")
    )
    gan = f"  D {m['train/d_loss']:.4f} G {m['train/g_loss']:.4f}" if "train/d_loss" in m else ""
    eta = "" if eta_s is None else f"  eta {duration(eta_s)}"
    return (
        f"epoch {epoch}/{epochs}  loss {m['train/loss']:.4f} ({terms}){gan}  "
        f"val dice {m['val_dice']:.4f} iou {m['val_iou']:.4f}  "
        f"lr {m['lr']:.2e}  {m['windows_per_s']:.1f} windows/s  {m['epoch_time']:.1f} s"
        f"{eta}"
    )


def _write_line(line: str) -> None:
    # not print(): Ray Train patches print in workers and the line would show up twice
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _line_sender(lines: Queue | None) -> Callable[[str], None]:
    """Where a worker's progress lines go: the driver's queue (`LineRelay`), or nowhere."""
    if lines is None:
        return lambda _line: None

    def send(line: str) -> None:
        # the driver may have stopped listening: training goes on
        with contextlib.suppress(Exception):
            lines.put_nowait(line)

    return send


class LineRelay:
    """Rank 0's progress lines, printed by the driver.

    A worker's stdout reaches the console only through Ray's ``log_to_driver``, which
    `connect_ray` turns off (with it comes Ray's own noise) unless ``verbose``. So rank 0 puts
    each line on a Ray queue (an actor without CPUs, reachable from any node) and a driver
    thread prints it; `close` prints what is left and removes the queue.
    """

    def __init__(self, write: Callable[[str], Any] = print) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._write = write
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="vfsearch-lines", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._write(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray went away: nothing more will come
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            for line in self.queue.get_nowait_batch(self.queue.qsize()):
                self._write(line)
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - never mask the training run's own outcome
            pass


# -- rank 0's MLflow run ------------------------------------------------------------------


class _RankZeroRun:
    """Rank 0's MLflow run: the only worker that logs.

    Set up in a background thread started after the first optimiser step, so that neither
    the mlflow import nor its HTTP round trips delay training; joined before the first
    metrics are logged. The run is the one named in the checkpoint (a restart), else the one
    an earlier attempt of this launch created (a replaced worker), else a new run (nested
    under ``parent_run_id`` if given). ``loop["mlflow"]`` carries the URI, experiment, tags,
    params, launch id and config file (see `build_trainer`).
    """

    def __init__(
        self, loop: Mapping[str, Any], *, run_id: str | None, resumed_from: int, digest: float
    ) -> None:
        self.spec = dict(loop["mlflow"])
        self.store, self.config = loop["store"], loop["config"]
        self.run_id, self.resumed_from, self.digest = run_id, resumed_from, digest
        self.experiment_id = ""
        self.tracker: Tracker | None = None
        self.logged: set[tuple[str, int]] = set()  # (metric, step) of earlier attempts
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._setup, name="vfsearch-mlflow", daemon=True)
            self._thread.start()

    def _setup(self) -> None:
        try:
            spec = self.spec
            t = Tracker(spec["uri"])
            self.experiment_id = t.experiment_id(spec["experiment"])
            tags = {
                **spec["tags"],
                LAUNCH_TAG: spec["launch_id"],
                FINGERPRINT_TAG: dataset_fingerprint(self.store),
                **_node_tags(),
            }
            if self.run_id:
                t.resume_run(self.run_id)
                self.logged = _logged_steps(t, self.run_id)
            else:
                self.run_id = t.find_run(spec["experiment"], LAUNCH_TAG, spec["launch_id"])
                if self.run_id:  # an earlier attempt of this launch made it
                    self.logged = _logged_steps(t, self.run_id)
                else:
                    self.run_id = t.start_run(
                        spec["experiment"],
                        spec["name"],
                        tags=tags,
                        parent_run_id=spec.get("parent_run_id"),
                    )
            t.set_tags(self.run_id, tags)
            t.log_params(self.run_id, {**self.config, **spec.get("params", {})})
            if self.resumed_from:
                t.set_tags(self.run_id, {"vfsearch.resumed_from_epoch": self.resumed_from})
                t.log_metrics(
                    self.run_id, {"resume/optimizer_digest": self.digest}, self.resumed_from
                )
            self.tracker = t
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
            self._error = exc

    def ready(self) -> str:
        self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.run_id  # type: ignore[return-value]

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> str:
        """Log ``metrics`` at ``step``, except those an earlier attempt of this run logged at
        that step already (it ran the epoch, but the checkpoint of it never registered: a
        sweep interrupted or a worker lost between the two), so that no step is twice in a
        metric's history."""
        run_id = self.ready()
        assert self.tracker is not None
        if self.logged:
            metrics = {k: v for k, v in metrics.items() if (k, step) not in self.logged}
        self.tracker.log_metrics(run_id, metrics, step=step)
        return run_id

    def log_metrics_soon(self, metrics: Mapping[str, Any], step: int) -> Callable[[], None]:
        """`log_metrics` in a thread of its own, so that the round trip overlaps what the
        caller does next; returns the function that waits for it (and re-raises its error).
        Call `ready` first: the run must exist."""
        error: list[BaseException] = []

        def work() -> None:
            try:
                self.log_metrics(metrics, step)
            except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                error.append(exc)

        thread = threading.Thread(target=work, name="vfsearch-mlflow-log", daemon=True)
        thread.start()

        def wait() -> None:
            thread.join()
            if error:
                raise error[0]

        return wait

    def finish(self, best_state: Mapping[str, Any] | None) -> None:
        """Config and best checkpoint as artifacts, then end the run FINISHED."""
        run_id = self.ready()
        t = self.tracker
        assert t is not None
        with tempfile.TemporaryDirectory(prefix="vfsearch-artifacts-") as tmp:
            resolved = Path(tmp, "resolved.json")
            resolved.write_text(json.dumps(self.config, indent=2, sort_keys=True))
            t.log_artifact(run_id, resolved, "config")
            if self.spec.get("config_file"):
                src = self.spec["config_file"]
                path = Path(tmp, Path(src["name"]).name)
                path.write_text(src["text"])
                t.log_artifact(run_id, path, "config")
            if best_state is not None:
                torch.save(dict(best_state), Path(tmp, BEST_CHECKPOINT))
                t.log_artifact(run_id, Path(tmp, BEST_CHECKPOINT), CHECKPOINTS_DIR)
        t.end_run(run_id, "FINISHED")


def _logged_steps(tracker: Tracker, run_id: str) -> set[tuple[str, int]]:
    """Every (metric, step) already in the run (read when an attempt continues it)."""
    keys = tracker.get_run(run_id).data.metrics
    return {(k, int(m.step)) for k in keys for m in tracker.get_metric_history(run_id, k)}


def dataset_fingerprint(store: str | Path) -> str:
    """A short hash of the store's metadata (ingest fingerprint, spacing, cases and splits)."""
    s = Store(store)
    meta = s.meta
    payload = {"meta": meta, "splits": {sp: s.case_ids(sp) for sp in ("train", "val", "test")}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _node_tags() -> dict[str, str]:
    """Where rank 0 runs: ``ray.node_id`` (and IP) of its node; re-set on every restart, so a
    run moved to another node by a failure names the node that finished it."""
    import ray

    if not ray.is_initialized():
        return {}
    ctx = ray.get_runtime_context()
    return {"ray.node_id": ctx.get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


__all__ = [
    "LineRelay",
    "dataset_fingerprint",
    "format_epoch",
    "run_worker",
    "train_loop_per_worker",
    "tune_trial_loop",
]
