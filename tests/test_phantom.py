"""Synthetic spine CT phantom, fracture simulation on real scans, and `vfsearch synth`.

Heights and HU statistics are measured here with code of the test's own (not the generator's
`measure_heights`), on arrays brought to canonical orientation (z superior, y posterior).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from vfsearch.cli import app
from vfsearch.core import phantom
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import to_canonical

IDS = range(11, 25)


# --------------------------------------------------------------------------------------------
# independent measurements
# --------------------------------------------------------------------------------------------


def canonical(case) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    ct, geom, ro = to_canonical(case.ct, case.geometry)
    return ct, ro.apply(case.vertebrae), ro.apply(case.fracture), tuple(geom.spacing[::-1])


def body_of(labels: np.ndarray, vid: int) -> tuple[np.ndarray, int, int, int]:
    """Body mask of one vertebra: the part anterior of the canal gap at the midline."""
    m = labels == vid
    x_mid = round(np.nonzero(m)[2].mean())
    occupied = m[:, :, x_mid].any(axis=0)  # over y
    y0 = int(np.argmax(occupied))
    after = np.nonzero(~occupied[y0:])[0]
    y1 = y0 + int(after[0]) if len(after) else len(occupied)
    body = np.zeros_like(m)
    body[:, y0:y1] = m[:, y0:y1]
    return body, y0, y1, x_mid


def heights(labels: np.ndarray, vid: int, sz: float) -> list[float]:
    """SI height (mm) of the body at 15/50/85 % of its AP depth in the mid-sagittal slice."""
    body, y0, y1, x_mid = body_of(labels, vid)
    out = []
    for f in (0.15, 0.5, 0.85):
        y = min(y1 - 1, y0 + int(f * (y1 - y0)))
        zs = np.nonzero(body[:, y, x_mid])[0]
        out.append(float(zs.max() - zs.min() + 1) * sz if len(zs) else 0.0)
    return out


def ratio(labels: np.ndarray, vid: int, sz: float) -> float:
    h = heights(labels, vid, sz)
    return min(h) / max(h)


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cases():
    return [phantom.make_case(seed, small=True) for seed in range(10)]


@pytest.fixture(scope="module")
def default_case():
    return phantom.make_case(7)


# --------------------------------------------------------------------------------------------
# the phantom
# --------------------------------------------------------------------------------------------


def test_small_case_shape_labels_and_orientation(small_cases):
    case = small_cases[0]
    assert case.ct.dtype == np.int16 and case.vertebrae.dtype == np.uint8
    assert case.fracture.dtype == np.uint8
    assert case.ct.shape == case.vertebrae.shape == case.fracture.shape
    assert max(case.ct.shape[1:]) <= 80  # tiny in-plane
    assert set(np.unique(case.vertebrae)) == {0, *IDS}
    assert set(case.meta) == set(IDS)
    # stored like dcm2niix NIfTI: x and y flipped, so ingestion must reorient
    assert case.geometry.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    _, labels, _, _ = canonical(case)
    z_of = {v: np.nonzero(labels == v)[0].mean() for v in IDS}
    assert all(z_of[v] > z_of[v + 1] for v in range(11, 24))  # T4 above L5: z superior


@pytest.mark.parametrize("which", ["small", "default"])
def test_height_ratio_separates_fractured_from_healthy(which, small_cases, default_case):
    cases = small_cases if which == "small" else [default_case]
    n_frac = 0
    for case in cases:
        _, labels, _, sp = canonical(case)
        for vid in IDS:
            r = ratio(labels, vid, sp[0])
            grade = case.meta[vid]["grade"]
            if grade:
                n_frac += 1
                assert r < 0.8, (vid, grade, case.meta[vid])
            else:
                assert r > 0.85, (vid, case.meta[vid])
            assert abs(r - case.meta[vid]["height_ratio"]) < 0.03
            # Genant grade agrees with the measured height loss
            loss = 1 - r
            expected = 3 if loss >= 0.4 else 2 if loss >= 0.25 else 1 if loss >= 0.2 else 0
            assert grade == expected, (vid, r, case.meta[vid])
    assert n_frac >= len(cases)


def test_fracture_rate_grades_and_morphologies(small_cases):
    grades = np.array([[c.meta[v]["grade"] for v in IDS] for c in small_cases])
    assert (grades > 0).any(axis=1).all()  # every case has a fracture
    assert 0.15 <= (grades > 0).mean() <= 0.30
    assert {1, 2, 3} <= set(grades.ravel())
    morph = {c.meta[v]["morphology"] for c in small_cases for v in IDS if c.meta[v]["grade"]}
    assert morph == {"wedge", "biconcave", "crush"}
    healthy = {c.meta[v]["morphology"] for c in small_cases for v in IDS if not c.meta[v]["grade"]}
    assert healthy == {"none"}


def test_heights_rise_from_t4_to_l5(default_case, small_cases):
    for case in [default_case, *small_cases[:3]]:
        _, labels, _, sp = canonical(case)
        h = {v: max(heights(labels, v, sp[0])) for v in IDS}
        healthy = [v for v in IDS if case.meta[v]["grade"] == 0]
        assert 14 <= h[11] <= 21 and 23 <= h[24] <= 31, h
        assert np.corrcoef(healthy, [h[v] for v in healthy])[0, 1] > 0.9


def test_fracture_mask_is_an_endplate_band_inside_the_body(small_cases, default_case):
    shares = []
    for case in [default_case, *small_cases]:
        _, labels, frac, sp = canonical(case)
        fractured = [v for v in IDS if case.meta[v]["grade"]]
        assert set(np.unique(labels[frac > 0])) == set(fractured)
        for vid in IDS:
            body, *_ = body_of(labels, vid)
            fv = (frac > 0) & (labels == vid)
            if vid not in fractured:
                assert not fv.any()
                continue
            assert fv.any() and not (fv & ~body).any()  # only in the vertebral body
            shares.append(fv.sum() / body.sum())
            # every mask voxel lies within a few mm of the body's top or bottom in its column
            zz, yy, xx = np.nonzero(fv)
            cols = body[:, yy, xx]  # (z, n)
            kz = np.arange(body.shape[0])[:, None]
            top = np.where(cols, kz, -1).max(axis=0)
            bot = np.where(cols, kz, body.shape[0]).min(axis=0)
            depth_mm = np.minimum(top - zz, zz - bot) * sp[0]
            assert depth_mm.max() <= 7.5, (vid, depth_mm.max())
    # a band, not the whole vertebra (a severe crush on 2 mm voxels reaches ~45 %)
    assert max(shares) < 0.5 and np.median(shares) < 0.3, sorted(shares)


def _tissue_stats(case) -> dict[str, float]:
    ct, labels, _frac, (sz, sy, sx) = canonical(case)
    ring, core = [], []
    for vid in IDS:
        body, *_ = body_of(labels, vid)
        zs = np.nonzero(body.any(axis=(1, 2)))[0]
        for k in range(
            zs.min() + (zs.max() - zs.min()) // 2 - 1, zs.min() + (zs.max() - zs.min()) // 2 + 2
        ):
            sl = body[k]
            ring.append(ct[k][sl & ~ndi.binary_erosion(sl)])
        if case.meta[vid]["grade"] == 0:  # the core: 3 mm or more inside the body
            r = [int(np.ceil(3.0 / s)) for s in (sz, sy, sx)]
            box = ndi.find_objects(body.astype(np.uint8))[0]
            inner = ndi.binary_erosion(body[box], structure=np.ones([2 * v + 1 for v in r]))
            core.append(ct[box][inner])
    # soft tissue: paraspinal muscle, 6-16 mm behind the front of the L3 lamina, 6-14 mm to
    # the side of the midline (clear of the spinous, articular and transverse processes)
    body, _y0, y1, x_mid = body_of(labels, 22)
    zs = np.nonzero(body.any(axis=(1, 2)))[0]
    behind = (labels[zs.min() : zs.max() + 1, :, x_mid] == 22).any(axis=0)
    y2 = y1 + int(np.argmax(behind[y1:]))  # first posterior-element voxel behind the canal
    soft = ct[
        zs.min() : zs.max() + 1,
        y2 + int(np.ceil(6 / sy)) : y2 + int(16 / sy) + 1,
        x_mid + int(np.ceil(6 / sx)) : x_mid + int(14 / sx) + 1,
    ]
    hx = int(8 / sx)
    # fat: 4-9 mm inside the anterior skin at the midline, over the lumbar levels
    column = ct[zs.min() : zs.max() + 1, :, x_mid - hx : x_mid + hx + 1]
    skin = int(np.argmax(np.median(column, axis=(0, 2)) > -500))
    fat = column[:, skin + int(np.ceil(4 / sy)) : skin + int(9 / sy) + 1]
    air = np.concatenate([ct[:, :3, :3].ravel(), ct[:, -3:, -3:].ravel()])
    return {
        "ring": float(np.mean(np.concatenate(ring))),
        "core": float(np.median(np.concatenate(core))),
        "soft": float(np.median(soft)),
        "noise": float(soft.std()),
        "fat": float(np.median(fat)),
        "air": float(np.median(air)),
    }


def test_hu_statistics_per_tissue_default_spacing(default_case):
    s = _tissue_stats(default_case)
    assert 250 <= s["ring"] <= 600, s  # cortex blurred to the voxel size, not 1000+
    assert 90 <= s["core"] <= 230, s
    assert abs(s["core"] - default_case.info["trabecular_hu"]) < 20
    assert 25 <= s["soft"] <= 55, s
    assert 10 <= s["noise"] <= 30, s
    assert -130 <= s["fat"] <= -70, s
    assert -1024 <= s["air"] <= -970, s


def test_hu_statistics_small_cases_and_density_varies(small_cases):
    stats = [_tissue_stats(c) for c in small_cases[:4]]
    for s in stats:
        assert 250 <= s["ring"] <= 600, s
        assert 90 <= s["core"] <= 230, s
        assert 25 <= s["soft"] <= 55, s
        assert 10 <= s["noise"] <= 30, s
        assert -1024 <= s["air"] <= -970, s
    cores = [s["core"] for s in stats]
    assert max(cores) - min(cores) > 30  # bone density varies between cases


def test_sclerotic_band_raises_hu(small_cases):
    diffs = []
    for case in small_cases:
        ct, labels, frac, _ = canonical(case)
        for vid in IDS:
            if case.meta[vid]["grade"]:
                band = (frac > 0) & (labels == vid)
                body, *_ = body_of(labels, vid)
                rest = ndi.binary_erosion(body & ~ndi.binary_dilation(band, iterations=2))
                diffs.append(np.median(ct[band]) - np.median(ct[rest]))
    assert np.median(diffs) > 80, diffs


def test_same_seed_same_case_other_seed_other_case():
    a, b = phantom.make_case(3, small=True), phantom.make_case(3, small=True)
    assert np.array_equal(a.ct, b.ct) and np.array_equal(a.fracture, b.fracture)
    assert a.meta == b.meta
    c = phantom.make_case(4, small=True)
    assert a.ct.shape != c.ct.shape or not np.array_equal(a.ct, c.ct)


def test_spacing_is_configurable_and_validated():
    case = phantom.make_case(1, small=True, spacing=(1.5, 1.5, 2.5))
    assert case.geometry.spacing == (1.5, 1.5, 2.5)
    assert set(np.unique(case.vertebrae)) == {0, *IDS}
    with pytest.raises(UserError, match="spacing"):
        phantom.make_case(1, small=True, spacing=(2.0, 2.0, 9.0))
    healthy = phantom.make_case(1, small=True, fracture_rate=0.0)
    assert not healthy.fracture.any() and all(m["grade"] == 0 for m in healthy.meta.values())


def test_simulate_fracture_on_canonical_phantom_arrays():
    case = phantom.make_case(5, small=True, fracture_rate=0.0)
    ct, labels, _, sp = canonical(case)
    before = ratio(labels, 21, sp[0])
    res = phantom.simulate_fractures(ct, labels, sp, {21: (3, "crush")}, np.random.default_rng(0))
    assert res.ct.shape == ct.shape and res.ct.dtype == ct.dtype
    assert before > 0.95 and ratio(res.vertebrae, 21, sp[0]) < 0.8
    assert res.meta[21]["grade"] == 3
    fv = res.fracture > 0
    assert fv.any() and set(np.unique(res.vertebrae[fv])) == {21}
    # untouched vertebrae keep their voxels
    far = labels == 15
    assert np.array_equal(res.ct[far], ct[far])


# --------------------------------------------------------------------------------------------
# variety: per-case scanner and patient randomisation
# --------------------------------------------------------------------------------------------

VARIETY_SEEDS = range(12)


@pytest.fixture(scope="module")
def variety_cases():
    return [phantom.make_case(seed, small=True, variety=1.0) for seed in VARIETY_SEEDS]


def _same_case(a, b) -> bool:
    return (
        all(
            x.dtype == y.dtype and np.array_equal(x, y)
            for x, y in ((a.ct, b.ct), (a.vertebrae, b.vertebrae), (a.fracture, b.fracture))
        )
        and a.geometry == b.geometry
        and a.meta == b.meta
        and a.info == b.info
    )


def test_variety_zero_is_the_standard_phantom_bit_for_bit(small_cases, default_case):
    for seed in (0, 1):
        assert _same_case(phantom.make_case(seed, small=True, variety=0.0), small_cases[seed])
    assert _same_case(phantom.make_case(7, variety=0), default_case)
    # a dataset's generator, an explicit spacing and fracture rate: still the same
    kw = {"small": True, "spacing": (1.5, 1.5, 2.5), "fracture_rate": 0.5}
    a = phantom.make_case(phantom.case_rng(3, 2), **kw)
    b = phantom.make_case(phantom.case_rng(3, 2), variety=0.0, **kw)
    assert _same_case(a, b) and "variety" not in b.info
    # while any variety changes the case
    c = phantom.make_case(phantom.case_rng(3, 2), variety=0.2, **kw)
    assert c.ct.shape != a.ct.shape or not np.array_equal(c.ct, a.ct)
    assert c.info["variety"] == 0.2


def test_variety_is_reproducible_and_validated():
    a = phantom.make_case(4, small=True, variety=0.7)
    b = phantom.make_case(4, small=True, variety=0.7)
    assert _same_case(a, b)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="variety"):
            phantom.make_case(4, small=True, variety=bad)
    # an explicit spacing is kept; only spacing=None is drawn
    fixed = phantom.make_case(4, small=True, spacing=(1.8, 1.8, 2.4), variety=1.0)
    assert fixed.geometry.spacing == (1.8, 1.8, 2.4)


def test_variety_spreads_noise_bone_density_and_spacing(variety_cases):
    stats = [_tissue_stats(c) for c in variety_cases]
    noise = [s["noise"] for s in stats]
    cores = [s["core"] for s in stats]
    assert max(noise) > 2.0 * min(noise), noise  # noise level (standard: 10-30 HU, < 2x)
    assert min(noise) < 10 and max(noise) > 25, noise
    assert min(cores) < 150, cores  # an osteopenic case
    assert max(cores) > 240 and max(cores) - min(cores) > 100, cores
    for s, case in zip(stats, variety_cases, strict=True):
        assert 20 <= s["soft"] <= 60, s  # the neighbours leave the paraspinal muscle alone
        assert abs(s["noise"] - case.info["noise_sigma_hu"]) < 0.35 * case.info["noise_sigma_hu"]
    spacing = np.array([c.geometry.spacing for c in variety_cases])
    assert spacing[:, 2].max() >= 2.5 and spacing[:, 2].min() <= 1.3, spacing[:, 2]
    assert np.ptp(spacing[:, 0]) > 0.4 and (spacing[:, 0] == spacing[:, 1]).all()
    for case, sp in zip(variety_cases, spacing, strict=True):
        assert case.ct.shape[0] * sp[2] > 250  # T4-L5 fits whatever the slice spacing
    # the cortical shell and grain vary too
    assert np.ptp([c.info["cortex_mm"] for c in variety_cases]) > 0.4
    assert np.ptp([c.info["noise_blur_vox_zyx"][2] for c in variety_cases]) > 0.5


def _lumbar_gas(case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Air enclosed by the body (not the air around it) on the slices of L2-L5 (canonical)."""
    ct, labels, frac, _ = canonical(case)
    zs = np.nonzero(np.isin(labels, [21, 22, 23, 24]).any(axis=(1, 2)))[0]
    gas = np.zeros(ct.shape, dtype=bool)
    for k in range(zs.min(), zs.max() + 1):
        gas[k] = ndi.binary_fill_holes(ct[k] > -500) & (ct[k] < -500)
    return gas, labels, frac


