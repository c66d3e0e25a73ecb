"""`vfsearch demo`: the whole path on embedded defaults (synthetic data, local Ray, local MLflow).

Each step is the same library call the matching command makes; the demo only chooses small
sizes so that a 2-core laptop finishes in minutes: synth -> ingest -> tune (smoke space) ->
export the best trial -> predict a held-out case with the exported bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOKE_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"


def run_demo(workdir: Path = Path("demo_out"), *, cases: int = 6, trials: int = 3,
             seed: int = 0, space: Path | None = None,
             echo: Callable[[str], Any] = print) -> dict[str, str]:
    """Run every stage on a small phantom dataset; returns where each output landed."""
    from vfsearch.data.ingest import ingest
    from vfsearch.data.store import Store
    from vfsearch.data.synth import synth_dataset
    from vfsearch.export import export
    from vfsearch.predict import predict
    from vfsearch.tune import tune

    t0 = time.perf_counter()
    workdir = Path(workdir)
    raw, store, mlruns = workdir / "synth", workdir / "store.zarr", workdir / "mlruns"
    echo(f"[1/5] synth: {cases} small phantom cases -> {raw}")
    if not (raw / "manifest.csv").is_file():
        echo("      " + synth_dataset(raw, cases=cases, seed=seed, spacing=None, small=True,
                                      fracture_rate=0.25))
    else:
        echo("      (exists, reused)")
    echo(f"[2/5] ingest -> {store}")
    echo("      " + ingest(raw / "manifest.csv", store, spacing=(2.0, 2.0, 2.0), margin_mm=6.0,
                           label_scheme="verse", split=(0.5, 0.25, 0.25), seed=seed, workers=1))
    sweep = time.strftime("demo-%Y%m%d-%H%M%S")
    echo(f"[3/5] tune: {trials} trials of {(space or SMOKE_SPACE).name} (sweep {sweep})")
    summary = tune(store, space or SMOKE_SPACE, num_samples=trials, name=sweep, seed=seed,
                   workdir=mlruns, echo=lambda line: echo("      " + line))
    echo("\n".join("      " + line for line in str(summary).splitlines()))
    bundle = workdir / "bundle"
    echo(f"[4/5] export the best trial -> {bundle} (registry alias champion)")
    exported = export(sweep=sweep, out=bundle, store=store, workdir=mlruns, force=True)
    echo("\n".join("      " + line for line in str(exported).splitlines()))
    case = Store(store).case_ids("test")[0]
    prediction = workdir / "prediction"
    echo(f"[5/5] predict held-out case {case} with the bundle -> {prediction}")
    predict(bundle, raw / case / "ct.nii.gz", raw / case / "vertebrae.nii.gz", prediction)
    echo(f"      wrote {', '.join(sorted(p.name for p in prediction.iterdir()))}")
    minutes = (time.perf_counter() - t0) / 60
    echo(f"done in {minutes:.1f} min. Browse the sweep: {summary.runs_url}")
    echo(f"(the MLflow server keeps running; stop it with: vfsearch ui --workdir {mlruns} --stop)")
    return {"synth": str(raw), "store": str(store), "sweep": sweep, "bundle": str(bundle),
            "prediction": str(prediction), "runs_url": summary.runs_url or ""}
