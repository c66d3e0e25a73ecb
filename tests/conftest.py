"""Shared fixtures. Each helper section below is owned by one module's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real CT samples in ../shared/data/real (never copied into the repository)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real CT samples not present at {REAL_DATA}")
    return REAL_DATA


# -- training and tracking (issue 4): real MLflow server, one local Ray, a phantom store --------


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI of a real ``mlflow server`` on 127.0.0.1 (SQLite + served artifacts in a temp dir),
    started once per session by `vfsearch.adapters.tracking.ensure_server` and stopped at the
    end."""
    from vfsearch.adapters import tracking

    workdir = tmp_path_factory.mktemp("mlflow")
    info = tracking.ensure_server(workdir, timeout=240)
    yield info.url
    tracking.stop_server(workdir)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session's Ray tests (2 CPUs, dashboard on: Train V2 needs the
    State API). Shut down at the end only if this fixture started it."""
    import ray

    from vfsearch.adapters.ray_runtime import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """A tiny real store: 3 small phantom cases (``vfsearch synth --small``) ingested at
    2 mm, one case each in train / val / test."""
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset

    root = tmp_path_factory.mktemp("small_store")
    synth_dataset(root / "raw", cases=3, seed=0, spacing=None, small=True, fracture_rate=0.3)
    ingest(
        root / "raw" / "manifest.csv",
        root / "store.zarr",
        spacing=(2.0, 2.0, 2.0),
        margin_mm=6.0,
        split=(0.34, 0.33, 0.33),
        seed=0,
    )
    return root / "store.zarr"