def test_variety_adds_ribs_aorta_and_gas_unlabelled(variety_cases, small_cases):
    n_gas = n_aorta = n_ribs = 0
    for case in [*variety_cases, *small_cases[:3]]:
        varied = "variety" in case.info
        ct, labels, frac, (sz, sy, sx) = canonical(case)
        assert set(np.unique(labels)) == {0, *IDS}
        fractured = [v for v in IDS if case.meta[v]["grade"]]
        assert set(np.unique(labels[frac > 0])) == set(fractured)
        x_mid = np.nonzero(labels)[2].mean()
        lateral = np.abs(np.arange(ct.shape[2]) - x_mid) * sx  # mm from the midline
        # thoracic labels stay within the transverse processes: no rib is labelled
        assert lateral[np.nonzero((labels >= 11) & (labels <= 19))[2]].max() < 40
        # bowel gas: air inside the body in front of the lumbar spine, never labelled
        gas, _, _ = _lumbar_gas(case)
        if gas.sum() > 5:
            assert varied and ct[gas].max() < -500
            assert not labels[gas].any() and not frac[gas].any()
            body_front = np.nonzero(np.isin(labels, [21, 22, 23, 24]))[1].min()
            assert np.nonzero(gas)[1].max() < body_front  # anterior (y grows posteriorly)
            n_gas += 1
        # ribs: bone beside the thoracic spine, beyond the transverse processes
        zs = np.nonzero(np.isin(labels, range(12, 18)).any(axis=(1, 2)))[0]  # T5-T10
        ribs = (ct[zs.min() : zs.max() + 1] > 250) & (lateral > 40)[None, None, :]
        if ribs.sum() > 5:
            assert varied
            n_ribs += 1
        # aorta: contrast-filled vessel in front of L1-L3 (4-45 mm ahead of the bodies), left of
        # the midline (x to the patient's left); a 3-voxel mean keeps noise and plaques out
        zs = np.nonzero(np.isin(labels, [20, 21, 22]).any(axis=(1, 2)))[0]
        front = np.nonzero(np.isin(labels, [20, 21, 22]))[1].min()
        win = np.zeros(ct.shape, dtype=bool)
        win[
            zs.min() : zs.max() + 1, max(0, front - int(45 / sy)) : front - int(np.ceil(4 / sy))
        ] = 1
        vessel = win & (ndi.uniform_filter(ct.astype(np.float32), 3) > 130) & (labels == 0)
        if vessel.sum() > 500:
            assert varied and case.info["structures"]["aorta"]["contrast"]
            assert (np.nonzero(vessel)[2].mean() - x_mid) * sx > 5.0  # patient's left
            assert not frac[vessel].any()
            n_aorta += 1
    assert n_gas >= 3 and n_ribs >= len(variety_cases) - 1 and n_aorta >= 2, (
        n_gas,
        n_ribs,
        n_aorta,
    )


