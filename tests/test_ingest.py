"""`vfsearch ingest`: real samples, DICOM, geometry back to the scanner, bad input, resume."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vfsearch.adapters import volumes as io
from vfsearch.adapters.store import CHUNK_SLICES, PLANE_AXIS, Store, fingerprint_from_hist
from vfsearch.cli import app
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry
from vfsearch.pipelines.ingest import assign_splits, ingest, read_manifest, read_verse_tree

pytestmark = pytest.mark.integration

# A flipped (RAS-like), slightly anisotropic grid with a non-zero origin.
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
GEOM = Geometry(spacing=(2.0, 1.5, 2.5), origin=(40.0, 25.0, -300.0), direction=DIRECTION)
SHAPE = (44, 16, 14)  # (z, y, x)
VERTEBRAE = (11, 12, 13, 14)


def make_case(
    folder: Path,
    *,
    vertebrae=VERTEBRAE,
    fracture: dict | None = None,
    ct_dtype=np.int16,
    geom: Geometry = GEOM,
    seed: int = 0,
) -> dict[str, Path]:
    """Tiny CT: a stack of boxes (one per vertebra) in -1000 HU noise, with labels."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-900, 30, SHAPE)
    lab = np.zeros(SHAPE, np.uint8)
    for i, vid in enumerate(vertebrae):
        z0 = 4 + 9 * i
        lab[z0 : z0 + 7, 4:12, 3:11] = vid
        ct[z0 : z0 + 7, 4:12, 3:11] = rng.normal(250 + 10 * i, 20, (7, 8, 8))
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": io.write_volume(folder / "ct.nii.gz", ct.astype(ct_dtype), geom),
        "vertebrae": io.write_volume(folder / "vertebrae.nii.gz", lab, geom),
    }
    if fracture is not None:
        frac = np.zeros(SHAPE, np.uint8)
        for vid, value in fracture.items():  # the vertebra's two lowest slices
            zz = np.argwhere(lab == vid)[:, 0].min()
            frac[zz : zz + 2][lab[zz : zz + 2] == vid] = value
        paths["fracture"] = io.write_volume(folder / "fracture.nii.gz", frac, geom)
    return paths


def write_manifest(path: Path, rows: list[dict], columns=None) -> Path:
    columns = columns or ["case_id", "ct", "vertebrae", "fracture"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: str(v) if v is not None else "" for k, v in row.items()})
    return path


def small_dataset(tmp_path: Path, n: int = 3, **kw) -> Path:
    rows = []
    for i in range(n):
        paths = make_case(tmp_path / f"case{i}", seed=i, **kw)
        rows.append({"case_id": f"case{i}", **paths})
    return write_manifest(tmp_path / "manifest.csv", rows)


def centroid_mm(mask: np.ndarray, geom: Geometry) -> np.ndarray:
    return geom.zyx_to_physical(np.argwhere(mask > 0).mean(axis=0))


def assert_crops_map_back(store: Store, case_id: str, labels: np.ndarray, label_ids: dict):
    """Each crop's mask, resampled onto the original CT grid, lands on its vertebra."""
    ct_geom, ct_shape = store.ct_grid(case_id)
    assert labels.shape == ct_shape
    for vid in store.vertebrae(case_id):
        mask = store.read(case_id, vid, "mask")
        back = io.resample_to(
            mask, store.crop_geometry(case_id, vid), ct_geom, ct_shape, nearest=True
        )
        original = labels == label_ids[vid]
        dist = np.linalg.norm(centroid_mm(back, ct_geom) - centroid_mm(original, ct_geom))
        assert dist <= min(ct_geom.spacing), (vid, dist)
        # And mostly the same voxels (nearest resampling 1 mm <-> scanner spacing).
        overlap = (back.astype(bool) & original).sum() / original.sum()
        assert overlap > 0.8, (vid, overlap)


def assert_nothing_half_written(out: Path, expected_complete: set[str] = frozenset()):
    if not out.exists():
        assert not expected_complete
        return
    store = Store(out)
    assert set(store.case_ids(complete_only=False)) == set(expected_complete)
    assert set(store.case_ids()) == set(expected_complete)


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["ingest", *map(str, args)])
    return result.exit_code, result.stderr


# ---------------------------------------------------------------------------------------
# Real samples
# ---------------------------------------------------------------------------------------


