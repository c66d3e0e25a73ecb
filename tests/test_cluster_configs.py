"""The scale-out material in cluster/, checked without starting Ray or Kubernetes.

* the Ray cluster-launcher config validates against the schema shipped in the ray package
  (and a broken copy does not), and its head/worker types fit vfsearch's driver placement;
* the KubeRay manifests carry the fields KubeRay requires, agree with each other and with the
  `vfsearch tune` command line;
* the MLflow server always starts with basic auth, and its start script keeps passwords off
  the command line and out of the auth config;
* security: no public Service or Ingress, no dashboard on a public address, no secret value in
  any file (secretKeyRef in manifests, `${VAR:?}` in compose);
* the Dockerfiles build from the pinned versions.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
KUBERAY = CLUSTER / "kuberay"
MLFLOW_DIR = CLUSTER / "mlflow"
COMPOSE = MLFLOW_DIR / "docker-compose.yaml"
DRIVER_RESOURCE = "vfsearch_driver"
IMAGE_CODE_DIR = "/home/ray/vfsearch"  # where cluster/Dockerfile puts the repository
SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN")
MLFLOW_CLIENT_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# -- helpers -----------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_files() -> list[Path]:
    return [p for p in cluster_files() if p.suffix in (".yaml", ".yml")]


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under cluster/ (documents with apiVersion and kind)."""
    return [
        (p, d)
        for p in yaml_files()
        for d in load_docs(p)
        if isinstance(d, dict) and "apiVersion" in d and "kind" in d
    ]


def k8s_of_kind(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_docs() if d["kind"] == kind]


def pinned(package: str) -> str:
    """The version constraints.txt pins for ``package``."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(package)}==([\w.*]+)", line.split("#")[0].strip())
        if m:
            return m.group(1)
    raise AssertionError(f"constraints.txt pins no {package}")


def ray_start_resources(value: str) -> dict:
    """KubeRay's rayStartParams.resources: a JSON object inside double quotes, quotes escaped
    (`'"{\\"Custom\\": 1}"'` in YAML)."""
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(label, RayCluster spec) for the RayCluster and every RayJob's rayClusterSpec."""
    specs = [(f"{p.name}:{d['metadata']['name']}", d["spec"]) for p, d in k8s_of_kind("RayCluster")]
    specs += [
        (f"{p.name}:{d['metadata']['name']}.rayClusterSpec", d["spec"]["rayClusterSpec"])
        for p, d in k8s_of_kind("RayJob")
    ]
    return specs


SPECS = pytest.mark.parametrize(
    "label, spec", ray_cluster_specs(), ids=[label for label, _ in ray_cluster_specs()]
)


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a Kubernetes object, CRDs included."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("containers"), list):
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    return found


def containers(pod: dict) -> list[dict]:
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def tune_options() -> set[str]:
    """The options of the `vfsearch tune` command line, from the Typer app itself."""
    import typer.main

    from vfsearch.cli import app

    command = typer.main.get_command(app).commands["tune"]
    return {opt for param in command.params for opt in param.opts}


def option_flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def option_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def head_type(config: dict) -> dict:
    return config["available_node_types"][config["head_node_type"]]