def test_variety_fractures_reduce_height_as_before(variety_cases, small_cases):
    n_frac = 0
    for seed, case in zip(VARIETY_SEEDS, variety_cases, strict=True):
        _, labels, _, sp = canonical(case)
        for vid in IDS:
            r = ratio(labels, vid, sp[0])
            grade = case.meta[vid]["grade"]
            if grade:
                n_frac += 1
                assert r < 0.8, (seed, vid, grade, case.meta[vid])
            else:
                assert r > 0.85, (seed, vid, case.meta[vid])  # intact stays intact
            assert abs(r - case.meta[vid]["height_ratio"]) < 0.03
            loss = 1 - r + 1e-9  # e.g. 9 of 12 voxels: exactly 25 % loss, grade 2
            expected = 3 if loss >= 0.4 else 2 if loss >= 0.25 else 1 if loss >= 0.2 else 0
            assert grade == expected, (seed, vid, r, case.meta[vid])
        if seed < len(small_cases):  # the same vertebrae break as at variety 0
            standard = small_cases[seed]
            assert {v for v in IDS if case.meta[v]["grade"]} == {
                v for v in IDS if standard.meta[v]["grade"]
            }
    assert n_frac >= len(variety_cases)


def test_variety_refused_out_of_range_by_the_pipeline(tmp_path):
    from vfsearch.pipelines import synth

    with pytest.raises(UserError, match="--variety"):
        synth.synth_dataset(
            tmp_path / "v", cases=1, seed=0, spacing=None, small=True, fracture_rate=0.2, variety=2
        )
    assert not (tmp_path / "v").exists()