def test_real_tptbox_verse_ids_map_back_to_scanner(real_data, tmp_path):
    d = real_data / "tptbox_l3"
    manifest = write_manifest(
        tmp_path / "m.csv",
        [{"case_id": "tptbox", "ct": d / "ct.nii.gz", "vertebrae": d / "vertebrae_verse.nii.gz"}],
    )
    out = tmp_path / "s.zarr"
    summary = ingest(manifest, out)
    assert "1 case(s) ingested" in summary
    store = Store(out)
    assert store.vertebrae("tptbox") == [21, 22, 23]
    attrs = store.case_attrs("tptbox")
    assert attrs["complete"] and attrs["split"] in ("train", "val", "test")
    assert attrs["ct_shape"] == [73, 47, 73]
    for key in (
        "ct_geometry",
        "reorientation",
        "canonical_geometry",
        "resampled_geometry",
        "roi_box",
        "resampling",
    ):
        assert key in attrs
    np.testing.assert_allclose(attrs["resampled_geometry"]["spacing"], (1, 1, 1))
    np.testing.assert_allclose(
        np.reshape(attrs["canonical_geometry"]["direction"], (3, 3)), np.eye(3), atol=1e-6
    )
    image = store.array("tptbox", 22, "image")
    assert image.dtype == np.int16 and store.array("tptbox", 22, "fracture").dtype == np.uint8
    # Consecutive sagittal slices share chunks: full in-plane extent, 8 slices deep.
    axis = PLANE_AXIS["sagittal"]
    expect = list(image.shape)
    expect[axis] = min(CHUNK_SLICES, image.shape[axis])
    assert list(image.chunks) == expect
    assert store.array("tptbox", 22, "image").compressors  # compressed
    # L3 is whole, L2/L4 are cut by the scan's border.
    assert not store.vertebra_attrs("tptbox", 22)["partial"]
    assert store.vertebra_attrs("tptbox", 21)["partial"]
    # HU survive: the trabecular core is osteopenic but bone, air is -1000-ish.
    img = store.read("tptbox", 22)
    mask = store.read("tptbox", 22, "mask")
    assert 0 < np.median(img[mask > 0]) < 600
    assert store.read("tptbox", 22, "fracture").max() == 0  # no fracture annotation
    fp = store.fingerprint
    assert fp["cases"] == 1 and fp["p0_5"] < fp["p50"] < fp["p99_5"] and fp["std"] > 0
    np.testing.assert_allclose(fp["spacing_median"], (1.5, 1.5, 1.5))
    labels = io.read_volume(d / "vertebrae_verse.nii.gz").array
    assert_crops_map_back(store, "tptbox", labels, {v: v for v in (21, 22, 23)})


def test_real_totalseg_ids_map_back_to_scanner(real_data, tmp_path):
    d = real_data / "totalseg_abdomen"
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {
                "case_id": "abdomen",
                "ct": d / "ct.nii.gz",
                "vertebrae": d / "vertebrae_totalseg.nii.gz",
            }
        ],
    )
    out = tmp_path / "s.zarr"
    ingest(manifest, out, label_scheme="totalsegmentator", spacing=(1.5, 1.5, 1.5))
    store = Store(out)
    # T11 (partial) .. L5; S1 (26) is not a target vertebra.
    assert store.vertebrae("abdomen") == list(range(18, 25))
    assert store.vertebra_attrs("abdomen", 18)["partial"]
    assert store.vertebra_attrs("abdomen", 18)["name"] == "T11"
    assert not store.vertebra_attrs("abdomen", 22)["partial"]
    labels = io.read_volume(d / "vertebrae_totalseg.nii.gz").array
    assert_crops_map_back(store, "abdomen", labels, {v: 51 - v for v in range(18, 25)})


# ---------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", [None, "JPEG2000"])
def test_dicom_series_written_from_nifti_is_ingested(real_data, tmp_path, compressor):
    d = real_data / "tptbox_l3"
    ct = io.read_volume(d / "ct.nii.gz")
    io.write_dicom_series(tmp_path / "dicom", ct.array, ct.geometry, compressor=compressor)
    if compressor:
        assert b"1.2.840.10008.1.2.4.90" in (tmp_path / "dicom" / "slice_0000.dcm").read_bytes()
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {
                "case_id": "from_dicom",
                "ct": tmp_path / "dicom",
                "vertebrae": d / "vertebrae_verse.nii.gz",
            },
            {
                "case_id": "from_nifti",
                "ct": d / "ct.nii.gz",
                "vertebrae": d / "vertebrae_verse.nii.gz",
            },
        ],
    )
    ingest(manifest, tmp_path / "s.zarr")
    store = Store(tmp_path / "s.zarr")
    assert store.case_ids() == ["from_dicom", "from_nifti"]
    g_dicom, _ = store.ct_grid("from_dicom")
    g_nifti, _ = store.ct_grid("from_nifti")
    np.testing.assert_allclose(g_dicom.origin, g_nifti.origin, atol=1e-3)
    np.testing.assert_allclose(g_dicom.direction, g_nifti.direction, atol=1e-5)
    for vid in (21, 22, 23):
        assert (
            store.vertebra_attrs("from_dicom", vid)["crop_box"]
            == store.vertebra_attrs("from_nifti", vid)["crop_box"]
        )
        a = store.read("from_dicom", vid).astype(int)
        b = store.read("from_nifti", vid).astype(int)
        assert np.abs(a - b).max() <= 1


# ---------------------------------------------------------------------------------------
# Synthetic cases: geometry, fracture, split, boxes, VerSe tree, resume, workers
# ---------------------------------------------------------------------------------------


