"""Pictures: heatmap / attention montages, headless 3D renderings and curves (matplotlib, Agg).

Adapter layer: matplotlib is imported inside the drawing functions and always with the
headless ``Agg`` backend, so no display is ever needed. Everything a picture shows arrives
as plain numpy arrays; which slices to cut and what to overlay is decided by
`vfsearch.pipelines.visualize`.

Orientation of the 2D views (arrays in vfsearch's canonical orientation: x to the patient's
left, y posterior, z superior):

* sagittal (a fixed x): superior up, anterior on the left;
* coronal (a fixed y): superior up, the patient's right on the viewer's left (radiological);
* axial (a fixed z): anterior up, the patient's right on the viewer's left (seen from the feet).

Axes are in millimetres (``extent`` from the voxel spacing, equal aspect), so anisotropic
voxels are drawn at their physical size. Every picture is written at exactly its stated
pixel size (``size`` = (width, height)); `png_size` reads it back.
"""

from __future__ import annotations

import importlib
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vfsearch.adapters.lazy import importer

BONE_WINDOW = (400.0, 1800.0)  # level, width (HU): -500 .. 1300 HU
DPI = 100
PANEL_PX = 300  # side of one 2D panel in a montage (axes, labels and title inside it)
COLORBAR_PX = 100
TITLE_PX = 50
PROB_CMAP = "jet"
ATTENTION_CMAP = "viridis"
PROB_FLOOR = 0.05  # probabilities below this are left transparent over the CT
VIEWS_3D: tuple[tuple[str, float, float], ...] = (
    ("anterior", 5.0, -90.0),
    ("left lateral", 5.0, 0.0),
    ("posterior", 5.0, 90.0),
    ("anterior oblique", 25.0, -45.0),
)
PLANES = ("sagittal", "axial", "coronal")


_matplotlib = importer("matplotlib", setup=lambda m: m.use("Agg", force=True))


def _plt() -> ModuleType:
    """pyplot on the headless Agg backend (whatever the environment asks for)."""
    return _submodule("pyplot")


def _submodule(name: str) -> ModuleType:
    """``matplotlib.<name>``, with the Agg backend chosen before anything draws."""
    _matplotlib()
    return importlib.import_module(f"matplotlib.{name}")


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file, from its IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return struct.unpack(">II", head[16:24])


def _figure(size: tuple[int, int], **kwargs: Any):
    plt = _plt()
    return plt, plt.figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, **kwargs)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Write at the figure's exact pixel size (no tight bbox), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".tmp-{p.name}")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, p)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return p


# -- 2D panels --------------------------------------------------------------------------------
@dataclass
class Panel:
    """One 2D view ready for ``imshow``: ``ct`` (rows, cols) HU; ``overlay`` (rows, cols) in
    [0, 1] or None; ``contour`` (rows, cols) bool (ground truth) or None; ``extent``
    (left, right, bottom, top) mm; ``origin`` ``lower`` | ``upper``; ``limits`` the zoom
    ((x0, x1), (y0, y1)) in mm or None."""

    title: str
    ct: np.ndarray
    overlay: np.ndarray | None
    contour: np.ndarray | None
    extent: tuple[float, float, float, float]
    origin: str
    xlabel: str
    ylabel: str
    limits: tuple[tuple[float, float], tuple[float, float]] | None = None


def _edges(origin: float, spacing: float, n: int) -> tuple[float, float]:
    """Physical extent of ``n`` voxels (half a voxel beyond the outer centres)."""
    return origin - spacing / 2, origin + (n - 1) * spacing + spacing / 2


