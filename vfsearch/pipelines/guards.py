"""Checks a multi-node run must pass before any trial starts (one-line errors, exit 2).

On a cluster of more than one node:

* the embedded MLflow server listens on 127.0.0.1 of the machine that started it, so the
  other nodes' workers cannot log to it: set ``MLFLOW_TRACKING_URI`` to a server all reach;
* checkpoint storage given as a path must be the same folder on every node (a shared file
  system): each node is asked whether it sees a probe file written there;
* the store must be readable from every node, and the validation cases' source files either
  from every node or from none, so the fused validation's ground truth (source files, else
  the resampled crops) is the same whichever node computes it.

Whatever the cluster: a worker never gets a fraction of a GPU when a trial has more than one
worker (NCCL ranks sharing one GPU). A ``://`` store or storage is passed through untouched.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from vfsearch.adapters.ray_runtime import alive_nodes, missing_on_nodes
from vfsearch.adapters.store import Store
from vfsearch.core.errors import UserError


def check_gpu_split(workers: int, gpus_per_worker: float, option: str) -> None:
    """Refuse fractional GPUs per worker when a run has more than one worker."""
    if workers > 1 and gpus_per_worker > 0 and gpus_per_worker != int(gpus_per_worker):
        raise UserError(
            f"{option}: {workers} workers would get {gpus_per_worker:g} GPU each; NCCL ranks "
            f"cannot share a GPU: give each worker whole GPUs (e.g. {workers} GPUs in all)"
        )


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def check_cluster(
    *,
    embedded_tracking: bool,
    storage: str,
    store: str,
    storage_option: str = "--storage",
) -> int:
    """Run the multi-node checks on the connected Ray; returns the number of alive nodes."""
    nodes = alive_nodes()
    if len(nodes) < 2:
        return len(nodes)
    if embedded_tracking:  # the embedded server always listens on 127.0.0.1
        raise UserError(
            "MLFLOW_TRACKING_URI: not set, and the embedded MLflow server (127.0.0.1) cannot "
            f"be reached from the other {len(nodes) - 1} node(s) of this cluster; "
            "set MLFLOW_TRACKING_URI to a server every node reaches (cluster/README.md)"
        )
    if not is_url(storage):
        _check_shared_folder(storage, storage_option, nodes)
    if not is_url(store):
        _check_store(store, nodes)
    return len(nodes)


def _check_shared_folder(folder: str, option: str, nodes: list) -> None:
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".vfsearch-probe-{uuid.uuid4().hex}"
    probe.write_text("probe\n")
    try:
        missing = missing_on_nodes([str(probe)], nodes)
    finally:
        probe.unlink(missing_ok=True)
    if missing:
        where = ", ".join(sorted(missing))
        raise UserError(
            f"{option}: {folder} is node-local: node(s) {where} do not see it; on a "
            f"{len(nodes)}-node cluster use a shared folder every node mounts, or s3://..."
        )


def _check_store(store: str, nodes: list) -> None:
    missing = missing_on_nodes([str(Path(store) / "zarr.json")], nodes)
    if missing:
        raise UserError(
            f"--store: {store} cannot be read from node(s) {', '.join(sorted(missing))}; "
            "put the store on a shared folder every node mounts"
        )
    opened = Store(store)
    sources = sorted(
        {
            p
            for cid in opened.case_ids("val")
            for p in (
                (opened.case_attrs(cid).get("source") or {}).get(k)
                for k in ("fracture", "vertebrae")
            )
            if p and os.path.isabs(str(p))
        }
    )
    if not sources:
        return
    missing = missing_on_nodes(sources[:1], nodes)  # one file decides: all live together
    if missing and len(missing) < len(nodes):
        raise UserError(
            f"--store: the source files of its validation cases (e.g. {sources[0]}) are seen "
            f"by some nodes but not by {', '.join(sorted(missing))}, so the fused "
            "validation's ground truth would depend on the node; mount them on every node"
        )
