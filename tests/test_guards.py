"""Multi-node guards (`vfsearch.pipelines.guards`) on a real two-node loopback Ray.

The second node runs in its own mount namespace with a private, empty tmpfs over one folder:
for that node the folder is a node-local disk, while the head and this process see the real
one. `vfsearch tune --address` runs as a user would run it (its own process); each guard
must stop the sweep before any trial starts with one line naming the option, exit 2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loopback import LoopbackCluster, can_hide_folders
from sweeps import client, write_space

from vfsearch.adapters.tracking import find_server, stop_server
from vfsearch.adapters.tracking.schema import SWEEP_EXPERIMENT, SWEEP_TAG
from vfsearch.pipelines import guards

HIDDEN = "node-local"


@pytest.fixture(scope="module")
def hidden(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(HIDDEN)


@pytest.fixture(scope="module")
def cluster(hidden):
    if not can_hide_folders():
        pytest.skip("this machine cannot mount a private tmpfs (needs root and unshare)")
    c = LoopbackCluster()
    try:
        c.start_head(num_cpus=1)
        c.add_node(num_cpus=1, hide=hidden)
        yield c
    finally:
        c.shutdown()


def _tune(cluster, store: Path, tmp: Path, *extra: str, uri: str | None = None, name: str):
    space = write_space(
        tmp, epochs=1, grace=1, params="  loss.dice_weight: {type: float, low: 0.5, high: 1.5}"
    )
    cmd = [
        sys.executable,
        "-m",
        "vfsearch",
        "tune",
        "--store",
        str(store),
        "--space",
        str(space),
        "--num-samples",
        "1",
        "--name",
        name,
        "--address",
        cluster.address,
        "--workdir",
        str(tmp / "wd"),
        *extra,
    ]
    env = {**os.environ, **cluster.env}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return res, lines


def _assert_refused(res, lines, *needles: str) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    error = lines[-1]
    for needle in needles:
        assert needle in error, error
    return error


def _no_sweep(uri: str, name: str) -> None:
    exp = client(uri).get_experiment_by_name(SWEEP_EXPERIMENT)
    if exp is not None:
        runs = client(uri).search_runs([exp.experiment_id], f"tags.`{SWEEP_TAG}` = '{name}'")
        assert not runs, "a refused sweep left a parent run behind"


@pytest.mark.integration
@pytest.mark.slow
def test_embedded_tracking_server_is_refused_on_two_nodes(cluster, small_store, tmp_path):
    try:
        res, lines = _tune(cluster, small_store, tmp_path, name="embedded")
        error = _assert_refused(res, lines, "MLFLOW_TRACKING_URI", "127.0.0.1", "1 node")
        assert find_server(tmp_path / "wd") is None  # refused before any server started
    finally:
        stop_server(tmp_path / "wd")
    assert error.startswith("error: MLFLOW_TRACKING_URI: not set")
    assert not (tmp_path / "wd" / "ray_results" / "embedded").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_node_local_checkpoint_storage_is_refused(
    cluster, small_store, hidden, mlflow_server, tmp_path
):
    storage = hidden / "ckpt"
    res, lines = _tune(
        cluster,
        small_store,
        tmp_path,
        "--storage",
        str(storage),
        uri=mlflow_server,
        name="local-storage",
    )
    _assert_refused(res, lines, "--storage", str(storage), "node-local", "2-node")
    assert not list(storage.glob(".vfsearch-probe-*"))  # the probe is cleaned up
    _no_sweep(mlflow_server, "local-storage")


@pytest.mark.integration
@pytest.mark.slow
def test_a_store_only_some_nodes_can_read_is_refused(
    cluster, small_store, hidden, mlflow_server, tmp_path
):
    store = hidden / "store.zarr"
    shutil.copytree(small_store, store, dirs_exist_ok=True)
    res, lines = _tune(
        cluster,
        store,
        tmp_path,
        "--storage",
        str(tmp_path / "ray"),
        uri=mlflow_server,
        name="local-store",
    )
    _assert_refused(res, lines, "--store", str(store), "cannot be read from node")
    _no_sweep(mlflow_server, "local-store")


@pytest.mark.integration
@pytest.mark.slow
def test_fractional_gpus_per_worker_are_refused(cluster, small_store, mlflow_server, tmp_path):
    res, lines = _tune(
        cluster,
        small_store,
        tmp_path,
        "--gpus-per-trial",
        "1",
        "--workers-per-trial",
        "2",
        uri=mlflow_server,
        name="half-gpu",
    )
    _assert_refused(res, lines, "--gpus-per-trial", "0.5 GPU each")


def test_url_storage_and_store_pass_through_untouched(monkeypatch):
    """Pure logic: with two nodes, a ``://`` storage or store is never probed as a path."""
    nodes = [
        {"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"},
        {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"},
    ]
    probed: list[list[str]] = []
    monkeypatch.setattr(guards, "alive_nodes", lambda: nodes)
    monkeypatch.setattr(guards, "missing_on_nodes", lambda paths, ns: probed.append(paths) or {})
    n = guards.check_cluster(
        embedded_tracking=False,
        storage="s3://bucket/ray",
        store="s3://bucket/store.zarr",
    )
    assert n == 2 and probed == []
    with pytest.raises(guards.UserError, match="127.0.0.1"):
        guards.check_cluster(
            embedded_tracking=True,
            storage="s3://bucket/ray",
            store="s3://bucket/store.zarr",
        )
    guards.check_gpu_split(2, 1.0, "--gpus-per-trial")  # whole GPUs: fine
    guards.check_gpu_split(1, 0.5, "--gpus-per-trial")  # one worker may share a GPU
    with pytest.raises(guards.UserError, match="0.5 GPU"):
        guards.check_gpu_split(2, 0.5, "--gpus-per-trial")