def test_flipped_anisotropic_case_maps_back_and_keeps_fracture(tmp_path):
    paths = make_case(tmp_path / "c", fracture={12: 1, 13: 3}, ct_dtype=np.float32)
    manifest = write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}])
    ingest(manifest, tmp_path / "s.zarr", margin_mm=4.0, chunk_plane="axial")
    store = Store(tmp_path / "s.zarr")
    assert store.vertebrae("c") == list(VERTEBRAE)
    labels = io.read_volume(paths["vertebrae"]).array
    assert_crops_map_back(store, "c", labels, {v: v for v in VERTEBRAE})
    # Grade-coded fracture values (3) count as fracture: stored as 0/1.
    assert store.vertebra_attrs("c", 12)["fractured"] and store.vertebra_attrs("c", 13)["fractured"]
    assert not store.vertebra_attrs("c", 11)["fractured"]
    assert set(np.unique(store.read("c", 13, "fracture"))) == {0, 1}
    # Per-slice fracture counts for the dataset's window index, per plane.
    fr13 = store.read("c", 13, "fracture")
    counts = store.vertebra_attrs("c", 13)["fracture_slices"]
    assert counts["sagittal"] == np.count_nonzero(fr13, axis=(0, 1)).tolist()
    assert counts["axial"] == np.count_nonzero(fr13, axis=(1, 2)).tolist()
    # The crop's fracture, mapped back, lands on the original fracture voxels.
    ct_geom, ct_shape = store.ct_grid("c")
    frac = io.read_volume(paths["fracture"]).array > 0
    back = io.resample_to(
        store.read("c", 13, "fracture"),
        store.crop_geometry("c", 13),
        ct_geom,
        ct_shape,
        nearest=True,
    )
    assert (back.astype(bool) & frac).sum() >= 0.7 * (frac & (labels == 13)).sum()
    # Margin 4 mm at 1 mm: the crop is the label box + 4 voxels each side (inside the image).
    a = store.vertebra_attrs("c", 12)
    corners = zip(a["crop_box"][:3], a["label_box"][:3], strict=True)
    assert [c - lb for c, lb in corners] == [-4, -4, -4]
    # Axial chunking.
    img = store.array("c", 12, "image")
    assert img.chunks == (min(CHUNK_SLICES, img.shape[0]), *img.shape[1:])


def test_same_grid_with_other_axis_order_is_no_error(tmp_path):
    """A label map stored transposed and flipped (same voxels in space) is accepted."""
    paths = make_case(tmp_path / "c")
    lab = io.read_volume(paths["vertebrae"])
    # Store it as (x, z, y) with the direction columns permuted/flipped to match.
    arr = np.flip(np.transpose(lab.array, (2, 0, 1)), axis=0)
    m = lab.geometry.matrix
    sp = lab.geometry.spacing
    new_dir = np.stack([m[:, 1], m[:, 2], -m[:, 0]], axis=1)  # new itk x, y, z
    origin = lab.geometry.zyx_to_physical([0, 0, SHAPE[2] - 1])
    geom = Geometry((sp[1], sp[2], sp[0]), tuple(origin), tuple(new_dir.ravel()))
    io.write_volume(tmp_path / "c" / "lab_transposed.nii.gz", arr, geom)
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"case_id": "plain", **paths},
            {
                "case_id": "transposed",
                **paths,
                "vertebrae": tmp_path / "c" / "lab_transposed.nii.gz",
            },
        ],
    )
    ingest(manifest, tmp_path / "s.zarr")
    store = Store(tmp_path / "s.zarr")
    for vid in VERTEBRAE:
        np.testing.assert_array_equal(
            store.read("plain", vid, "mask"), store.read("transposed", vid, "mask")
        )


def test_float_label_map_with_other_structures(tmp_path):
    paths = make_case(tmp_path / "c")
    lab = io.read_volume(paths["vertebrae"])
    arr = lab.array.astype(np.float32)
    arr[0:2] = 5.0  # a cervical vertebra id and an "organ" id: ignored
    arr[-2:] = 1000.0
    io.write_volume(tmp_path / "c" / "float_lab.nii.gz", arr, lab.geometry)
    manifest = write_manifest(
        tmp_path / "m.csv",
        [{"case_id": "c", "ct": paths["ct"], "vertebrae": tmp_path / "c" / "float_lab.nii.gz"}],
    )
    ingest(manifest, tmp_path / "s.zarr")
    assert Store(tmp_path / "s.zarr").vertebrae("c") == list(VERTEBRAE)


def test_bounding_box_csv_stands_in_for_labels(tmp_path):
    paths = make_case(tmp_path / "c")
    boxes = tmp_path / "c" / "boxes.csv"
    # Box of vertebra 11 is x 3..11, y 4..12, z 4..11 in CT voxels; name or id both accepted.
    boxes.write_text(
        "vertebra,x0,y0,z0,x1,y1,z1\nT4,3,4,4,11,12,11\n12,3,4,13,11,12,20\nC5,0,0,0,2,2,2\n"
    )
    manifest = write_manifest(
        tmp_path / "m.csv", [{"case_id": "c", "ct": paths["ct"], "vertebrae": boxes}]
    )
    ingest(manifest, tmp_path / "s.zarr", margin_mm=2.0)
    store = Store(tmp_path / "s.zarr")
    assert store.vertebrae("c") == [11, 12]
    labels = io.read_volume(paths["vertebrae"]).array
    assert_crops_map_back(store, "c", labels, {11: 11, 12: 12})
    assert store.case_attrs("c")["vertebrae_source"] == "boxes"


