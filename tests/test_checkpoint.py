"""The training loop's pieces without Ray or MLflow (vfsearch.pipelines.train.loop,
.checkpoint, .hooks): checkpoint round trip, best-model tracking, the fault drill, validation
counts, one epoch on in-memory windows. Tiny real models on the CPU."""

from __future__ import annotations

import json
import os
import random
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vfsearch.core.config import load_config
from vfsearch.core.losses import build_loss
from vfsearch.core.metrics import confusion_counts
from vfsearch.pipelines.train import hooks as hooks_mod
from vfsearch.pipelines.train.checkpoint import (
    restore,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from vfsearch.pipelines.train.hooks import Hooks, fault_hooks
from vfsearch.pipelines.train.loop import (
    Parts,
    TrainData,
    TrainState,
    all_summer,
    best_snapshot,
    build_models,
    loader_workers,
    run_epoch,
    val_metrics,
    validate,
)

CPU = torch.device("cpu")
TINY = [
    "model.depth=3",
    "model.base_channels=4",
    "data.patch_size=32",
    "data.seq_len=3",
    "model.norm=group",
    "train.epochs=3",
    "train.warmup_epochs=1",
    "train.lr=0.01",
]
GAN = ["model.gan=true", "loss.adv_weight=0.1", "model.disc_layers=2", "model.disc_channels=4"]
STEPS_PER_EPOCH = 4


def _parts(cfg, seed: int | None = None) -> Parts:
    model, disc = build_models(cfg, seed)
    loss_fn = build_loss(cfg.loss, gan=cfg.model.gan)
    return Parts.build(cfg, model, disc, loss_fn, device=CPU, steps_per_epoch=STEPS_PER_EPOCH)


def _random_batch() -> dict[str, torch.Tensor]:
    """A batch drawn from every RNG a worker seeds: torch, numpy and Python."""
    scale = 1.0 + float(np.random.rand()) + random.random()
    return {
        "image": torch.randn(2, 3, 32, 32) * scale,
        "target": (torch.rand(2, 1, 32, 32) > 0.7).float(),
    }


def _weights(parts: Parts) -> dict[str, torch.Tensor]:
    out = {f"g.{k}": v.detach().clone() for k, v in parts.inner.state_dict().items()}
    if parts.inner_d is not None:
        out.update({f"d.{k}": v.detach().clone() for k, v in parts.inner_d.state_dict().items()})
    return out


# -- checkpoint round trip ----------------------------------------------------------------


def test_restored_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    """Weights, both optimisers, the scheduler and every RNG come back: the steps after a
    restore into freshly built (differently initialised) objects equal those of a run that
    was never interrupted."""
    cfg = load_config(None, TINY + GAN)
    run = _parts(cfg)
    seed_everything(7)
    for _ in range(3):
        run.step(_random_batch(), gan_active=True)
    state = TrainState(epoch=1, best_metric=0.25, best_epoch=1, since_best=0, run_id="run-1")
    save_checkpoint(tmp_path, run, state, rank=0, world=1, config=cfg.flatten(), name="r")
    expected = [run.step(_random_batch(), gan_active=True) for _ in range(2)]
    expected_lr = run.opt_g.param_groups[0]["lr"]

    fresh = _parts(cfg, seed=123)  # other initial weights, fresh optimiser states
    seed_everything(999)  # other RNG streams
    assert not all(
        torch.equal(a, b)
        for a, b in zip(_weights(fresh).values(), _weights(run).values(), strict=True)
    )
    back = restore(tmp_path, fresh, rank=0, world=1, seed=cfg.train.seed)
    got = [fresh.step(_random_batch(), gan_active=True) for _ in range(2)]

    assert got == expected  # same losses (G, D, every term), step for step
    for key, value in _weights(run).items():
        assert torch.equal(_weights(fresh)[key], value), key
    assert fresh.opt_g.param_groups[0]["lr"] == expected_lr
    assert fresh.sched.last_epoch == run.sched.last_epoch == 5
    assert (back.epoch, back.resumed_from, back.best_metric, back.best_epoch, back.run_id) == (
        1,
        1,
        0.25,
        1,
        "run-1",
    )


def test_checkpoint_files_and_keys(tmp_path):
    """The files and keys a checkpoint holds (what restarts, predict and tests read), all
    loadable with ``weights_only=True``; a non-zero rank writes its RNG state only."""
    cfg = load_config(None, TINY)
    parts = _parts(cfg)
    best = best_snapshot(
        parts.inner,
        2,
        0.5,
        config=cfg.flatten(),
        seq_len=3,
        store_info={"spacing": [2.0, 2.0, 2.0]},
    )
    state = TrainState(epoch=3, best_metric=0.5, best_epoch=2, since_best=1, best=best)
    save_checkpoint(
        tmp_path,
        parts,
        state,
        rank=0,
        world=2,
        config=cfg.flatten(),
        name="run",
        experiment_id="7",
        metrics={"val_dice": 0.4, "epoch": 3, "note": "x"},
    )
    save_checkpoint(tmp_path, parts, state, rank=1, world=2, config=cfg.flatten())
    assert sorted(os.listdir(tmp_path)) == [
        "best.pt",
        "meta.json",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "state.pt",
    ]
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert list(saved) == [
        "model",
        "disc",
        "opt_g",
        "opt_d",
        "sched",
        "scaler",
        "epoch",
        "best_metric",
        "best_epoch",
        "since_best",
        "config",
        "mlflow_run_id",
        "world_size",
    ]
    assert (saved["epoch"], saved["best_epoch"], saved["since_best"], saved["world_size"]) == (
        3,
        2,
        1,
        2,
    )
    assert saved["disc"] == {} and saved["opt_d"] == {} and saved["mlflow_run_id"] == ""
    best_pt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert list(best_pt) == ["model", "epoch", "val_dice", "config", "seq_len", "store"]
    assert best_pt["epoch"] == 2 and best_pt["store"]["spacing"] == [2.0, 2.0, 2.0]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {
        "epoch": 3,
        "best_epoch": 2,
        "best_val_dice": 0.5,
        "mlflow_run_id": "",
        "name": "run",
        "mlflow_experiment_id": "7",
        "metrics": {"val_dice": 0.4, "epoch": 3},
    }
    for rank in (0, 1):
        set_rng_state(torch.load(tmp_path / f"rng_rank{rank}.pt", weights_only=True))
    # no best model yet: no best.pt
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, parts, TrainState(epoch=1), rank=0, world=1, config={})
    assert not (empty / "best.pt").exists()