def test_cli_synth_variety_out_of_range_is_one_line_exit_2(tmp_path):
    runner = CliRunner()
    for args in (
        ["--variety", "1.5"],
        ["--variety", "-0.5"],
        ["--variety", "0.5", "--background", str(tmp_path / "ct.nii.gz")],
    ):
        bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--small", *args])
        assert bad.exit_code == 2, (args, bad.output)
        lines = bad.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), bad.output
        assert "--variety" in lines[0]
        assert not (tmp_path / "bad").exists()


@pytest.mark.integration
def test_cli_synth_variety_writes_varied_cases(tmp_path):
    result = CliRunner().invoke(
        app, ["synth", str(tmp_path / "v"), "--cases", "2", "--small", "--variety", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "spacing drawn per case (variety 1)" in result.output
    metas = [
        json.loads((tmp_path / "v" / c / "meta.json").read_text())
        for c in ("synth_000", "synth_001")
    ]
    assert all(m["variety"] == 1.0 and m["structures"]["ribs"] > 0 for m in metas)
    assert metas[0]["spacing"] != metas[1]["spacing"]


# --------------------------------------------------------------------------------------------
# synth_dataset: files, manifest, determinism
# --------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.integration
def test_synth_dataset_writes_deterministic_cases(tmp_path):
    from vfsearch.adapters.volumes import read_volume
    from vfsearch.pipelines import synth

    summary = synth.synth_dataset(
        tmp_path / "a", cases=2, seed=3, spacing=None, small=True, fracture_rate=0.22
    )
    assert "2 synthetic case" in summary and "\n" not in summary
    synth.synth_dataset(
        tmp_path / "b", cases=2, seed=3, spacing=None, small=True, fracture_rate=0.22
    )
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == {"manifest.csv"} | {
        f"synth_00{k}/{f}" for k in range(2) for f in synth.CASE_FILES
    }
    assert a == b  # same seed, same bytes
    # case k does not depend on --cases; another seed gives another case
    synth.synth_dataset(
        tmp_path / "c", cases=1, seed=3, spacing=None, small=True, fracture_rate=0.22
    )
    c = _files(tmp_path / "c")
    assert all(c[f"synth_000/{f}"] == a[f"synth_000/{f}"] for f in synth.CASE_FILES)
    synth.synth_dataset(
        tmp_path / "d", cases=1, seed=4, spacing=None, small=True, fracture_rate=0.22
    )
    assert _files(tmp_path / "d")["synth_000/ct.nii.gz"] != a["synth_000/ct.nii.gz"]

    rows = list(csv.DictReader((tmp_path / "a" / "manifest.csv").open()))
    assert list(rows[0]) == ["case_id", "ct", "vertebrae", "fracture", "grades"]
    assert [r["case_id"] for r in rows] == ["synth_000", "synth_001"]
    meta = json.loads((tmp_path / "a" / "synth_001" / "meta.json").read_text())
    grades = dict(item.split(":") for item in rows[1]["grades"].split(";"))
    assert grades == {k: str(v["grade"]) for k, v in meta["vertebrae"].items()}
    assert set(grades) == {str(v) for v in IDS}
    ct = read_volume(tmp_path / "a" / rows[1]["ct"])
    case = phantom.make_case(phantom.case_rng(3, 1), small=True)
    assert np.array_equal(ct.array, case.ct) and ct.geometry == case.geometry
    frac = read_volume(tmp_path / "a" / rows[1]["fracture"]).array
    assert np.array_equal(frac, case.fracture)


@pytest.mark.integration
def test_synth_dataset_refuses_foreign_folder_and_replaces_own(tmp_path):
    from vfsearch.pipelines import synth

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        synth.synth_dataset(foreign, cases=1, seed=0, spacing=None, small=True, fracture_rate=0.2)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    out = tmp_path / "own"
    synth.synth_dataset(out, cases=2, seed=0, spacing=None, small=True, fracture_rate=0.2)
    synth.synth_dataset(out, cases=1, seed=0, spacing=None, small=True, fracture_rate=0.2)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "synth_000"]
    with pytest.raises(UserError, match="cases"):
        synth.synth_dataset(
            tmp_path / "x", cases=0, seed=0, spacing=None, small=True, fracture_rate=0.2
        )
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# fractures simulated on real scans
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "sample,labels_file,scheme,spec,vid",
    [
        ("tptbox_l3", "vertebrae_verse.nii.gz", "verse", "22:2:wedge", 22),
        ("totalseg_abdomen", "vertebrae_totalseg.nii.gz", "totalsegmentator", "L1:3:crush", 20),
    ],
)
def test_synth_on_background_real_scans(
    real_data, tmp_path, sample, labels_file, scheme, spec, vid
):
    from vfsearch.adapters.volumes import read_volume
    from vfsearch.core.labels import to_verse
    from vfsearch.pipelines import synth

    src_ct = read_volume(real_data / sample / "ct.nii.gz")
    src_lab = read_volume(real_data / sample / labels_file)
    out = tmp_path / "out"
    summary = synth.synth_on_background(
        real_data / sample / "ct.nii.gz",
        real_data / sample / labels_file,
        out,
        fracture=spec,
        seed=0,
        label_scheme=scheme,
    )
    assert "\n" not in summary
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 1 and f"{vid}:" in rows[0]["grades"]
    ct = read_volume(out / rows[0]["ct"])
    lab = read_volume(out / rows[0]["vertebrae"])
    frac = read_volume(out / rows[0]["fracture"])
    for vol in (ct, lab, frac):
        assert vol.shape == src_ct.shape and vol.geometry == src_ct.geometry
    assert ct.array.dtype == src_ct.array.dtype
    assert frac.array.any() and set(np.unique(lab.array[frac.array > 0])) == {vid}
    # the chosen body got shorter (measured here, in canonical orientation)
    _, geom, ro = to_canonical(src_ct.array, src_ct.geometry)
    sz = geom.spacing[2]
    before = heights(ro.apply(to_verse(src_lab.array, scheme)), vid, sz)
    after_labels = ro.apply(lab.array)
    after = heights(after_labels, vid, sz)
    assert ratio(after_labels, vid, sz) < 0.8
    assert max(1 - a / b for a, b in zip(after, before, strict=False)) >= 0.2, (before, after)
    # the CT changed only around the chosen vertebra
    changed = np.nonzero(ct.array != src_ct.array)
    near = ro.undo(ndi.binary_dilation(ro.apply(src_lab.array) > 0, iterations=5))
    assert near[changed].all()
    meta = json.loads((out / rows[0]["ct"]).parent.joinpath("meta.json").read_text())
    assert meta["vertebrae"][str(vid)]["grade"] >= 1


