"""Starting or joining Ray (layer 1: the Ray runtime; ``ray`` is imported where it is used).

* `connect_ray`: join ``--address`` / ``$RAY_ADDRESS``, else start a local Ray sized for the run.
* `start_local_ray`: a local Ray whose own processes know its address (Train V2 needs that).
* `ray_output`: the `ray.init` arguments that decide what Ray itself prints on the console.

The dashboard stays on everywhere: Train V2 frees a stopped run's resources through the State
API, which lives in the dashboard.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Mapping
from typing import Any

from vfsearch.core.errors import UserError, explain


def connect_ray(
    address: str | None = None,
    *,
    num_cpus_needed: float = 1.0,
    num_gpus_needed: float = 0.0,
    resources: Mapping[str, float] | None = None,
    verbose: bool = False,
) -> None:
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
            raise UserError(
                f"--address: cannot join the Ray cluster at {address}: "
                f"{explain(exc, address=address)}"
            ) from exc
        finally:
            if ours:
                os.environ.pop(tries, None)
        return
    cpus = os.cpu_count() or 1
    if num_gpus_needed > 0:
        import torch

        have = torch.cuda.device_count()
        if have < num_gpus_needed:
            raise UserError(
                f"--gpus-per-worker: the run needs {num_gpus_needed:g} GPUs, this "
                f"machine has {have}"
            )
    # never leave a local run waiting forever for CPUs this machine does not have
    start_local_ray(
        num_cpus=max(cpus, math.ceil(num_cpus_needed)),
        resources=dict(resources) if resources else None,
        **ray_output(verbose),
    )


def ray_output(verbose: bool) -> dict[str, Any]:
    """`ray.init` arguments for what Ray itself prints on this console.

    Quiet by default: worker and actor output stays in Ray's log files
    (``/tmp/ray/session_latest/logs``) instead of reaching the console (Ray Train's reports,
    the PreemptionWatcher's and the State API client's warnings), and the driver's ``ray``
    logger shows errors only (the token-authentication notice of a new local Ray is a
    warning). Progress lines reach the console through
    `vfsearch.pipelines.train.worker.LineRelay` and Tune callbacks instead. ``verbose``: all
    of it, as Ray prints by default.
    """
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}


def start_local_ray(**init_kwargs: Any) -> str:
    """Start a local Ray whose own processes know its address; returns the GCS address.

    Train V2 frees the resources of a stopped run from an actor that asks the State API
    about the run's controller; that actor finds the cluster through ``RAY_ADDRESS`` and,
    without it, fails as soon as a second Ray instance runs on the machine ("Found multiple
    active Ray instances"), leaving the stopped trial's CPUs taken. So the GCS port is chosen
    here and ``RAY_ADDRESS`` goes into the job's runtime environment. The dashboard stays on.
    """
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


__all__ = ["connect_ray", "ray_output", "start_local_ray"]


def alive_nodes() -> list[dict[str, Any]]:
    """The connected cluster's alive nodes (``NodeID``, ``NodeManagerAddress``, resources)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def missing_on_nodes(
    paths: list[str], nodes: list[dict[str, Any]] | None = None, timeout_s: float = 120.0
) -> dict[str, list[str]]:
    """Which of ``paths`` each node cannot see: ``{node address: [missing paths]}`` for the
    nodes that miss any. A zero-CPU task pinned to each node checks; it never writes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def _missing(ps: list[str]) -> list[str]:
        return [p for p in ps if not os.path.exists(p)]

    nodes = alive_nodes() if nodes is None else nodes
    refs = {
        f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": _missing.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(list(paths))
        for n in nodes
    }
    out = {}
    for node, ref in refs.items():
        missing = ray.get(ref, timeout=timeout_s)
        if missing:
            out[node] = missing
    return out
