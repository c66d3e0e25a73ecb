"""Export (vfsearch.pipelines.export, vfsearch.adapters.bundle,
vfsearch.adapters.tracking.pyfunc): selection, promotion gate,
registry, bundle parity, and loading the exported model in fresh processes.

Runs are created directly in a real MLflow server (the ``mlflow_server`` fixture) with tiny
checkpoints saved in train.py's ``best.pt`` format (plus the store's spacing / margin /
fingerprint, which training is being extended to carry), so no Ray training is needed.
Each registry export costs a few seconds of HTTP uploads; there are three.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vfsearch.adapters import bundle
from vfsearch.core.config import Config
from vfsearch.core.errors import UserError
from vfsearch.core.inference import LoadedModel
from vfsearch.pipelines.export import Candidate, choose, export, promotion_decision, rank

FINGERPRINT = {"p0_5": -1000.0, "p99_5": 1500.0, "mean": 100.0, "std": 400.0}
SPACING = (1.0, 1.0, 1.0)
TINY = {
    "model.depth": 3,
    "model.base_channels": 4,
    "data.seq_len": 3,
    "data.patch_size": 32,
    "model.norm": "group",
}
VARIANTS = {
    "lstm": {"model.temporal": "lstm"},
    "convlstm": {"model.temporal": "convlstm"},
    "none": {"model.temporal": "none"},
    "lstm-forward-all-slices": {
        "model.temporal": "lstm",
        "model.bidirectional": False,
        "model.predict_all_slices": True,
        "data.target_all_slices": True,
    },
}


def tiny_config(**extra) -> Config:
    return Config.from_flat({**TINY, **extra})


def tiny_loaded(cfg: Config, seed: int = 0) -> LoadedModel:
    from vfsearch.core.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.seq_len, load_weights=False).eval()
    return LoadedModel(model, cfg, dict(FINGERPRINT), SPACING, 4.0, source="test")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- contract: every exported format reproduces the eager model ---------------------------


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
    cfg = tiny_config(**VARIANTS[request.param])
    loaded = tiny_loaded(cfg, seed=3)
    out = bundle.write_bundle(
        loaded, tmp_path_factory.mktemp(request.param) / "bundle", info={"run_id": "r" * 32}
    )
    return request.param, loaded, out


class TestBundleContract:
    """Opt-in contract every model variant's bundle satisfies."""

    @staticmethod
    def _windows(loaded: LoadedModel):
        # sizes and seed unlike the ones the export checked itself
        g = torch.Generator().manual_seed(11)
        return torch.randn(2, loaded.seq_len, 40, 56, generator=g)

    def test_torchscript_matches_eager(self, exported):
        _, loaded, out = exported
        x = self._windows(loaded)
        program = torch.jit.load(str(out / bundle.TORCHSCRIPT))
        with torch.no_grad():
            eager = loaded.model(x)["logits"]
            got = program(x)
        assert got.shape == eager.shape
        assert torch.allclose(got, eager, atol=bundle.PARITY_ATOL, rtol=0)

    def test_onnx_matches_eager(self, exported):
        pytest.importorskip("onnxruntime")
        name, loaded, out = exported
        info = bundle.read_config(out)["onnx"]
        # every variant here exports cleanly; a skip would hide a regression
        assert info["status"] == "ok", f"{name}: {info.get('reason')}"
        x = self._windows(loaded)
        with torch.no_grad():
            eager = loaded.model(x)["logits"].numpy()
        got = bundle.onnx_logits(out / bundle.ONNX, x)
        assert got.shape == eager.shape
        np.testing.assert_allclose(got, eager, atol=bundle.PARITY_ATOL, rtol=0)

    def test_bundle_reloads_with_preprocessing(self, exported):
        _, loaded, out = exported
        cfg = bundle.read_config(out)
        assert cfg["seq_len"] == loaded.seq_len and cfg["plane"] == loaded.plane
        assert cfg["fingerprint"] == FINGERPRINT and tuple(cfg["spacing"]) == SPACING
        assert cfg["model"]["model.temporal"] == loaded.config.model.temporal
        again = bundle.load_bundle(out, device="cpu")
        x = self._windows(loaded)
        with torch.no_grad():
            assert torch.equal(again.model(x)["logits"], loaded.model(x)["logits"])
        assert again.config == loaded.config and again.margin_mm == loaded.margin_mm


