"""Scale out on a real multi-node Ray: a head and a second node started with `ray start` on
loopback, `vfsearch tune --address` run as a user would run it (its own process), MLflow over
HTTP. Then the fault drills: the MLflow server restarted mid-sweep, the second node stopped
mid-sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from loopback import LoopbackCluster
from sweeps import children, client, write_space

from vfsearch.adapters.tracking.schema import STATUS_TAG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DRIVER = "vfsearch_driver"


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU + the trial drivers' resource) and one worker node (1 CPU): two trials
    at once can only run one on each node."""
    c = LoopbackCluster()
    try:
        c.head = c.start_head(num_cpus=1, resources={DRIVER: 1})
        c.worker = c.add_node(num_cpus=1)
        yield c
    finally:
        c.shutdown()


def _sweep(
    cluster: LoopbackCluster,
    store: Path,
    tmp: Path,
    uri: str,
    name: str,
    *,
    epochs: int,
    fixed: dict | None = None,
) -> subprocess.Popen:
    space = write_space(
        tmp,
        epochs=epochs,
        grace=epochs,
        fixed=fixed,
        params="  loss.dice_weight: {type: float, low: 0.5, high: 1.5}",
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
        "2",
        "--name",
        name,
        "--address",
        cluster.address,
        "--driver-resource",
        DRIVER,
        "--workdir",
        str(tmp),
        "--storage",
        str(tmp / "ray"),
    ]
    # progress lines on although stdout is a pipe: the tests read the sweep's header
    env = {**os.environ, **cluster.env, "MLFLOW_TRACKING_URI": uri, "VFSEARCH_PROGRESS": "1"}
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail("the sweep did not finish in time:\n" + out[-4000:])
    assert proc.returncode == 0, out[-4000:]
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n" + proc.stdout.read()[-4000:])
        time.sleep(1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def _assert_complete(uri: str, sweep: str, epochs: int) -> list:
    """Two children, each completed with every epoch's metrics and the fused 3D Dice."""
    c, _, kids = children(uri, sweep)
    assert len(kids) == 2, [k.info.run_name for k in kids]  # no trial lost, none doubled
    assert len({k.info.run_name for k in kids}) == 2
    for kid in kids:
        for key in ("val_dice", "train/loss"):
            assert set(_steps(c, kid.info.run_id, key)) == set(range(1, epochs + 1)), (
                kid.info.run_name,
                key,
            )
        assert 0.0 <= kid.data.metrics["val_dice3d"] <= 1.0
        assert kid.data.tags[STATUS_TAG] == "completed"
        assert kid.info.status == "FINISHED"
    return kids


def test_trials_run_on_both_nodes(cluster, small_store, mlflow_server, tmp_path):
    assert sorted(cluster.node_ids()) == sorted([cluster.head, cluster.worker])
    # the cluster is not recorded as this machine's default Ray (which would outlive it)
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    port = cluster.address.rsplit(":", 1)[1]
    assert not current.exists() or current.read_text().rsplit(":", 1)[-1] != port
    out = _finish(_sweep(cluster, small_store, tmp_path, mlflow_server, "two-nodes", epochs=2))
    assert "up to 2 at once" in out  # drivers take no CPU: one trial per node's CPU
    kids = _assert_complete(mlflow_server, "two-nodes", 2)
    assert {k.data.tags["ray.node_id"] for k in kids} == {cluster.head, cluster.worker}


def test_mlflow_server_restart_mid_sweep_loses_nothing(cluster, small_store, tmp_path):
    """The tracking server goes away after the first epoch is logged and comes back on the
    same port and database ~5 s later; every metric of every epoch still arrives."""
    from vfsearch.adapters import tracking

    workdir = tmp_path / "mlflow"
    info = tracking.ensure_server(workdir, timeout=240)
    try:
        proc = _sweep(cluster, small_store, tmp_path, info.url, "restart", epochs=3)

        def first_epoch_logged():
            try:
                _, _, kids = children(info.url, "restart")
            except Exception:  # noqa: BLE001 - experiment or parent not there yet
                return None
            c = client(info.url)
            return any(_steps(c, k.info.run_id, "val_dice") for k in kids)

        _wait_for(first_epoch_logged, proc, what="a first epoch in MLflow")
        assert tracking.stop_server(workdir)
        assert not tracking.is_healthy(info.url)
        time.sleep(5)
        assert proc.poll() is None  # the sweep is still running while the server is down
        again = tracking.ensure_server(workdir, port=info.port, timeout=240)
        assert again.url == info.url
        _finish(proc)
        _assert_complete(info.url, "restart", 3)
    finally:
        tracking.stop_server(workdir)


def test_worker_node_lost_mid_sweep(cluster, small_store, mlflow_server, tmp_path):
    """The second node is killed (SIGKILL of its raylet and workers) after its trial has
    checkpointed an epoch: that trial resumes from its checkpoint on the head, the sweep
    completes, no trial is lost and no MLflow run doubled. Enough epochs that the trial is
    still training when its node dies: an epoch of this problem takes about 0.5 s, and the
    kill comes a second or two after epoch 2 is logged (with 4 epochs the trial sometimes
    finished first, and nothing was left to resume)."""
    epochs = 16
    proc = _sweep(
        cluster,
        small_store,
        tmp_path,
        mlflow_server,
        "node-lost",
        epochs=epochs,
        fixed={"train.max_failures": 10},
    )
    c = client(mlflow_server)

    def worker_trial_past_epoch_1():
        try:
            _, _, kids = children(mlflow_server, "node-lost")
        except Exception:  # noqa: BLE001 - experiment or parent not there yet
            return None
        for kid in kids:
            if (
                kid.data.tags.get("ray.node_id") == cluster.worker
                and max(_steps(c, kid.info.run_id, "val_dice"), default=0) >= 2
            ):
                return kid.info.run_id  # epoch 1's checkpoint was reported before epoch 2
        return None

    moved = _wait_for(worker_trial_past_epoch_1, proc, what="the worker node's trial at epoch 2")
    cluster.kill_node(cluster.worker)
    if c.get_run(moved).info.status == "FINISHED":  # ended on its own, before the kill
        proc.kill()
        pytest.fail("the worker node's trial finished before its node was killed")
    cluster.wait_dead(cluster.worker)
    _finish(proc)
    kids = _assert_complete(mlflow_server, "node-lost", epochs)
    run = {k.info.run_id: k for k in kids}[moved]
    assert int(run.data.tags["vfsearch.resumed_from_epoch"]) >= 1  # from its checkpoint
    assert run.data.tags["ray.node_id"] == cluster.head  # finished on the surviving node
