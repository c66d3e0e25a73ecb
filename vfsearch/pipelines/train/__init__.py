"""Training on Ray Train V2: the driver side (`train`, `run_training`, `build_trainer`) and the
per-worker loop (`train_loop_per_worker`).

Three thin levels (Ray's ``train_tune_interop`` shape):

* `train` (``vfsearch train``): connects to Ray (a local one, or ``--address`` /
  ``$RAY_ADDRESS``), resolves the MLflow URI, then `run_training`.
* `run_training`: builds the `TorchTrainer` with `build_trainer`, fits it and summarises
  the result (marking the MLflow run FAILED if training fails). A Ray Tune trial driver
  calls this (or `build_trainer`) per trial with ``parent_run_id`` (nested runs) and its
  callbacks.
* `train_loop_per_worker`: one process per worker: DDP (gloo on CPU, NCCL on GPU), a
  `DistributedSampler` shard of the train split (optionally oversampling windows with
  fracture), AdamW/Adam with warm-up + cosine, gradient clipping, bf16 autocast on CUDA,
  staged GAN training, validation on the whole validation split every epoch from
  all-reduced TP/FP/FN, one ``ray.train.report`` (a barrier) with a checkpoint per epoch,
  early stopping. The maths lives in `vfsearch.core.steps`.

Console: Ray's own output stays in its log files unless ``verbose`` (`ray_output`); at a
terminal rank 0 sends one line per epoch (losses, validation Dice, windows/s, ETA) to the
driver, which prints it (`_LineRelay`).

MLflow: only rank 0 logs (`_RankZeroRun`). It creates the run (or continues the one named in
its checkpoint) in a background thread started after the first optimiser step, so tracking
adds nothing to the start-up; params (flattened config), tags (dataset fingerprint, git
commit, run name), per-epoch metrics, and at the end the config and the best checkpoint as
artifacts.

Checkpoints (a folder per epoch in ``<storage>/<name>/``) hold plain tensors and dicts only,
so ``torch.load(..., weights_only=True)`` reads them:

* ``state.pt``: ``model``, ``disc``, ``opt_g``, ``opt_d``, ``sched``, ``scaler`` state dicts,
  ``epoch`` (last finished, 1-based), ``best_metric``, ``best_epoch``, ``since_best``,
  ``config`` (flat), ``mlflow_run_id``, ``world_size``;
* ``best.pt``: ``model`` state dict of the best epoch so far, ``epoch``, ``val_dice``,
  ``config`` (flat), ``seq_len``;
* ``rng_rank<r>.pt``: each worker's torch / CUDA / numpy / Python RNG state.

Restart: a run started again with the same ``name`` and ``storage`` is restored by Ray Train
V2 (it finds the run's state under ``<storage>/<name>``), ``ray.train.get_checkpoint()``
returns the last checkpoint, and the loop continues at the next epoch with the saved
optimiser, scheduler and RNG states; the same MLflow run keeps receiving metrics. A worker
that dies is replaced the same way, up to ``train.max_failures`` times.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from vfsearch.core.config import Config
from vfsearch.core.errors import UserError

RUN_TAG = "vfsearch.run"  # MLflow tag holding the Ray run name
LAUNCH_TAG = "vfsearch.launch"  # MLflow tag of one `run_training` call (replaced workers reuse it)
PRIMARY_METRIC = "val_dice"


# -- pure helpers ------------------------------------------------------------------------

def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at optimiser step ``step`` (0-based): linear warm-up from
    ``1/warmup_steps`` to 1 over ``warmup_steps``, then a cosine from 1 to 0 at
    ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_digest(state: Mapping[str, Any]) -> float:
    """A float fingerprint of an optimiser state dict (sum of |x| over its state tensors plus
    step counts): equal states give equal digests. Used to check that a restart resumes with
    the saved optimiser state."""
    import torch

    total = 0.0
    for pid in sorted(state.get("state", {})):
        for key in sorted(state["state"][pid]):
            value = state["state"][pid][key]
            if isinstance(value, torch.Tensor):
                total += float(value.detach().double().abs().sum())
            elif isinstance(value, (int, float)):
                total += float(value)
    return total


def build_models(config: Config, seed: int | None = None):
    """Seed the RNG with ``seed`` (default ``train.seed``) and build ``(model, disc)``.

    ``disc`` is None without ``model.gan``. The order (seed, model, discriminator) is fixed,
    so the same config always gives the same initial weights on every worker.
    """
    import torch

    from vfsearch.core.models import build_discriminator, build_model

    torch.manual_seed(config.train.seed if seed is None else seed)
    model = build_model(config.model, config.data.seq_len)
    disc = build_discriminator(config.model, config.data.seq_len) if config.model.gan else None
    return model, disc


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": [int(py_state[0]), [int(v) for v in py_state[1]],
                   None if py_state[2] is None else float(py_state[2])],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), float(gauss)))
    version, internal, g = state["python"]
    random.setstate((version, tuple(internal), g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _write_line(line: str) -> None:
    # not print(): Ray Train patches print in workers and the line would show up twice
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _line_sender(lines: Any) -> Callable[[str], None]:
    """Where a worker's progress lines go: the driver's queue (`_LineRelay`), or nowhere."""
    if lines is None:
        return lambda _line: None

    def send(line: str) -> None:
        try:
            lines.put_nowait(line)
        except Exception:  # noqa: BLE001 - the driver stopped listening: training goes on
            pass

    return send


class _LineRelay:
    """Rank 0's progress lines, printed by the driver.

    A worker's stdout reaches the console only through Ray's ``log_to_driver``, which
    `connect_ray` turns off (with it comes Ray's own noise) unless ``verbose``. So rank 0 puts
    each line on a Ray queue (an actor without CPUs, reachable from any node) and a driver
    thread prints it; `close` prints what is left and removes the queue.
    """

    def __init__(self, write: Callable[[str], Any] = print) -> None:
        import threading

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


def format_epoch(epoch: int, epochs: int, m: Mapping[str, float],
                 eta_s: float | None = None) -> str:
    """One epoch's line: losses, validation Dice/IoU, lr, windows/s, seconds (and ETA)."""
    from vfsearch.adapters.progress import duration

    terms = " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in m.items()
                     if k.startswith("train/") and k not in ("train/loss", "train/grad_norm",
                                                            "train/d_loss", "train/g_loss"))
    gan = (f"  D {m['train/d_loss']:.4f} G {m['train/g_loss']:.4f}"
           if "train/d_loss" in m else "")
    eta = "" if eta_s is None else f"  eta {duration(eta_s)}"
    return (f"epoch {epoch}/{epochs}  loss {m['train/loss']:.4f} ({terms}){gan}  "
            f"val dice {m['val_dice']:.4f} iou {m['val_iou']:.4f}  "
            f"lr {m['lr']:.2e}  {m['windows_per_s']:.1f} windows/s  {m['epoch_time']:.1f} s"
            f"{eta}")