@pytest.mark.slow
def test_torch_export_program_matches_eager(tmp_path):
    """The opt-in torch.export program (TorchScript's successor): dynamic batch and sides."""
    loaded = tiny_loaded(tiny_config(**VARIANTS["lstm"]), seed=5)
    out = bundle.write_bundle(loaded, tmp_path / "b", onnx=False, torch_export=True)
    info = bundle.read_config(out)["torch_export"]
    assert info["status"] == "ok", info.get("reason")
    program = torch.export.load(str(out / bundle.EXPORTED)).module()
    for shape in ((1, 3, 40, 56), (3, 3, 24, 32)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(
                program(x), loaded.model(x)["logits"], atol=bundle.PARITY_ATOL, rtol=0
            )


def test_failed_onnx_export_is_recorded_not_fatal(tmp_path, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("Exporting the operator 'aten::lstm' is not supported")

    monkeypatch.setattr(bundle, "export_onnx", broken)
    out = bundle.write_bundle(tiny_loaded(tiny_config()), tmp_path / "b")
    info = bundle.read_config(out)["onnx"]
    assert info["status"] == "skipped" and "aten::lstm" in info["reason"]
    assert not (out / bundle.ONNX).exists() and (out / bundle.TORCHSCRIPT).is_file()


def test_out_never_overwrites_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not a vfsearch bundle"):
        bundle.write_bundle(tiny_loaded(tiny_config()), foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-bundle")]


def test_ensemble_bundle_loads_as_its_members_averaged(tmp_path):
    """write_ensemble: each member a bundle of its own, the ensemble's threshold on every
    member, and the loaded list predicting the mean of the members' maps (planes mixed)."""
    from vfsearch.core.inference import crop_probability
    from vfsearch.pipelines.predict import load_model

    a = tiny_loaded(tiny_config(), seed=1)
    b = tiny_loaded(tiny_config(**{"data.plane": "axial"}), seed=2)
    a.run_id, a.threshold, b.run_id = "a" * 32, 0.3, "b" * 32
    out = bundle.write_ensemble(
        [a, b],
        tmp_path / "e",
        threshold=0.42,
        onnx=False,
        member_info=[{"metric_value": 0.9}, {"metric_value": 0.8}],
    )
    cfg = bundle.read_config(out)
    assert bundle.is_ensemble(cfg) and cfg["format_version"] == bundle.ENSEMBLE_FORMAT_VERSION
    assert [(m["path"], m["run_id"], m["plane"], m["metric_value"]) for m in cfg["members"]] == [
        ("members/0", "a" * 32, "sagittal", 0.9),
        ("members/1", "b" * 32, "axial", 0.8),
    ]
    alone = bundle.load_bundle(out / "members" / "0")  # a member is a bundle of its own
    assert isinstance(alone, LoadedModel) and alone.threshold == pytest.approx(0.3)
    assert len(bundle.load_bundle(out)) == 2
    models = load_model(out, device="cpu")
    assert [m.run_id for m in models] == ["a" * 32, "b" * 32]
    assert [m.threshold for m in models] == [0.42, 0.42]
    assert models[0].extra["member_threshold"] == pytest.approx(0.3)
    crop = np.random.default_rng(0).normal(300, 200, (18, 22, 26)).astype(np.int16)
    maps = [crop_probability([m], crop) for m in (a, b)]
    assert not np.allclose(maps[0], maps[1])
    np.testing.assert_allclose(crop_probability(models, crop), (maps[0] + maps[1]) / 2, atol=1e-6)

    c = tiny_loaded(tiny_config(), seed=3)
    c.margin_mm = 6.0
    with pytest.raises(UserError, match="must share"):
        bundle.write_ensemble([a, c], tmp_path / "bad", threshold=0.5, onnx=False)
    assert not (tmp_path / "bad").exists()


# -- selection and gate (pure logic) --------------------------------------------------------


def _c(run_id, value=None, *, end=0, status="FINISHED", tag=None, metric="val_dice3d"):
    metrics = {} if value is None else {metric: value}
    return Candidate(
        run_id=run_id,
        status=status,
        end_time=end,
        metrics=metrics,
        tags={"vfsearch.status": tag} if tag else {},
    )


def test_rank_skips_nan_and_breaks_ties_on_end_time():
    cands = [
        _c("b", 0.7, end=20),
        _c("a", 0.7, end=30),
        _c("n", math.nan, end=1),
        _c("c", 0.6, end=5),
        _c("d", 0.7, end=20),
    ]
    assert [c.run_id for c in rank(cands, "val_dice3d")] == ["b", "d", "a", "c"]
    assert rank(cands, "val_dice3d", "min")[0].run_id == "c"


def test_choose_counts_stopped_early_only_with_the_metric():
    cands = [
        _c("failed", 0.99, status="FAILED", tag="failed"),
        _c("failed-tag", 0.98, tag="failed"),
        _c("running", 0.97, status="RUNNING"),
        _c("stopped-no-metric", None, status="KILLED", tag="stopped early"),
        _c("stopped", 0.8, status="KILLED", tag="stopped early"),
        _c("done", 0.7, tag="completed"),
    ]
    assert [c.run_id for c in choose(cands, "val_dice3d", "max", "sweep s")] == ["stopped", "done"]


def test_choose_errors_name_the_problem():
    with pytest.raises(UserError, match=r"sweep s: no finished run .*1 failed, 1 running"):
        choose(
            [_c("f", 0.9, status="FAILED", tag="failed"), _c("r", status="RUNNING")],
            "val_dice3d",
            "max",
            "sweep s",
        )
    with pytest.raises(UserError, match=r"--metric: .*'val_dice3d' \(they log: val_dice\)"):
        choose([_c("x", 0.5, metric="val_dice")], "val_dice3d", "max", "sweep s")
    with pytest.raises(UserError, match="NaN"):
        choose([_c("x", math.nan)], "val_dice3d", "max", "sweep s")


def test_promotion_decision():
    kw = {"metric": "val_dice3d"}
    assert promotion_decision(0.8, None, **kw).promote
    assert promotion_decision(0.8, 0.7, **kw).promote
    refused = promotion_decision(0.6, 0.7, **kw)
    assert not refused.promote and "0.6000" in refused.reason and "0.7000" in refused.reason
    assert not promotion_decision(0.7, 0.7, **kw).promote  # a tie does not move the alias
    assert promotion_decision(0.2, 0.3, mode="min", **kw).promote
    assert not promotion_decision(0.9, 0.7, ci_low=0.6, minimum=0.65, **kw).promote
    assert promotion_decision(0.9, 0.7, ci_low=0.66, minimum=0.65, **kw).promote
    assert "--min" in promotion_decision(0.9, 0.7, minimum=0.5, **kw).reason  # no interval


# -- MLflow: real server, runs created directly ---------------------------------------------


def _save_best(
    path: Path, cfg: Config, seed: int, *, fingerprint=None, spacing=SPACING, margin_mm: float = 4.0
) -> Path:
    """A checkpoint in train.py's ``best.pt`` format, plus the store's preprocessing."""
    from vfsearch.core.models import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.seq_len, load_weights=False)
    torch.save(
        {
            "model": model.state_dict(),
            "epoch": 1,
            "val_dice": 0.5,
            "config": cfg.flatten(),
            "seq_len": cfg.data.seq_len,
            "fingerprint": dict(fingerprint or FINGERPRINT),
            "spacing": list(spacing),
            "margin_mm": margin_mm,
        },
        path,
    )
    return path


def _log_run(
    tr,
    folder: Path,
    experiment: str,
    name: str,
    metrics: dict,
    *,
    cfg: Config | None = None,
    seed: int = 0,
    tags: dict | None = None,
    parent: str | None = None,
    checkpoint: bool = True,
    status: str = "FINISHED",
    **ckpt,
) -> str:
    """A run with params, metrics and (optionally) a ``checkpoints/best.pt`` artifact."""
    ckpt_dir = folder / name
    ckpt_dir.mkdir()
    cfg = cfg or tiny_config()
    run_id = tr.start_run(
        experiment,
        name,
        tags={"dataset_fingerprint": "abc123", **(tags or {})},
        parent_run_id=parent,
    )
    tr.log_params(run_id, cfg.flatten())
    for k, v in metrics.items():  # Tracker.log_metrics drops NaN; log_metric keeps it
        tr.log_metric(run_id, k, float(v), step=0)
    if checkpoint:
        tr.log_artifact(run_id, _save_best(ckpt_dir / "best.pt", cfg, seed, **ckpt), "checkpoints")
    if status != "RUNNING":
        tr.end_run(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def world(mlflow_server, tmp_path_factory):
    """Sweeps and runs in the real server: returns their names and ids."""
    from vfsearch.adapters import tracking
    from vfsearch.adapters.tracking.schema import STATUS_TAG, SWEEP_TAG
    from vfsearch.adapters.tracking.schema import SWEEP_EXPERIMENT as EXPERIMENT

    tmp = tmp_path_factory.mktemp("export-runs")
    tr = tracking.Tracker(mlflow_server)
    uid = uuid.uuid4().hex[:8]
    w = {
        "uid": uid,
        "uri": mlflow_server,
        "sweep": f"s-ok-{uid}",
        "empty": f"s-none-{uid}",
        "experiment": f"exp-{uid}",
        "name": f"vfsearch-fracture-{uid}",
    }

    def run(experiment, name, metrics, **kw):
        return _log_run(tr, tmp, experiment, name, metrics, **kw)

    space = tmp / "space.yaml"
    space.write_text("metric: val_dice3d\nparams:\n  model.temporal: [lstm, none]\n")
    parent = tr.start_run(
        EXPERIMENT, w["sweep"], tags={SWEEP_TAG: w["sweep"], "space_file": "space.yaml"}
    )
    tr.log_artifact(parent, space, "search_space")
    trial = {"parent": parent}
    done = {STATUS_TAG: "completed"}
    w["A"] = run(
        EXPERIMENT, "A", {"val_dice3d": 0.70, "val_threshold3d": 0.35}, seed=1, tags=done, **trial
    )
    w["A_tie"] = run(EXPERIMENT, "A_tie", {"val_dice3d": 0.70}, seed=2, tags=done, **trial)
    run(
        EXPERIMENT,
        "B",
        {"val_dice": 0.9},
        status="KILLED",
        checkpoint=False,
        tags={STATUS_TAG: "stopped early"},
        **trial,
    )
    run(
        EXPERIMENT,
        "C",
        {"val_dice3d": 0.99},
        status="FAILED",
        checkpoint=False,
        tags={STATUS_TAG: "failed"},
        **trial,
    )
    run(EXPERIMENT, "D", {"val_dice3d": math.nan}, checkpoint=False, tags=done, **trial)
    run(
        EXPERIMENT,
        "E",
        {"val_dice3d": 0.65},
        status="KILLED",
        checkpoint=False,
        tags={STATUS_TAG: "stopped early"},
        **trial,
    )
    tr.end_run(parent)

    empty = tr.start_run(EXPERIMENT, w["empty"], tags={SWEEP_TAG: w["empty"]})
    run(
        EXPERIMENT,
        "F",
        {"val_dice": 0.5},
        status="FAILED",
        checkpoint=False,
        tags={STATUS_TAG: "failed"},
        parent=empty,
    )
    run(EXPERIMENT, "R", {}, status="RUNNING", checkpoint=False, parent=empty)

    w["W"] = run(w["experiment"], "W", {"val_dice3d": 0.50}, seed=4)
    w["X"] = run(
        w["experiment"],
        "X",
        {"val_dice3d": 0.80, "val_dice3d_ci_low": 0.60, "val_dice3d_ci_high": 0.90},
        seed=5,
    )
    w["N"] = run(w["experiment"], "N", {"val_dice": 0.4}, checkpoint=False)
    return w


@pytest.fixture(scope="module")
def champion(world, tmp_path_factory):
    """The sweep's best trial exported once: registry version 1 + alias champion + bundle."""
    out = tmp_path_factory.mktemp("champion") / "bundle"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = export(sweep=world["sweep"], name=world["name"], out=out, mlflow_uri=world["uri"])
    # no global mlflow state leaks out of export (it would redirect later tracking)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    return summary, out


@pytest.mark.integration
@pytest.mark.slow
def test_selection_errors_are_one_line(world):
    uri = world["uri"]
    cases = [
        ({"run": "0" * 32}, r"^--run: no MLflow run '0{32}'"),
        ({"sweep": "no-such-sweep-" + world["uid"]}, r"^--sweep: no sweep named"),
        (
            {"sweep": world["empty"]},
            r"no finished run to export \(2 run\(s\): 1 failed, 1 running\)",
        ),
        (
            {"run": world["N"]},
            r"^--metric: run \w+ has no metric 'val_dice3d' \(it logs: val_dice\)",
        ),
        ({"sweep": world["sweep"], "metric": "val_auc"}, r"^--metric: no finished run of sweep"),
        ({"experiment": "no-such-exp-" + world["uid"]}, r"^--experiment: no MLflow experiment"),
        ({"sweep": world["sweep"], "run": world["A"]}, r"give exactly one"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(UserError, match=pattern) as info:
            export(mlflow_uri=uri, name=world["name"], **kwargs)
        assert "\n" not in str(info.value)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_export_exit_codes(world, champion, monkeypatch):
    from typer.testing import CliRunner

    from vfsearch.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    runner = CliRunner()
    bad = runner.invoke(app, ["export", "--run", "f" * 32, "--name", world["name"]])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    assert bad.output.startswith("error: --run: no MLflow run")
    # the champion's run again: idempotent, so the CLI succeeds without a new version
    ok = runner.invoke(app, ["export", "--sweep", world["sweep"], "--name", world["name"]])
    assert ok.exit_code == 0, ok.output
    assert "version 1 (existing" in ok.output and "unchanged: already the champion" in ok.output


@pytest.mark.integration
@pytest.mark.slow
def test_export_selects_registers_and_writes_the_bundle(world, champion):
    from mlflow import MlflowClient

    summary, out = champion
    # A and A_tie tie at 0.70; A finished first. C (failed, 0.99), D (NaN) and the stopped
    # trial without the metric are ignored; E (stopped early, 0.65) loses on the metric
    assert summary.run_id == world["A"] and summary.value == pytest.approx(0.70)
    assert summary.version == "1" and summary.new_version and summary.alias_moved
    client = MlflowClient(world["uri"])
    mv = client.get_model_version_by_alias(world["name"], "champion")
    assert mv.version == "1" and mv.tags["vfsearch.run_id"] == world["A"]
    assert mv.run_id == world["A"]
    assert client.get_run(world["A"]).info.status == "FINISHED"  # the run was not reopened

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "weights.pt", "model.ts", "model.onnx", "MODEL_CARD.md"} <= files
    cfg = bundle.read_config(out)
    assert cfg["threshold"] == pytest.approx(0.35) and cfg["run_id"] == world["A"]
    assert cfg["sweep"] == world["sweep"] and cfg["fingerprint"] == FINGERPRINT
    assert cfg["margin_mm"] == 4.0 and cfg["spacing"] == list(SPACING)
    card = (out / "MODEL_CARD.md").read_text()
    for text in (
        "Research use only",
        "not clinical tools",
        world["A"],
        world["sweep"],
        "model.temporal: [lstm, none]",
        "`val_dice3d` | 0.7000",
        "abc123",
        "Not evaluated on the test split",
    ):
        assert text in card, text


@pytest.mark.integration
@pytest.mark.slow
def test_gate_refuses_worse_accepts_better_and_force(world, champion, tmp_path):
    from mlflow import MlflowClient

    name, uri = world["name"], world["uri"]
    client = MlflowClient(uri)

    def versions() -> int:
        return len(client.search_model_versions(f"name = '{name}'"))

    # a second alias on the champion's run reuses its version: no new version
    s = export(sweep=world["sweep"], name=name, alias="gate", mlflow_uri=uri)
    assert (s.version, s.new_version, s.alias_moved) == ("1", False, True)
    assert versions() == 1
    with pytest.raises(UserError, match=r"0\.5000.*0\.7000") as info:
        export(run=world["W"], name=name, alias="gate", out=tmp_path / "w", mlflow_uri=uri)
    assert "--force" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "w").exists() and versions() == 1
    assert client.get_model_version_by_alias(name, "gate").version == "1"
    with pytest.raises(UserError, match=r"--min: .*0\.6000 does not beat --min 0\.6500"):
        export(run=world["X"], name=name, alias="gate", minimum=0.65, mlflow_uri=uri)
    assert versions() == 1

    better = export(
        run=world["X"], name=name, alias="gate", minimum=0.55, onnx=False, mlflow_uri=uri
    )
    assert (better.version, better.new_version, better.alias_moved) == ("2", True, True)
    assert better.previous["version"] == "1" and better.previous["value"] == pytest.approx(0.7)
    assert client.get_model_version_by_alias(name, "gate").version == "2"
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    again = export(run=world["X"], name=name, alias="gate", mlflow_uri=uri)
    assert (again.version, again.new_version, again.alias_moved) == ("2", False, False)

    forced = export(run=world["W"], name=name, alias="gate", force=True, onnx=False, mlflow_uri=uri)
    assert forced.alias_moved and forced.version == "3" and "forced" in forced.decision
    assert client.get_model_version_by_alias(name, "gate").version == "3"
    assert versions() == 3


def _example_files(folder: Path) -> tuple[Path, Path, dict, dict]:
    from vfsearch.adapters import volumes as io
    from vfsearch.adapters.tracking.pyfunc import input_example
    from vfsearch.core.geometry import Geometry

    x, params = input_example(SPACING)
    geometry = Geometry(params["spacing"], (0.0, 0.0, 0.0))
    ct = io.write_volume(folder / "ct.nii.gz", x["ct"].astype(np.int16), geometry)
    lab = io.write_volume(folder / "vertebrae.nii.gz", x["vertebrae"].astype(np.uint8), geometry)
    return ct, lab, x, params


@pytest.mark.integration
@pytest.mark.slow
def test_pyfunc_loads_and_predicts_in_a_fresh_process(world, champion, tmp_path):
    from vfsearch.adapters.tracking.pyfunc import predict_arrays

    _, out = champion
    _, _, x, params = _example_files(tmp_path)
    script = f"""
import json, mlflow, numpy as np
from vfsearch.adapters.tracking.pyfunc import input_example
mlflow.set_tracking_uri({world["uri"]!r})
model = mlflow.pyfunc.load_model("models:/{world["name"]}@champion")
x, params = input_example({SPACING!r})
y = model.predict(x, params=params)
np.save({str(tmp_path / "y.npy")!r}, y)
schema = model.metadata.get_input_schema()
print(json.dumps({{"inputs": schema.input_names(), "type": type(y).__name__}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"]}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta == {"inputs": ["ct", "vertebrae"], "type": "ndarray"}
    y = np.load(tmp_path / "y.npy")
    assert y.shape == x["ct"].shape and y.dtype == np.float32
    inside = x["vertebrae"] > 0
    assert y[inside].min() > 0.0 and y.max() <= 1.0
    expected = predict_arrays(bundle.load_bundle(out, device="cpu"), x, params)
    np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_predict_cli_with_bundle_and_registry_uri_in_a_fresh_process(
    world, champion, tmp_path, monkeypatch
):
    from vfsearch.adapters import volumes as io
    from vfsearch.pipelines.predict import load_model, predict

    _, out = champion
    ct, lab, _, _ = _example_files(tmp_path)
    uri = f"models:/{world['name']}@champion"
    script = f"""
from vfsearch.cli import app
for model, out in (({str(out)!r}, "o_bundle"), ({uri!r}, "o_registry")):
    app(["predict", {str(ct)!r}, "--model", model, "--vertebrae", {str(lab)!r},
         "--out", out], standalone_mode=False)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": world["uri"]}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "threshold 0.35" in proc.stdout  # the validation threshold travelled along

    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    [registered] = load_model(uri)
    assert registered.run_id == world["A"] and registered.threshold == pytest.approx(0.35)
    ref = predict(bundle.load_bundle(out), ct, lab, tmp_path / "ref")
    expected = io.read_volume(ref["files"][0]).array
    for folder in ("o_bundle", "o_registry"):
        got = io.read_volume(tmp_path / folder / "fracture_prob.nii.gz").array
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert (tmp_path / folder / "vertebrae.json").is_file()


# -- top-k ensembles: real server, a sweep of three trials, the small store's val split ------


@pytest.fixture(scope="module")
def ens_world(mlflow_server, small_store, tmp_path_factory):
    """A sweep of three finished trials (two planes) whose checkpoints carry the small store's
    preprocessing; ``E``/``T``: the fused val Dice / threshold of its two best together,
    computed here on the checkpoint files; ``LOW``/``HIGH``: plain runs logged just below and
    above ``E`` (champions for the gate)."""
    from vfsearch.adapters import tracking
    from vfsearch.adapters.bundle import load_checkpoint
    from vfsearch.adapters.store import Store
    from vfsearch.adapters.tracking.schema import STATUS_TAG, SWEEP_TAG
    from vfsearch.adapters.tracking.schema import SWEEP_EXPERIMENT as EXPERIMENT
    from vfsearch.pipelines.evaluate import fused_validation_metrics

    tmp = tmp_path_factory.mktemp("ensemble-runs")
    tr = tracking.Tracker(mlflow_server)
    uid = uuid.uuid4().hex[:8]
    st = Store(small_store)
    meta = {
        "fingerprint": st.fingerprint,
        "spacing": tuple(st.meta["spacing"]),
        "margin_mm": float(st.meta["margin_mm"]),
    }
    w = {
        "uri": mlflow_server,
        "store": str(small_store),
        "sweep": f"s-ens-{uid}",
        "name": f"vfsearch-ensemble-{uid}",
        "tmp": tmp,
    }
    parent = tr.start_run(EXPERIMENT, w["sweep"], tags={SWEEP_TAG: w["sweep"]})
    # the members' logged values are far above what tiny random models reach on the store: a
    # gate comparing them instead of the ensemble's own value would decide otherwise
    for key, plane, seed, value in (
        ("P", "sagittal", 1, 0.95),
        ("Q", "axial", 2, 0.93),
        ("S", "sagittal", 3, 0.90),
    ):
        w[key] = _log_run(
            tr,
            tmp,
            EXPERIMENT,
            key,
            {"val_dice3d": value},
            seed=seed,
            cfg=tiny_config(**{"data.plane": plane}),
            parent=parent,
            tags={STATUS_TAG: "completed"},
            **meta,
        )
    tr.end_run(parent)
    pair = [load_checkpoint(tmp / k / "best.pt", device="cpu") for k in ("P", "Q")]
    figures = fused_validation_metrics(pair, small_store, split="val")
    w["E"], w["T"] = figures["val_dice3d"], figures["val_threshold3d"]
    assert math.isfinite(w["E"]), figures
    champions = f"ens-champions-{uid}"
    w["LOW"] = _log_run(tr, tmp, champions, "LOW", {"val_dice3d": w["E"] - 0.01}, seed=4, **meta)
    w["HIGH"] = _log_run(tr, tmp, champions, "HIGH", {"val_dice3d": w["E"] + 0.01}, seed=5, **meta)
    return w


@pytest.fixture(scope="module")
def ensemble(ens_world, tmp_path_factory):
    """LOW exported to alias ``ens``; then the sweep's two best as an ensemble with a bundle
    (it beats LOW), and the same ensemble again on alias ``ens-champ``."""
    w = ens_world
    kw = {"name": w["name"], "mlflow_uri": w["uri"]}
    low = export(run=w["LOW"], alias="ens", onnx=False, **kw)
    out = tmp_path_factory.mktemp("ensemble") / "bundle"
    summary = export(sweep=w["sweep"], top_k=2, store=w["store"], alias="ens", out=out, **kw)
    again = export(sweep=w["sweep"], top_k=2, store=w["store"], alias="ens-champ", **kw)
    return low, summary, again, out


@pytest.mark.integration
@pytest.mark.slow
def test_top_k_bundle_holds_the_members_and_predicts_their_mean(ens_world, ensemble):
    from mlflow import MlflowClient

    from vfsearch.adapters.bundle import load_checkpoint
    from vfsearch.adapters.store import Store
    from vfsearch.adapters.tracking import Tracker
    from vfsearch.adapters.tracking.registry import version_of_run
    from vfsearch.core.inference import crop_probability
    from vfsearch.pipelines.predict import load_model

    w = ens_world
    _, summary, again, out = ensemble
    assert [m["run_id"] for m in summary.members] == [w["P"], w["Q"]]
    cfg = bundle.read_config(out)
    assert cfg["kind"] == "ensemble" and cfg["run_ids"] == [w["P"], w["Q"]]
    assert [(m["path"], m["run_id"], m["metric_value"]) for m in cfg["members"]] == [
        ("members/0", w["P"], 0.95),
        ("members/1", w["Q"], 0.93),
    ]
    assert cfg["threshold"] == pytest.approx(w["T"]) == summary.threshold
    assert cfg["metric_value"] == pytest.approx(w["E"])
    for i in (0, 1):
        assert {"config.json", "weights.pt", "model.ts", "model.onnx"} <= {
            p.name for p in (out / "members" / str(i)).iterdir()
        }

    models = load_model(out, device="cpu")
    assert [(m.run_id, m.plane) for m in models] == [(w["P"], "sagittal"), (w["Q"], "axial")]
    assert all(m.threshold == pytest.approx(w["T"]) for m in models)
    st = Store(w["store"])
    case = st.case_ids("val")[0]
    crop = st.read(case, st.vertebrae(case)[0], "image")
    maps = [
        crop_probability([load_checkpoint(w["tmp"] / k / "best.pt", device="cpu")], crop)
        for k in ("P", "Q")
    ]
    assert not np.allclose(maps[0], maps[1])
    np.testing.assert_allclose(crop_probability(models, crop), (maps[0] + maps[1]) / 2, atol=1e-6)

    card = (out / "MODEL_CARD.md").read_text()
    for text in (
        "ensemble of 2 runs",
        w["P"],
        w["Q"],
        f"**{w['E']:.4f}**",
        "Research use only",
        "cross-fitted",
    ):
        assert text in card, text
    client = MlflowClient(w["uri"])
    mv = client.get_model_version(w["name"], summary.version)
    assert mv.run_id == w["P"] and mv.tags["vfsearch.members"] == f"{w['P']},{w['Q']}"
    assert mv.tags["vfsearch.member_values"] == "0.95,0.93"
    assert float(mv.tags["vfsearch.metric_value"]) == pytest.approx(w["E"])
    # idempotent by the set of members; a single member never matches the ensemble
    assert (again.version, again.new_version, again.alias_moved) == (summary.version, False, True)
    tracker = Tracker(w["uri"])
    assert version_of_run(tracker, w["name"], [w["Q"], w["P"]]).version == summary.version
    assert version_of_run(tracker, w["name"], w["P"]) is None


@pytest.mark.integration
@pytest.mark.slow
def test_top_k_gate_compares_the_ensembles_own_value(ens_world, ensemble, tmp_path):
    from mlflow import MlflowClient

    w = ens_world
    kw = {"name": w["name"], "mlflow_uri": w["uri"]}
    client = MlflowClient(w["uri"])
    low, summary, _, _ = ensemble
    # promoted over LOW by its own value E, not by its members' logged 0.95 / 0.93
    assert (low.version, summary.version, summary.new_version) == ("1", "2", True)
    assert summary.value == pytest.approx(w["E"]) and summary.alias_moved
    assert summary.previous["value"] == pytest.approx(w["E"] - 0.01)
    assert "beats the champion's" in summary.decision

    high = export(run=w["HIGH"], alias="ens", onnx=False, **kw)
    assert (high.version, high.alias_moved) == ("3", True)
    assert high.previous["members"] == [w["P"], w["Q"]]
    assert high.previous["value"] == pytest.approx(w["E"])  # the ensemble's, from its tags
    # HIGH is below both members' logged values, yet the ensemble does not beat it
    expected = (
        f"challenger ensemble of runs {w['P']}, {w['Q']} refused: val_dice3d "
        f"{w['E']:.4f} does not beat the champion's {w['E'] + 0.01:.4f}"
    )
    with pytest.raises(UserError, match=re.escape(expected)) as info:
        export(
            sweep=w["sweep"], top_k=2, store=w["store"], alias="ens", out=tmp_path / "refused", **kw
        )
    assert "\n" not in str(info.value) and not (tmp_path / "refused").exists()
    assert len(client.search_model_versions(f"name = '{w['name']}'")) == 3
    assert client.get_model_version_by_alias(w["name"], "ens").version == "3"


@pytest.mark.integration
@pytest.mark.slow
def test_top_k_registered_ensemble_predicts_like_its_bundle(
    ens_world, ensemble, tmp_path, monkeypatch
):
    from vfsearch.adapters.tracking.pyfunc import input_example, predict_arrays
    from vfsearch.pipelines.predict import load_model

    w = ens_world
    _, _, _, out = ensemble
    uri = f"models:/{w['name']}@ens-champ"
    spacing = tuple(bundle.read_config(out)["spacing"])
    script = f"""
import json, mlflow, numpy as np
from vfsearch.adapters.tracking.pyfunc import input_example
mlflow.set_tracking_uri({w["uri"]!r})
model = mlflow.pyfunc.load_model({uri!r})
x, params = input_example({spacing!r})
np.save({str(tmp_path / "y.npy")!r}, model.predict(x, params=params))
print(json.dumps({{"members": len(model.unwrap_python_model()._loaded)}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": w["uri"]}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"members": 2}
    y = np.load(tmp_path / "y.npy")
    x, params = input_example(spacing)
    assert y.shape == x["ct"].shape and y.dtype == np.float32
    expected = predict_arrays(bundle.load_members(out, device="cpu"), x, params)
    np.testing.assert_allclose(y, expected, atol=1e-6)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", w["uri"])
    registered = load_model(uri, device="cpu")
    assert [m.run_id for m in registered] == [w["P"], w["Q"]]
    assert all(m.threshold == pytest.approx(w["T"]) for m in registered)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_top_k_errors_are_one_line_and_write_nothing(ens_world, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from vfsearch.cli import app

    w = ens_world
    monkeypatch.setenv("MLFLOW_TRACKING_URI", w["uri"])
    client = MlflowClient(w["uri"])

    def versions() -> int:
        return len(client.search_model_versions(f"name = '{w['name']}'"))

    before = versions()
    out = tmp_path / "b"
    cases = [
        (["--top-k", "0"], r"error: --top-k: .*1 or more; got 0"),
        (
            ["--top-k", "4", "--store", w["store"]],
            rf"error: --top-k 4: sweep {w['sweep']} has only 3 candidate run\(s\) with a "
            r"checkpoint .*pass --top-k 3 or less",
        ),
        (["--top-k", "2"], r"error: --top-k 2: .*pass --store"),
    ]
    runner = CliRunner()
    for extra, pattern in cases:
        r = runner.invoke(
            app,
            [
                "export",
                "--sweep",
                w["sweep"],
                "--name",
                w["name"],
                "--alias",
                "cli",
                "--out",
                str(out),
                *extra,
            ],
        )
        assert r.exit_code == 2, r.output
        assert r.output.count("\n") == 1 and re.match(pattern, r.output), r.output
        assert not out.exists()
    assert versions() == before
