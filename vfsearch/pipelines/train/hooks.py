"""Named points of the worker loop where extra behaviour plugs in (`Hooks`), and the
fault-injection drill built on them (`fault_hooks`).

The loop calls, in list order:

* ``on_batch(epoch, batch, rank)``: before each training step, the batch already loaded;
* ``after_step(epoch, batch, rank)``: after each optimiser (and scheduler) step;
* ``on_epoch_end(epoch, rank)``: after the epoch's checkpoint was reported (the epoch is saved).

Epochs count from 1, batches from 0 within an epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

BatchHook = Callable[[int, int, int], None]  # (epoch, batch, rank)
EpochHook = Callable[[int, int], None]  # (epoch, rank)


@dataclass
class Hooks:
    """Callables the worker loop calls at its named points (none: nothing happens)."""

    on_batch: list[BatchHook] = field(default_factory=list)
    after_step: list[BatchHook] = field(default_factory=list)
    on_epoch_end: list[EpochHook] = field(default_factory=list)

    def batch(self, epoch: int, batch: int, rank: int) -> None:
        for hook in self.on_batch:
            hook(epoch, batch, rank)

    def step(self, epoch: int, batch: int, rank: int) -> None:
        for hook in self.after_step:
            hook(epoch, batch, rank)

    def epoch_end(self, epoch: int, rank: int) -> None:
        for hook in self.on_epoch_end:
            hook(epoch, rank)


@dataclass(frozen=True)
class KillPoint:
    """``on_batch`` drill: at (``epoch``, ``batch``) the chosen ``rank`` writes its pid to
    ``pid_file`` and waits ``wait_s`` seconds for the test to SIGKILL it. Only once: the
    replacement worker finds the file and carries on."""

    pid_file: str
    epoch: int = 2
    batch: int = 1
    rank: int = 0
    wait_s: float = 300.0

    def __call__(self, epoch: int, batch: int, rank: int) -> None:
        if epoch != self.epoch or batch != self.batch or rank != self.rank:
            return
        try:
            fd = os.open(self.pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the replacement worker: carry on
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(self.wait_s)


@dataclass(frozen=True)
class RaiseAfterEpoch:
    """``on_epoch_end`` drill: every rank fails once ``epoch`` is saved (an interrupted run)."""

    epoch: int

    def __call__(self, epoch: int, rank: int) -> None:
        if epoch == self.epoch:
            raise RuntimeError(f"injected interruption after epoch {epoch}")


def fault_hooks(fault: Mapping[str, Any] | None) -> Hooks:
    """The fault-injection drill that ``fault`` (`build_trainer`'s test hook) asks for:
    ``{"pid_file", "epoch", "batch", "rank", "wait_s"}`` a `KillPoint` (defaults: epoch 2,
    batch 1, rank 0, 300 s), ``{"raise_after_epoch": k}`` a `RaiseAfterEpoch`; both may be
    given. None or ``{}``: no hooks."""
    hooks = Hooks()
    if not fault:
        return hooks
    if "pid_file" in fault:
        hooks.on_batch.append(
            KillPoint(
                fault["pid_file"],
                epoch=fault.get("epoch", 2),
                batch=fault.get("batch", 1),
                rank=fault.get("rank", 0),
                wait_s=float(fault.get("wait_s", 300)),
            )
        )
    if fault.get("raise_after_epoch") is not None:
        hooks.on_epoch_end.append(RaiseAfterEpoch(fault["raise_after_epoch"]))
    return hooks


__all__ = ["BatchHook", "EpochHook", "Hooks", "KillPoint", "RaiseAfterEpoch", "fault_hooks"]
