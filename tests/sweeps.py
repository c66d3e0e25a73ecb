"""Helpers shared by the sweep tests: a tiny search space and the sweep's MLflow runs."""

from __future__ import annotations

from pathlib import Path

from vfsearch.adapters.tracking.schema import SWEEP_EXPERIMENT, SWEEP_TAG

TINY = """
version: 1
metric: val_dice3d
mode: max
epochs: {epochs}
scheduler: {{grace_period: {grace}, reduction_factor: 2, metric: val_dice}}
fixed:
  data.patch_size: 48
  data.seq_len: 3
  data.augment: 0.0
  model.base_channels: 4
  model.depth: 3
  model.norm: group  # eval = train behaviour after a few steps (BatchNorm stats would not settle)
  train.batch_size: 8
  train.max_windows_per_epoch: 48
  train.warmup_epochs: 0
  train.lr: 0.01
  train.log_pictures: false
{extra}params:
{params}
"""


def write_space(
    folder: Path, *, epochs: int, grace: int, params: str, fixed: dict[str, object] | None = None
) -> Path:
    """A tiny space YAML in ``folder`` (``fixed`` adds or overrides fixed keys)."""
    extra = "".join(f"  {k}: {v}\n" for k, v in (fixed or {}).items())
    path = folder / "space.yaml"
    path.write_text(TINY.format(epochs=epochs, grace=grace, params=params, extra=extra))
    return path


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def children(uri: str, sweep: str):
    """(client, parent run, child runs) of ``sweep``; exactly one parent must exist."""
    c = client(uri)
    exp = c.get_experiment_by_name(SWEEP_EXPERIMENT)
    parents = c.search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    kids = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, kids