def gpu_types(config: dict) -> dict[str, dict]:
    return {
        name: t
        for name, t in config["available_node_types"].items()
        if name != config["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1
    }


def head_ray_start(config: dict) -> str:
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1, config["head_start_ray_commands"]
    return starts[0]


def ray_start_argv(command: str) -> list[str]:
    """The `ray start ...` part of a shell command line, split like the shell would."""
    start = command[command.index("ray start") :]
    return shlex.split(start.split(";")[0])


# -- (a) the launcher config against the schema that ships in ray -------------------------------


def test_launcher_config_validates_against_ray_schema(launcher):
    """`ray up` fills in the provider's defaults, then validates against
    ray/autoscaler/ray-schema.json: both the file as written and that result must pass."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(copy.deepcopy(launcher))
    validate_config(prepare_config(copy.deepcopy(launcher)))


def _misspelt_top_level_key(c):
    c["head_start_ray_comands"] = c.pop("head_start_ray_commands")


def _fractional_custom_resource(c):
    head_type(c)["resources"][DRIVER_RESOURCE] = 0.5  # the schema wants whole units


def _unknown_node_type_key(c):
    next(iter(gpu_types(c).values()))["min_worker"] = 1


def _head_type_not_defined(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_above_global_max(c):
    next(iter(gpu_types(c).values()))["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "breakage, error",
    [
        (_misspelt_top_level_key, jsonschema.ValidationError),
        (_fractional_custom_resource, jsonschema.ValidationError),
        (_unknown_node_type_key, jsonschema.ValidationError),
        (_head_type_not_defined, ValueError),
        (_min_workers_above_global_max, ValueError),
    ],
)
def test_launcher_schema_check_rejects_a_broken_copy(launcher, breakage, error):
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(launcher)
    breakage(broken)
    with pytest.raises(error):
        validate_config(broken)


# -- (b) what vfsearch needs from the launcher cluster -----------------------------------------


def test_launcher_head_offers_the_driver_resource_and_no_cpu(launcher):
    resources = head_type(launcher)["resources"]
    assert resources.get("CPU") == 0, "training workers must not land on the head"
    assert resources.get(DRIVER_RESOURCE, 0) >= 1
    assert head_type(launcher).get("max_workers", 0) == 0
    # `ray start` on the head must advertise what the autoscaler is told the head has
    argv = ray_start_argv(head_ray_start(launcher))
    assert "--head" in argv
    assert option_value(argv, "--num-cpus") == "0"
    assert json.loads(option_value(argv, "--resources")) == {
        k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")
    }
    assert option_value(argv, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"


def test_launcher_dashboard_is_on_but_bound_to_loopback(launcher):
    argv = ray_start_argv(head_ray_start(launcher))
    assert option_value(argv, "--dashboard-host") == "127.0.0.1"
    assert option_value(argv, "--include-dashboard") in (None, "true", "True")
    assert "0.0.0.0" not in LAUNCHER.read_text()


def test_launcher_gpu_workers_and_autoscaling_bounds(launcher):
    gpus = gpu_types(launcher)
    assert gpus, "no worker type offers a GPU"
    for name, node_type in gpus.items():
        assert DRIVER_RESOURCE not in node_type["resources"], name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= launcher["max_workers"]
        assert node_type["max_workers"] >= 1
    assert (
        sum(t.get("min_workers", 0) for t in launcher["available_node_types"].values())
        <= launcher["max_workers"]
    )
    assert launcher["idle_timeout_minutes"] > 0


def test_launcher_nodes_join_the_head_and_restart_cleanly(launcher):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert launcher[key][0].strip() == "ray stop", key
    worker = [c for c in launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(worker) == 1
    assert option_value(ray_start_argv(worker[0]), "--address") == "$RAY_HEAD_IP:6379"


def test_launcher_installs_vfsearch_with_the_pinned_versions(launcher):
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(launcher))
    mount = next(remote for remote, local in prepared["file_mounts"].items() if local == ".")
    repo = mount.replace("/home/ray", "~")
    repo = re.escape(repo)
    install = re.compile(rf"pip install .*-c {repo}/constraints\.txt .*-e {repo}\b")
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any(install.search(c) for c in prepared[key]), (key, prepared[key])
    ray_version = pinned("ray")
    docker = launcher["docker"]
    for image in (
        docker["image"],
        docker.get("head_image", docker["image"]),
        docker.get("worker_image", docker["image"]),
    ):
        assert image.startswith(f"rayproject/ray:{ray_version}-py311"), image
    # the repository travels without the virtualenv, the data or the runs
    excluded = set(launcher["rsync_exclude"])
    assert {".venv", "mlruns", "data"} <= excluded


def test_launcher_nodes_start_ray_with_the_environment_file(launcher):
    """Ray workers inherit the environment of `ray start`: every node sources the file that
    write-env.sh wrote, which file_mounts copies from outside the repository."""
    remote, local = next(
        (r, lo) for r, lo in launcher["file_mounts"].items() if r.endswith("cluster.env")
    )
    assert local.startswith("~/") and not (ROOT / local).exists()
    sourced = remote.replace("/home/ray", "~")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in launcher[key] if "ray start" in c)
        assert start.index(f". {sourced}") < start.index("ray start"), key


def test_write_env_writes_a_private_file_the_shell_reads_back(tmp_path):
    tricky = "p@ss w'rd\"$HOME;`x`"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": "http://10.0.1.20:5000",
        "MLFLOW_TRACKING_USERNAME": "vfsearch",
        "MLFLOW_TRACKING_PASSWORD": tricky,
        "AWS_ACCESS_KEY_ID": "id-for-test",
    }
    run = subprocess.run(
        ["bash", str(CLUSTER / "write-env.sh")],
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    out = tmp_path / ".vfsearch" / "cluster.env"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    echo = subprocess.run(
        [
            "bash",
            "-c",
            (
                f'. "{out}" && printf "%s\\n" "$MLFLOW_TRACKING_PASSWORD" '
                '"$VFSEARCH_DRIVER_RESOURCE" "$AWS_ACCESS_KEY_ID" '
                '"${AWS_SECRET_ACCESS_KEY-unset}"'
            ),
        ],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )
    assert echo.stdout.splitlines() == [tricky, DRIVER_RESOURCE, "id-for-test", "unset"]

    del env["MLFLOW_TRACKING_PASSWORD"]
    missing = subprocess.run(
        ["bash", str(CLUSTER / "write-env.sh"), str(tmp_path / "x.env")],
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in missing.stderr
    assert not (tmp_path / "x.env").exists()


# -- (c) KubeRay manifests ----------------------------------------------------------------------


def test_kuberay_objects_are_ray_io_v1_with_name_and_namespace():
    objects = k8s_of_kind("RayCluster") + k8s_of_kind("RayJob")
    assert {d["kind"] for _, d in objects} == {"RayCluster", "RayJob"}
    for path, doc in objects:
        assert path.parent == KUBERAY, path
        assert doc["apiVersion"] == "ray.io/v1", path
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"], path


@SPECS
def test_kuberay_cluster_spec_has_the_fields_kuberay_requires(label, spec):
    assert spec.get("rayVersion") == pinned("ray")
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        "rayStartParams values must be strings"
    )
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c.get("name") and c.get("image") for c in head_containers)
    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        assert isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        group_containers = group["template"]["spec"]["containers"]
        assert group_containers and all(c.get("name") and c.get("image") for c in group_containers)


@SPECS
def test_kuberay_head_offers_the_driver_resource_and_workers_the_gpus(label, spec):
    params = spec["headGroupSpec"]["rayStartParams"]
    assert params.get("num-cpus") == "0"
    assert ray_start_resources(params["resources"]).get(DRIVER_RESOURCE, 0) >= 1
    assert str(params.get("include-dashboard", "true")).lower() == "true"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in (head.get("resources", {}).get("limits") or {})
    assert env_of(head)["VFSEARCH_DRIVER_RESOURCE"]["value"] == DRIVER_RESOURCE
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        >= 1
    ]
    assert gpu_groups, "no worker group has a GPU"
    for group in spec["workerGroupSpecs"]:
        if "resources" in group["rayStartParams"]:
            assert DRIVER_RESOURCE not in ray_start_resources(group["rayStartParams"]["resources"])


@SPECS
def test_kuberay_pods_log_to_mlflow_and_mount_the_shared_volume(label, spec):
    pvcs = {d["metadata"]["name"]: d for _, d in k8s_of_kind("PersistentVolumeClaim")}
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    for pod in pods:
        ray = pod["containers"][0]
        assert ray["image"].split("/")[-1].startswith("vfsearch-ray:"), ray["image"]
        env = env_of(ray)
        assert all(name in env for name in MLFLOW_CLIENT_VARS), env.keys()
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.")
        volumes = {v["name"]: v for v in pod["volumes"]}
        shared = next(m for m in ray["volumeMounts"] if m["mountPath"] == "/shared")
        claim = volumes[shared["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs and "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"]


def test_ray_pods_reach_mlflow_through_a_service_whose_host_it_accepts():
    """MLFLOW_TRACKING_URI names the MLflow Service (name.namespace), on a port it exposes, and
    the server's Host-header allowlist accepts it (MLflow answers 403 otherwise)."""
    services = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d for _, d in k8s_of_kind("Service")
    }
    (deployment,) = [d for _, d in k8s_of_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    pod = deployment["spec"]["template"]
    allowed = env_of(pod["spec"]["containers"][0])["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"]
    allowed = [a.strip() for a in allowed.split(",")]

    def accepts(host: str) -> bool:  # MLflow's rule: fnmatch when the pattern has a "*"
        return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)

    assert accepts("localhost:5000"), "kubectl port-forward must keep working"
    for label, spec in ray_cluster_specs():
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in spec["workerGroupSpecs"]
        ]
        for ray_pod in pods:
            uri = urlparse(env_of(ray_pod["containers"][0])["MLFLOW_TRACKING_URI"]["value"])
            name, namespace = uri.hostname.split(".")[:2]
            service = services[(namespace, name)]
            assert uri.port in [p["port"] for p in service["spec"]["ports"]], label
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            assert accepts(uri.netloc), (label, uri.netloc)