def test_verse_tree(tmp_path):
    root = tmp_path / "verse"
    for sub in ("sub-gl001", "sub-gl002"):
        paths = make_case(tmp_path / "tmp" / sub)
        (root / "rawdata" / sub).mkdir(parents=True)
        (root / "derivatives" / sub).mkdir(parents=True)
        shutil.copy(paths["ct"], root / "rawdata" / sub / f"{sub}_dir-ax_ct.nii.gz")
        shutil.copy(
            paths["vertebrae"], root / "derivatives" / sub / f"{sub}_dir-ax_seg-vert_msk.nii.gz"
        )
    summary = ingest(root, tmp_path / "s.zarr")
    assert "2 case(s) ingested" in summary
    store = Store(tmp_path / "s.zarr")
    assert store.case_ids() == ["sub-gl001_dir-ax", "sub-gl002_dir-ax"]
    assert store.meta["kind"] == "verse"


def test_split_is_seeded_case_level_and_manifest_wins(tmp_path):
    ids = [f"c{i}" for i in range(8)]
    a = assign_splits(ids, {}, {}, (0.7, 0.15, 0.15), seed=3)
    assert a == assign_splits(ids, {}, {}, (0.7, 0.15, 0.15), seed=3)
    assert list(a.values()).count("val") >= 1 and list(a.values()).count("test") >= 1
    three = assign_splits(ids[:3], {}, {}, (0.7, 0.15, 0.15), seed=0)
    assert sorted(three.values()) == ["test", "train", "val"]
    # Previous assignments are kept when cases are added; fixed ones win.
    grown = assign_splits(ids + ["c8", "c9"], {"c9": "test"}, a, (0.7, 0.15, 0.15), seed=3)
    assert all(grown[c] == a[c] for c in ids) and grown["c9"] == "test"
    # Through ingest: the manifest's split column is stored on the case and in the meta.
    rows = []
    for i in range(3):
        rows.append(
            {
                "case_id": f"c{i}",
                **make_case(tmp_path / f"c{i}", seed=i),
                "split": "test" if i == 0 else "",
            }
        )
    manifest = write_manifest(
        tmp_path / "m.csv", rows, ["case_id", "ct", "vertebrae", "fracture", "split"]
    )
    ingest(manifest, tmp_path / "s.zarr", seed=1)
    store = Store(tmp_path / "s.zarr")
    assert store.case_attrs("c0")["split"] == "test"
    splits = {c: store.case_attrs(c)["split"] for c in store.case_ids()}
    assert splits == store.meta["splits"]
    assert sorted(splits.values()) == ["test", "train", "val"]
    assert sum(len(store.case_ids(s)) for s in ("train", "val", "test")) == 3


def test_split_draws_subjects_not_cases():
    fractions = (0.7, 0.15, 0.15)
    subjects = {"a1": "A", "a2": "A", "a3": "A", "b": "B", "c": "C", "d": "D"}
    ids = sorted(subjects)
    for seed in range(10):
        plan = assign_splits(ids, {}, {}, fractions, seed, subjects)
        assert plan["a1"] == plan["a2"] == plan["a3"]
        # Counts are in subjects: 4 subjects -> 2 train, 1 val, 1 test.
        per_subject = sorted({subjects[c]: plan[c] for c in ids}.values())
        assert per_subject == ["test", "train", "train", "val"]
    # A fixed split of one case, or a previous one, holds for the whole subject.
    plan = assign_splits(ids, {"a2": "val"}, {"a1": "train"}, fractions, 0, subjects)
    assert plan["a1"] == plan["a2"] == plan["a3"] == "val"
    plan = assign_splits(ids, {}, {"a3": "test"}, fractions, 0, subjects)
    assert plan["a1"] == plan["a2"] == plan["a3"] == "test"
    # Cases of one subject split apart by an earlier version: the most held-out split wins.
    plan = assign_splits(ids, {}, {"a1": "train", "a2": "test", "b": "val"}, fractions, 0, subjects)
    assert plan["a1"] == plan["a2"] == plan["a3"] == "test"


def make_verse_tree(root: Path, tmp: Path, scans: list[tuple[str, str]]) -> Path:
    """A VerSe tree of ``(subject folder, scan stem)`` scans, all copies of one tiny case."""
    paths = make_case(tmp / "verse_case")
    for sub, stem in scans:
        for top, src, suffix in (
            ("rawdata", paths["ct"], "ct"),
            ("derivatives", paths["vertebrae"], "seg-vert_msk"),
        ):
            folder = root / top / sub / (stem.split("_")[1] if "_ses-" in stem else "")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / f"{stem}_{suffix}.nii.gz")
    return root