def test_restore_with_another_number_of_workers_reseeds(tmp_path):
    """The saved RNG state belongs to the saved world size; with another, each rank gets
    fresh streams seeded by (seed, next epoch, rank)."""
    cfg = load_config(None, TINY)
    parts = _parts(cfg)
    save_checkpoint(tmp_path, parts, TrainState(epoch=2), rank=0, world=2, config={})
    drawn_after_save = torch.rand(3)  # what the saved RNG state produces
    restore(tmp_path, _parts(cfg), rank=0, world=2, seed=5)
    assert torch.equal(torch.rand(3), drawn_after_save)
    restore(tmp_path, _parts(cfg), rank=0, world=1, seed=5)
    got = (torch.rand(3), float(np.random.rand()), random.random())
    seed_everything(5 + 1000 * 3 + 0)
    assert torch.equal(got[0], torch.rand(3))
    assert got[1:] == (float(np.random.rand()), random.random())


def test_rng_state_round_trip():
    seed_everything(3)
    saved = rng_state()
    first = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    seed_everything(4)
    set_rng_state(saved)
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1]) and first[2] == again[2]


# -- best-model tracking -------------------------------------------------------------------


def test_best_model_tracking_keeps_the_best_epoch(tmp_path):
    model = nn.Linear(2, 1)
    state = TrainState()
    keep = partial(best_snapshot, model, config={"train.seed": 0}, seq_len=3, store_info={})
    improved = []
    for epoch, dice in enumerate([0.2, 0.6, 0.6, 0.5], start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))  # the weights of each epoch differ
        improved.append(state.record(epoch, dice))
        if improved[-1]:
            state.best = keep(epoch, dice)
    assert improved == [True, True, False, False]  # a tie is no gain
    assert (state.epoch, state.best_epoch, state.best_metric, state.since_best) == (4, 2, 0.6, 2)
    assert state.best is not None and state.best["epoch"] == 2
    assert state.best["val_dice"] == 0.6
    assert torch.all(state.best["model"]["weight"] == 2.0)  # a copy: later epochs leave it be
    assert state.stale(2) and not state.stale(3) and not state.stale(0)  # 0: no early stop

    # the best model survives a restart (rank 0 reloads best.pt)
    cfg = load_config(None, TINY)
    parts = _parts(cfg)
    state.best = best_snapshot(parts.inner, 2, 0.6, config={}, seq_len=3, store_info={})
    save_checkpoint(tmp_path, parts, state, rank=0, world=1, config={})
    back = restore(tmp_path, _parts(cfg, seed=9), rank=0, world=1, seed=0)
    assert (back.best_epoch, back.best_metric, back.since_best) == (2, 0.6, 2)
    assert back.best is not None and back.best["epoch"] == 2
    assert all(torch.equal(back.best["model"][k], v) for k, v in parts.inner.state_dict().items())
    assert restore(tmp_path, _parts(cfg), rank=1, world=1, seed=0).best is None  # rank 0's