def ortho_panels(
    ct: np.ndarray,
    overlay: np.ndarray | None,
    truth: np.ndarray | None,
    spacing_xyz: Sequence[float],
    origin_xyz: Sequence[float],
    centre_zyx: Sequence[int],
    *,
    box_zyx: tuple[Sequence[int], Sequence[int]] | None = None,
    margin_mm: float = 12.0,
    planes: Sequence[str] = PLANES,
    label: str = "",
) -> list[Panel]:
    """Sagittal, axial and coronal panels of canonical ``(z, y, x)`` volumes through
    ``centre_zyx``. ``overlay`` in [0, 1] (probability); ``truth`` bool; ``box_zyx`` (lo, hi
    half-open voxel box) zooms every panel onto it plus ``margin_mm``."""
    sx, sy, sz = (float(v) for v in spacing_xyz)
    ox, oy, oz = (float(v) for v in origin_xyz)
    nz, ny, nx = ct.shape
    k, j, i = (int(v) for v in centre_zyx)
    ex, ey, ez = _edges(ox, sx, nx), _edges(oy, sy, ny), _edges(oz, sz, nz)

    def zoom(axis_lo: float, sp: float, lo: int, hi: int) -> tuple[float, float]:
        return axis_lo + lo * sp - sp / 2 - margin_mm, axis_lo + (hi - 1) * sp + sp / 2 + margin_mm

    def cut(vol: np.ndarray | None, index: tuple) -> np.ndarray | None:
        return None if vol is None else np.asarray(vol[index])

    panels = []
    idx: tuple[slice | int, ...]
    for plane in planes:
        if plane == "sagittal":
            idx, extent, origin = (slice(None), slice(None), i), (*ey, *ez), "lower"
            xl, yl = "y mm (anterior → posterior)", "z mm (superior ↑)"
            where = f"x = {ox + i * sx:.0f} mm"
        elif plane == "coronal":
            idx, extent, origin = (slice(None), j, slice(None)), (*ex, *ez), "lower"
            xl, yl = "x mm (patient right → left)", "z mm (superior ↑)"
            where = f"y = {oy + j * sy:.0f} mm"
        elif plane == "axial":
            idx, extent, origin = (
                (k, slice(None), slice(None)),
                (ex[0], ex[1], ey[1], ey[0]),
                "upper",
            )
            xl, yl = "x mm (patient right → left)", "y mm (anterior ↑)"
            where = f"z = {oz + k * sz:.0f} mm"
        else:
            raise ValueError(f"unknown plane {plane!r}")
        limits = None
        if box_zyx is not None:
            (lz, ly, lx), (hz, hy, hx) = box_zyx
            zx, zy, zz = zoom(ox, sx, lx, hx), zoom(oy, sy, ly, hy), zoom(oz, sz, lz, hz)
            limits = {"sagittal": (zy, zz), "coronal": (zx, zz), "axial": (zx, (zy[1], zy[0]))}[
                plane
            ]
        panels.append(
            Panel(
                f"{label} {plane} ({where})".strip(),
                np.asarray(ct[idx]),
                cut(overlay, idx),
                cut(truth, idx),
                extent,
                origin,
                xl,
                yl,
                limits,
            )
        )
    return panels


def crop_panel(
    ct: np.ndarray, overlay: np.ndarray | None, plane: str, spacing_xyz: Sequence[float], title: str
) -> Panel:
    """A panel of one 2D slice of a canonical crop along ``plane`` (the slice as
    `fusion.volume_to_slices` gives it: sagittal ``(z, y)``, coronal ``(z, x)``, axial
    ``(y, x)``); millimetres from the crop's corner."""
    sx, sy, sz = (float(v) for v in spacing_xyz)
    rows, cols = ct.shape
    if plane == "sagittal":
        extent, origin, xl, yl = (
            (0, cols * sy, 0, rows * sz),
            "lower",
            "y mm (ant → post)",
            "z mm (sup ↑)",
        )
    elif plane == "coronal":
        extent, origin, xl, yl = (
            (0, cols * sx, 0, rows * sz),
            "lower",
            "x mm (R → L)",
            "z mm (sup ↑)",
        )
    elif plane == "axial":
        extent, origin, xl, yl = (
            (0, cols * sx, rows * sy, 0),
            "upper",
            "x mm (R → L)",
            "y mm (ant ↑)",
        )
    else:
        raise ValueError(f"unknown plane {plane!r}")
    return Panel(title, ct, overlay, None, extent, origin, xl, yl)