def test_verse_scans_of_one_subject_share_a_split(tmp_path):
    scans = [
        ("sub-verse004", "sub-verse004_ses-a"),
        ("sub-verse004", "sub-verse004_ses-b"),
        ("sub-verse005", "sub-verse005_dir-ax"),
        ("sub-verse005", "sub-verse005_dir-sag"),
        ("sub-verse006", "sub-verse006"),
        ("sub-verse007", "sub-verse007"),
        ("sub-verse008", "sub-verse008"),
    ]
    root = make_verse_tree(tmp_path / "verse", tmp_path, scans)
    subjects = {s.case_id: s.subject for s in read_verse_tree(root)}
    assert subjects == {stem: sub for sub, stem in scans}
    ids = sorted(subjects)
    pairs = [
        ("sub-verse004_ses-a", "sub-verse004_ses-b"),
        ("sub-verse005_dir-ax", "sub-verse005_dir-sag"),
    ]
    fractions = (0.7, 0.15, 0.15)
    apart = 0
    for seed in range(20):
        plan = assign_splits(ids, {}, {}, fractions, seed, subjects)
        assert all(plan[a] == plan[b] for a, b in pairs), (seed, plan)
        assert {"train", "val", "test"} <= set(plan.values())
        case_level = assign_splits(ids, {}, {}, fractions, seed)
        apart += any(case_level[a] != case_level[b] for a, b in pairs)
    assert apart > 0  # a case-level draw would have put one subject on both sides
    # Through ingest: the subject is stored on each case and in the meta.
    for seed in (0, 1):
        ingest(root, tmp_path / f"s{seed}.zarr", seed=seed)
        store = Store(tmp_path / f"s{seed}.zarr")
        assert store.case_ids() == ids
        splits = {c: store.case_attrs(c)["split"] for c in ids}
        assert (
            splits == store.meta["splits"] == assign_splits(ids, {}, {}, fractions, seed, subjects)
        )
        assert all(splits[a] == splits[b] for a, b in pairs)
        assert {c: store.case_attrs(c)["subject"] for c in ids} == subjects
        assert store.meta["subjects"] == subjects


def test_manifest_subject_column_groups_cases(tmp_path):
    paths = make_case(tmp_path / "c")
    table = [
        ("p1_a", "P1", ""),
        ("p1_b", "P1", ""),
        ("p1_c", "P1", ""),
        ("q_a", "Q", "test"),
        ("q_b", "Q", ""),
        ("solo1", "", ""),
        ("solo2", "", ""),
        ("solo3", "", ""),
    ]
    columns = ["case_id", "ct", "vertebrae", "subject", "split"]
    rows = [{"case_id": c, **paths, "subject": subj, "split": split} for c, subj, split in table]
    manifest = write_manifest(tmp_path / "m.csv", rows, columns)
    subjects = {s.case_id: s.subject for s in read_manifest(manifest)}
    assert subjects["p1_b"] == "P1" and subjects["solo1"] == "solo1"  # empty: its own subject
    out = tmp_path / "s.zarr"
    ingest(manifest, out, seed=2)
    store = Store(out)
    split = {c: store.case_attrs(c)["split"] for c in store.case_ids()}
    assert split["p1_a"] == split["p1_b"] == split["p1_c"]
    assert split["q_a"] == split["q_b"] == "test"  # a manifest split holds for the subject
    assert {c: store.case_attrs(c)["subject"] for c in store.case_ids()} == subjects
    # A new scan of a known subject joins the split the subject already has.
    rows.append({"case_id": "p1_d", **paths, "subject": "P1"})
    write_manifest(manifest, rows, columns)
    assert "1 case(s) ingested, 8 already complete" in ingest(manifest, out, seed=2)
    store = Store(out)
    assert store.case_attrs("p1_d")["split"] == split["p1_a"]
    assert {c: store.case_attrs(c)["split"] for c in split} == split


def test_manifest_domain_column_balances_training_windows(tmp_path):
    """A ``domain`` column is stored on each case (and updated on a rerun);
    ``data.balance_domains`` gives each domain the same share of the drawn windows."""
    from vfsearch.adapters.dataset import WindowDataset
    from vfsearch.core.config import DataConfig

    paths = make_case(tmp_path / "c", fracture={11: 1})
    ids = [f"ph{i}" for i in range(6)] + ["real0"]
    columns = ["case_id", "ct", "vertebrae", "fracture", "split", "domain"]

    def rows(real_domain: str) -> list[dict]:
        return [
            {
                "case_id": c,
                **paths,
                "split": "train",
                "domain": real_domain if c == "real0" else "phantom",
            }
            for c in ids
        ]

    manifest = write_manifest(tmp_path / "m.csv", rows("real"), columns)
    assert {s.domain for s in read_manifest(manifest)} == {"phantom", "real"}
    out = tmp_path / "s.zarr"
    ingest(manifest, out, seed=0)
    assert Store(out).case_attrs("real0")["domain"] == "real"

    def real_share(balance: bool) -> float:
        data = DataConfig(seq_len=3, patch_size=16, plane="axial", balance_domains=balance)
        ds = WindowDataset(out, "train", data)
        order = ds.epoch_order(4000, epoch=0)
        cases = [ds.items[ds.locate(v % len(ds))[0]][0] for v in order]
        return float(np.mean([c == "real0" for c in cases]))

    assert abs(real_share(False) - 1 / 7) < 0.03
    assert abs(real_share(True) - 1 / 2) < 0.03
    # A rerun with another domain updates the complete case without re-ingesting it.
    write_manifest(manifest, rows("phantom"), columns)
    assert "0 case(s) ingested, 7 already complete" in ingest(manifest, out, seed=0)
    assert Store(out).case_attrs("real0")["domain"] == "phantom"
    assert abs(real_share(True) - 1 / 7) < 0.03  # one domain: nothing to balance