@pytest.mark.integration
def test_synth_on_background_errors(real_data, tmp_path):
    from vfsearch.pipelines import synth

    tpt, tot = real_data / "tptbox_l3", real_data / "totalseg_abdomen"
    cases = [
        (tpt / "ct.nii.gz", tot / "vertebrae_totalseg.nii.gz", "22:2", "verse", "does not match"),
        (tpt / "ct.nii.gz", tpt / "vertebrae_verse.nii.gz", "X9:2", "verse", "unknown vertebra"),
        (tpt / "ct.nii.gz", tpt / "vertebrae_verse.nii.gz", "T4:2", "verse", "not in"),
        (tpt / "ct.nii.gz", tpt / "vertebrae_verse.nii.gz", "22:5", "verse", "grade"),
        (
            tpt / "ct.nii.gz",
            tpt / "vertebrae_verse.nii.gz",
            None,
            "totalsegmentator",
            "no vertebra T4..L5",
        ),
        (tpt / "missing.nii.gz", tpt / "vertebrae_verse.nii.gz", None, "verse", "not found"),
    ]
    for ct, labels, spec, scheme, message in cases:
        with pytest.raises(UserError, match=message):
            synth.synth_on_background(
                ct, labels, tmp_path / "o", fracture=spec, seed=0, label_scheme=scheme
            )
        assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# variants from a folder or manifest of real healthy scans; vertebrae cut by the scan's edge
