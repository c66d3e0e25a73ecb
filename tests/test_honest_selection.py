"""Honest selection: train, tune and export never read the test split.

A real store whose test case is made unreadable (every stored chunk overwritten with random
bytes, its source files moved away) goes through a real sweep (Ray Train trials with their
final fused validation and pictures) and a real export (bundle, registry, pictures) against a
real MLflow server. Both must finish; evaluating the test split with the exported model must
then fail, which shows that the damage would have been noticed had anything read it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sweeps import children, write_space

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _make_unreadable(store_path: Path, case_id: str) -> None:
    from vfsearch.adapters.store import Store

    source = Store(store_path).case_attrs(case_id).get("source") or {}
    for path in source.values():
        if path and Path(path).exists():
            Path(path).rename(str(path) + ".hidden")
    damaged = 0
    for f in (store_path / "cases" / case_id).rglob("*"):
        if f.is_file() and f.name != "zarr.json":  # chunks, not the metadata
            f.write_bytes(os.urandom(max(64, f.stat().st_size)))
            damaged += 1
    assert damaged, "no chunk found to damage"


def test_train_tune_and_export_never_read_the_test_split(tmp_path, mlflow_server, ray_local):
    from vfsearch.adapters.store import Store
    from vfsearch.pipelines.evaluate import evaluate
    from vfsearch.pipelines.export import export
    from vfsearch.pipelines.ingest import ingest
    from vfsearch.pipelines.synth import synth_dataset
    from vfsearch.pipelines.tune import tune

    synth_dataset(tmp_path / "raw", cases=4, seed=5, spacing=None, small=True, fracture_rate=0.3)
    store = tmp_path / "store.zarr"
    ingest(
        tmp_path / "raw" / "manifest.csv",
        store,
        spacing=(2.0, 2.0, 2.0),
        margin_mm=6.0,
        split=(0.5, 0.25, 0.25),
        seed=0,
    )
    test_ids = Store(store).case_ids("test")
    assert len(test_ids) == 1
    _make_unreadable(store, test_ids[0])

    space = write_space(
        tmp_path,
        epochs=1,
        grace=1,
        fixed={"train.log_pictures": "true"},
        params="  loss.dice_weight: {type: float, low: 0.5, high: 1.5}",
    )
    summary = tune(
        store,
        space,
        num_samples=1,
        name="no-test",
        seed=0,
        workdir=tmp_path,
        storage=tmp_path / "ray",
        mlflow_uri=mlflow_server,
    )
    assert [row["status"] for row in summary.table] == ["completed"], summary.table
    client, _, kids = children(mlflow_server, "no-test")
    # pictures swallow their own errors: check that they were drawn (from val), not skipped
    assert client.list_artifacts(kids[0].info.run_id, "visualisations")
    exported = export(
        sweep="no-test",
        out=tmp_path / "bundle",
        store=store,
        mlflow_uri=mlflow_server,
        force=True,
        alias="no-test",
    )
    assert (tmp_path / "bundle" / "config.json").is_file() and exported.version

    with pytest.raises(Exception):  # noqa: B017 - any failure to read the damaged case
        evaluate(
            tmp_path / "bundle",
            store,
            split="test",
            out=tmp_path / "eval",
            threshold=0.5,
            log_to_run=False,
        )
