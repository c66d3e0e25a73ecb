"""What several benchmarks share: a small phantom store built the way the tests build theirs."""

from __future__ import annotations

from pathlib import Path


def phantom_store(
    root: Path, *, cases: int, fracture_rate: float, split: tuple[float, float, float]
) -> Path:
    """``vfsearch synth --small`` cases under ``root/raw``, ingested at 2 mm into
    ``root/store.zarr`` (returned)."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    synth_dataset(
        root / "raw", cases=cases, seed=0, spacing=None, small=True, fracture_rate=fracture_rate
    )
    ingest(
        root / "raw" / "manifest.csv",
        root / "store.zarr",
        spacing=(2.0, 2.0, 2.0),
        margin_mm=6.0,
        split=split,
        seed=0,
    )
    return root / "store.zarr"
