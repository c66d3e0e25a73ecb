"""`vfsearch demo`: the whole path on embedded defaults (synthetic data, local Ray, local MLflow).

Each step is the same library call the matching command makes; the demo only chooses
small sizes so that a 2-core laptop finishes in minutes.
"""

from __future__ import annotations

from pathlib import Path


def run_demo(workdir: Path = Path("demo_out"), *, cases: int = 6, seed: int = 0,
             echo=print) -> dict[str, str]:
    """Synthesise a small phantom dataset, ingest it, and run the later stages that exist."""
    from vfsearch.data.ingest import ingest
    from vfsearch.data.synth import synth_dataset

    workdir = Path(workdir)
    raw, store = workdir / "synth", workdir / "store.zarr"
    echo(f"[1/2] synth: {cases} small phantom cases -> {raw}")
    if not (raw / "manifest.csv").is_file():
        echo("      " + synth_dataset(raw, cases=cases, seed=seed, spacing=None, small=True,
                                      fracture_rate=0.25))
    else:
        echo("      (exists, reused)")
    echo(f"[2/2] ingest -> {store}")
    echo("      " + ingest(raw / "manifest.csv", store, spacing=(2.0, 2.0, 2.0), margin_mm=6.0,
                           label_scheme="verse", split=(0.6, 0.2, 0.2), seed=seed, workers=1))
    return {"synth": str(raw), "store": str(store)}
