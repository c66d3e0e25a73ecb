"""A real multi-node Ray on one machine: `ray start --head` plus more `ray start --address`
nodes on loopback, each its own process group so that one node can be stopped alone (the
way a cloud VM disappears) without touching any other Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_executable() -> str:
    import sys

    path = Path(sys.executable).with_name("ray")
    return str(path) if path.exists() else shutil.which("ray") or "ray"


@dataclass
class LoopbackCluster:
    """``start_head`` then ``add_node``; ``kill_node`` stops one node's whole process group."""

    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # node id -> `ray start`
    temp_dirs: list[str] = field(default_factory=list)

    def _ports(self) -> list[str]:
        return [
            "--node-manager-port",
            str(_free_port()),
            "--object-manager-port",
            str(_free_port()),
            "--dashboard-agent-listen-port",
            str(_free_port()),
            "--dashboard-agent-grpc-port",
            str(_free_port()),
            "--metrics-export-port",
            str(_free_port()),
            "--runtime-env-agent-port",
            str(_free_port()),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
        ]

    def _start(
        self,
        args: list[str],
        resources: dict[str, float] | None,
        num_cpus: int,
        prefix: list[str] | None = None,
    ) -> str:
        before = set(self.node_ids(alive_only=False)) if self.address else set()
        # a temp dir of the node's own: `ray start` records its cluster in
        # <temp dir>/ray_current_cluster, and a record left in /tmp/ray after the node is
        # killed would send every later address-less `ray.init()` on this machine to it
        temp_dir = tempfile.mkdtemp(prefix="vfray-")  # short: Ray's socket paths live here
        self.temp_dirs.append(temp_dir)
        cmd = [
            _ray_executable(),
            "start",
            "--block",
            "--temp-dir",
            temp_dir,
            "--num-cpus",
            str(num_cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(150 * 2**20),
            "--node-ip-address",
            "127.0.0.1",
            *self._ports(),
            *args,
        ]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        cmd = [*(prefix or []), *cmd]
        env = {**os.environ, **self.env}
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
            if self.address:
                new = set(self.node_ids()) - before
                if new:
                    node = new.pop()
                    self.procs[node] = proc
                    return node
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"`{' '.join(cmd)}` did not join the cluster in 120 s")

    def start_head(self, *, num_cpus: int, resources: dict[str, float] | None = None) -> str:
        # Ray 2.60 turns token authentication on for new clusters; this process queries the
        # GCS too, so it uses (and if need be creates) the same ~/.ray/auth_token
        from ray._private.authentication.authentication_token_setup import (
            enable_token_auth_by_default,
            ensure_token_if_auth_enabled,
        )

        enable_token_auth_by_default()
        ensure_token_if_auth_enabled()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        # Ray's own processes (Train V2's placement-group cleaner) must find this cluster
        # and no other Ray on the machine
        self.env = {**self.env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        return self._start(
            [
                "--head",
                "--port",
                str(port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(_free_port()),
                "--ray-client-server-port",
                str(_free_port()),
            ],
            resources,
            num_cpus,
        )

    def add_node(
        self,
        *,
        num_cpus: int,
        resources: dict[str, float] | None = None,
        hide: str | Path | None = None,
    ) -> str:
        """A node joining the cluster; with ``hide``, that folder is an empty private tmpfs
        for this node and its workers (its own mount namespace), as a node-local disk would
        be: the other nodes keep seeing the real folder."""
        prefix = None
        if hide is not None:
            prefix = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"',
                str(hide),
            ]
        return self._start(["--address", self.address], resources, num_cpus, prefix)

    def _gcs_nodes(self) -> list[dict]:
        from ray._raylet import GcsClient

        client = GcsClient(address=self.address)
        infos = client.get_all_node_info(timeout=10)
        return [{"id": node_id.hex(), "alive": info.state == 0} for node_id, info in infos.items()]

    def node_ids(self, *, alive_only: bool = True) -> list[str]:
        host, port = self.address.rsplit(":", 1)
        try:  # a GcsClient made before the GCS listens blocks for a long time
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return []
        try:
            return [n["id"] for n in self._gcs_nodes() if n["alive"] or not alive_only]
        except Exception:  # noqa: BLE001 - GCS not up yet
            return []

    def kill_node(self, node_id: str) -> None:
        """SIGKILL the node's raylet, its workers and everything else it started."""
        proc = self.procs.pop(node_id)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def wait_dead(self, node_id: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node_id not in self.node_ids():
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {node_id} still alive after {timeout} s")

    def shutdown(self) -> None:
        """Stop every node (worker nodes first): SIGTERM each process group, then SIGKILL
        whatever is left of it."""
        head = next(iter(self.procs), None)
        for node_id in [n for n in self.procs if n != head] + ([head] if head else []):
            proc = self.procs.pop(node_id)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def can_hide_folders() -> bool:
    """Whether this machine lets a process mount a private tmpfs (root, mount namespaces)."""
    probe = tempfile.mkdtemp(prefix="vfhide-")
    try:
        return (
            subprocess.run(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    f'mount -t tmpfs tmpfs "{probe}"',
                ],
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        os.rmdir(probe)