def montage(
    rows: Sequence[Sequence[Panel]],
    path: str | os.PathLike,
    *,
    title: str = "",
    overlay_label: str = "fracture probability",
    cmap: str = PROB_CMAP,
    floor: float = PROB_FLOOR,
    alpha: float = 0.55,
    window: tuple[float, float] = BONE_WINDOW,
    size: tuple[int, int] | None = None,
) -> Path:
    """A grid of panels: CT in the bone ``window`` (level, width HU), the overlay in ``cmap``
    over [0, 1] (values below ``floor`` transparent) with one colour bar, the ground-truth
    contour in cyan. ``size`` defaults to `montage_size`. Returns the PNG path."""
    cm, colors = _submodule("cm"), _submodule("colors")

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    size = size or montage_size(n_rows, n_cols)
    plt, fig = _figure(size)
    # a fixed grid in pixels (no layout engine: constrained layout tripled the drawing time)
    w, h = size
    cell_w, cell_h = (w - COLORBAR_PX) / n_cols, (h - TITLE_PX) / n_rows
    axes = np.empty((n_rows, n_cols), dtype=object)
    for r in range(n_rows):
        for c in range(n_cols):
            left, top = c * cell_w + 52, TITLE_PX + r * cell_h + 22
            axes[r, c] = fig.add_axes(
                (left / w, 1 - (top + cell_h - 62) / h, (cell_w - 62) / w, (cell_h - 62) / h)
            )
    lo, hi = window[0] - window[1] / 2, window[0] + window[1] / 2
    norm = colors.Normalize(0.0, 1.0)
    has_contour = False
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            p = row[c]
            ax.imshow(
                p.ct,
                cmap="gray",
                vmin=lo,
                vmax=hi,
                extent=p.extent,
                origin=p.origin,
                interpolation="nearest",
            )
            if p.overlay is not None:
                ov = np.ma.masked_less(np.asarray(p.overlay, np.float32), floor)
                ax.imshow(
                    ov,
                    cmap=cmap,
                    norm=norm,
                    alpha=alpha,
                    extent=p.extent,
                    origin=p.origin,
                    interpolation="nearest",
                )
            if p.contour is not None and np.any(p.contour) and not np.all(p.contour):
                ax.contour(
                    np.asarray(p.contour, np.float32),
                    levels=[0.5],
                    colors="cyan",
                    linewidths=1.0,
                    extent=p.extent,
                    origin=p.origin,
                )
                has_contour = True
            if p.limits is not None:
                ax.set_xlim(*p.limits[0])
                ax.set_ylim(*p.limits[1])
            ax.set_aspect("equal")  # extents are mm: physical proportions
            ax.set_title(p.title, fontsize=8)
            ax.set_xlabel(p.xlabel, fontsize=7)
            ax.set_ylabel(p.ylabel, fontsize=7)
            ax.tick_params(labelsize=6)
    plot_h = h - TITLE_PX
    cax = fig.add_axes(((w - COLORBAR_PX + 20) / w, 0.1 * plot_h / h, 16 / w, 0.8 * plot_h / h))
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label(overlay_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    note = f"CT: bone window L{window[0]:g}/W{window[1]:g} HU"
    if has_contour:
        note += "; cyan: ground-truth fracture"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=9)
    return _save(plt, fig, path)


def montage_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """Pixel size of a montage of ``n_rows`` x ``n_cols`` panels (plus colour bar, title)."""
    return n_cols * PANEL_PX + COLORBAR_PX, n_rows * PANEL_PX + TITLE_PX


# -- 3D ---------------------------------------------------------------------------------------
def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    face_rgba: np.ndarray,
    path: str | os.PathLike,
    *,
    views: Sequence[tuple[str, float, float]] = VIEWS_3D,
    size: tuple[int, int] | None = None,
    title: str = "",
    colorbar: tuple[str, float, float, str] | None = None,
) -> Path:
    """Render a triangle mesh headless from several views, side by side.

    ``vertices`` ``(n, 3)`` physical mm (x patient-left, y posterior, z superior: superior is
    up in every view); ``faces`` ``(m, 3)``; ``face_rgba`` ``(m, 4)`` in [0, 1] (translucent
    faces let inner ones show). ``views``: (name, elevation, azimuth) in degrees, azimuth
    -90 looking from the front. Flat shading with a light at the camera; one matplotlib
    collection per view, depth-sorted per face. ``colorbar``: (label, vmin, vmax, cmap).
    """
    _matplotlib()
    art3d = importlib.import_module("mpl_toolkits.mplot3d.art3d")

    size = size or (len(views) * 380, 460)
    plt, fig = _figure(size)
    vertices = np.asarray(vertices, np.float64)
    tri = vertices[np.asarray(faces)] if len(faces) else np.zeros((0, 3, 3))
    normal = (
        np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) if len(tri) else np.zeros((0, 3))
    )
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    lo = vertices.min(axis=0) if len(vertices) else np.zeros(3)
    hi = vertices.max(axis=0) if len(vertices) else np.ones(3)
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1.0)
    right = 0.88 if colorbar else 0.99
    width = right / len(views)
    for k, (name, elev, azim) in enumerate(views):
        ax = fig.add_axes((k * width, 0.0, width, 0.9), projection="3d")
        e, a = np.radians(elev), np.radians(azim)
        eye = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
        shade = 0.3 + 0.7 * np.abs(normal @ eye)
        rgba = np.asarray(face_rgba, np.float64).copy()
        rgba[:, :3] *= shade[:, None]
        if len(tri):
            ax.add_collection3d(
                art3d.Poly3DCollection(tri, facecolors=rgba, edgecolors="none", linewidths=0.0)
            )
        ax.set_xlim(centre[0] - half[0], centre[0] + half[0])
        ax.set_ylim(centre[1] - half[1], centre[1] + half[1])
        ax.set_zlim(centre[2] - half[2], centre[2] + half[2])
        ax.set_box_aspect(tuple(half), zoom=1.05)  # millimetres: true proportions
        ax.view_init(elev=elev, azim=azim)
        ax.set_proj_type("ortho")
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
    if colorbar:
        cm, colors = _submodule("cm"), _submodule("colors")
        label, vmin, vmax, cmap = colorbar
        cax = fig.add_axes((0.91, 0.15, 0.02, 0.65))
        bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(vmin, vmax), cmap=cmap), cax=cax)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


