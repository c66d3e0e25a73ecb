"""Ray Train's torch backend with an import pre-warm, and the two sessions a worker loop runs
under (orchestration; imports ray).

Every torch optimiser imports ``torch._dynamo`` lazily when it is constructed: ~2 s on a small
CPU, ~5 s on a loaded one, spent between the worker loop's start and its first step.
`PrewarmTorchConfig` behaves exactly like `ray.train.torch.TorchConfig`, except that its
backend first starts `prewarm_imports` on every worker, in a background thread, before Ray sets
up the process group; the imports then overlap Ray's own start-up instead of following it.
Measured with 2 CPU workers: constructing the first optimiser in the loop took 3.4-3.7 s
without, 0.01-0.05 s with, and Ray's start-up did not grow.

`TrainSession` and `TuneSession` answer the few calls the worker loop makes (its rank and world
size, its device, wrapping the model, the checkpoint to resume from, the per-epoch report):
the first through Ray Train inside a `TorchTrainer` worker, the second through Ray Tune inside
a function trainable, where a one-worker trial runs the same loop in the trial's own process
(no Train controller, no placement group, no worker actors to start).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ray.train.torch import TorchConfig

from vfsearch.adapters.lazy import import_in_background

PREWARM_MODULES: tuple[str, ...] = (
    "torch._dynamo",
    "zarr",
    "vfsearch.adapters.dataset",
    "vfsearch.core.models",
    "vfsearch.core.losses",
    "vfsearch.core.steps",
)


def prewarm_imports() -> None:
    """Import `PREWARM_MODULES` in a daemon thread and return at once."""
    import_in_background(PREWARM_MODULES)


# Ray's own torch backend class, reached through the public `TorchConfig.backend_cls`
_TorchBackend = TorchConfig().backend_cls


class PrewarmBackend(_TorchBackend):  # type: ignore[misc, valid-type]
    """Ray's torch backend, plus `prewarm_imports` on every worker before process-group
    set-up (everything else, e.g. ``share_cuda_visible_devices``, is inherited)."""

    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(prewarm_imports)
        return super().on_start(worker_group, backend_config)


class PrewarmTorchConfig(TorchConfig):
    """`TorchConfig` (``backend``: gloo / nccl) whose backend is `PrewarmBackend`."""

    @property
    def backend_cls(self):
        return PrewarmBackend


class TrainSession:
    """The worker loop's calls answered by Ray Train V2 (one `TorchTrainer` worker of many)."""

    def rank_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str, dir_name: str) -> None:
        """One report with the checkpoint in ``folder`` (a barrier: every rank calls it; the
        ranks' folders merge into one, named ``dir_name``)."""
        import ray.train

        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=dir_name,
        )


class TuneSession:
    """The worker loop's calls answered by Ray Tune: the loop runs in the trial's process as
    its only worker (rank 0 of 1), on the GPU Ray gave the trial if any; the checkpoint is
    the trial's, which Tune keeps, hands back on a retry or a restored sweep, and names
    itself (``checkpoint_00000N``)."""

    def __init__(self) -> None:
        self._device: torch.device | None = None
        # one INFO line per persisted checkpoint; a TorchTrainer run's are quieted by its
        # LoggingConfig(log_level="WARNING")
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def rank_world(self) -> tuple[int, int]:
        return 0, 1

    def device(self) -> torch.device:
        if self._device is None:
            import ray

            # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU(s): the first one is index 0
            if ray.get_gpu_ids() and torch.cuda.is_available():
                self._device = torch.device("cuda", 0)
                torch.cuda.set_device(self._device)
            else:
                self._device = torch.device("cpu")
        return self._device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device())  # one worker: no DistributedDataParallel

    def get_checkpoint(self) -> Any:
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str, dir_name: str) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


__all__ = [
    "PREWARM_MODULES",
    "PrewarmBackend",
    "PrewarmTorchConfig",
    "TrainSession",
    "TuneSession",
    "prewarm_imports",
]