class _RankZeroRun:
    """Rank 0's MLflow run: the only worker that logs.

    Set up in a background thread started after the first optimiser step, so that neither
    the mlflow import nor its HTTP round trips delay training; joined before the first
    metrics are logged. The run is the one named in the checkpoint (a restart), else the one
    an earlier attempt of this launch created (a replaced worker), else a new run (nested
    under ``parent_run_id`` if given). ``loop["mlflow"]`` carries the URI, experiment, tags,
    params, launch id and config file (see `build_trainer`).
    """

    def __init__(self, loop: Mapping[str, Any], *, run_id: str | None, resumed_from: int,
                 digest: float) -> None:
        self.spec = dict(loop["mlflow"])
        self.store, self.config = loop["store"], loop["config"]
        self.run_id, self.resumed_from, self.digest = run_id, resumed_from, digest
        self.experiment_id = ""
        self.tracker = None
        self._thread: Any = None
        self._error: BaseException | None = None

    def start(self) -> None:
        import threading

        if self._thread is None:
            self._thread = threading.Thread(target=self._setup, name="vfsearch-mlflow",
                                            daemon=True)
            self._thread.start()

    def _setup(self) -> None:
        try:
            from vfsearch.adapters.tracking import Tracker

            spec = self.spec
            t = Tracker(spec["uri"])
            self.experiment_id = t.experiment_id(spec["experiment"])
            tags = {**spec["tags"], LAUNCH_TAG: spec["launch_id"],
                    "dataset_fingerprint": dataset_fingerprint(self.store), **_node_tags()}
            if self.run_id:
                t.resume_run(self.run_id)
            else:
                self.run_id = t.find_run(spec["experiment"], LAUNCH_TAG, spec["launch_id"]) \
                    or t.start_run(spec["experiment"], spec["name"], tags=tags,
                                   parent_run_id=spec.get("parent_run_id"))
            t.set_tags(self.run_id, tags)
            t.log_params(self.run_id, {**self.config, **spec.get("params", {})})
            if self.resumed_from:
                t.set_tags(self.run_id, {"vfsearch.resumed_from_epoch": self.resumed_from})
                t.log_metrics(self.run_id, {"resume/optimizer_digest": self.digest},
                              self.resumed_from)
            self.tracker = t
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread
            self._error = exc

    def ready(self) -> str:
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.run_id  # type: ignore[return-value]

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> str:
        run_id = self.ready()
        self.tracker.log_metrics(run_id, metrics, step=step)
        return run_id

    def finish(self, best_state: Mapping[str, Any] | None) -> None:
        """Config and best checkpoint as artifacts, then end the run FINISHED."""
        import torch

        run_id = self.ready()
        t = self.tracker
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
                torch.save(dict(best_state), Path(tmp, "best.pt"))
                t.log_artifact(run_id, Path(tmp, "best.pt"), "checkpoints")
        t.end_run(run_id, "FINISHED")