# -- the fault drill ------------------------------------------------------------------------


def test_kill_point_fires_once_at_its_epoch_batch_and_rank(tmp_path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(hooks_mod.time, "sleep", waits.append)
    pid_file = tmp_path / "victim.pid"
    hooks = fault_hooks({"pid_file": str(pid_file), "epoch": 3, "batch": 2, "rank": 1, "wait_s": 7})
    for epoch, batch, rank in [(3, 2, 0), (3, 1, 1), (2, 2, 1), (4, 2, 1)]:
        hooks.batch(epoch, batch, rank)
    assert not pid_file.exists() and waits == []
    hooks.batch(3, 2, 1)
    assert pid_file.read_text() == str(os.getpid()) and waits == [7.0]
    hooks.batch(3, 2, 1)  # the replacement worker: the file exists, no wait
    assert waits == [7.0]
    assert hooks.on_epoch_end == []  # nothing raises after an epoch


def test_kill_point_defaults_epoch_2_batch_1_rank_0(tmp_path, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(hooks_mod.time, "sleep", waits.append)
    pid_file = tmp_path / "victim.pid"
    hooks = fault_hooks({"pid_file": str(pid_file)})
    hooks.batch(1, 1, 0)
    hooks.batch(2, 0, 0)
    assert not pid_file.exists()
    hooks.batch(2, 1, 0)
    assert pid_file.is_file() and waits == [300.0]


def test_raise_after_epoch_fails_every_rank_at_that_epoch_only():
    hooks = fault_hooks({"raise_after_epoch": 2})
    assert hooks.on_batch == []
    hooks.epoch_end(1, 0)
    hooks.epoch_end(3, 0)
    for rank in (0, 1):
        with pytest.raises(RuntimeError, match="injected interruption after epoch 2"):
            hooks.epoch_end(2, rank)


def test_no_fault_no_hooks():
    for fault in (None, {}):
        assert fault_hooks(fault) == Hooks()


# -- validation counts ---------------------------------------------------------------------


class _CentreSlice(nn.Module):
    """Deterministic segmenter: the logit of a pixel is its centre-slice value minus 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1] - 0.5


class _Windows(Dataset):
    """In-memory windows in the dataset's item layout."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = [
            {
                "image": torch.rand(3, 32, 32, generator=g),
                "target": (torch.rand(1, 32, 32, generator=g) > 0.6).float(),
            }
            for _ in range(n)
        ]
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def _batches(windows: _Windows, indices, size: int = 3):
    idx = list(indices)
    return [
        {
            "image": torch.stack([windows[i]["image"] for i in idx[j : j + size]]),
            "target": torch.stack([windows[i]["target"] for i in idx[j : j + size]]),
        }
        for j in range(0, len(idx), size)
    ]


def test_validate_counts_add_up_over_batches_and_ranks():
    windows = _Windows(8, seed=1)
    model = _CentreSlice().train()
    counts = validate(model, _batches(windows, range(8)), 0.5, device=CPU)
    assert not model.training  # validation runs in eval mode
    image = torch.stack([w["image"] for w in windows.items])
    target = torch.stack([w["target"] for w in windows.items])
    assert torch.equal(counts, confusion_counts(image[:, 1:2] > 0.5, target))
    assert counts[0] + counts[2] == target.sum()  # TP + FN: every positive pixel
    # two ranks' shares (every window once, as TrainData splits validation) sum to the whole
    shares = [validate(model, _batches(windows, range(r, 8, 2)), 0.5, device=CPU) for r in (0, 1)]
    assert torch.equal(shares[0] + shares[1], counts)
    assert torch.equal(all_summer(CPU, 1)(counts), counts)  # one worker: nothing to reduce
    tp, fp, fn = counts.tolist()
    m = val_metrics(counts)
    assert m["val_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m["val_iou"] == pytest.approx(tp / (tp + fp + fn))
    assert (m["val_tp"], m["val_fp"], m["val_fn"]) == (tp, fp, fn)
    # a higher threshold claims fewer pixels
    assert validate(model, _batches(windows, range(8)), 0.9, device=CPU)[1] < counts[1]


# -- one epoch -----------------------------------------------------------------------------


def test_loader_workers_default_to_none_on_cpu_and_to_the_spare_cpus_on_gpu():
    cuda = torch.device("cuda")
    assert loader_workers(-1, CPU, 8) == 0
    assert loader_workers(-1, cuda, 8) == 7
    assert loader_workers(-1, cuda, 32) == 8 and loader_workers(-1, cuda, 1) == 1
    assert loader_workers(3, CPU, 1) == 3  # an explicit number is kept


class _Sampler(torch.utils.data.Sampler):
    """The epoch sampler's contract (set_epoch, then iterate) over in-memory windows."""

    def __init__(self, order, windows):
        self.order, self.windows = order, windows

    def set_epoch(self, epoch):
        self.windows.set_epoch(epoch)

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


def test_run_epoch_trains_validates_and_tracks(monkeypatch):
    cfg = load_config(None, TINY + ["train.batch_size=2", "train.early_stop_patience=1"])
    parts = _parts(cfg)
    train, val = _Windows(6, seed=1), _Windows(5, seed=2)
    loader_kw = {"batch_size": 2, "num_workers": 0, "pin_memory": False}
    sampler = _Sampler([0, 3, 1, 5], train)
    data = TrainData(
        train=train,
        val=val,
        store_info={},
        n_train=4,
        loader_kw=loader_kw,
        steps_per_epoch=2,
        sampler=sampler,
        loader=torch.utils.data.DataLoader(train, sampler=sampler, **loader_kw),
    )
    calls: list[tuple] = []
    hooks = Hooks(
        on_batch=[lambda *a: calls.append(("batch", *a))],
        after_step=[lambda *a: calls.append(("step", *a))],
    )
    state = TrainState()
    kept: list[int] = []

    def keep_best(epoch: int, dice: float) -> dict:
        kept.append(epoch)
        return {"epoch": epoch, "val_dice": dice}

    metrics, stop = run_epoch(
        parts,
        data,
        state,
        cfg.train,
        epoch=1,
        hooks=hooks,
        all_sum=all_summer(CPU, 1),
        keep_best=keep_best,
    )
    assert calls == [("batch", 1, 0, 0), ("step", 1, 0, 0), ("batch", 1, 1, 0), ("step", 1, 1, 0)]
    assert train.epochs == [1] and parts.sched.last_epoch == 2
    assert list(metrics) == [
        "train/bce",
        "train/dice",
        "train/grad_norm",
        "train/loss",
        "val_dice",
        "val_iou",
        "val_precision",
        "val_recall",
        "val_tp",
        "val_fp",
        "val_fn",
        "best_val_dice",
        "best_epoch",
        "lr",
        "epoch_time",
        "train_time",
        "windows_per_s",
        "val_windows",
        "gan_active",
        "epoch",
        "resumed_from_epoch",
        "early_stopped",
    ]
    positives = float(sum(w["target"].sum() for w in val.items))
    assert metrics["val_tp"] + metrics["val_fn"] == positives
    assert metrics["val_windows"] == len(val.items)  # every window of a hand-built split
    assert metrics["epoch"] == 1 and metrics["best_epoch"] == 1 and not stop
    assert kept == [1] and state.best == {"epoch": 1, "val_dice": metrics["val_dice"]}
    assert metrics["lr"] == parts.opt_g.param_groups[0]["lr"]

    # an epoch without a gain stops the run at patience 1 and keeps the best weights
    monkeypatch.setattr(state, "best_metric", 2.0)  # nothing can beat a Dice of 2
    metrics, stop = run_epoch(
        parts,
        data,
        state,
        cfg.train,
        epoch=2,
        hooks=Hooks(),
        all_sum=all_summer(CPU, 1),
        keep_best=keep_best,
    )
    assert stop and metrics["early_stopped"] == 1.0 and kept == [1]
    assert state.epoch == 2 and state.since_best == 1


def test_the_overlapped_log_is_waited_for_after_the_checkpoint_and_before_the_report(
    monkeypatch,
):
    """`_save_and_report` calls ``before_report`` (the wait for rank 0's MLflow log) after
    the checkpoint is written and before the report, which sees the checkpoint naming the
    run; when the write fails it still waits, then raises the write's error (a retry must
    see what that log wrote) and reports nothing."""
    from vfsearch.pipelines.train import worker

    cfg = load_config(None, TINY)
    parts = _parts(cfg)
    state = TrainState(epoch=1, run_id="run-1")
    order: list[str] = []
    real_save = worker.save_checkpoint

    def spy_save(*args, **kwargs):
        real_save(*args, **kwargs)
        order.append("saved")

    class Session:
        def report(self, metrics, folder, dir_name) -> None:
            order.append(f"report {dir_name}")
            ckpt = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
            assert ckpt["mlflow_run_id"] == "run-1"

    save = partial(
        worker._save_and_report,
        parts,
        state,
        {"val_dice": 0.5},
        "epoch_0001",
        session=Session(),
        rank=0,
        world=1,
        loop={"config": cfg.flatten(), "name": "t"},
        tracker=None,
        before_report=lambda: order.append("waited"),
    )
    monkeypatch.setattr(worker, "save_checkpoint", spy_save)
    save()
    assert order == ["saved", "waited", "report epoch_0001"]

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(worker, "save_checkpoint", broken)
    order.clear()
    with pytest.raises(OSError, match="disk full"):
        save()
    assert order == ["waited"]