def test_rayjob_runs_vfsearch_tune_on_the_cluster():
    ((_, job),) = k8s_of_kind("RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in spec
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["vfsearch", "tune"]
    assert option_value(argv, "--address") == "auto"
    assert option_value(argv, "--driver-resource") == DRIVER_RESOURCE
    assert set(option_flags(argv)) <= tune_options(), set(option_flags(argv)) - tune_options()
    assert option_value(argv, "--store").startswith("/shared/")
    assert option_value(argv, "--storage").startswith(("/shared/", "s3://"))
    assert option_value(argv, "--workdir").startswith("/shared/")
    assert float(option_value(argv, "--gpus-per-trial")) > 0
    space = option_value(argv, "--space")  # a space shipped inside the package
    assert (ROOT / "vfsearch" / "search_spaces" / f"{space}.yaml").is_file(), space
    submitter = spec["submitterPodTemplate"]
    assert submitter["spec"]["restartPolicy"] == "Never"
    assert submitter["metadata"]["labels"].get("vfsearch/ray-client") == "true"


def test_raycluster_and_rayjob_describe_the_same_cluster():
    ((_, cluster),) = k8s_of_kind("RayCluster")
    ((_, job),) = k8s_of_kind("RayJob")
    a, b = cluster["spec"], job["spec"]["rayClusterSpec"]
    assert a["headGroupSpec"]["rayStartParams"] == b["headGroupSpec"]["rayStartParams"]
    assert a["headGroupSpec"]["template"] == b["headGroupSpec"]["template"]
    assert [g["template"] for g in a["workerGroupSpecs"]] == [
        g["template"] for g in b["workerGroupSpecs"]
    ]
    image = a["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image


def test_ray_network_policy_limits_gcs_and_dashboard():
    """Ray pods: every port from Ray pods; the dashboard (8265) from the operator and labelled
    clients (the RayJob submitter); nothing else, in particular not the GCS (6379)."""
    policies = [
        d
        for _, d in k8s_of_kind("NetworkPolicy")
        if d["spec"]["podSelector"].get("matchLabels") == {"ray.io/is-ray-node": "yes"}
    ]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert "Ingress" in spec["policyTypes"]
    ray_peer = {"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}}
    client_labels = set()
    for rule in spec["ingress"]:
        peers = rule.get("from")
        assert peers, "a rule without `from` admits everyone"
        if peers == [ray_peer]:
            continue
        assert [p["port"] for p in rule.get("ports", [])] == [8265], rule
        for peer in peers:
            assert peer.get("podSelector", {}).get("matchLabels"), peer
            if "namespaceSelector" not in peer:
                client_labels |= set(peer["podSelector"]["matchLabels"].items())
    ((_, job),) = k8s_of_kind("RayJob")
    assert set(job["spec"]["submitterPodTemplate"]["metadata"]["labels"].items()) & client_labels


def test_mlflow_stack_is_reachable_only_by_who_needs_it():
    policies = {d["metadata"]["name"]: d["spec"] for _, d in k8s_of_kind("NetworkPolicy")}
    by_target = {
        s["podSelector"]["matchLabels"].get("app.kubernetes.io/name"): s for s in policies.values()
    }
    server = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
    for backend, port in (("mlflow-postgres", 5432), ("mlflow-minio", 9000)):
        (rule,) = by_target[backend]["ingress"]
        assert rule["from"] == [server] and [p["port"] for p in rule["ports"]] == [port]
    (rule,) = by_target["mlflow"]["ingress"]
    assert {"podSelector": {"matchLabels": {"ray.io/is-ray-node": "yes"}}} in rule["from"]
    assert [p["port"] for p in rule["ports"]] == [5000]


# -- (d) security ------------------------------------------------------------------------------


def test_no_public_service_ingress_or_host_port():
    for path, doc in k8s_docs():
        assert doc["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), path
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", (path, doc["metadata"])
        for pod in pod_specs(doc):
            assert not pod.get("hostNetwork"), path
            for c in containers(pod):
                assert all("hostPort" not in p for p in c.get("ports") or []), (path, c["name"])
    for label, spec in ray_cluster_specs():
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", label
        assert not spec["headGroupSpec"].get("enableIngress", False), label


def test_secret_env_vars_in_manifests_come_from_secrets():
    checked = 0
    for path, doc in k8s_docs():
        for pod in pod_specs(doc):
            for c in containers(pod):
                for name, entry in env_of(c).items():
                    if SECRETISH.search(name) or name == "MLFLOW_TRACKING_USERNAME":
                        checked += 1
                        assert "value" not in entry, (path, c["name"], name)
                        assert "secretKeyRef" in entry.get("valueFrom", {}), (path, c["name"], name)
    assert checked >= 10


def test_no_secret_object_with_values_is_committed():
    for path, doc in k8s_of_kind("Secret"):
        assert not doc.get("data") and not doc.get("stringData"), path


def test_every_referenced_secret_is_created_by_a_documented_command():
    """Each secretKeyRef (name, key) appears in a `kubectl create secret generic` command of
    cluster/README.md, with its value taken from a variable, never typed in."""
    documented = set()
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        m = re.search(r"kubectl .*create secret generic ([\w.-]+)(.*)", line)
        if not m:
            continue
        for key, value in re.findall(r"--from-literal=([\w.-]+)=(\S+)", m.group(2)):
            documented.add((m.group(1), key))
            if SECRETISH.search(key.upper()) or key in ("password", "root-password"):
                assert value.startswith(('"$', "$")), f"literal secret in README: {line}"
    referenced = set()
    for _, doc in k8s_docs():
        for pod in pod_specs(doc):
            for c in containers(pod):
                for entry in env_of(c).values():
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add((ref["name"], ref["key"]))
    assert referenced and referenced <= documented, referenced - documented


def test_compose_takes_secrets_from_the_environment():
    compose = yaml.safe_load(COMPOSE.read_text())
    required = re.compile(r"\$\{[A-Z][A-Z0-9_]*:\?[^}]*\}")
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        for var, value in env.items():
            if SECRETISH.search(var):
                assert isinstance(value, str) and required.fullmatch(value), (name, var, value)
        assert "env_file" not in service, name


def test_compose_publishes_only_mlflow_and_not_on_all_interfaces():
    compose = yaml.safe_load(COMPOSE.read_text())
    published = {name: s["ports"] for name, s in compose["services"].items() if s.get("ports")}
    assert set(published) == {"mlflow"}
    for port in published["mlflow"]:
        m = re.fullmatch(r"\$\{MLFLOW_BIND_ADDRESS:-([\d.]+)\}:5000:5000", str(port))
        assert m and m.group(1) == "127.0.0.1", port


# `mlflow server ...` on a command line, or "mlflow", "server", ... in a Python list
MLFLOW_SERVER = re.compile(r"\bmlflow(?:[ \t]+|[\"'][ \t]*,[ \t]*[\"'])server\b(?P<rest>[^\n]*)")


def mlflow_server_commands() -> list[tuple[Path, str]]:
    """Every `mlflow server` invocation in cluster/ (code, manifests, README code blocks); a
    mention in prose (no option after it) is not one."""
    found = []
    for path in cluster_files():
        text = path.read_text()
        if path.suffix == ".md":
            text = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL))
        text = text.replace("\\\n", " ")
        for m in MLFLOW_SERVER.finditer(text):
            if "--" in m.group("rest"):
                found.append((path, m.group(0)))
    return found


def test_every_mlflow_server_command_turns_basic_auth_on():
    commands = mlflow_server_commands()
    assert any(p.name == "entrypoint.py" for p, _ in commands)
    for path, command in commands:
        assert re.search(r"--app-name[\"',\s]+basic-auth", command), (path, command)


def _entrypoint():
    spec = importlib.util.spec_from_file_location("mlflow_entrypoint", MLFLOW_DIR / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SERVER_ENV = {
    "POSTGRES_USER": "mlflow@corp",
    "PGPASSWORD": "db-pass-not-on-cmdline",
    "POSTGRES_HOST": "mlflow-postgres",
    "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pass-0123456",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow-artifacts",
}


def test_mlflow_entrypoint_keeps_passwords_off_the_command_line_and_config():
    ep = _entrypoint()
    cmd = ep.server_command(SERVER_ENV)
    assert cmd[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert {"--serve-artifacts", "--backend-store-uri", "--artifacts-destination"} <= set(cmd)
    backend = cmd[cmd.index("--backend-store-uri") + 1]
    assert backend == "postgresql://mlflow%40corp@mlflow-postgres:5432/mlflow"
    ini = ep.auth_ini(SERVER_ENV)
    for text in (" ".join(cmd), ini):
        assert "db-pass" not in text and "admin-pass" not in text
    assert ep.missing({}) == list(ep.REQUIRED)
    assert ep.missing(SERVER_ENV) == []


def test_mlflow_auth_config_is_what_the_installed_mlflow_reads(tmp_path, monkeypatch):
    """The generated ini uses the keys of mlflow's own basic_auth.ini, and mlflow reads it with
    the admin password taken from the environment."""
    import configparser

    # mlflow/server/auth/config.py alone: importing the package would build the Flask app
    auth_dir = Path(importlib.util.find_spec("mlflow").origin).parent / "server" / "auth"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", auth_dir / "config.py")
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)

    ep = _entrypoint()
    shipped = configparser.ConfigParser()
    shipped.read(auth_dir / "basic_auth.ini", encoding="utf-8")  # it holds non-ASCII text
    ours = configparser.ConfigParser()
    ours.read_string(ep.auth_ini(SERVER_ENV))
    assert set(ours["mlflow"]) <= set(shipped["mlflow"])
    path = tmp_path / "basic_auth.ini"
    path.write_text(ep.auth_ini(SERVER_ENV))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SERVER_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = config_module.read_auth_config()
    assert config.database_uri == "postgresql://mlflow%40corp@mlflow-postgres:5432/mlflow_auth"
    assert config.admin_username == "admin"
    assert config.admin_password == SERVER_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"]


# A value that is not a reference ($VAR, ${VAR}, $(cmd)) after a secret-looking variable name.
LITERAL_SECRET_PATTERNS = [
    re.compile(
        r"(?<![\w{$])[A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN|ACCESS_KEY)[A-Z0-9_]*"
        r"[ \t]*[=:][ \t]*"
        r"(?![\"']?\$)(?![\"']?\s*$)([\"']?[^\s\"'{]+)",
        re.MULTILINE,
    ),
    re.compile(r"(?i)^[ \t]*admin_password[ \t]*=[ \t]*\S", re.MULTILINE),
    re.compile(
        r"--from-literal=[\w.-]*(?:password|secret|token|key)[\w.-]*=(?![\"']?\$)\S", re.IGNORECASE
    ),
    re.compile(r"\b\w+://[^/\s:@'\"]+:(?![\"']?\$)[^@\s/'\"]+@"),  # user:password@host
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize(
    "sample",
    [
        "MLFLOW_TRACKING_PASSWORD=hunter2hunter2",
        "    AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI",
        "admin_password = changeme123",
        "postgresql://mlflow:s3cret@postgres:5432/mlflow",
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "kubectl create secret generic x --from-literal=password=hunter2hunter2",
    ],
)
def test_secret_scanner_catches_literal_secrets(sample):
    assert any(p.search(sample) for p in LITERAL_SECRET_PATTERNS)


@pytest.mark.parametrize(
    "sample",
    [
        "PGPASSWORD: ${POSTGRES_PASSWORD:?export POSTGRES_PASSWORD}",
        "export POSTGRES_PASSWORD=$(openssl rand -base64 24)",
        "- name: MLFLOW_TRACKING_PASSWORD",
        '--from-literal=password="$POSTGRES_PASSWORD"',
        "MLFLOW_AUTH_ADMIN_PASSWORD: "
        "${MLFLOW_AUTH_ADMIN_PASSWORD:?export MLFLOW_AUTH_ADMIN_PASSWORD}",
        "read -rs MLFLOW_TRACKING_PASSWORD && export MLFLOW_TRACKING_PASSWORD",
    ],
)
def test_secret_scanner_lets_references_pass(sample):
    assert not any(p.search(sample) for p in LITERAL_SECRET_PATTERNS)


def test_no_literal_secret_in_any_file_under_cluster():
    for path in cluster_files():
        text = path.read_text()
        for pattern in LITERAL_SECRET_PATTERNS:
            m = pattern.search(text)
            assert m is None, f"{path.relative_to(ROOT)}: a literal secret? {m.group(0)!r}"


# -- (e) images --------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_worker_dockerfile_builds_from_the_pinned_ray_and_constraints():
    steps = dockerfile_instructions(CLUSTER / "Dockerfile")
    first = next(i for i, (word, _) in enumerate(steps) if word != "ARG")
    assert steps[first][0] == "FROM"
    assert steps[first][1] == f"rayproject/ray:{pinned('ray')}-py311-gpu"
    copied = " ".join(rest for word, rest in steps if word in ("COPY", "ADD"))
    for needed in ("constraints.txt", "pyproject.toml", "vfsearch"):
        assert needed in copied
    for never in (".venv", "mlruns", "data/", ".zarr", ".env"):
        assert never not in copied
    runs = [rest for word, rest in steps if word == "RUN"]
    assert any(re.search(r"pip install .*-c constraints\.txt .*(-e )?\.(\s|$)", r) for r in runs)
    assert not [rest for word, rest in steps if word in ("ENV", "ARG") and SECRETISH.search(rest)]
    # the code lands where the RayJob's --space points
    assert ("WORKDIR", IMAGE_CODE_DIR) in steps
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert next(ln for ln in ignore if ln and not ln.startswith("#")) == "**"


def test_mlflow_dockerfile_has_auth_postgres_and_s3_support():
    steps = dockerfile_instructions(MLFLOW_DIR / "Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")
    install = " ".join(rest for word, rest in steps if word == "RUN")
    assert "-c /tmp/constraints.txt" in install
    for package in ('"mlflow[auth]"', "psycopg2-binary", "boto3"):
        assert package in install
    assert dict(steps).get("USER") not in (None, "root", "0")
    assert "entrypoint.py" in dict(steps)["ENTRYPOINT"]
    assert dict(steps).get("ENV") == "MLFLOW_DISABLE_TELEMETRY=true"  # sends nothing anywhere


def test_all_cluster_yaml_parses():
    for path in yaml_files():
        assert load_docs(path), path


# -- the READMEs' commands ---------------------------------------------------------------------


def readme_commands(path: Path) -> list[str]:
    text = path.read_text()
    if path == ROOT / "README.md":  # the scale-out section; the rest runs on one machine
        text = text.split("\n## Scale out\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines() if ln.strip()]


@pytest.mark.parametrize(
    "readme", [ROOT / "README.md", CLUSTER / "README.md"], ids=["README", "cluster"]
)
def test_readme_scale_out_commands_match_the_files_and_the_cli(readme):
    commands = readme_commands(readme)
    text = "\n".join(commands)
    assert "ray up cluster/ray-cluster.yaml" in text
    assert "kubectl apply -f cluster/kuberay/" in text
    assert "kubectl create secret" in text or "create secret generic" in text
    for path in re.findall(r"(?:-f|apply -f) (cluster/\S+)", text):
        assert (ROOT / path).exists(), path
    tunes = [c for c in commands if "vfsearch tune" in c]
    assert tunes
    known = tune_options()
    for command in tunes:
        argv = shlex.split(command[command.index("vfsearch tune") :].rstrip("'"), posix=True)
        assert set(option_flags(argv)) <= known, set(option_flags(argv)) - known
        assert option_value(argv, "--driver-resource") == DRIVER_RESOURCE
        assert option_value(argv, "--address") == "auto"


def test_readme_has_a_scale_out_section_and_keeps_its_opening():
    readme = (ROOT / "README.md").read_text()
    assert readme.splitlines()[0] == "# vfsearch"
    opening = readme.split("\n## ", 1)[0]
    assert "make demo" in opening and "make test" in opening
    assert "\n## Scale out\n" in readme