def _node_tags() -> dict[str, str]:
    """Where rank 0 runs: ``ray.node_id`` (and IP) of its node; re-set on every restart, so a
    run moved to another node by a failure names the node that finished it."""
    import ray

    if not ray.is_initialized():
        return {}
    ctx = ray.get_runtime_context()
    return {"ray.node_id": ctx.get_node_id(), "ray.node_ip": ray.util.get_node_ip_address()}


# -- the worker loop -----------------------------------------------------------------------

def _fault_hook(fault: Mapping[str, Any] | None, *, epoch: int, batch: int, rank: int) -> None:
    """Test hook: the chosen rank writes its pid once and waits to be SIGKILLed mid-epoch."""
    if not fault or "pid_file" not in fault:
        return
    if epoch != fault.get("epoch", 2) or batch != fault.get("batch", 1) or \
            rank != fault.get("rank", 0):
        return
    try:
        fd = os.open(fault["pid_file"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # the replacement worker: carry on
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(float(fault.get("wait_s", 300)))


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs. ``loop`` is plain data (see `build_trainer`)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    from vfsearch.adapters.dataset import WindowDataset
    from vfsearch.adapters.store import Store
    from vfsearch.core.losses import build_loss, gan_d_loss
    from vfsearch.core.metrics import scores
    from vfsearch.core.steps import eval_step, gan_step, seg_step

    t_entry = time.time()
    config = Config.from_flat(loop["config"])
    tc = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    fault = loop.get("fault")

    # models: the same seed on every rank (DDP also broadcasts rank 0's weights)
    model, disc = build_models(config)
    output_kind = getattr(model, "output_kind", "segmentation")
    loss_fn = build_loss(config.loss, gan=config.model.gan, output_kind=output_kind)
    d_loss_fn = partial(gan_d_loss, config.loss.gan_mode)
    model = ray.train.torch.prepare_model(model)
    disc = ray.train.torch.prepare_model(disc) if disc is not None else None
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    inner_d = (disc.module if isinstance(disc, DistributedDataParallel) else disc)

    # data: train sharded by DistributedSampler; validation split without padding so that
    # every window is counted exactly once whatever the number of workers
    store = loop["store"]
    train_ds = WindowDataset(store, "train", config.data, augment=config.data.augment > 0,
                             seed=tc.seed)
    val_ds = WindowDataset(store, "val", config.data, augment=False, seed=tc.seed)
    val_part = Subset(val_ds, list(range(rank, len(val_ds), world)))
    # what prediction needs to preprocess a new scan exactly as this store was made
    store_meta = Store(store).meta if rank == 0 else {}
    store_info = {"spacing": list(store_meta.get("spacing", [])),
                  "margin_mm": store_meta.get("margin_mm"),
                  "fingerprint": dict(store_meta.get("fingerprint", {}))}
    loader_kw: dict[str, Any] = {"batch_size": tc.batch_size, "num_workers": tc.num_workers,
                                 "pin_memory": device.type == "cuda"}
    if tc.num_workers > 0:
        loader_kw["multiprocessing_context"] = "spawn"  # zarr and fork do not mix
    n_train = len(train_ds) if tc.max_windows_per_epoch <= 0 else \
        min(len(train_ds), tc.max_windows_per_epoch)
    steps_per_epoch = max(1, math.ceil(math.ceil(n_train / world) / tc.batch_size))
    weights = (torch.as_tensor(train_ds.sample_weights(), dtype=torch.double)
               if config.data.oversample_fracture > 0 else None)

    opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    opt_g = opt_cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    opt_d = (torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=(0.5, 0.999))
             if disc is not None else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, partial(
        warmup_cosine, warmup_steps=tc.warmup_epochs * steps_per_epoch,
        total_steps=tc.epochs * steps_per_epoch))
    amp_dtype = torch.bfloat16 if (device.type == "cuda" and tc.amp) else None
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling

    start_epoch, best_metric, best_epoch, since_best = 1, -1.0, 0, 0
    resumed_from = 0
    run_id: str | None = None
    best_state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d, "state.pt"), map_location="cpu", weights_only=True)
            inner.load_state_dict(state["model"])
            opt_g.load_state_dict(state["opt_g"])
            sched.load_state_dict(state["sched"])
            scaler.load_state_dict(state["scaler"])
            if disc is not None:
                inner_d.load_state_dict(state["disc"])
                opt_d.load_state_dict(state["opt_d"])
            start_epoch = int(state["epoch"]) + 1
            resumed_from = int(state["epoch"])
            best_metric, best_epoch = float(state["best_metric"]), int(state["best_epoch"])
            since_best = int(state["since_best"])
            run_id = state.get("mlflow_run_id") or None
            rng_file = Path(d, f"rng_rank{rank}.pt")
            if rng_file.is_file() and int(state.get("world_size", 0)) == world:
                _set_rng_state(torch.load(rng_file, weights_only=True))
            else:
                _seed_everything(tc.seed + 1000 * start_epoch + rank)
            if rank == 0 and Path(d, "best.pt").is_file():
                best_state = torch.load(Path(d, "best.pt"), map_location="cpu",
                                        weights_only=True)
    else:
        _seed_everything(tc.seed + rank)

    tracker = None
    if rank == 0 and loop.get("mlflow"):
        tracker = _RankZeroRun(loop, run_id=run_id, resumed_from=resumed_from,
                               digest=optimizer_digest(opt_g.state_dict()))
    echo = _line_sender(loop.get("lines") if rank == 0 else None)
    if resumed_from:
        echo(f"resumed from epoch {resumed_from} of run {loop.get('name')}")

    def all_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64)
        if distributed:
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def save_and_report(report: dict[str, Any], epoch: int, dir_name: str) -> None:
        """Every rank's RNG state, rank 0's state/best/meta, and one `ray.train.report`."""
        with tempfile.TemporaryDirectory(prefix="vfsearch-ckpt-") as tmp:
            torch.save(_rng_state(), Path(tmp, f"rng_rank{rank}.pt"))
            if rank == 0:
                torch.save({
                    "model": inner.state_dict(),
                    "disc": inner_d.state_dict() if inner_d is not None else {},
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict() if opt_d is not None else {},
                    "sched": sched.state_dict(), "scaler": scaler.state_dict(),
                    "epoch": epoch, "best_metric": best_metric, "best_epoch": best_epoch,
                    "since_best": since_best, "config": loop["config"],
                    "mlflow_run_id": run_id or "", "world_size": world,
                }, Path(tmp, "state.pt"))
                if best_state is not None:
                    torch.save(best_state, Path(tmp, "best.pt"))
                Path(tmp, "meta.json").write_text(json.dumps(
                    {"epoch": epoch, "best_epoch": best_epoch, "best_val_dice": best_metric,
                     "mlflow_run_id": run_id or "", "name": loop.get("name", ""),
                     "mlflow_experiment_id": tracker.experiment_id if tracker else "",
                     "metrics": {k: v for k, v in report.items()
                                 if isinstance(v, (int, float))}}))
            # a barrier: every rank reports once; the folders merge into one
            ray.train.report(report if rank == 0 else {},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=dir_name)

    first_step_s: float | None = None  # fixed cost: launch to the first optimiser step
    worker_setup_s = 0.0  # the part of it spent in this function
    metrics: dict[str, Any] = {}
    epoch_times: list[float] = []
    for epoch in range(start_epoch, tc.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        gan_active = disc is not None and epoch > tc.gan_start()  # -1: epochs // 2
        if disc is not None:
            disc.train()
        # the epoch's windows, drawn identically on every rank, then sharded
        g = torch.Generator().manual_seed(tc.seed * 100_003 + epoch)
        if weights is not None:  # oversample windows with fracture (with replacement)
            drawn = torch.multinomial(weights, n_train, replacement=True, generator=g)
            epoch_ds = Subset(train_ds, drawn.tolist())
        elif n_train < len(train_ds):
            epoch_ds = Subset(train_ds, torch.randperm(len(train_ds), generator=g)[:n_train]
                              .tolist())
        else:
            epoch_ds = train_ds
        sampler = DistributedSampler(epoch_ds, num_replicas=world, rank=rank, shuffle=True,
                                     seed=tc.seed, drop_last=False)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        loader = DataLoader(epoch_ds, sampler=sampler, **loader_kw)
        sums: dict[str, float] = {}
        batches = windows = 0
        for i, batch in enumerate(loader):
            _fault_hook(fault, epoch=epoch, batch=i, rank=rank)
            if gan_active:
                out = gan_step(model, disc, batch, loss_fn, opt_g, opt_d, d_loss_fn=d_loss_fn,
                               scaler=scaler, grad_clip=tc.grad_clip, amp_dtype=amp_dtype,
                               device=device)
            else:
                out = seg_step(model, batch, loss_fn, opt_g, scaler=scaler,
                               grad_clip=tc.grad_clip, amp_dtype=amp_dtype, device=device)
            sched.step()
            if first_step_s is None:
                now = time.time()
                first_step_s = now - float(loop.get("t_launch") or now)
                worker_setup_s = now - t_entry
                if tracker is not None:
                    tracker.start()  # MLflow set-up overlaps the first epoch, not start-up
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            windows += int(batch["image"].shape[0])
        train_time = time.perf_counter() - t0
        keys = sorted(sums)  # identical on every rank: same step kind, same loss terms
        reduced = all_sum([sums[k] for k in keys] + [batches, windows]).tolist()
        total_batches, total_windows = max(reduced[-2], 1.0), reduced[-1]
        train_means = {f"train/{k}": reduced[i] / total_batches for i, k in enumerate(keys)}

        # validation: counts over the whole split, summed across workers, divided once
        model.eval()
        counts = torch.zeros(3, dtype=torch.float64)
        val_loader = DataLoader(val_part, **{**loader_kw, "batch_size": tc.batch_size})
        for batch in val_loader:
            counts += eval_step(inner, batch, tc.val_threshold, amp_dtype=amp_dtype,
                                device=device)
        counts = all_sum(counts)
        val = scores(counts)
        epoch_time = time.perf_counter() - t0

        improved = val["dice"] > best_metric
        if improved:
            best_metric, best_epoch, since_best = val["dice"], epoch, 0
            if rank == 0:
                best_state = {"model": {k: v.detach().cpu().clone()
                                        for k, v in inner.state_dict().items()},
                              "epoch": epoch, "val_dice": val["dice"],
                              "config": loop["config"], "seq_len": config.data.seq_len,
                              "store": store_info}
        else:
            since_best += 1
        stop = tc.early_stop_patience > 0 and since_best >= tc.early_stop_patience

        metrics: dict[str, Any] = {
            **train_means,
            "val_dice": val["dice"], "val_iou": val["iou"],
            "val_precision": val["precision"], "val_recall": val["recall"],
            "val_tp": float(counts[0]), "val_fp": float(counts[1]), "val_fn": float(counts[2]),
            "best_val_dice": best_metric, "best_epoch": best_epoch,
            "lr": float(opt_g.param_groups[0]["lr"]),
            "epoch_time": epoch_time, "train_time": train_time,
            "windows_per_s": total_windows / max(train_time, 1e-9),
            "gan_active": float(gan_active), "epoch": epoch, "resumed_from_epoch": resumed_from,
            "early_stopped": float(stop),
        }
        if first_step_s is not None and not resumed_from:
            metrics["startup_s"] = first_step_s
            metrics["worker_setup_s"] = worker_setup_s
        # rank 0 logs before the report barrier, so that the other ranks wait there rather
        # than inside the next epoch's timed training phase
        if tracker is not None:
            run_id = tracker.log_metrics(metrics, step=epoch)
        epoch_times.append(epoch_time)  # this attempt's epochs: remaining x mean is the ETA
        eta = 0.0 if stop else (tc.epochs - epoch) * sum(epoch_times) / len(epoch_times)
        echo(format_epoch(epoch, tc.epochs, metrics, eta))
        save_and_report(metrics, epoch, f"epoch_{epoch:04d}")
        if fault and fault.get("raise_after_epoch") == epoch:
            raise RuntimeError(f"injected interruption after epoch {epoch}")
        if stop:
            echo(f"early stop: no val_dice gain for {since_best} epochs "
                 f"(best {best_metric:.4f} at epoch {best_epoch})")
            break
    final = _final_evaluation(loop, config, inner, best_state, rank=rank)
    if final:
        metrics = {**metrics, **final}
        if best_state is not None and "val_threshold3d" in final:
            best_state["threshold"] = float(final["val_threshold3d"])
        if tracker is not None:
            tracker.log_metrics(final, step=int(metrics.get("epoch", 0)))
            _log_pictures(loop, config, inner, tracker, final.get("val_threshold3d"))
    # a last barrier: Tune (and Optuna) see the fused 3D figures of the best model (rank 0's
    # dict is the one forwarded), and the last checkpoint's best.pt carries the deployment
    # threshold and its meta.json the final figures
    if config.train.final_eval:
        last = int(metrics.get("epoch", start_epoch - 1))
        save_and_report(metrics, last, f"final_{last:04d}")
    if tracker is not None:
        tracker.finish(best_state)


def _final_evaluation(loop: Mapping[str, Any], config: Config, model: Any,
                      best_state: Mapping[str, Any] | None, *, rank: int) -> dict[str, float]:
    """Rank 0: the fused 3D validation figures (``val_dice3d`` ...) of the best weights.

    Every slice of every validation vertebra is predicted, fused into 3D and mapped back to
    the original CT grid (`vfsearch.pipelines.evaluate.fused_validation_metrics`), on this worker's
    device. The model is left holding the best weights.
    """
    if rank != 0 or not config.train.final_eval or best_state is None:
        return {}
    from vfsearch.pipelines.evaluate import fused_validation_metrics

    model.load_state_dict(best_state["model"])
    t0 = time.perf_counter()
    out = fused_validation_metrics(model, loop["store"], config, split="val")
    out = {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}
    out["final_eval_s"] = time.perf_counter() - t0
    # the cost side of a multi-objective sweep (Dice against size or speed)
    out["model_params"] = float(sum(p.numel() for p in model.parameters()))
    out["latency_ms"] = _latency_ms(model, config)
    return out


def _latency_ms(model: Any, config: Config, *, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass on one window, on the model's device."""
    import torch

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


def _log_pictures(loop: Mapping[str, Any], config: Config, model: Any, tracker: Any,
                  threshold: float | None) -> None:
    """Heatmap, attention and 3D pictures of the best model on one validation case."""
    if not config.train.log_pictures:
        return
    from vfsearch.pipelines.visualize import log_visualisations

    try:
        log_visualisations(tracker.tracker, tracker.ready(), model, loop["store"], config,
                           threshold=threshold)
    except Exception as exc:  # noqa: BLE001 - pictures must never fail a finished run
        _write_line(f"warning: could not log pictures ({type(exc).__name__}: {exc})")


# -- the driver side -------------------------------------------------------------------------

def build_trainer(store: str | Path, config: Config, *, name: str, storage: str | Path,
                  workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                  mlflow_uri: str | None = None, experiment: str = "vfsearch",
                  parent_run_id: str | None = None, launch_id: str | None = None,
                  tags: Mapping[str, Any] | None = None, config_file: str | Path | None = None,
                  callbacks: Sequence[Any] | None = None, lines: Any = None,
                  fault: Mapping[str, Any] | None = None, t_launch: float | None = None):
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
            epoch; see `_LineRelay`); None: no lines.
        fault: test hook, ``{"raise_after_epoch": k}`` or ``{"pid_file", "epoch", "batch",
            "rank"}`` (see `_fault_hook`).
        t_launch: wall-clock start (``time.time()``) from which the workers measure
            ``startup_s``, the seconds to the first optimiser step (default: now).
    """
    import uuid

    import ray.train
    from ray.train.torch import TorchTrainer

    from vfsearch.adapters.ray_backend import PrewarmTorchConfig

    use_gpu = gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    store = str(store) if "://" in str(store) else str(Path(store).resolve())
    mlflow = None
    if mlflow_uri:
        mlflow = {
            "uri": mlflow_uri, "experiment": experiment, "name": name,
            "parent_run_id": parent_run_id, "launch_id": launch_id or uuid.uuid4().hex,
            "tags": {RUN_TAG: name, "git_commit": git_commit(), "store": store,
                     **{k: str(v) for k, v in (tags or {}).items()}},
            "params": {"run.workers": workers, "run.gpus_per_worker": gpus_per_worker},
            "config_file": ({"name": Path(config_file).name,
                             "text": Path(config_file).read_text()} if config_file else None),
        }
    loop = {"store": store, "config": config.flatten(), "name": name, "mlflow": mlflow,
            "lines": lines, "fault": dict(fault) if fault else None,
            "t_launch": time.time() if t_launch is None else t_launch}
    storage = str(storage) if "://" in str(storage) else str(Path(storage).resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        torch_config=PrewarmTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            # the final report's checkpoint (best.pt with its threshold) is kept on top of
            # the last keep_checkpoints epochs
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.train.keep_checkpoints + int(config.train.final_eval)),
            # Ray Train's own per-report INFO lines would bury the progress lines
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks) if callbacks else None,
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
        lines = [f"run {self.name}: {self.epochs_done} epochs, best val dice {best} at epoch "
                 f"{self.best_epoch}", f"checkpoint: {self.checkpoint}"]
        if self.mlflow_run_id:
            lines.append(f"mlflow run {self.mlflow_run_id}: {self.runs_url}")
        lines.append(f"resume or extend with: --name {self.name}")
        return "\n".join(lines)


def git_commit() -> str:
    """The vfsearch source tree's commit (``+dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=False)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_fingerprint(store: str | Path) -> str:
    """A short hash of the store's metadata (ingest fingerprint, spacing, cases and splits)."""
    import hashlib

    from vfsearch.adapters.store import Store

    s = Store(store)
    meta = s.meta
    payload = {"meta": meta, "splits": {sp: s.case_ids(sp) for sp in ("train", "val", "test")}}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_store(store: str | Path) -> None:
    from vfsearch.adapters.store import Store

    s = Store(store)
    _ = s.meta  # raises UserError for a folder that is not a store
    for split in ("train", "val"):
        if not s.case_ids(split):
            raise UserError(f"{store}: no complete cases in split {split!r} "
                            "(re-run `vfsearch ingest` with a different --split)")


def run_training(store: str | Path, config: Config, *, name: str, storage: str | Path,
                 workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: float = 1.0,
                 mlflow_uri: str | None = None, experiment: str = "vfsearch",
                 parent_run_id: str | None = None, config_file: str | Path | None = None,
                 callbacks: Sequence[Any] | None = None,
                 extra_tags: Mapping[str, Any] | None = None, progress: bool | None = None,
                 fault: Mapping[str, Any] | None = None) -> TrainSummary:
    """Fit one run on an already connected Ray, tracked in MLflow when ``mlflow_uri`` is set.

    Rank 0 creates the MLflow run (nested under ``parent_run_id`` if given; a run restarted
    with the same ``name`` continues the MLflow run named in its checkpoint), logs the
    flattened config as params, tags (dataset fingerprint, git commit, Ray run name),
    per-epoch metrics and at the end the config (``config/``) and best checkpoint
    (``checkpoints/best.pt``) as artifacts. If training fails, this marks the run FAILED.
    ``progress``: print rank 0's line per epoch here (default: at a terminal, see
    `vfsearch.adapters.progress`).
    """
    import uuid

    import ray.train

    from vfsearch.adapters import progress as progress_mod

    t_launch = time.time()
    launch_id = uuid.uuid4().hex
    relay = _LineRelay() if (progress_mod.enabled() if progress is None else progress) \
        else None
    trainer = build_trainer(store, config, name=name, storage=storage, workers=workers,
                            gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                            mlflow_uri=mlflow_uri, experiment=experiment,
                            parent_run_id=parent_run_id, launch_id=launch_id,
                            tags=extra_tags, config_file=config_file, callbacks=callbacks,
                            lines=relay.queue if relay else None, fault=fault,
                            t_launch=t_launch)
    try:
        result = trainer.fit()
    except BaseException as exc:
        if mlflow_uri:
            _mark_failed(mlflow_uri, experiment, launch_id,
                         "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
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
    from vfsearch.adapters.tracking import runs_url

    return TrainSummary(
        name=name, storage=str(storage), checkpoint=ckpt_dir,
        best_val_dice=meta.get("best_val_dice", metrics.get("best_val_dice")),
        best_epoch=meta.get("best_epoch", metrics.get("best_epoch")),
        epochs_done=meta.get("epoch", metrics.get("epoch")), metrics=metrics,
        mlflow_run_id=run_id, tracking_uri=mlflow_uri,
        runs_url=runs_url(mlflow_uri, exp_id) if (mlflow_uri and exp_id) else None)


def _mark_failed(uri: str, experiment: str, launch_id: str, status: str) -> None:
    """End the MLflow run of a failed launch (rank 0 could not: it may have been killed)."""
    from vfsearch.adapters.tracking import Tracker

    try:
        tracker = Tracker(uri)
        run_id = tracker.find_run(experiment, LAUNCH_TAG, launch_id)
        if run_id and tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.end_run(run_id, status)
    except Exception:  # noqa: BLE001 - keep the training error, not the logging one
        pass


def connect_ray(address: str | None = None, *, num_cpus_needed: float = 1.0,
                num_gpus_needed: float = 0.0,
                resources: Mapping[str, float] | None = None, verbose: bool = False) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray sized for the run
    (offering the custom ``resources`` too, as a cluster's head would).

    The dashboard stays on (Train V2 needs the State API to free stopped runs' resources).
    Ray's own console output (see `ray_output`) only with ``verbose``.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        from vfsearch.core.errors import explain

        # Where nothing answers, Ray 2.60 tries 20 times, ~40 s each (13 minutes of warnings,
        # measured): 3 tries say so within ~2 minutes. A value the user set wins.
        tries = "RAY_gcs_server_port_wait_time_s"
        ours = tries not in os.environ
        if ours:
            os.environ[tries] = "3"
        try:
            ray.init(address=address, **ray_output(verbose))
        except Exception as exc:  # noqa: BLE001 - a refused token is a RayError, not OSError
            # Ray's message is a multi-line traceback of the GCS client: name its cause instead
            raise UserError(f"--address: cannot join the Ray cluster at {address}: "
                            f"{explain(exc, address=address)}") from exc
        finally:
            if ours:
                os.environ.pop(tries, None)
        return
    cpus = os.cpu_count() or 1
    if num_gpus_needed > 0:
        import torch

        have = torch.cuda.device_count()
        if have < num_gpus_needed:
            raise UserError(f"--gpus-per-worker: the run needs {num_gpus_needed:g} GPUs, this "
                            f"machine has {have}")
    # never leave a local run waiting forever for CPUs this machine does not have
    start_local_ray(num_cpus=max(cpus, math.ceil(num_cpus_needed)),
                    resources=dict(resources) if resources else None, **ray_output(verbose))


def ray_output(verbose: bool) -> dict[str, Any]:
    """`ray.init` arguments for what Ray itself prints on this console.

    Quiet by default: worker and actor output stays in Ray's log files
    (``/tmp/ray/session_latest/logs``) instead of reaching the console (Ray Train's reports,
    the PreemptionWatcher's and the State API client's warnings), and the driver's ``ray``
    logger shows errors only (the token-authentication notice of a new local Ray is a
    warning). Progress lines reach the console through `_LineRelay` and Tune callbacks
    instead. ``verbose``: all of it, as Ray prints by default.
    """
    import logging

    return {"log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.ERROR}


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a local Ray whose own processes know its address; returns the GCS address.

    Train V2 frees the resources of a stopped run from an actor that asks the State API
    about the run's controller; that actor finds the cluster through ``RAY_ADDRESS`` and,
    without it, fails as soon as a second Ray instance runs on the machine ("Found multiple
    active Ray instances"), leaving the stopped trial's CPUs taken. So the GCS port is chosen
    here and ``RAY_ADDRESS`` goes into the job's runtime environment. The dashboard stays on.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": address}
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts the head
    try:
        ray.init(runtime_env=runtime_env, **init_kwargs)
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    actual = ray.get_runtime_context().gcs_address
    if actual != address:  # e.g. a Ray that ignores the port variable: still usable
        return actual
    return address


def train(store: str | Path, config: Config, *, workers: int = 1, gpus_per_worker: float = 0.0,
          name: str | None = None, address: str | None = None, storage: str | Path | None = None,
          workdir: str | Path = "mlruns", mlflow_uri: str | None = None,
          experiment: str = "vfsearch", config_file: str | Path | None = None,
          track: bool = True, verbose: bool = False,
          echo: Callable[[str], Any] = print) -> TrainSummary:
    """``vfsearch train``: train ``config`` on ``store`` with Ray Train, tracked in MLflow.

    ``storage`` defaults to ``<workdir>/checkpoints``; ``name`` to ``train-<time>`` (pass the
    name again to resume). ``mlflow_uri`` defaults to `vfsearch.adapters.tracking.tracking_uri`
    (``$MLFLOW_TRACKING_URI`` or the embedded server of ``workdir``); ``track=False`` skips
    MLflow. One line per epoch at a terminal (`vfsearch.adapters.progress`); Ray's own output only
    with ``verbose`` (`ray_output`).
    """
    if workers < 1:
        raise UserError(f"--workers: must be >= 1, got {workers}")
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker: must be >= 0, got {gpus_per_worker}")
    if name is not None and (not name or "/" in name or name.startswith(".")):
        raise UserError(f"--name: {name!r} is not a valid run name")
    _check_store(store)
    name = name or time.strftime("train-%Y%m%d-%H%M%S")
    storage = storage or Path(workdir) / "checkpoints"
    if mlflow_uri is None and track:
        from vfsearch.adapters.tracking import tracking_uri

        mlflow_uri = tracking_uri(workdir)
    connect_ray(address, num_cpus_needed=workers, num_gpus_needed=workers * gpus_per_worker,
                verbose=verbose)
    echo(f"training {name}: {workers} worker(s), store {store}, storage {storage}"
         + (f", MLflow {mlflow_uri}" if mlflow_uri else ""))
    return run_training(store, config, name=name, storage=storage, workers=workers,
                        gpus_per_worker=gpus_per_worker, mlflow_uri=mlflow_uri,
                        experiment=experiment, config_file=config_file)


__all__ = [
    "TrainSummary",
    "build_models",
    "build_trainer",
    "connect_ray",
    "ray_output",
    "dataset_fingerprint",
    "format_epoch",
    "git_commit",
    "optimizer_digest",
    "run_training",
    "train",
    "train_loop_per_worker",
    "warmup_cosine",
]

