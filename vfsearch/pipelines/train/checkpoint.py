"""The files of a training checkpoint: what an epoch leaves behind (`save_checkpoint`) and how
a restart reads it back (`restore`). Plain torch and files, no Ray: the worker hands the
folder to ``ray.train.report`` as a ``Checkpoint``, and unit tests call these directly.

A checkpoint is a folder (one per epoch in ``<storage>/<name>/``; every rank writes its files
into its own folder and Ray merges them) of plain tensors and dicts only, so
``torch.load(..., weights_only=True)`` reads it:

* ``state.pt`` (rank 0): ``model``, ``disc``, ``opt_g``, ``opt_d``, ``sched``, ``scaler``
  state dicts, ``epoch`` (last finished, 1-based), ``best_metric``, ``best_epoch``,
  ``since_best``, ``config`` (flat), ``mlflow_run_id``, ``world_size``;
* ``best.pt`` (rank 0): ``model`` state dict of the best epoch so far, ``epoch``,
  ``val_dice``, ``config`` (flat), ``seq_len``, ``store`` (and ``threshold`` once the final
  evaluation chose one);
* ``meta.json`` (rank 0): ``epoch``, ``best_epoch``, ``best_val_dice``, ``mlflow_run_id``,
  ``name``, ``mlflow_experiment_id`` and the numeric ``metrics`` of the report;
* ``rng_rank<r>.pt``: each worker's torch / CUDA / numpy / Python RNG state.

Restart: a run started again with the same ``name`` and ``storage`` is restored by Ray Train
V2 (it finds the run's state under ``<storage>/<name>``), ``ray.train.get_checkpoint()``
returns the last checkpoint, and `restore` continues at the next epoch with the saved
weights, optimiser, scheduler and RNG states; the same MLflow run keeps receiving metrics. A
worker that dies is replaced the same way, up to ``train.max_failures`` times.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vfsearch.pipelines.train.loop import Parts, TrainState

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"
META_FILE = "meta.json"


def rng_file(rank: int) -> str:
    """The name of rank ``rank``'s RNG state file."""
    return f"rng_rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states as plain tensors and lists."""
    np_state = np.random.get_state()
    assert isinstance(np_state, tuple)  # the legacy form: (name, keys, pos, has_gauss, gauss)
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": [
            int(py_state[0]),
            [int(v) for v in py_state[1]],
            None if py_state[2] is None else float(py_state[2]),
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(has_gauss), float(gauss)))
    version, internal, g = state["python"]
    random.setstate((version, tuple(internal), g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(
    folder: str | Path,
    parts: Parts,
    state: TrainState,
    *,
    rank: int,
    world: int,
    config: Mapping[str, Any],
    name: str = "",
    experiment_id: str = "",
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Write rank ``rank``'s share of the checkpoint of ``state.epoch`` into ``folder``:
    every rank its RNG state, rank 0 ``state.pt``, ``best.pt`` (when there is a best model)
    and ``meta.json``. ``config`` is the flat config, ``name`` the run's, ``experiment_id``
    its MLflow experiment, ``metrics`` the epoch's report."""
    folder = Path(folder)
    torch.save(rng_state(), folder / rng_file(rank))
    if rank != 0:
        return
    torch.save(
        {
            "model": parts.inner.state_dict(),
            "disc": parts.inner_d.state_dict() if parts.inner_d is not None else {},
            "opt_g": parts.opt_g.state_dict(),
            "opt_d": parts.opt_d.state_dict() if parts.opt_d is not None else {},
            "sched": parts.sched.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "epoch": state.epoch,
            "best_metric": state.best_metric,
            "best_epoch": state.best_epoch,
            "since_best": state.since_best,
            "config": config,
            "mlflow_run_id": state.run_id or "",
            "world_size": world,
        },
        folder / STATE_FILE,
    )
    if state.best is not None:
        torch.save(state.best, folder / BEST_FILE)
    (folder / META_FILE).write_text(
        json.dumps(
            {
                "epoch": state.epoch,
                "best_epoch": state.best_epoch,
                "best_val_dice": state.best_metric,
                "mlflow_run_id": state.run_id or "",
                "name": name,
                "mlflow_experiment_id": experiment_id,
                "metrics": {
                    k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))
                },
            }
        )
    )


def restore(folder: str | Path, parts: Parts, *, rank: int, world: int, seed: int) -> TrainState:
    """Load the checkpoint in ``folder`` into ``parts`` and return the state to go on from.

    The RNG state is rank ``rank``'s own when the run had ``world`` workers then too; with
    another number of workers every rank is seeded afresh (``seed + 1000 * next epoch +
    rank``). Rank 0 also reloads best.pt.
    """
    folder = Path(folder)
    saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    parts.inner.load_state_dict(saved["model"])
    parts.opt_g.load_state_dict(saved["opt_g"])
    parts.sched.load_state_dict(saved["sched"])
    parts.scaler.load_state_dict(saved["scaler"])
    if parts.disc is not None:
        assert parts.inner_d is not None and parts.opt_d is not None
        parts.inner_d.load_state_dict(saved["disc"])
        parts.opt_d.load_state_dict(saved["opt_d"])
    epoch = int(saved["epoch"])
    rng = folder / rng_file(rank)
    if rng.is_file() and int(saved.get("world_size", 0)) == world:
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        seed_everything(seed + 1000 * (epoch + 1) + rank)
    best = None
    if rank == 0 and (folder / BEST_FILE).is_file():
        best = torch.load(folder / BEST_FILE, map_location="cpu", weights_only=True)
    return TrainState(
        epoch=epoch,
        best_metric=float(saved["best_metric"]),
        best_epoch=int(saved["best_epoch"]),
        since_best=int(saved["since_best"]),
        resumed_from=epoch,
        run_id=saved.get("mlflow_run_id") or None,
        best=best,
    )


__all__ = [
    "BEST_FILE",
    "META_FILE",
    "STATE_FILE",
    "restore",
    "rng_file",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
]