def test_fingerprint_comes_from_train_split_only(tmp_path):
    rows = []
    for i, split in enumerate(("train", "train", "val", "test")):
        held_out = split != "train"
        # Held-out cases: bone 1500 HU denser and a coarser scanner grid than the train cases.
        geom = Geometry((3.0, 2.0, 3.0), GEOM.origin, DIRECTION) if held_out else GEOM
        paths = make_case(tmp_path / f"c{i}", seed=i, geom=geom)
        if held_out:
            ct = io.read_volume(paths["ct"])
            io.write_volume(paths["ct"], ct.array + 1500, ct.geometry)
        rows.append({"case_id": f"c{i}", **paths, "split": split})
    columns = ["case_id", "ct", "vertebrae", "split"]
    manifest = write_manifest(tmp_path / "m.csv", rows, columns)
    out = tmp_path / "s.zarr"
    ingest(manifest, out)

    def expected(store: Store, ids: list[str]) -> dict:
        return fingerprint_from_hist(sum(store.hu_hist(c) for c in ids))

    store = Store(out)
    fp = store.fingerprint
    assert fp["from_split"] == "train" and fp["cases"] == 2
    train_only = expected(store, ["c0", "c1"])
    assert {k: fp[k] for k in train_only} == pytest.approx(train_only)
    every_case = expected(store, store.case_ids())
    assert fp["mean"] < every_case["mean"] - 300 and fp["p99_5"] < every_case["p99_5"]
    np.testing.assert_allclose(fp["spacing_max"], GEOM.spacing)
    # The manifest moves c3 into train: the resumed run recomputes the fingerprint.
    rows[3]["split"] = "train"
    write_manifest(manifest, rows, columns)
    assert "0 case(s) ingested, 4 already complete" in ingest(manifest, out)
    store = Store(out)
    fp = store.fingerprint
    assert store.case_attrs("c3")["split"] == "train" and fp["cases"] == 3
    with_c3 = expected(store, ["c0", "c1", "c3"])
    assert {k: fp[k] for k in with_c3} == pytest.approx(with_c3)
    np.testing.assert_allclose(fp["spacing_max"], (3.0, 2.0, 3.0))
    # No train case at all (an evaluation-only store): every case, and it says so.
    only_test = write_manifest(tmp_path / "test_only.csv", rows[2:3], columns)
    ingest(only_test, tmp_path / "t.zarr")
    fp = Store(tmp_path / "t.zarr").fingerprint
    assert fp["from_split"] == "all" and fp["cases"] == 1


def test_idempotent_rerun(tmp_path):
    manifest = small_dataset(tmp_path, n=2)
    out = tmp_path / "s.zarr"
    ingest(manifest, out)
    meta = Store(out).meta
    stamp = (out / "cases" / "case0" / "zarr.json").stat().st_mtime_ns
    summary = ingest(manifest, out)
    assert "0 case(s) ingested, 2 already complete" in summary
    assert (out / "cases" / "case0" / "zarr.json").stat().st_mtime_ns == stamp
    assert Store(out).meta == meta


def test_interrupted_ingest_resumes(tmp_path, monkeypatch):
    manifest = small_dataset(tmp_path, n=3)
    out = tmp_path / "s.zarr"
    original = Store.write_vertebra
    calls = []

    def crash_in_case1(self, case_id, vid, arrays, attrs, **kw):
        calls.append(case_id)
        if case_id == "case1" and calls.count("case1") == 2:
            raise OSError("disk full (simulated crash mid-case)")
        return original(self, case_id, vid, arrays, attrs, **kw)

    monkeypatch.setattr(Store, "write_vertebra", crash_in_case1)
    with pytest.raises(OSError, match="simulated"):
        ingest(manifest, out)
    store = Store(out)
    # The half-written case exists but never reads as complete.
    assert store.case_ids() == ["case0"]
    assert store.case_ids(complete_only=False) == ["case0", "case1"]
    assert store.case_attrs("case1")["complete"] is False
    split0 = store.case_attrs("case0")["split"]
    plan = store.meta["splits"]
    stamp = (out / "cases" / "case0" / "zarr.json").stat().st_mtime_ns
    monkeypatch.setattr(Store, "write_vertebra", original)

    summary = ingest(manifest, out)
    assert "2 case(s) ingested, 1 already complete" in summary
    store = Store(out)
    assert store.case_ids() == ["case0", "case1", "case2"]
    assert (out / "cases" / "case0" / "zarr.json").stat().st_mtime_ns == stamp
    assert store.case_attrs("case0")["split"] == split0
    assert store.meta["splits"] == plan  # no case changes split on resume
    assert {c: store.case_attrs(c)["split"] for c in store.case_ids()} == plan
    assert store.vertebrae("case1") == list(VERTEBRAE)
    assert store.fingerprint["cases"] == len(store.case_ids("train"))
    assert store.fingerprint["from_split"] == "train"