# --------------------------------------------------------------------------------------------

REAL_SCANS = {  # scan name -> (label file, scheme, vertebrae cut by the scan's edge)
    "tptbox_l3": ("vertebrae_verse.nii.gz", "verse", {21, 23}),
    "totalseg_abdomen": ("vertebrae_totalseg.nii.gz", "totalsegmentator", {18, 19}),
}


def _scan_source(real_data: Path, tmp_path: Path, kind: str) -> Path:
    """A folder (symlinks to the real files, never copies) or a manifest CSV of both scans."""
    if kind == "folder":
        root = tmp_path / "scans"
        for scan, (labels_file, _, _) in REAL_SCANS.items():
            (root / scan).mkdir(parents=True)
            (root / scan / "ct.nii.gz").symlink_to(real_data / scan / "ct.nii.gz")
            (root / scan / labels_file).symlink_to(real_data / scan / labels_file)
        (root / "notes").mkdir()  # a subfolder without ct.* is not a scan
        return root
    manifest = tmp_path / "lists" / "scans.csv"
    manifest.parent.mkdir()
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "ct", "vertebrae", "label_scheme"])
        for scan, (labels_file, scheme, _) in REAL_SCANS.items():  # paths relative to the CSV
            w.writerow(
                [
                    scan,
                    *(
                        os.path.relpath(real_data / scan / f, manifest.parent)
                        for f in ("ct.nii.gz", labels_file)
                    ),
                    "" if scheme == "verse" else scheme,
                ]
            )  # empty: --label-scheme
    return manifest


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["manifest", "folder"])
def test_synth_background_variants_from_many_scans(real_data, tmp_path, kind):
    from vfsearch.adapters.store import Store
    from vfsearch.adapters.volumes import read_volume
    from vfsearch.core.labels import to_verse
    from vfsearch.pipelines import synth
    from vfsearch.pipelines.ingest import ingest

    src = _scan_source(real_data, tmp_path, kind)
    warnings: list[str] = []
    summary = synth.synth_on_background(
        src,
        None,
        tmp_path / "a",
        fracture=None,
        seed=5,
        label_scheme="verse",
        variants=3,
        warn=warnings.append,
    )
    assert "\n" not in summary and "6 case(s) from 2 scan(s)" in summary, summary
    # one warning line per scan names the vertebrae cut by its edge
    assert len(warnings) == 2 and all("cut by the scan's edge" in w for w in warnings)
    assert any("L2, L4" in w for w in warnings) and any("T11, T12" in w for w in warnings)

    rows = list(csv.DictReader((tmp_path / "a" / "manifest.csv").open()))
    assert list(rows[0]) == ["case_id", "ct", "vertebrae", "fracture", "grades", "subject"]
    expected = {f"{scan}_v{k:03d}": scan for scan in REAL_SCANS for k in range(3)}
    assert {r["case_id"]: r["subject"] for r in rows} == expected
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(["manifest.csv", *expected])
    n_fractured = 0
    for r in rows:
        scan = r["subject"]
        labels_file, scheme, cut = REAL_SCANS[scan]
        src_ct = read_volume(real_data / scan / "ct.nii.gz")
        src_lab = to_verse(read_volume(real_data / scan / labels_file).array, scheme)
        ct = read_volume(tmp_path / "a" / r["ct"])
        lab = read_volume(tmp_path / "a" / r["vertebrae"])
        frac = read_volume(tmp_path / "a" / r["fracture"])
        for vol in (ct, lab, frac):
            assert vol.shape == src_ct.shape and vol.geometry == src_ct.geometry
        assert ct.array.dtype == src_ct.array.dtype
        grades = {int(k): int(g) for k, g in (i.split(":") for i in r["grades"].split(";"))}
        assert set(grades) == {int(v) for v in np.unique(src_lab) if v}
        fractured = {v for v, g in grades.items() if g}
        assert len(fractured) <= 3 and not fractured & cut  # never a vertebra cut by the edge
        assert set(np.unique(lab.array[frac.array > 0])) == fractured
        if not fractured:  # an intact variant is the scan itself
            assert np.array_equal(ct.array, src_ct.array) and not frac.array.any()
        meta = json.loads((tmp_path / "a" / r["case_id"] / "meta.json").read_text())
        assert meta["subject"] == meta["scan"] == scan
        assert {int(v) for v, m in meta["vertebrae"].items() if m["cut_by_edge"]} == cut
        for v in fractured:
            m = meta["vertebrae"][str(v)]
            assert m["morphology"] in phantom.MORPHOLOGIES and 180 <= m["band_hu"] <= 320
        n_fractured += bool(fractured)
    assert n_fractured >= 3

    # same seed, same bytes; variant k does not depend on --variants; another seed differs
    synth.synth_on_background(
        src,
        None,
        tmp_path / "b",
        fracture=None,
        seed=5,
        label_scheme="verse",
        variants=3,
        warn=lambda _: None,
    )
    a = _files(tmp_path / "a")
    assert _files(tmp_path / "b") == a
    synth.synth_on_background(
        src,
        None,
        tmp_path / "c",
        fracture=None,
        seed=5,
        label_scheme="verse",
        variants=1,
        warn=lambda _: None,
    )
    c = _files(tmp_path / "c")
    assert {k: v for k, v in c.items() if k != "manifest.csv"} == {
        k: v for k, v in a.items() if "_v000/" in k
    }
    synth.synth_on_background(
        src,
        None,
        tmp_path / "d",
        fracture=None,
        seed=6,
        label_scheme="verse",
        variants=3,
        warn=lambda _: None,
    )
    d = _files(tmp_path / "d")
    assert any(d[k] != a[k] for k in a if k.endswith("fracture.nii.gz"))

    # ingestable; a scan's variants share one split (the manifest's subject column)
    ingest(
        tmp_path / "a",
        tmp_path / "s.zarr",
        spacing=(3.0, 3.0, 3.0),
        margin_mm=6.0,
        split=(0.5, 0.5, 0.0),
        seed=0,
    )
    store = Store(tmp_path / "s.zarr")
    assert sorted(store.case_ids()) == sorted(expected)
    assert store.meta["subjects"] == expected
    splits = store.meta["splits"]
    per_scan = {scan: {splits[c] for c, s in expected.items() if s == scan} for scan in REAL_SCANS}
    assert all(len(v) == 1 for v in per_scan.values()), per_scan
    assert {store.case_attrs(c)["subject"] for c in store.case_ids()} == set(REAL_SCANS)


