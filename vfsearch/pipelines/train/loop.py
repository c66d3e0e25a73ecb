"""One worker's training in named pieces that know nothing of Ray (the maths lives in
`vfsearch.core.steps`):

* `setup`: models (the same seed on every rank), loss, data (`TrainData`), optimisers,
  warm-up + cosine schedule (`Parts`);
* `TrainData.train_loader`: the epoch's windows, drawn identically on every rank
  (optionally oversampling windows with fracture), sharded and ordered for cache locality
  (`EpochSampler`), from one loader whose processes persist across epochs;
* `train_epoch`: the step loop (segmentation, or staged GAN once ``train.gan_start()`` epochs
  are done), calling the `Hooks`;
* `validate`: this rank's TP/FP/FN over its share of the validation split (a segmenter's:
  vertebra by vertebra, each slice encoded once for all the windows that hold it); all-reduced
  (`all_summer`) and divided once (`val_metrics`);
* `TrainState`: where training stands (last epoch, best-model tracking, early stopping);
* `run_epoch`: the above for one epoch, returning its metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from vfsearch.adapters.dataset import EpochSampler, VertebraStacks, WindowDataset, finish_batch
from vfsearch.adapters.store import Store
from vfsearch.core.config import Config, TrainConfig
from vfsearch.core.losses import SegLoss, build_loss, gan_d_loss
from vfsearch.core.metrics import scores
from vfsearch.core.models import build_discriminator, build_model
from vfsearch.core.sampling import val_stride
from vfsearch.core.steps import eval_step, eval_volume, gan_step, seg_step
from vfsearch.pipelines.train.hooks import Hooks

Reduce = Callable[[Sequence[float] | torch.Tensor], torch.Tensor]  # float64 sum over ranks
VAL_BATCH = 32  # windows per forward pass when validating vertebra stacks


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
    total = 0.0
    for pid in sorted(state.get("state", {})):
        for key in sorted(state["state"][pid]):
            value = state["state"][pid][key]
            if isinstance(value, torch.Tensor):
                total += float(value.detach().double().abs().sum())
            elif isinstance(value, (int, float)):
                total += float(value)
    return total


def build_models(config: Config, seed: int | None = None) -> tuple[nn.Module, nn.Module | None]:
    """Seed the RNG with ``seed`` (default ``train.seed``) and build ``(model, disc)``.

    ``disc`` is None without ``model.gan``. The order (seed, model, discriminator) is fixed,
    so the same config always gives the same initial weights on every worker.
    """
    torch.manual_seed(config.train.seed if seed is None else seed)
    model = build_model(config.model, config.data.seq_len)
    disc = build_discriminator(config.model, config.data.seq_len) if config.model.gan else None
    return model, disc


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    return module.module if isinstance(module, DistributedDataParallel) else module


def all_summer(device: torch.device, world: int) -> Reduce:
    """A function summing a vector over all ranks (float64, on CPU); the identity on one."""
    distributed = dist.is_available() and dist.is_initialized() and world > 1

    def all_sum(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64)
        if distributed:
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    return all_sum


# -- what a worker trains, and on what ----------------------------------------------------


@dataclass
class Parts:
    """The models, losses and optimisers of one worker.

    ``model`` / ``disc`` are what the steps train (DDP-wrapped when distributed); ``inner`` /
    ``inner_d`` the bare modules whose state dicts are saved and validated.
    """

    model: nn.Module
    inner: nn.Module
    disc: nn.Module | None
    inner_d: nn.Module | None
    loss_fn: SegLoss
    d_loss_fn: Callable[..., torch.Tensor]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    grad_clip: float

    @classmethod
    def build(
        cls,
        config: Config,
        model: nn.Module,
        disc: nn.Module | None,
        loss_fn: SegLoss,
        *,
        device: torch.device,
        steps_per_epoch: int,
    ) -> Parts:
        """AdamW/Adam with warm-up + cosine per optimiser step for ``model``, Adam for
        ``disc``; bf16 autocast on CUDA with ``train.amp``."""
        tc = config.train
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        opt_g = opt_cls(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        opt_d = (
            torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=(0.5, 0.999))
            if disc is not None
            else None
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt_g,
            partial(
                warmup_cosine,
                warmup_steps=tc.warmup_epochs * steps_per_epoch,
                total_steps=tc.epochs * steps_per_epoch,
            ),
        )
        amp_dtype = torch.bfloat16 if (device.type == "cuda" and tc.amp) else None
        scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
        inner = _unwrap(model)
        assert inner is not None
        return cls(
            model=model,
            inner=inner,
            disc=disc,
            inner_d=_unwrap(disc),
            loss_fn=loss_fn,
            d_loss_fn=partial(gan_d_loss, config.loss.gan_mode),
            opt_g=opt_g,
            opt_d=opt_d,
            sched=sched,
            scaler=scaler,
            device=device,
            amp_dtype=amp_dtype,
            grad_clip=tc.grad_clip,
        )

    def step(self, batch: Mapping[str, Any], gan_active: bool) -> dict[str, float]:
        """One optimiser step (GAN or segmentation) and one scheduler step; the loss terms."""
        if gan_active:
            assert self.disc is not None and self.opt_d is not None  # gan_active needs a GAN
            out = gan_step(
                self.model,
                self.disc,
                batch,
                self.loss_fn,
                self.opt_g,
                self.opt_d,
                d_loss_fn=self.d_loss_fn,
                scaler=self.scaler,
                grad_clip=self.grad_clip,
                amp_dtype=self.amp_dtype,
                device=self.device,
            )
        else:
            out = seg_step(
                self.model,
                batch,
                self.loss_fn,
                self.opt_g,
                scaler=self.scaler,
                grad_clip=self.grad_clip,
                amp_dtype=self.amp_dtype,
                device=self.device,
            )
        self.sched.step()
        return out


def loader_workers(requested: int, device: torch.device, cpus: float) -> int:
    """DataLoader processes per training worker: ``requested`` when >= 0; ``-1`` (auto) is
    none on CPU (the training process uses the cores) and ``cpus - 1`` (at most 8) on GPU."""
    if requested >= 0:
        return requested
    return 0 if device.type != "cuda" else max(1, min(8, int(cpus) - 1))


@dataclass
class TrainData:
    """One worker's data: this rank's shard of each epoch's training windows, drawn and
    ordered by `EpochSampler` (`vfsearch.core.sampling`: the same draw on every rank,
    oversampling windows with fracture, vertebrae a few at a time so the crop cache hits),
    and this rank's share of the validation split, without padding so that every window is
    counted exactly once whatever the number of workers. The training loader and its worker
    processes persist across epochs.

    With ``val_seq_len`` set (a segmenter scored on the centre slice), the validation share
    is whole vertebrae (`VertebraStacks`: vertebrae ``rank, rank + world, ...``), so that
    `validate` encodes each slice once for all the windows that hold it; else windows
    ``rank, rank + world, ...``.

    Per-epoch validation scores the windows centred on every ``val_stride``-th slice of each
    vertebra (`vfsearch.core.sampling.val_stride` from ``train.val_windows``: by default all
    of them, unless ``train.max_windows_per_epoch`` caps the epoch), ``val_windows`` of
    ``val_total`` in all ranks together; the same windows in every epoch. The end-of-run
    fused validation (``val_dice3d``) always scores every slice."""

    train: WindowDataset
    val: Dataset
    store_info: dict[str, Any]  # rank 0: what prediction needs to preprocess a new scan
    loader_kw: dict[str, Any]
    n_train: int
    steps_per_epoch: int
    sampler: EpochSampler
    loader: DataLoader
    rank: int = 0
    val_seq_len: int | None = None  # set: `val` holds vertebra stacks (see the docstring)
    val_stride: int = 1
    val_windows: int = -1  # windows scored per epoch, all ranks together (-1: len(val))
    val_total: int = -1  # windows of the validation split (-1: len(val))
    _val_loader: DataLoader | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # built by hand around a dataset of windows: every one of them is scored
        if self.val_windows < 0:
            self.val_windows = len(self.val)  # type: ignore[arg-type]
        if self.val_total < 0:
            self.val_total = self.val_windows

    @classmethod
    def open(
        cls,
        store: str | Path,
        config: Config,
        *,
        rank: int,
        world: int,
        device: torch.device,
        cpus: float = 1.0,
        stacks: bool = False,
    ) -> TrainData:
        """``stacks``: validate vertebra by vertebra (see the class docstring); only for a
        segmenter with the ``encode``/``forward_features`` seams scored on slice ``t``."""
        tc = config.train
        train_ds = WindowDataset(
            store, "train", config.data, augment=config.data.augment > 0, seed=tc.seed
        )
        val_ds = WindowDataset(store, "val", config.data, augment=False, seed=tc.seed)
        n_train = (
            len(train_ds)
            if tc.max_windows_per_epoch <= 0
            else min(len(train_ds), tc.max_windows_per_epoch)
        )
        # an epoch capped below the training split validates a strided subset (auto)
        capped = n_train if n_train < len(train_ds) else None
        stride = val_stride(len(val_ds), tc.val_windows, capped)
        scored = val_ds.strided(stride)
        val_part: Dataset = (
            VertebraStacks(val_ds, list(range(rank, len(val_ds.items), world)), stride)
            if stacks
            else Subset(val_ds, scored[rank::world])
        )
        # what prediction needs to preprocess a new scan exactly as this store was made
        store_meta = Store(store).meta if rank == 0 else {}
        store_info = {
            "spacing": list(store_meta.get("spacing", [])),
            "margin_mm": store_meta.get("margin_mm"),
            "fingerprint": dict(store_meta.get("fingerprint", {})),
        }
        workers = loader_workers(tc.num_workers, device, cpus)
        loader_kw: dict[str, Any] = {
            "batch_size": tc.batch_size,
            "num_workers": workers,
            "pin_memory": device.type == "cuda",
        }
        if workers > 0:
            loader_kw["multiprocessing_context"] = "spawn"  # zarr and fork do not mix
            loader_kw["prefetch_factor"] = 4 if device.type == "cuda" else 2
        steps_per_epoch = max(1, math.ceil(math.ceil(n_train / world) / tc.batch_size))
        sampler = EpochSampler(
            train_ds, n_train, rank=rank, world=world, open_vertebrae=config.data.open_vertebrae
        )
        loader = DataLoader(train_ds, sampler=sampler, persistent_workers=workers > 0, **loader_kw)
        return cls(
            train=train_ds,
            val=val_part,
            store_info=store_info,
            loader_kw=loader_kw,
            n_train=n_train,
            steps_per_epoch=steps_per_epoch,
            sampler=sampler,
            loader=loader,
            rank=rank,
            val_seq_len=config.data.seq_len if stacks else None,
            val_stride=stride,
            val_windows=len(scored),
            val_total=len(val_ds),
        )

    def train_loader(self, epoch: int) -> DataLoader:
        """This rank's shard of the epoch's windows; the same loader (and processes) each
        epoch, with the sampler moved on to ``epoch``."""
        self.sampler.set_epoch(epoch)
        return self.loader

    def val_loader(self) -> DataLoader:
        """This rank's share of the validation split: one loader (and, with loader
        processes, persistent ones) for every epoch; a vertebra per item with stacks."""
        if self._val_loader is None:
            kw = dict(self.loader_kw)
            if self.val_seq_len is not None:
                kw["batch_size"] = None  # a vertebra's stack per item
            self._val_loader = DataLoader(self.val, persistent_workers=kw["num_workers"] > 0, **kw)
        return self._val_loader


def setup(
    store: str | Path,
    config: Config,
    *,
    rank: int,
    world: int,
    device: torch.device,
    cpus: float = 1.0,
    prepare: Callable[[nn.Module], nn.Module] = lambda m: m,
) -> tuple[Parts, TrainData]:
    """Models, loss, data and optimisers of one worker, in that order; ``prepare`` wraps a
    model for distributed training (Ray's ``prepare_model``: device, DDP); ``cpus``: the
    worker's CPUs (sizes the automatic number of loader processes)."""
    # the same seed on every rank (DDP also broadcasts rank 0's weights)
    model, disc = build_models(config)
    loss_fn = build_loss(
        config.loss, gan=config.model.gan, output_kind=getattr(model, "output_kind", "segmentation")
    )
    # a segmenter scored on slice t validates vertebra by vertebra, each slice encoded once
    stacks = (
        hasattr(model, "forward_features")
        and getattr(model, "output_kind", "segmentation") == "segmentation"
        and not config.data.target_all_slices
    )
    model = prepare(model)
    disc = prepare(disc) if disc is not None else None
    data = TrainData.open(
        store, config, rank=rank, world=world, device=device, cpus=cpus, stacks=stacks
    )
    parts = Parts.build(
        config, model, disc, loss_fn, device=device, steps_per_epoch=data.steps_per_epoch
    )
    return parts, data


# -- one epoch ----------------------------------------------------------------------------


@dataclass
class StepSums:
    """One rank's sums over an epoch's training steps: loss terms, steps, windows."""

    terms: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    windows: int = 0

    def add(self, out: Mapping[str, float], windows: int) -> None:
        for k, v in out.items():
            self.terms[k] = self.terms.get(k, 0.0) + v
        self.batches += 1
        self.windows += windows

    def means(self, all_sum: Reduce) -> tuple[dict[str, float], float]:
        """``train/<term>`` means over every rank's steps, and the windows of all ranks."""
        keys = sorted(self.terms)  # identical on every rank: same step kind, same loss terms
        reduced = all_sum([self.terms[k] for k in keys] + [self.batches, self.windows]).tolist()
        total_batches, total_windows = max(reduced[-2], 1.0), reduced[-1]
        means = {f"train/{k}": reduced[i] / total_batches for i, k in enumerate(keys)}
        return means, total_windows


def train_epoch(
    parts: Parts,
    batches: Iterable[Mapping[str, Any]],
    *,
    epoch: int,
    rank: int,
    gan_active: bool,
    hooks: Hooks,
) -> StepSums:
    """Train on ``batches`` (this rank's shard of the epoch); the loss sums of its steps.

    A batch whose augmentation the loader deferred (``data.augment_device``) is moved to
    ``parts.device`` and augmented there, in one batched pass (`finish_batch`)."""
    parts.model.train()
    if parts.disc is not None:
        parts.disc.train()
    sums = StepSums()
    for i, batch in enumerate(batches):
        hooks.batch(epoch, i, rank)
        batch = finish_batch(batch, parts.device)
        out = parts.step(batch, gan_active)
        hooks.step(epoch, i, rank)
        sums.add(out, int(batch["image"].shape[0]))
    return sums


def validate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    threshold: float,
    *,
    seq_len: int | None = None,
    batch_size: int = VAL_BATCH,
    amp_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Summed TP, FP, FN (float64 ``(3,)``) of ``sigmoid(model) > threshold`` over
    ``batches``, in eval mode: this rank's counts, to be summed across ranks before dividing
    (`val_metrics`). ``batches``: windows (`eval_step`), or with ``seq_len`` vertebra stacks
    (`vfsearch.adapters.dataset.VertebraStacks`): every window centred on a slice of each
    (or on its ``centres``), counted the same, with each slice encoded once (`eval_volume`,
    ``batch_size`` windows at a time)."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        if seq_len is None:
            counts += eval_step(model, batch, threshold, amp_dtype=amp_dtype, device=device)
        else:
            counts += eval_volume(
                model,
                batch["image"],
                batch["target"],
                seq_len,
                threshold,
                centres=batch.get("centres"),
                batch_size=batch_size,
                amp_dtype=amp_dtype,
                device=device,
            )
    return counts


def val_metrics(counts: torch.Tensor) -> dict[str, float]:
    """Validation Dice/IoU/precision/recall from the all-reduced counts, and the counts."""
    val = scores(counts)
    return {
        "val_dice": val["dice"],
        "val_iou": val["iou"],
        "val_precision": val["precision"],
        "val_recall": val["recall"],
        "val_tp": float(counts[0]),
        "val_fp": float(counts[1]),
        "val_fn": float(counts[2]),
    }


@dataclass
class TrainState:
    """Where training stands: what a checkpoint holds besides weights and optimisers."""

    epoch: int = 0  # last finished epoch (1-based); training goes on at epoch + 1
    best_metric: float = -1.0  # best validation Dice so far
    best_epoch: int = 0
    since_best: int = 0  # epochs since the best one
    resumed_from: int = 0  # the epoch this attempt continued from (0: from scratch)
    run_id: str | None = None  # rank 0's MLflow run
    best: dict[str, Any] | None = None  # rank 0: best.pt (weights of the best epoch)

    def record(self, epoch: int, dice: float) -> bool:
        """Best-model tracking once ``epoch`` is validated: True when ``dice`` beats the best
        so far (the caller then keeps the weights in `best`)."""
        self.epoch = epoch
        if dice > self.best_metric:
            self.best_metric, self.best_epoch, self.since_best = dice, epoch, 0
            return True
        self.since_best += 1
        return False

    def stale(self, patience: int) -> bool:
        """Early stopping: ``patience`` (> 0) epochs without a gain."""
        return patience > 0 and self.since_best >= patience


def best_snapshot(
    model: nn.Module,
    epoch: int,
    dice: float,
    *,
    config: Mapping[str, Any],
    seq_len: int,
    store_info: Mapping[str, Any],
) -> dict[str, Any]:
    """best.pt: a CPU copy of ``model``'s weights with the epoch, its validation Dice, the
    flat config, ``seq_len`` and the store's preprocessing (``store``)."""
    return {
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "val_dice": dice,
        "config": config,
        "seq_len": seq_len,
        "store": store_info,
    }


KeepBest = Callable[[int, float], dict[str, Any]]  # (epoch, val Dice) -> best.pt


def run_epoch(
    parts: Parts,
    data: TrainData,
    state: TrainState,
    tc: TrainConfig,
    *,
    epoch: int,
    hooks: Hooks,
    all_sum: Reduce,
    keep_best: KeepBest | None,
) -> tuple[dict[str, Any], bool]:
    """Train and validate ``epoch``, track the best model (`keep_best` makes best.pt: rank
    0's), and return the epoch's metrics and whether to stop early."""
    t0 = time.perf_counter()
    gan_active = parts.disc is not None and epoch > tc.gan_start()  # -1: epochs // 2
    sums = train_epoch(
        parts,
        data.train_loader(epoch),
        epoch=epoch,
        rank=data.rank,
        gan_active=gan_active,
        hooks=hooks,
    )
    train_time = time.perf_counter() - t0
    train_means, total_windows = sums.means(all_sum)

    # validation: counts over the whole split, summed across workers, divided once
    parts.model.eval()
    counts = all_sum(
        validate(
            parts.inner,
            data.val_loader(),
            tc.val_threshold,
            seq_len=data.val_seq_len,
            amp_dtype=parts.amp_dtype,
            device=parts.device,
        )
    )
    val = val_metrics(counts)
    epoch_time = time.perf_counter() - t0

    if state.record(epoch, val["val_dice"]) and keep_best is not None:
        state.best = keep_best(epoch, val["val_dice"])
    stop = state.stale(tc.early_stop_patience)
    return {
        **train_means,
        **val,
        "best_val_dice": state.best_metric,
        "best_epoch": state.best_epoch,
        "lr": float(parts.opt_g.param_groups[0]["lr"]),
        "epoch_time": epoch_time,
        "train_time": train_time,
        "windows_per_s": total_windows / max(train_time, 1e-9),
        "val_windows": data.val_windows,
        "gan_active": float(gan_active),
        "epoch": epoch,
        "resumed_from_epoch": state.resumed_from,
        "early_stopped": float(stop),
    }, stop


__all__ = [
    "KeepBest",
    "Parts",
    "Reduce",
    "StepSums",
    "TrainData",
    "TrainState",
    "all_summer",
    "best_snapshot",
    "build_models",
    "loader_workers",
    "optimizer_digest",
    "run_epoch",
    "setup",
    "train_epoch",
    "val_metrics",
    "validate",
    "warmup_cosine",
]
