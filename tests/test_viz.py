"""Pictures and meshes (`vfsearch.adapters.plots`, `vfsearch.adapters.meshes`,
`vfsearch.pipelines.visualize`).

A test double that "segments" the voxels the test CT marks as fracture (3000 HU) stands in for
a model, so the heatmap must sit on the ground truth; its attention maps are the marked
voxels pooled per gate level. The case is a cropped small phantom stored with anisotropic
spacing and flipped axes, read and written through real SimpleITK I/O.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfsearch.adapters import meshes as meshes
from vfsearch.adapters import plots as viz
from vfsearch.adapters import volumes as io
from vfsearch.core.config import Config, DataConfig, ModelConfig
from vfsearch.core.geometry import Geometry
from vfsearch.core.inference import LoadedModel

torch.set_num_threads(1)  # 2-core machine shared with other test runs

MARK_HU = 3000
FINGERPRINT = {"p0_5": -1024.0, "p99_5": 3071.0, "mean": 0.0, "std": 1000.0}
SPACING = (1.6, 2.0, 2.5)  # x, y, z mm: anisotropic on purpose
LEVELS = 3


class GroundTruthStandIn(torch.nn.Module):
    """Test double with the segmenter's seams: logits high exactly on the marked voxels,
    attention level ``l`` = the marked share of each 2**l x 2**l block."""

    output_kind = "segmentation"

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @staticmethod
    def _attention(x):  # (B, 1, H, W) -> [(B, 1, H / 2**l, W / 2**l)]
        marked = (x > 2.5).float()
        return [F.avg_pool2d(marked, 2**lv) if lv else marked for lv in range(LEVELS)]

    def encode(self, slices):  # (N, 1, H, W)
        return slices, [slices]

    def forward_features(self, bottlenecks, skips):
        return {"logits": (skips[0] - 2.5) * 50.0, "attention": self._attention(skips[0])}

    def forward(self, window):  # (B, T, H, W)
        centre = window[:, window.shape[1] // 2 :][:, :1]
        return {"logits": (centre - 2.5) * 50.0, "attention": self._attention(centre)}


def _stand_in(spacing=SPACING) -> LoadedModel:
    config = Config(
        model=ModelConfig(depth=LEVELS), data=DataConfig(seq_len=3, plane="sagittal", patch_size=32)
    )
    return LoadedModel(
        GroundTruthStandIn().eval(),
        config,
        FINGERPRINT,
        tuple(spacing),
        4.0,
        source="ground-truth stand-in",
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Canonical phantom arrays (a few vertebrae around the fracture) stored flipped in x and
    y (direction diag(-1, -1, 1)) with anisotropic spacing; fracture voxels marked 3000 HU."""
    from vfsearch.core.geometry import to_canonical
    from vfsearch.core.phantom import make_case

    ph = make_case(0, small=True)
    ct = to_canonical(ph.ct, ph.geometry)[0]
    lab = to_canonical(ph.vertebrae, ph.geometry)[0]
    frac = to_canonical(ph.fracture, ph.geometry)[0]
    z = np.flatnonzero(frac.any(axis=(1, 2)))
    zs = slice(max(int(z.mean()) - 30, 0), int(z.mean()) + 30)
    ct, lab, frac = ct[zs], lab[zs], frac[zs]
    ct = np.where(frac > 0, MARK_HU, np.minimum(ct, 2000)).astype(np.int16)
    cut = np.union1d(np.unique(lab[0]), np.unique(lab[-1]))
    lab = np.where(np.isin(lab, cut), 0, lab).astype(np.uint8)  # whole vertebrae only
    assert len(np.unique(lab)) >= 3
    canon = {"ct": ct, "vertebrae": lab, "fracture": frac}
    geom = Geometry(SPACING, (40.0, -12.5, 300.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    folder = tmp_path_factory.mktemp("viz_case")
    paths = {
        k: io.write_volume(folder / f"{k}.nii.gz", np.ascontiguousarray(a[:, ::-1, ::-1]), geom)
        for k, a in canon.items()
    }
    return {"paths": paths, "canon": canon, "folder": folder}


@pytest.fixture(scope="module")
def rendered(case, tmp_path_factory):
    """`visualize` of the case with the stand-in: every picture, mesh and the HTML view."""
    from vfsearch.pipelines.visualize import visualize

    out = tmp_path_factory.mktemp("viz_out")
    p = case["paths"]
    summary = visualize(
        out,
        model=_stand_in(),
        ct=p["ct"],
        vertebrae=p["vertebrae"],
        fracture=p["fracture"],
        html=True,
    )
    return out, summary


@pytest.fixture(scope="module")
def view(case):
    from vfsearch.pipelines.visualize import view_from_files

    p = case["paths"]
    return view_from_files(_stand_in(), p["ct"], p["vertebrae"], fracture=p["fracture"])


# -- readers that share no code with the writers ----------------------------------------------
def read_ply(path: Path) -> dict:
    """Binary little-endian PLY with float/uchar vertex properties and int triangle lists."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and "binary_little_endian" in header[1]
    n_vert = n_face = 0
    props, element = [], None
    for line in header:
        parts = line.split()
        if parts[:1] == ["element"]:
            element = parts[1]
            if element == "vertex":
                n_vert = int(parts[2])
            else:
                n_face = int(parts[2])
        elif parts[:1] == ["property"] and element == "vertex":
            props.append((parts[2], {"float": "<f4", "uchar": "u1"}[parts[1]]))
    vert = np.frombuffer(data, dtype=np.dtype(props), count=n_vert, offset=end)
    off = end + vert.nbytes
    faces = []
    for _ in range(n_face):
        (k,) = struct.unpack_from("<B", data, off)
        faces.append(struct.unpack_from(f"<{k}i", data, off + 1))
        off += 1 + 4 * k
    assert off == len(data), "trailing bytes"
    xyz = np.stack([vert["x"], vert["y"], vert["z"]], axis=1)
    return {
        "xyz": xyz,
        "faces": np.array(faces, dtype=np.int64).reshape(-1, 3),
        "vert": vert,
        "header": header,
    }


def read_stl(path: Path) -> np.ndarray:
    """Binary STL -> triangles (m, 3, 3)."""
    data = path.read_bytes()
    (m,) = struct.unpack_from("<I", data, 80)
    assert len(data) == 84 + 50 * m
    tris = [struct.unpack_from("<9f", data, 84 + 50 * i + 12) for i in range(m)]
    return np.array(tris, dtype=np.float64).reshape(m, 3, 3)


def count_components(faces: np.ndarray) -> int:
    """Union-find over triangle edges."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b, c in faces.tolist():
        for u, v in ((a, b), (b, c)):
            ru, rv = find(u), find(v)
            if ru != rv:
                parent[ru] = rv
    return len({find(v) for v in np.unique(faces).tolist()})


def stl_components(tris: np.ndarray) -> int:
    """Components of an STL triangle soup: vertices welded by exact coordinates."""
    _, idx = np.unique(tris.reshape(-1, 3), axis=0, return_inverse=True)
    return count_components(idx.reshape(-1, 3))


# -- pictures -------------------------------------------------------------------------------------
@pytest.mark.integration
def test_every_picture_written_at_its_stated_size(rendered, monkeypatch):
    import matplotlib.image as mpimg

    out, summary = rendered
    pictures = summary["pictures"]
    names = {Path(p).name for p in pictures}
    assert {"heatmap_case.png", "attention_case.png", "render_3d.png"} <= names
    n = len(summary["findings"])
    assert n >= 1 and all(f["true"] and f["predicted"] for f in summary["findings"])
    per_vertebra = [f"heatmap_{f['name']}.png" for f in summary["findings"]]
    assert set(per_vertebra) <= names
    expected = {
        "heatmap_case.png": viz.montage_size(n, 3),
        "render_3d.png": (4 * 380, 460),
        "attention_case.png": viz.montage_size(n, 1 + LEVELS),
    }
    for f in summary["findings"]:
        expected[f"heatmap_{f['name']}.png"] = viz.montage_size(1, 3)
        expected[f"attention_{f['name']}.png"] = viz.montage_size(1, 1 + LEVELS)
    for path, size in pictures.items():
        p = Path(path)
        assert p.is_file() and p.stat().st_size > 5000, p
        assert viz.png_size(p) == tuple(size) == expected[p.name], p.name
        pixels = mpimg.imread(p)
        assert pixels.std() > 0.05, f"{p.name} is blank"
    listed = json.loads((out / "pictures.json").read_text())
    assert listed["pictures"] == {k: list(v) for k, v in pictures.items()}
    html = (out / "view_3d.html").read_text()
    assert "<script src" not in html and '"f": [' in html  # self-contained, mesh embedded


@pytest.mark.integration
def test_hottest_region_lies_inside_the_true_fracture(view):
    from vfsearch.pipelines.visualize import _heat_row, findings

    found = findings(view)
    assert found
    for f in found:
        region = tuple(slice(a, b) for a, b in zip(*f.box, strict=False))
        truth = np.zeros_like(view.truth)
        truth[region] = view.truth[region]
        idx = np.argwhere(truth)
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        assert np.all(lo <= f.focus) and np.all(np.asarray(f.focus) <= hi), (f, lo, hi)
        sx, sy, sz = view.geometry.spacing
        ox, oy, oz = view.geometry.origin
        # truth box in mm along each canonical axis (voxel edges)
        mm = {
            "x": (ox + lo[2] * sx - sx / 2, ox + hi[2] * sx + sx / 2),
            "y": (oy + lo[1] * sy - sy / 2, oy + hi[1] * sy + sy / 2),
            "z": (oz + lo[0] * sz - sz / 2, oz + hi[0] * sz + sz / 2),
        }
        axes = {"sagittal": ("y", "z"), "coronal": ("x", "z"), "axial": ("x", "y")}
        for panel in _heat_row(view, f):
            plane = panel.title.split()[1]
            ov = panel.overlay
            rows, cols = np.nonzero(ov >= 0.9 * ov.max())
            left, right, bottom, top = panel.extent
            # pixel centre -> mm through the panel's own extent and origin
            u = left + (cols.mean() + 0.5) * (right - left) / ov.shape[1]
            frac = (rows.mean() + 0.5) / ov.shape[0]
            v = (
                bottom + frac * (top - bottom)
                if panel.origin == "lower"
                else top + frac * (bottom - top)
            )
            (ua, va) = axes[plane]
            assert mm[ua][0] <= u <= mm[ua][1], (plane, ua, u, mm[ua])
            assert mm[va][0] <= v <= mm[va][1], (plane, va, v, mm[va])


@pytest.mark.integration
def test_panels_are_physical_and_superior_up(view):
    """Extents are the anisotropic voxel sizes in mm; sagittal/coronal rows run inferior to
    superior with origin 'lower' (superior up); axial rows run anterior to posterior, drawn
    from the top."""
    nz, ny, nx = view.ct.shape
    sx, sy, sz = view.geometry.spacing
    assert (sx, sy, sz) == pytest.approx(SPACING)
    centre = (nz // 2, ny // 2, nx // 2)
    sag, ax, cor = viz.ortho_panels(
        view.ct, view.prob, None, view.geometry.spacing, view.geometry.origin, centre
    )
    assert sag.ct.shape == (nz, ny) and sag.origin == "lower"
    assert sag.extent[1] - sag.extent[0] == pytest.approx(ny * sy)
    assert sag.extent[3] - sag.extent[2] == pytest.approx(nz * sz)  # z grows upward
    assert cor.ct.shape == (nz, nx) and cor.origin == "lower"
    assert cor.extent[1] - cor.extent[0] == pytest.approx(nx * sx)
    assert ax.ct.shape == (ny, nx) and ax.origin == "upper"
    assert ax.extent[2] - ax.extent[3] == pytest.approx(ny * sy)  # bottom = posterior
    # superior really is high z: the upper vertebra of the case has the higher label rows
    lab = view.labels[:, :, nx // 2]
    ids = sorted(int(v) for v in np.unique(lab) if v)
    z_of = {v: np.argwhere(lab == v)[:, 0].mean() for v in ids}
    assert z_of[ids[0]] > z_of[ids[-1]]  # VerSe ids grow caudally (T4=11 ... L5=24)


# -- meshes --------------------------------------------------------------------------------------
@pytest.mark.integration
def test_meshes_load_back_with_expected_components(rendered, view):
    from scipy import ndimage

    out = rendered[0]
    ids = [int(v) for v in np.unique(view.labels) if v]
    for vid in ids:  # each vertebra is one solid piece, so one closed surface each
        assert ndimage.label(view.labels == vid)[1] == 1
    spine = read_ply(out / "spine.ply")
    assert "comment SPACE=LPS" in spine["header"]
    assert count_components(spine["faces"]) == len(ids)
    assert sorted(np.unique(spine["vert"]["vertebra"]).astype(int).tolist()) == ids
    tris = read_stl(out / "spine.stl")
    assert len(tris) == len(spine["faces"])
    assert stl_components(tris) == len(ids)
    # vertices are physical mm: the mesh spans the labelled voxels' physical box
    idx = np.argwhere(view.labels > 0)
    corners = view.geometry.zyx_to_physical(np.stack([idx.min(0), idx.max(0)]).astype(float))
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    tol = np.asarray(view.geometry.spacing)
    assert np.all(np.abs(spine["xyz"].min(axis=0) - lo) <= tol)
    assert np.all(np.abs(spine["xyz"].max(axis=0) - hi) <= tol)

    n_true = ndimage.label(view.truth)[1]
    frac = read_ply(out / "fracture.ply")
    assert count_components(frac["faces"]) == n_true >= 1
    assert np.all(frac["vert"]["probability"] >= view.threshold)
    assert stl_components(read_stl(out / "fracture.stl")) == n_true
    assert stl_components(read_stl(out / "truth.stl")) == n_true


def test_label_surfaces_one_component_per_piece(tmp_path):
    """Three labels, one of them in two separate pieces, one with a cavity (filled)."""
    labels = np.zeros((20, 24, 30), np.uint8)
    labels[2:8, 3:10, 3:12] = 1
    labels[2:8, 14:20, 3:12] = 2
    labels[12:18, 3:10, 18:27] = 2  # second piece of label 2
    labels[11:19, 12:22, 4:14] = 3
    labels[13:16, 15:18, 7:10] = 0  # cavity inside label 3: no inner surface
    geom = Geometry((0.7, 1.3, 3.0), (-5.0, 7.0, 100.0))
    m = meshes.label_surfaces(labels, geom)
    assert meshes.components(m.faces, len(m.vertices)) == 4
    meshes.write_ply(tmp_path / "m.ply", m, value_name="vertebra")
    meshes.write_stl(tmp_path / "m.stl", m)
    back = read_ply(tmp_path / "m.ply")
    assert count_components(back["faces"]) == 4
    np.testing.assert_allclose(back["xyz"], m.vertices, atol=1e-4)
    assert stl_components(read_stl(tmp_path / "m.stl")) == 4
    one = back["xyz"][back["vert"]["vertebra"] == 1]  # label 1 spans x 3..11, y 3..9, z 2..7
    lo = np.array([-5.0 + 3 * 0.7, 7.0 + 3 * 1.3, 100.0 + 2 * 3.0])
    hi = np.array([-5.0 + 11 * 0.7, 7.0 + 9 * 1.3, 100.0 + 7 * 3.0])
    assert np.all(np.abs(one.min(axis=0) - lo) <= np.array([0.7, 1.3, 3.0]))
    assert np.all(np.abs(one.max(axis=0) - hi) <= np.array([0.7, 1.3, 3.0]))


# -- command line, headless ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_cli_headless_with_a_real_checkpoint(case, tmp_path):
    """A real (untrained) Attention U-Net checkpoint through `vfsearch visualize`, with no
    display and an interactive backend requested: pictures still come out (Agg)."""
    from vfsearch.core.models import build_model

    config = Config(
        model=ModelConfig(depth=3, base_channels=4, temporal="lstm"),
        data=DataConfig(seq_len=3, plane="sagittal", patch_size=32),
    )
    torch.manual_seed(0)
    model = build_model(config.model, config.data.seq_len)
    ckpt = tmp_path / "best.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "config": config.flatten(),
            "fingerprint": FINGERPRINT,
            "spacing": list(SPACING),
            "margin_mm": 4.0,
            "threshold": 0.5,
        },
        ckpt,
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="TkAgg", OMP_NUM_THREADS="1")
    p = case["paths"]
    out = tmp_path / "pics"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfsearch",
            "visualize",
            str(p["ct"]),
            "--model",
            str(ckpt),
            "--vertebrae",
            str(p["vertebrae"]),
            "--fracture",
            str(p["fracture"]),
            "--out",
            str(out),
            "--threshold",
            "0.9",
        ],
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    listed = json.loads((out / "pictures.json").read_text())
    for path, size in listed["pictures"].items():
        assert viz.png_size(path) == tuple(size)
    # a real model has gates on 3 levels: the attention montage has 1 + 3 columns
    n = len(listed["findings"])
    assert viz.png_size(out / "attention_case.png") == viz.montage_size(n, 1 + 3)
    assert (out / "spine.stl").stat().st_size > 84


def test_cli_needs_a_ct_or_a_run(tmp_path):
    from typer.testing import CliRunner

    from vfsearch.cli import app

    res = CliRunner().invoke(app, ["visualize", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "give a CT" in res.output
    res = CliRunner().invoke(
        app, ["visualize", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "--model and --vertebrae" in res.output


# -- curves and MLflow ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_curves_and_sweep_plots_from_mlflow(mlflow_server, tmp_path):
    from vfsearch.adapters.tracking import Tracker
    from vfsearch.pipelines.visualize import curve_pictures, log_curves, run_history, sweep_data

    tracker = Tracker(mlflow_server)
    parent = tracker.start_run("viz-test", "sweep")
    kids = []
    for k, dice in enumerate(([0.1, 0.3, 0.5], [0.2, 0.25])):  # the second stopped early
        kid = tracker.start_run("viz-test", f"trial{k}", parent_run_id=parent)
        for epoch, d in enumerate(dice, start=1):
            tracker.log_metrics(kid, {"val_dice": d, "train_loss": 1 - d}, step=epoch)
        kids.append(kid)
    imp = tmp_path / "param_importances.json"
    imp.write_text(json.dumps({"model.depth": 0.7, "train.lr": 0.3}))
    tracker.log_artifact(parent, imp, "importances")

    hist = run_history(tracker, kids[1])
    assert sorted(hist["val_dice"]) == [(1.0, pytest.approx(0.2)), (2.0, pytest.approx(0.25))]
    trials, importances = sweep_data(tracker, parent)
    assert {k: [v for _, v in sorted(pts)] for k, pts in trials.items()} == {
        "trial0": pytest.approx([0.1, 0.3, 0.5]),
        "trial1": pytest.approx([0.2, 0.25]),
    }
    assert importances == {"model.depth": 0.7, "train.lr": 0.3}
    run = curve_pictures(tracker, kids[0], tmp_path / "run")
    assert len(run) == 1 and viz.png_size(run[0]) == (1200, 400)
    logged = log_curves(tracker, parent)  # a sweep's parent: budget and importances
    names = {a.path for a in tracker.client.list_artifacts(parent, "curves")}
    assert set(logged) == names == {"curves/budget.png", "curves/importances.png"}
    local = Path(tracker.client.download_artifacts(parent, "curves", str(tmp_path / "dl")))
    assert viz.png_size(local / "budget.png") == (800, 500)
    assert viz.png_size(local / "importances.png") == (700, 450)


@pytest.mark.integration
@pytest.mark.slow
def test_log_visualisations_of_a_store_case(mlflow_server, small_store):
    from vfsearch.adapters.store import Store
    from vfsearch.adapters.tracking import Tracker
    from vfsearch.pipelines.visualize import log_visualisations, pick_case

    tracker = Tracker(mlflow_server)
    run = tracker.start_run("viz-test", "trial-best")
    st = Store(small_store)
    cid = pick_case(st, "val")
    logged = log_visualisations(tracker, run, _stand_in((2.0, 2.0, 2.0)), st, split="val")
    assert logged
    folder = logged[0].rsplit("/", 1)[0]
    assert folder.startswith("visualisations/") and cid.replace("/", "_") in folder
    names = {Path(a.path).name for a in tracker.client.list_artifacts(run, folder)}
    assert {"heatmap_case.png", "render_3d.png", "spine.stl", "spine.ply", "pictures.json"} <= names
    assert names == {Path(p).name for p in logged}