# -- curves -----------------------------------------------------------------------------------
def plot_training_curves(
    history: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str = "",
    size: tuple[int, int] = (1200, 400),
) -> Path:
    """Metric histories of one run, ``{key: [(step, value), ...]}``, in three panels: losses,
    overlap figures (dice / iou / precision / recall) and the rest (learning rate, ...)."""
    plt, fig = _figure(size, layout="constrained")
    groups: dict[str, list[str]] = {"losses": [], "overlap": [], "other": []}
    for key in sorted(history):
        low = key.lower()
        group = (
            "losses"
            if "loss" in low
            else "overlap"
            if any(w in low for w in ("dice", "iou", "precision", "recall", "auc"))
            else "other"
        )
        groups[group].append(key)
    axes = fig.subplots(1, 3, squeeze=False)[0]
    for ax, (group, keys) in zip(axes, groups.items(), strict=False):
        for key in keys:
            pts = sorted(history[key])
            if not pts:
                continue
            steps, values = zip(*pts, strict=False)
            ax.plot(steps, values, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        if keys:
            ax.legend(fontsize=6)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if group == "other" and keys and all(v > 0 for k in keys for _, v in history[k]):
            ax.set_yscale("log")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_budget(
    trials: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    metric: str = "val_dice",
    title: str = "",
    size: tuple[int, int] = (800, 500),
) -> Path:
    """``metric`` against budget (epochs) for every trial of a sweep, ``{trial: [(epoch,
    value), ...]}``; the last point of each trial is marked (ASHA stops weak ones early)."""
    plt, fig = _figure(size, layout="constrained")
    ax = fig.subplots()
    for name in sorted(trials):
        pts = sorted(trials[name])
        if not pts:
            continue
        steps, values = zip(*pts, strict=False)
        (line,) = ax.plot(steps, values, alpha=0.8, linewidth=1.2, label=name)
        ax.plot(steps[-1:], values[-1:], "o", color=line.get_color(), markersize=4)
    if 0 < len(trials) <= 12:
        ax.legend(fontsize=6)
    ax.set_xlabel("budget (epochs)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{metric} against budget ({len(trials)} trials)", fontsize=10)
    return _save(plt, fig, path)


def plot_importances(
    importances: Mapping[str, float],
    path: str | os.PathLike,
    *,
    title: str = "parameter importances",
    size: tuple[int, int] = (700, 450),
) -> Path:
    """Horizontal bars of parameter importances (largest on top)."""
    plt, fig = _figure(size, layout="constrained")
    ax = fig.subplots()
    items = sorted(importances.items(), key=lambda kv: kv[1])
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items], color="#3b7dd8")
    else:
        ax.text(
            0.5,
            0.5,
            "no importances (fewer than 2 finished trials)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("importance (Optuna's default evaluator)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


__all__ = [
    "BONE_WINDOW",
    "PLANES",
    "VIEWS_3D",
    "Panel",
    "crop_panel",
    "montage",
    "montage_size",
    "ortho_panels",
    "plot_budget",
    "plot_importances",
    "plot_training_curves",
    "png_size",
    "render_mesh",
]