def test_draw_fractures_share_grades_and_morphologies():
    from vfsearch.pipelines import synth

    draws = [
        synth.draw_fractures(synth.variant_rng(0, "scan", k), [20, 21, 22, 23, 24])
        for k in range(600)
    ]
    none = np.mean([not d for d in draws])
    assert 0.15 <= none <= 0.25  # some variants show intact vertebrae only
    sizes = {len(d) for d in draws if d}
    assert sizes == {1, 2, 3}
    assert {g for d in draws for g, _ in d.values()} == {1, 2, 3}
    assert {m for d in draws for _, m in d.values()} == set(phantom.MORPHOLOGIES)
    assert all(set(d) <= {20, 21, 22, 23, 24} for d in draws)
    assert synth.draw_fractures(synth.variant_rng(0, "scan", 1), [22]) in (
        {},
        *({22: (g, m)} for g in (1, 2, 3) for m in phantom.MORPHOLOGIES),
    )


@pytest.mark.integration
def test_synth_background_source_errors(real_data, tmp_path):
    from vfsearch.pipelines import synth

    def run(src, **kw):
        args = {"fracture": None, "seed": 0, "label_scheme": "verse", "variants": 2, **kw}
        return synth.synth_on_background(src, None, tmp_path / "o", **args)

    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    two = tmp_path / "two"
    (two / "s").mkdir(parents=True)
    for f in ("ct.nii.gz", "vertebrae_a.nii.gz", "vertebrae_b.nii.gz"):
        (two / "s" / f).symlink_to(real_data / "tptbox_l3" / "ct.nii.gz")
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,ct\nx,ct.nii.gz\n")
    scheme = tmp_path / "scheme.csv"
    scheme.write_text("case_id,ct,vertebrae,label_scheme\nx,a.nii.gz,b.nii.gz,nnunet\n")
    for src, message in (
        (empty, "no scans found"),
        (two, "expected one vertebrae"),
        (bad, "lacks column"),
        (scheme, "label_scheme 'nnunet'"),
        (tmp_path / "nope", "not found"),
        (real_data / "tptbox_l3" / "ct.nii.gz", "--vertebrae: required"),
    ):
        with pytest.raises(UserError, match=message):
            run(src)
        assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="--variants"):
        run(empty, variants=0)