@pytest.mark.slow
def test_parallel_workers_match_serial(tmp_path):
    manifest = small_dataset(tmp_path, n=3)
    ingest(manifest, tmp_path / "serial.zarr")
    ingest(manifest, tmp_path / "parallel.zarr", workers=2)
    a, b = Store(tmp_path / "serial.zarr"), Store(tmp_path / "parallel.zarr")
    assert a.case_ids() == b.case_ids() == ["case0", "case1", "case2"]
    for cid in a.case_ids():
        assert a.case_attrs(cid)["split"] == b.case_attrs(cid)["split"]
        for vid in a.vertebrae(cid):
            np.testing.assert_array_equal(a.read(cid, vid), b.read(cid, vid))
    assert a.fingerprint == b.fingerprint
    # A bad case in a parallel run: one error, the other cases complete, no half case.
    bad = make_case(tmp_path / "bad", vertebrae=(1, 2))
    rows = list(csv.DictReader(manifest.open()))  # noqa: SIM115 - read in full at once
    write_manifest(tmp_path / "m2.csv", rows + [{"case_id": "bad", **bad}])
    with pytest.raises(UserError, match="bad/vertebrae.nii.gz: no T4..L5"):
        ingest(tmp_path / "m2.csv", tmp_path / "p2.zarr", workers=2)
    store = Store(tmp_path / "p2.zarr")
    assert "bad" not in store.case_ids(complete_only=False)
    assert set(store.case_ids(complete_only=False)) == set(store.case_ids())


# ---------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing half-written
# ---------------------------------------------------------------------------------------


def assert_one_line_error(code: int, stderr: str, *fragments: str):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_file(tmp_path):
    paths = make_case(tmp_path / "c")
    manifest = write_manifest(
        tmp_path / "m.csv", [{"case_id": "c", **paths, "ct": tmp_path / "c" / "nope.nii.gz"}]
    )
    code, err = run_cli(manifest, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "nope.nii.gz", "not found")
    assert not (tmp_path / "s.zarr").exists()


def test_unreadable_image(tmp_path):
    paths = make_case(tmp_path / "c")
    paths["vertebrae"].write_bytes(b"this is not an image")
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "vertebrae.nii.gz", "cannot read")
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_truncated_image(tmp_path, suffix):
    paths = make_case(tmp_path / "c")
    ct = io.read_volume(paths["ct"])
    truncated = io.write_volume(tmp_path / "c" / f"ct_cut{suffix}", ct.array, ct.geometry)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    manifest = write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths, "ct": truncated}])
    with pytest.raises(UserError, match=f"ct_cut{suffix}.*(truncated|corrupt)"):
        ingest(manifest, tmp_path / "s.zarr")
    assert_nothing_half_written(tmp_path / "s.zarr")


def test_grid_mismatch(tmp_path):
    paths = make_case(tmp_path / "c")
    lab = io.read_volume(paths["vertebrae"])
    moved = Geometry(lab.geometry.spacing, (41.0, 25.0, -300.0), lab.geometry.direction)
    io.write_volume(paths["vertebrae"], lab.array, moved)
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "vertebrae.nii.gz", "differs from the CT")
    assert not (tmp_path / "s.zarr").exists()


def test_no_target_vertebra(tmp_path):
    paths = make_case(tmp_path / "c", vertebrae=(3, 4, 25, 26))
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "vertebrae.nii.gz", "no T4..L5", "found ids 3, 4, 25, 26")
    assert not (tmp_path / "s.zarr").exists()


def test_fracture_probability_map_rejected(tmp_path):
    paths = make_case(tmp_path / "c", fracture={12: 1})
    frac = io.read_volume(paths["fracture"])
    io.write_volume(paths["fracture"], frac.array.astype(np.float32) * 0.7, frac.geometry)
    with pytest.raises(UserError, match="fracture.nii.gz: fracture mask has non-integer"):
        ingest(write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]), tmp_path / "s.zarr")
    assert_nothing_half_written(tmp_path / "s.zarr")


def test_fracture_negative_values_rejected(tmp_path):
    paths = make_case(tmp_path / "c", fracture={12: 1})
    frac = io.read_volume(paths["fracture"])
    io.write_volume(paths["fracture"], frac.array.astype(np.int16) - 1, frac.geometry)
    with pytest.raises(UserError, match="negative values"):
        ingest(write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]), tmp_path / "s.zarr")
    assert_nothing_half_written(tmp_path / "s.zarr")


def test_nan_in_ct(tmp_path):
    paths = make_case(tmp_path / "c", ct_dtype=np.float32)
    ct = io.read_volume(paths["ct"])
    ct.array[3, 4, 5] = np.nan
    io.write_volume(paths["ct"], ct.array, ct.geometry)
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "ct.nii.gz", "NaN")
    assert not (tmp_path / "s.zarr").exists()


def _dicom_case(tmp_path: Path) -> tuple[dict, Path]:
    paths = make_case(tmp_path / "c")
    ct = io.read_volume(paths["ct"])
    folder = tmp_path / "dicom"
    io.write_dicom_series(folder, ct.array, ct.geometry, series_uid="1.2.826.0.1.3680043.2.1")
    return paths, folder


