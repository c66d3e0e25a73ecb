"""`vfsearch demo`: the whole path on embedded defaults (synthetic data, local Ray, local MLflow).

Each step is the same library call the matching command makes; the demo only chooses sizes
so that a 2-core laptop finishes in under ten minutes with a model that finds fractures:
synth -> ingest -> tune (the packaged ``demo`` space) -> export the best trial -> evaluate the
champion on the held-out test cases -> predict and picture a fractured test case.

The figures it ends with are honest: trials are ranked by their cross-fitted validation Dice,
the threshold is chosen on validation, and the test cases are read only by the evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vfsearch.adapters.store import Store
from vfsearch.core.labels import name
from vfsearch.pipelines.evaluate import evaluate
from vfsearch.pipelines.export import export
from vfsearch.pipelines.ingest import ingest
from vfsearch.pipelines.predict import predict
from vfsearch.pipelines.synth import synth_dataset
from vfsearch.pipelines.tune import tune
from vfsearch.pipelines.visualize import visualize

DEMO_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"


def _fractured_case(store: Any, split: str) -> tuple[str, str]:
    """A case of ``split`` with a fractured vertebra (the first by case id) and its name."""
    for cid in store.case_ids(split):
        for vid in store.vertebrae(cid):
            if int(store.vertebra_attrs(cid, vid).get("grade", 0) or 0) > 0:
                return cid, name(vid)
    cid = store.case_ids(split)[0]
    return cid, ""


def run_demo(
    workdir: Path = Path("demo_out"),
    *,
    cases: int = 12,
    trials: int = 2,
    seed: int = 0,
    space: Path | None = None,
    echo: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Run every stage on a small phantom dataset; returns where each output landed and the
    champion's held-out figures."""
    t0 = time.perf_counter()
    workdir = Path(workdir)
    raw, store, mlruns = workdir / "synth", workdir / "store.zarr", workdir / "mlruns"
    echo(f"[1/6] synth: {cases} small phantom cases -> {raw}")
    if not (raw / "manifest.csv").is_file():
        echo(
            "      "
            + synth_dataset(
                raw, cases=cases, seed=seed, spacing=None, small=True, fracture_rate=0.3
            )
        )
    else:
        echo("      (exists, reused)")
    echo(f"[2/6] ingest -> {store}")
    echo(
        "      "
        + ingest(
            raw / "manifest.csv",
            store,
            spacing=(2.0, 2.0, 2.0),
            margin_mm=6.0,
            label_scheme="verse",
            split=(0.6, 0.2, 0.2),
            seed=seed,
            workers=1,
        )
    )
    sweep = time.strftime("demo-%Y%m%d-%H%M%S")
    space = space or DEMO_SPACE
    echo(f"[3/6] tune: {trials} trials of {space.name} (sweep {sweep})")
    summary = tune(
        store,
        space,
        num_samples=trials,
        name=sweep,
        seed=seed,
        workdir=mlruns,
        echo=lambda line: echo("      " + line),
    )
    echo("\n".join("      " + line for line in str(summary).splitlines()))
    bundle = workdir / "bundle"
    echo(f"[4/6] export the best trial -> {bundle} (registry alias champion)")
    exported = export(sweep=sweep, out=bundle, store=store, workdir=mlruns, force=True)
    echo("\n".join("      " + line for line in str(exported).splitlines()))
    st = Store(store)
    echo(
        f"[5/6] evaluate the champion on the {len(st.case_ids('test'))} held-out test cases "
        f"(threshold chosen on val)"
    )
    report = evaluate(
        bundle,
        store,
        split="test",
        out=workdir / "evaluation",
        workdir=mlruns,
        log_to_run=False,
        n_boot=500,
        seed=seed,
    )
    f = report["flat"]
    case, vertebra = _fractured_case(st, "test")
    prediction, pictures = workdir / "prediction", workdir / "pictures"
    echo(f"[6/6] predict held-out case {case} with the bundle -> {prediction}, {pictures}")
    ct, labels, truth = (
        raw / case / n for n in ("ct.nii.gz", "vertebrae.nii.gz", "fracture.nii.gz")
    )
    predict(bundle, ct, labels, prediction)
    shown = visualize(pictures, model=bundle, ct=ct, vertebrae=labels, fracture=truth)
    heatmaps = [
        p
        for p in shown["files"]
        if Path(p).name.startswith("heatmap_") and Path(p).name != "heatmap_case.png"
    ]
    heatmap = next(
        (p for p in heatmaps if vertebra and vertebra.lower() in p.lower()),
        heatmaps[0] if heatmaps else None,
    )
    minutes = (time.perf_counter() - t0) / 60
    echo(f"done in {minutes:.1f} min. Browse the sweep: {summary.runs_url}")
    echo(f"(the MLflow server keeps running; stop it with: vfsearch ui --workdir {mlruns} --stop)")
    echo(
        f"champion on {len(report['cases'])} held-out phantom cases: fused 3D Dice "
        f"{f['test_dice3d']:.3f} (95% CI {f.get('test_dice3d_ci_low', float('nan')):.3f}-"
        f"{f.get('test_dice3d_ci_high', float('nan')):.3f}), vertebra PR-AUC "
        f"{f['test_vertebra_pr_auc']:.3f} (prevalence {f['test_vertebra_prevalence']:.3f}), "
        f"threshold {report['threshold']:.2f} from validation"
    )
    echo(f"heatmap of fractured vertebra {vertebra or '?'} in {case}: {heatmap}")
    return {
        "synth": str(raw),
        "store": str(store),
        "sweep": sweep,
        "bundle": str(bundle),
        "prediction": str(prediction),
        "runs_url": summary.runs_url or "",
        "test_dice3d": f["test_dice3d"],
        "test_vertebra_pr_auc": f["test_vertebra_pr_auc"],
        "heatmap": heatmap,
    }