@pytest.mark.integration
@pytest.mark.parametrize(
    "sample,labels_file,scheme,spec,vertebra",
    [
        ("tptbox_l3", "vertebrae_verse.nii.gz", "verse", "L4:2:crush", "L4"),  # README: partial
        ("tptbox_l3", "vertebrae_verse.nii.gz", "verse", "22:1,21:3:wedge", "L2"),
        ("totalseg_abdomen", "vertebrae_totalseg.nii.gz", "totalsegmentator", "T12:3:crush", "T12"),
    ],
)
def test_cli_refuses_a_vertebra_cut_by_the_scan_edge(
    real_data, tmp_path, sample, labels_file, scheme, spec, vertebra
):
    from vfsearch.adapters.volumes import read_volume
    from vfsearch.core.labels import to_verse, verse_id

    # the test's own check: the vertebra's label reaches the first or last canonical z slice
    ct = read_volume(real_data / sample / "ct.nii.gz")
    labels = to_verse(read_volume(real_data / sample / labels_file).array, scheme)
    labels_c = to_canonical(labels, ct.geometry)[2].apply(labels)
    zs = np.nonzero((labels_c == verse_id(vertebra)).any(axis=(1, 2)))[0]
    assert zs[0] == 0 or zs[-1] == labels_c.shape[0] - 1
    result = CliRunner().invoke(
        app,
        [
            "synth",
            str(tmp_path / "o"),
            "--background",
            str(real_data / sample / "ct.nii.gz"),
            "--vertebrae",
            str(real_data / sample / labels_file),
            "--label-scheme",
            scheme,
            "--fracture",
            spec,
        ],
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert f"{vertebra} (" in lines[0] and "cut by the scan's edge" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_a_cropped_scan_cutting_l3_is_refused(real_data, tmp_path):
    """The real tptbox scan cropped to 30 slices so that L3 reaches the top slice."""
    from vfsearch.adapters.volumes import read_volume, write_volume
    from vfsearch.pipelines import synth

    src = real_data / "tptbox_l3"
    ct = read_volume(src / "ct.nii.gz")
    lab = read_volume(src / "vertebrae_verse.nii.gz")
    ct_c, geom_c, ro = to_canonical(ct.array, ct.geometry)
    lab_c = ro.apply(lab.array)
    assert (lab_c[29] == 22).any() and (lab_c[:29] == 22).any()  # L3 spans slice 29
    crop = tmp_path / "crop"
    crop.mkdir()
    write_volume(crop / "ct.nii.gz", np.ascontiguousarray(ct_c[:30]), geom_c)
    write_volume(crop / "vertebrae.nii.gz", np.ascontiguousarray(lab_c[:30]), geom_c)
    # the full scan takes a grade-3 crush of L3; the cropped one refuses it
    synth.synth_on_background(
        src / "ct.nii.gz",
        src / "vertebrae_verse.nii.gz",
        tmp_path / "full",
        fracture="L3:3:crush",
        seed=0,
        label_scheme="verse",
    )
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "synth",
            str(tmp_path / "o"),
            "--background",
            str(crop / "ct.nii.gz"),
            "--vertebrae",
            str(crop / "vertebrae.nii.gz"),
            "--fracture",
            "L3:3:crush",
        ],
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "L3 (22) is cut by the scan's edge" in result.output
    assert not (tmp_path / "o").exists()
    # drawn at random: every vertebra of the crop is cut, so nothing can be fractured
    with pytest.raises(UserError, match="no scan has a fully imaged vertebra"):
        synth.synth_on_background(
            crop / "ct.nii.gz",
            crop / "vertebrae.nii.gz",
            tmp_path / "o",
            fracture=None,
            seed=0,
            label_scheme="verse",
            variants=2,
            warn=lambda _: None,
        )
    assert not (tmp_path / "o").exists()
    # the simulation itself refuses a cut vertebra too (canonical arrays and spacing)
    with pytest.raises(UserError, match="cut by the scan's edge"):
        phantom.simulate_fractures(
            ct_c[:30],
            lab_c[:30],
            tuple(geom_c.spacing[::-1]),
            {22: (2, "wedge")},
            np.random.default_rng(0),
        )


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def test_cli_synth_help():
    result = CliRunner().invoke(app, ["synth", "--help"])
    assert result.exit_code == 0
    for option in (
        "--cases",
        "--seed",
        "--spacing",
        "--small",
        "--background",
        "--fracture",
        "--variants",
        "--variety",
    ):
        assert option in result.output


@pytest.mark.integration
def test_cli_synth_small_run_and_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["synth", str(tmp_path / "s"), "--cases", "1", "--small", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "manifest.csv").is_file()
    assert (tmp_path / "s" / "synth_000" / "fracture.nii.gz").is_file()
    for args in (
        ["--spacing", "1,2"],
        ["--fracture-rate", "1.5"],
        [
            "--background",
            str(tmp_path / "nope.nii.gz"),
            "--vertebrae",
            str(tmp_path / "nope2.nii.gz"),
        ],
        ["--background", str(tmp_path), "--fracture", "L1:2", "--variants", "3"],
        ["--background", str(tmp_path), "--variants", "0"],
        ["--variants", "2"],
    ):
        bad = runner.invoke(app, ["synth", str(tmp_path / "bad"), "--small", *args])
        assert bad.exit_code == 2, (args, bad.output)
        lines = bad.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), bad.output
        assert not (tmp_path / "bad").exists()