def test_dicom_folder_with_several_series(tmp_path):
    paths, folder = _dicom_case(tmp_path)
    ct = io.read_volume(paths["ct"])
    other = tmp_path / "other"
    io.write_dicom_series(other, ct.array[:5], ct.geometry, series_uid="1.2.826.0.1.3680043.2.2")
    for f in other.iterdir():
        shutil.copy(f, folder / f"b_{f.name}")
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths, "ct": folder}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "dicom", "2 DICOM series")
    assert not (tmp_path / "s.zarr").exists()


def test_dicom_missing_slice(tmp_path):
    paths, folder = _dicom_case(tmp_path)
    (folder / "slice_0020.dcm").unlink()
    code, err = run_cli(
        write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths, "ct": folder}]),
        "--out",
        tmp_path / "s.zarr",
    )
    assert_one_line_error(code, err, "dicom", "missing slice")
    assert not (tmp_path / "s.zarr").exists()


def test_manifest_missing_columns(tmp_path):
    paths = make_case(tmp_path / "c")
    manifest = write_manifest(tmp_path / "m.csv", [{"case_id": "c", **paths}], ["case_id", "ct"])
    code, err = run_cli(manifest, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "m.csv", "lacks column(s) vertebrae")
    assert not (tmp_path / "s.zarr").exists()


def test_manifest_duplicate_case_ids(tmp_path):
    paths = make_case(tmp_path / "c")
    manifest = write_manifest(
        tmp_path / "m.csv", [{"case_id": "c", **paths}, {"case_id": "c", **paths}]
    )
    code, err = run_cli(manifest, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "m.csv", "duplicate case_id 'c' (lines 2 and 3)")
    assert not (tmp_path / "s.zarr").exists()


def test_manifest_subject_in_two_splits(tmp_path):
    paths = make_case(tmp_path / "c")
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {"case_id": "a", **paths, "subject": "S", "split": "train"},
            {"case_id": "b", **paths},
            {"case_id": "c", **paths, "subject": "S", "split": "test"},
        ],
        ["case_id", "ct", "vertebrae", "subject", "split"],
    )
    code, err = run_cli(manifest, "--out", tmp_path / "s.zarr")
    assert_one_line_error(code, err, "m.csv", "subject 'S'", "train on line 2", "test on line 4")
    assert not (tmp_path / "s.zarr").exists()


def test_store_of_another_dataset(tmp_path):
    manifest = small_dataset(tmp_path, n=1)
    out = tmp_path / "s.zarr"
    ingest(manifest, out)
    before = Store(out).meta
    code, err = run_cli(manifest, "--out", out, "--spacing", "2,2,2")
    assert_one_line_error(code, err, "s.zarr", "another dataset", "spacing")
    assert Store(out).meta == before
    assert_nothing_half_written(out, {"case0"})
    # A folder that is not a store at all is refused too, and left alone.
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    code, err = run_cli(manifest, "--out", tmp_path / "junk")
    assert_one_line_error(code, err, "junk", "not a vfsearch store")
    assert os.listdir(tmp_path / "junk") == ["notes.txt"]


def test_bad_case_stops_run_and_keeps_complete_cases(tmp_path):
    good = make_case(tmp_path / "good")
    bad = make_case(tmp_path / "bad", vertebrae=(2, 3))
    manifest = write_manifest(
        tmp_path / "m.csv", [{"case_id": "a_good", **good}, {"case_id": "b_bad", **bad}]
    )
    out = tmp_path / "s.zarr"
    with pytest.raises(UserError, match="bad/vertebrae.nii.gz: no T4..L5"):
        ingest(manifest, out)
    assert_nothing_half_written(out, {"a_good"})
    assert Store(out).fingerprint["cases"] == 1
    # A half case left by an earlier crash is removed when the case then fails validation.
    Store(out, "a").begin_case("b_bad", {})
    with pytest.raises(UserError, match="no T4..L5"):
        ingest(manifest, out)
    assert_nothing_half_written(out, {"a_good"})


@pytest.mark.slow
def test_synth_folder_end_to_end(tmp_path):
    synth = pytest.importorskip("vfsearch.pipelines.synth")
    synth.synth_dataset(
        tmp_path / "ph", cases=2, seed=0, spacing=None, small=True, fracture_rate=0.3
    )
    summary = ingest(tmp_path / "ph", tmp_path / "s.zarr")
    assert "2 case(s) ingested" in summary
    store = Store(tmp_path / "s.zarr")
    assert store.meta["kind"] == "synth"
    assert len(store.case_ids()) == 2
    with (tmp_path / "ph" / "manifest.csv").open() as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    n_fractured = 0
    for cid in store.case_ids():
        grades = dict(item.split(":") for item in rows[cid]["grades"].split(";"))
        assert store.vertebrae(cid) == sorted(int(k) for k in grades)
        labels = io.read_volume(tmp_path / "ph" / cid / "vertebrae.nii.gz").array
        assert_crops_map_back(store, cid, labels, {v: v for v in store.vertebrae(cid)})
        for vid in store.vertebrae(cid):
            attrs = store.vertebra_attrs(cid, vid)
            # The manifest's grade is stored, and a graded vertebra carries fracture voxels.
            assert attrs["grade"] == int(grades[str(vid)])
            assert attrs["fractured"] == (attrs["grade"] > 0)
            n_fractured += attrs["fractured"]
    assert n_fractured > 0
