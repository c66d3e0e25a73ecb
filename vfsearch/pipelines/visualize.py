"""``vfsearch visualize``: pictures of what a model sees and predicts, as files and in MLflow.

Path of one case::

    CT + vertebra labels (+ fracture mask)       or   a case of a training store (crops)
      │ predict.predict_case (the predict path)     │ core.inference.fuse_crops: crops pasted
      │ + to_canonical of every volume              │ back into the case's resampled canonical
      │                                             │ grid
      ▼ CaseView: canonical (z, y, x) CT HU, fracture probability, labels, truth, crops
      │ flagged vertebrae: a predicted (mask) or true fracture voxel in the vertebra's cell
      ├─ heatmaps   sagittal / axial / coronal through each flagged vertebra's hottest
      │             point: heatmap_case.png + heatmap_<vertebra>.png
      ├─ attention  each gate level's coefficients on the model's own slice through that
      │             point (the model only sees slices of its plane): attention_case.png +
      │             attention_<vertebra>.png
      └─ 3D         spine.stl/.ply (one surface per vertebra, from the labels), fracture.stl/
                    .ply (iso-surface at the threshold, coloured by the nearby peak
                    probability), truth.stl, render_3d.png (4 views), optional view_3d.html

Curves (`curve_pictures`, `log_curves`): a run's metric histories from MLflow
(curves_<run>.png); for a sweep's parent run also ``val_dice`` against budget over its child
runs (budget.png) and the parameter importances the sweep logged (importances.png).

`log_visualisations` renders one validation case of a store for a trained model and logs the
pictures and meshes as MLflow artifacts (the end-of-training hook).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from scipy import ndimage

from vfsearch.adapters import meshes
from vfsearch.adapters import plots as viz
from vfsearch.adapters import volumes as io
from vfsearch.adapters.store import Store
from vfsearch.adapters.tracking import Tracker, tracking_uri
from vfsearch.adapters.tracking.schema import IMPORTANCES_FILE, PARENT_RUN_TAG
from vfsearch.core import fusion
from vfsearch.core.config import Config
from vfsearch.core.errors import UserError
from vfsearch.core.geometry import Geometry, canonical_reorientation, to_canonical
from vfsearch.core.inference import (
    DEFAULT_THRESHOLD,
    LoadedModel,
    ModelCrop,
    combine_maps,
    crop_attention,
    fuse_crops,
    vertebra_score,
)
from vfsearch.core.labels import name as vertebra_name
from vfsearch.core.windows import PLANE_AXIS
from vfsearch.pipelines.predict import RUN_ID, ModelRef, predict_case

if TYPE_CHECKING:
    import torch

MAX_RENDER_FACES = 40_000  # mplot3d sorts every face per view: bound the rendering time
SPINE_RGB = ((0.93, 0.89, 0.80), (0.80, 0.76, 0.68))  # alternating vertebra tones
PROB_CMAP = "jet"


@dataclass
class CropView:
    """One vertebra crop as the model saw it: canonical ``image`` (z, y, x) HU at the model's
    spacing, its ``geometry``."""

    vid: int
    image: np.ndarray
    geometry: Geometry


@dataclass
class CaseView:
    """A case ready to draw, every volume ``(z, y, x)`` on one canonical grid (identity-like
    direction: x to the patient's left, y posterior, z superior): ``ct`` HU, ``prob`` float
    0..1, ``labels`` VerSe ids, ``truth`` bool or None, ``spine`` bool (the surface to mesh:
    the labels, or bone inside the boxes of a bounding-box CSV)."""

    case_id: str
    ct: np.ndarray
    prob: np.ndarray
    labels: np.ndarray
    truth: np.ndarray | None
    geometry: Geometry
    threshold: float
    models: list[LoadedModel]
    crops: dict[int, CropView] = field(default_factory=dict)
    spine: np.ndarray | None = None


# -- building a view ------------------------------------------------------------------------
def view_from_files(
    model_ref: ModelRef,
    ct: str | os.PathLike,
    vertebrae: str | os.PathLike,
    *,
    fracture: str | os.PathLike | None = None,
    label_scheme: str = "verse",
    threshold: float | None = None,
    combine: str = "mean",
    device: str | torch.device | None = None,
    store: str | os.PathLike | Store | None = None,
    workdir: str | os.PathLike = "mlruns",
) -> CaseView:
    """Predict one CT (the `vfsearch.pipelines.predict` path) and bring everything to canonical
    orientation at the CT's own resolution. ``fracture``: ground truth on the CT's grid."""
    case = predict_case(
        model_ref,
        ct,
        vertebrae,
        label_scheme=label_scheme,
        threshold=threshold,
        combine=combine,
        device=device,
        store=store,
        workdir=workdir,
    )
    vol = io.read_volume(ct, what="CT")
    truth = None
    if fracture is not None:
        gt = io.read_volume(fracture, what="fracture mask")
        if not vol.geometry.same_space(gt.geometry, vol.shape, gt.shape):
            raise UserError(f"{fracture}: fracture mask grid differs from the CT's")
        truth = gt.array > 0
        if gt.shape != vol.shape or not np.allclose(
            gt.geometry.direction, vol.geometry.direction, atol=1e-4
        ):
            truth = (
                io.resample_to(
                    truth.astype(np.uint8), gt.geometry, vol.geometry, vol.shape, nearest=True
                )
                > 0
            )
    ro = canonical_reorientation(vol.geometry)
    ct_c, geom_c, _ = to_canonical(vol.array, vol.geometry)
    labels_c = ro.apply(case.labels)
    spine = None
    if case.prepared.vertebrae_source == "boxes":
        spine = (labels_c > 0) & (ct_c >= 150)  # boxes only: bone inside them
    crops = {
        c.vid: CropView(c.vid, c.arrays["image"], Geometry.from_dict(c.attrs["geometry"]))
        for c in case.prepared.crops
    }
    return CaseView(
        case.case_id,
        ct_c,
        ro.apply(case.prob),
        labels_c,
        ro.apply(truth) if truth is not None else None,
        geom_c,
        case.threshold,
        case.models,
        crops,
        spine,
    )


def view_from_store(
    models: Sequence[LoadedModel],
    store: Store,
    case_id: str,
    *,
    threshold: float | None = None,
    combine: str = "mean",
    batch_size: int = 16,
) -> CaseView:
    """A stored case at the store's resolution: crops pasted into the case's resampled
    canonical grid (outside the crops: -1024 HU), probability fused over the crops
    (`vfsearch.core.inference.fuse_crops`, on that grid: no resampling)."""
    attrs = store.case_attrs(case_id)
    geometry = Geometry.from_dict(attrs["resampled_geometry"])
    shape = tuple(int(v) for v in attrs["resampled_shape"])
    t = float(
        threshold
        if threshold is not None
        else (getattr(models[0], "threshold", None) or DEFAULT_THRESHOLD)
    )
    ct = np.full(shape, -1024, np.int16)
    labels = np.zeros(shape, np.uint8)
    truth = np.zeros(shape, bool)
    crops = {}
    for vid in store.vertebrae(case_id):
        va = store.vertebra_attrs(case_id, vid)
        lo = [int(v) for v in va["crop_box"][:3]]
        image = store.read(case_id, vid, "image")
        dst = tuple(slice(a, a + n) for a, n in zip(lo, image.shape, strict=True))
        ct[dst] = image
        labels[dst] = np.where(store.read(case_id, vid, "mask") > 0, vid, labels[dst])
        truth[dst] |= store.read(case_id, vid, "fracture") > 0
        crops[vid] = CropView(vid, image, Geometry.from_dict(va["geometry"]))
    fused = fuse_crops(
        models,
        [ModelCrop(c.vid, c.image, c.geometry) for c in crops.values()],
        geometry,
        shape,
        resampler=None,
        batch_size=batch_size,
    )
    prob = combine_maps(fused.maps, ((0, 0, 0), shape), combine, t).result()
    return CaseView(case_id, ct, prob, labels, truth, geometry, t, list(models), crops)


# -- choosing what to draw ----------------------------------------------------------------------
@dataclass
class Finding:
    """A vertebra worth a picture: predicted and/or true fracture, its ``score`` (q99 of the
    probability over its voxels), ``focus`` (z, y, x) voxel to cut the slices through and
    ``box`` (lo, hi) of the vertebra's label."""

    vid: int
    name: str
    predicted: bool
    true: bool
    score: float
    focus: tuple[int, int, int]
    box: tuple[tuple[int, ...], tuple[int, ...]]

    @property
    def caption(self) -> str:
        what = {
            (True, True): "predicted + true fracture",
            (True, False): "predicted fracture",
            (False, True): "true fracture (missed)",
        }.get((self.predicted, self.true), "")
        return f"{self.name}: score {self.score:.2f}, {what}"


def hottest_point(values: np.ndarray, region: np.ndarray) -> tuple[int, int, int] | None:
    """The voxel (z, y, x) of ``region`` where ``values`` peaks; among near-ties (within 2 %
    of the peak) the one closest to their centroid, so a plateau is cut through its middle
    rather than its corner."""
    if not region.any():
        return None
    v = np.where(region, values, -np.inf)
    top = v >= v.max() - 0.02 * max(abs(float(v.max())), 1e-6)
    idx = np.argwhere(top)
    centre = idx.mean(axis=0)
    best = idx[np.argmin(((idx - centre) ** 2).sum(axis=1))]
    return tuple(int(c) for c in best)  # type: ignore[return-value]


def findings(view: CaseView, *, include_all: bool = False) -> list[Finding]:
    """Flagged vertebrae (a predicted or a true fracture voxel in the vertebra's nearest-label
    cell), ordered superior to inferior; ``include_all`` lists every vertebra."""
    present = ndimage.find_objects(view.labels.astype(np.int64))
    if not any(s is not None for s in present):
        return []
    lo = np.min([[s.start for s in sl] for sl in present if sl is not None], axis=0)
    hi = np.max([[s.stop for s in sl] for sl in present if sl is not None], axis=0)
    pad = 8
    lo, hi = np.maximum(lo - pad, 0), np.minimum(hi + pad, view.labels.shape)
    roi = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    labels = view.labels[roi]
    cells = fusion.nearest_label(labels, view.geometry.spacing[::-1])
    prob = view.prob[roi]
    pred = prob >= view.threshold
    truth = view.truth[roi] if view.truth is not None else np.zeros(labels.shape, bool)
    out = []
    for vid, sl in enumerate(present, start=1):
        if sl is None:
            continue
        cell = cells == vid
        own = labels == vid
        is_pred, is_true = bool((pred & cell).any()), bool((truth & cell).any())
        if not (is_pred or is_true or include_all):
            continue
        score = vertebra_score(prob, labels, cells, vid)
        # hottest point of probability + truth: lands in the overlap when both exist
        region = cell & (pred | truth) if (is_pred or is_true) else own
        # `own` is the label of a present vertebra (it has a box), so a peak exists
        peak = cast(
            "tuple[int, int, int]",
            hottest_point(prob + truth, region) or hottest_point(prob, own),
        )
        focus = (int(peak[0] + lo[0]), int(peak[1] + lo[1]), int(peak[2] + lo[2]))
        box = (tuple(s.start for s in sl), tuple(s.stop for s in sl))
        out.append(Finding(vid, vertebra_name(vid), is_pred, is_true, score, focus, box))
    return sorted(out, key=lambda f: -f.focus[0])  # superior first


# -- pictures of one case -------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def _heat_row(view: CaseView, f: Finding) -> list[Any]:
    return viz.ortho_panels(
        view.ct,
        view.prob,
        view.truth,
        view.geometry.spacing,
        view.geometry.origin,
        f.focus,
        box_zyx=f.box,
        label=f.name,
    )


def _attention_rows(view: CaseView, f: Finding) -> list[list[Any]]:
    """Per model (plane): [CT + probability, gate level 0, 1, ...] on the model's slice of the
    vertebra's crop through the finding's focus."""
    crop = view.crops.get(f.vid)
    if crop is None:
        return []
    point = view.geometry.zyx_to_physical(np.asarray(f.focus, np.float64))
    idx = np.rint(crop.geometry.physical_to_index(point)[::-1]).astype(int)  # z, y, x
    idx = np.clip(idx, 0, np.asarray(crop.image.shape) - 1)
    rows = []
    for lm in view.models:
        axis = PLANE_AXIS[lm.plane]
        prob, alphas = crop_attention(lm, crop.image, int(idx[axis]))
        ct2d = np.moveaxis(crop.image, axis, 0)[int(idx[axis])]
        sp = crop.geometry.spacing
        row = [viz.crop_panel(ct2d, prob, lm.plane, sp, f"{f.name} {lm.plane}: probability")]
        row += [
            viz.crop_panel(ct2d, a, lm.plane, sp, f"gate level {lv} (1/{2**lv} resolution)")
            for lv, a in enumerate(alphas)
        ]
        if not alphas:
            row[0].title += " (model has no attention gates)"
        rows.append(row)
    return rows


def _spine_mask_and_ids(view: CaseView) -> tuple[np.ndarray, list[int]]:
    labels = view.labels if view.spine is None else np.where(view.spine, view.labels, 0)
    return labels, [int(v) for v in np.unique(labels) if v]


def _mesh_for_render(build, n_faces: int):
    """Rebuild a mesh with a coarser marching-cubes step until it is cheap to render."""
    step = int(np.ceil(np.sqrt(n_faces / MAX_RENDER_FACES))) if n_faces > MAX_RENDER_FACES else 1
    return build(step) if step > 1 else None


def render_3d(view: CaseView, out: Path, *, html: bool = False) -> dict[str, Any]:
    """Meshes (STL + PLY in physical LPS mm) and the headless 4-view rendering."""
    from matplotlib import colormaps

    labels, ids = _spine_mask_and_ids(view)
    spine = meshes.label_surfaces(labels, view.geometry, ids=ids)
    frac = meshes.probability_surface(view.prob, view.geometry, view.threshold)
    cmap = colormaps[PROB_CMAP]
    files: dict[str, Any] = {}
    tones = np.asarray(SPINE_RGB)
    spine_rgb = tones[(spine.values.astype(int) % 2)]
    files["spine_stl"] = str(meshes.write_stl(out / "spine.stl", spine, name="vfsearch spine"))
    files["spine_ply"] = str(
        meshes.write_ply(
            out / "spine.ply", spine, (spine_rgb * 255).astype(np.uint8), value_name="vertebra"
        )
    )
    frac_rgb = cmap(np.clip(frac.values, 0, 1))[:, :3]
    if frac.n_faces:
        files["fracture_stl"] = str(
            meshes.write_stl(out / "fracture.stl", frac, name="vfsearch fracture")
        )
        files["fracture_ply"] = str(
            meshes.write_ply(
                out / "fracture.ply",
                frac,
                (frac_rgb * 255).astype(np.uint8),
                value_name="probability",
            )
        )
    if view.truth is not None and view.truth.any():
        truth = meshes.surface(view.truth, view.geometry, smooth_mm=0.5)
        files["truth_stl"] = str(
            meshes.write_stl(out / "truth.stl", truth, name="vfsearch ground truth")
        )
    files["components"] = {
        "spine": meshes.components(spine.faces, len(spine.vertices)),
        "fracture": meshes.components(frac.faces, len(frac.vertices)),
    }

    r_spine = (
        _mesh_for_render(
            lambda s: meshes.label_surfaces(labels, view.geometry, ids=ids, step=s), spine.n_faces
        )
        or spine
    )
    r_frac = (
        _mesh_for_render(
            lambda s: meshes.probability_surface(view.prob, view.geometry, view.threshold, step=s),
            frac.n_faces,
        )
        or frac
    )
    alpha = 0.3 if r_frac.n_faces else 1.0  # see-through bone when there is a fracture inside
    sp_face = np.concatenate(
        [
            tones[(r_spine.values[r_spine.faces[:, 0]].astype(int) % 2)],
            np.full((r_spine.n_faces, 1), alpha),
        ],
        axis=1,
    )
    fr_face = (
        cmap(np.clip(r_frac.values[r_frac.faces].mean(axis=1), 0, 1))
        if r_frac.n_faces
        else np.zeros((0, 4))
    )
    both = meshes.concat([r_spine, r_frac])
    title = (
        f"{view.case_id}: spine surface, predicted fracture regions (p >= "
        f"{view.threshold:.2f}) coloured by peak probability"
    )
    png = viz.render_mesh(
        both.vertices,
        both.faces,
        np.concatenate([sp_face, fr_face]),
        out / "render_3d.png",
        title=title,
        colorbar=("peak fracture probability", view.threshold, 1.0, PROB_CMAP)
        if r_frac.n_faces
        else None,
    )
    files["render_3d"] = str(png)
    if html:
        parts = [
            (
                "spine",
                r_spine,
                (spine_rgb if r_spine is spine else tones[(r_spine.values.astype(int) % 2)]),
                alpha,
            )
        ]
        if r_frac.n_faces:
            parts.append(("fracture", r_frac, cmap(np.clip(r_frac.values, 0, 1))[:, :3], 1.0))
        files["html"] = str(write_html(out / "view_3d.html", parts, title=title))
    return files


def render_case(
    view: CaseView, out: str | os.PathLike, *, html: bool = False, max_vertebrae: int | None = None
) -> dict[str, Any]:
    """Every picture and mesh of one case into folder ``out``; returns a summary (files,
    flagged vertebrae, picture sizes) that is also written as ``pictures.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = findings(view)
    shown = found[:max_vertebrae] if max_vertebrae else found
    pictures: list[str] = []
    heat_rows, att_rows, captions = [], [], []
    for f in shown:
        row = _heat_row(view, f)
        heat_rows.append(row)
        captions.append(f.caption)
        pictures.append(
            str(
                viz.montage(
                    [row], out / f"heatmap_{_slug(f.name)}.png", title=f"{view.case_id} {f.caption}"
                )
            )
        )
        rows = _attention_rows(view, f)
        if rows:
            att_rows += rows
            pictures.append(
                str(
                    viz.montage(
                        rows,
                        out / f"attention_{_slug(f.name)}.png",
                        cmap=viz.ATTENTION_CMAP,
                        floor=0.0,
                        alpha=0.45,
                        overlay_label="probability / attention coefficient",
                        title=f"{view.case_id} {f.name}: attention gates on the model's slice",
                    )
                )
            )
    if heat_rows:
        title = f"{view.case_id}: " + "; ".join(captions)
    else:  # nothing flagged: one overview row through the middle of the labelled spine
        pts = np.argwhere(view.labels > 0)
        centre = tuple(
            int(v) for v in (np.median(pts, axis=0) if len(pts) else np.asarray(view.ct.shape) // 2)
        )
        heat_rows = [
            viz.ortho_panels(
                view.ct,
                view.prob,
                view.truth,
                view.geometry.spacing,
                view.geometry.origin,
                centre,
                label="spine",
            )
        ]
        title = f"{view.case_id}: no fracture predicted (threshold {view.threshold:.2f}) or given"
    pictures.insert(0, str(viz.montage(heat_rows, out / "heatmap_case.png", title=title)))
    if att_rows:
        pictures.insert(
            1,
            str(
                viz.montage(
                    att_rows,
                    out / "attention_case.png",
                    cmap=viz.ATTENTION_CMAP,
                    floor=0.0,
                    alpha=0.45,
                    overlay_label="probability / attention coefficient",
                    title=f"{view.case_id}: attention gates (finest level first)",
                )
            ),
        )
    files = render_3d(view, out, html=html)
    pictures.append(files["render_3d"])
    summary = {
        "case_id": view.case_id,
        "threshold": view.threshold,
        "findings": [
            {
                "vertebra": f.vid,
                "name": f.name,
                "predicted": f.predicted,
                "true": f.true,
                "score": round(f.score, 4),
                "focus_zyx": list(f.focus),
            }
            for f in found
        ],
        "pictures": {p: list(viz.png_size(p)) for p in pictures},
        "meshes": {k: v for k, v in files.items() if k not in ("render_3d", "components")},
        "mesh_components": files["components"],
        "orientation": "canonical: x patient-left, y posterior, z superior; meshes in "
        "physical LPS mm",
    }
    (out / "pictures.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["files"] = [*pictures, *summary["meshes"].values(), str(out / "pictures.json")]
    return summary


# -- an optional interactive view -------------------------------------------------------------
_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%(title)s</title>
<style>body{margin:0;background:#222;color:#ddd;font:13px sans-serif}
#c{display:block;margin:auto;background:#111}</style></head><body>
<div style="padding:6px">%(title)s. Drag to rotate, wheel to zoom. Superior is up;
physical LPS mm.</div><canvas id="c" width="900" height="700"></canvas>
<script>
const parts=%(data)s;
const cv=document.getElementById('c'),cx=cv.getContext('2d');
let yaw=-Math.PI/2,pitch=0.1,zoom=1;let lo=[1e9,1e9,1e9],hi=[-1e9,-1e9,-1e9];
for(const p of parts)for(let i=0;i<p.v.length;i+=3)for(let k=0;k<3;k++){
 lo[k]=Math.min(lo[k],p.v[i+k]);hi[k]=Math.max(hi[k],p.v[i+k]);}
const ctr=lo.map((a,k)=>(a+hi[k])/2),ext=Math.max(...hi.map((b,k)=>b-lo[k]));
function draw(){cx.clearRect(0,0,cv.width,cv.height);
 const cy=Math.cos(yaw),sy=Math.sin(yaw),cp=Math.cos(pitch),sp=Math.sin(pitch);
 const s=zoom*0.9*Math.min(cv.width,cv.height)/ext,tris=[];
 const eye=[cp*cy,cp*sy,sp];
 for(const p of parts){const v=p.v,f=p.f,c=p.c;
  for(let t=0;t<f.length;t+=3){const q=[],P=[];
   for(let k=0;k<3;k++){const i=3*f[t+k],x=v[i]-ctr[0],y=v[i+1]-ctr[1],z=v[i+2]-ctr[2];
    const u=-sy*x+cy*y,d=cy*x+sy*y,w=z*cp-d*sp,dep=d*cp+z*sp;
    q.push([cv.width/2+s*u,cv.height/2-s*w,dep]);P.push([v[i],v[i+1],v[i+2]]);}
   const a=P[1].map((x,k)=>x-P[0][k]),b=P[2].map((x,k)=>x-P[0][k]);
   const n=[a[1]*b[2]-a[2]*b[1],a[2]*b[0]-a[0]*b[2],a[0]*b[1]-a[1]*b[0]];
   const nl=Math.hypot(...n)||1,l=0.3+0.7*Math.abs((n[0]*eye[0]+n[1]*eye[1]+n[2]*eye[2])/nl);
   const j=3*f[t];tris.push([q[0][2]+q[1][2]+q[2][2],q,
    `rgba(${c[j]*l|0},${c[j+1]*l|0},${c[j+2]*l|0},${p.a})`]);}}
 tris.sort((a,b)=>b[0]-a[0]);
 for(const [,q,col] of tris){cx.fillStyle=col;cx.beginPath();cx.moveTo(q[0][0],q[0][1]);
  cx.lineTo(q[1][0],q[1][1]);cx.lineTo(q[2][0],q[2][1]);cx.closePath();cx.fill();}}
let drag=null;cv.onmousedown=e=>drag=[e.clientX,e.clientY];onmouseup=()=>drag=null;
onmousemove=e=>{if(!drag)return;yaw-=(e.clientX-drag[0])*0.01;
 pitch=Math.max(-1.5,Math.min(1.5,pitch+(e.clientY-drag[1])*0.01));
 drag=[e.clientX,e.clientY];draw();};
cv.onwheel=e=>{e.preventDefault();zoom*=e.deltaY<0?1.1:1/1.1;draw();};draw();
</script></body></html>
"""


def write_html(
    path: str | os.PathLike,
    parts: Sequence[tuple[str, Any, np.ndarray, float]],
    *,
    title: str = "vfsearch 3D view",
) -> Path:
    """A self-contained HTML page (no external scripts) with the meshes embedded and a tiny
    canvas viewer (rotate, zoom). ``parts``: (name, `vfsearch.adapters.meshes.Mesh`, per-vertex RGB
    (n, 3) in [0, 1], opacity)."""
    import html as html_mod

    data = []
    for _name, m, rgb, alpha in parts:
        data.append(
            {
                "v": np.round(m.vertices.astype(np.float64), 2).ravel().tolist(),
                "f": m.faces.ravel().tolist(),
                "c": (np.clip(np.asarray(rgb), 0, 1) * 255).astype(int).ravel().tolist(),
                "a": float(alpha),
            }
        )
    text = _HTML % {"title": html_mod.escape(title), "data": json.dumps(data)}
    p = Path(path)
    p.write_text(text, encoding="utf-8")
    return p


# -- curves -------------------------------------------------------------------------------------
def run_history(tracker: Tracker, run_id: str) -> dict[str, list[tuple[float, float]]]:
    """Every metric of an MLflow run as ``{key: [(step, value), ...]}``."""
    run = tracker.get_run(run_id)
    return {
        k: [(float(m.step), float(m.value)) for m in tracker.get_metric_history(run_id, k)]
        for k in run.data.metrics
    }


def child_runs(tracker: Tracker, run_id: str) -> list[Any]:
    """The nested runs of a parent (a sweep's trials)."""
    exp = tracker.experiment_of(run_id)
    return tracker.search_runs([exp], f"tags.`{PARENT_RUN_TAG}` = '{run_id}'", max_results=5000)


def sweep_data(
    tracker: Tracker, run_id: str, *, metric: str = "val_dice"
) -> tuple[dict[str, list[tuple[float, float]]] | None, dict[str, float]]:
    """A sweep parent's trials ``{run name: [(epoch, metric), ...]}`` (None when the run has
    no nested runs) and the parameter importances it logged (``{}`` when none)."""
    children = child_runs(tracker, run_id)
    if not children:
        return None, {}
    trials = {}
    for child in children:
        name = child.data.tags.get("mlflow.runName") or child.info.run_id[:8]
        if metric in child.data.metrics:
            trials[name] = [
                (float(m.step), float(m.value))
                for m in tracker.get_metric_history(child.info.run_id, metric)
            ]
    importances: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.download_artifacts(run_id, IMPORTANCES_FILE, tmp)
            importances = {str(k): float(v) for k, v in json.loads(Path(local).read_text()).items()}
    except Exception:  # noqa: BLE001 - none logged (fewer than 2 finished trials)
        importances = {}
    return trials, importances


def curve_pictures(
    tracker: Tracker, run_id: str, out: str | os.PathLike, *, metric: str = "val_dice"
) -> list[Path]:
    """Training curves of a run; for a sweep's parent run (one with nested runs) also
    ``metric`` against budget over its trials and the parameter importances it logged
    (``importances/param_importances.json``, written by `vfsearch.pipelines.tune`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    history = run_history(tracker, run_id)
    if any(len(v) > 1 for v in history.values()):
        written.append(
            viz.plot_training_curves(
                history, out / f"curves_{run_id[:8]}.png", title=f"run {run_id}"
            )
        )
    trials, importances = sweep_data(tracker, run_id, metric=metric)
    if trials is not None:
        written.append(viz.plot_budget(trials, out / "budget.png", metric=metric))
        written.append(viz.plot_importances(importances, out / "importances.png"))
    if not written:
        raise UserError(
            f"--run: MLflow run {run_id} has no metric history and no nested runs to plot"
        )
    return written


def log_curves(
    tracker: Tracker, run_id: str, *, artifact_path: str = "curves", metric: str = "val_dice"
) -> list[str]:
    """`curve_pictures` of ``run_id`` logged on that run under ``artifact_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = curve_pictures(tracker, run_id, tmp, metric=metric)
        _log_folder(tracker, run_id, tmp, artifact_path)
    return [f"{artifact_path}/{p.name}" for p in paths]


def _log_folder(tracker: Tracker, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Every file of ``folder`` in one upload (one request per file is slow on a busy
    server)."""
    tracker.log_artifacts(run_id, folder, artifact_path)


# -- MLflow hook -------------------------------------------------------------------------------
def pick_case(store: Store, split: str = "val") -> str | None:
    """The first case of ``split`` with a fractured vertebra, else its first case."""
    ids = store.case_ids(split)
    for cid in ids:
        if any(store.vertebra_attrs(cid, v).get("fractured") for v in store.vertebrae(cid)):
            return cid
    return ids[0] if ids else None


def log_visualisations(
    tracker: Tracker,
    run_id: str,
    model: torch.nn.Module | LoadedModel,
    store: str | os.PathLike | Store,
    config: Config | None = None,
    *,
    case_id: str | None = None,
    split: str = "val",
    threshold: float | None = None,
    combine: str = "mean",
    artifact_path: str = "visualisations",
    max_vertebrae: int = 4,
    html: bool = False,
) -> list[str]:
    """Render one case of a training store for a trained model and log the pictures and
    meshes on MLflow run ``run_id`` under ``artifact_path/<case>/``.

    ``model``: a `vfsearch.core.inference.LoadedModel`, or a trained module with its
    `vfsearch.core.config.Config` as ``config`` (set to eval mode here; it stays on its device).
    ``store``: path or `Store`. ``case_id``: default the first ``split`` case with a
    fracture. Classifiers draw nothing. Returns the artifact paths logged.
    """
    st = store if isinstance(store, Store) else Store(store)
    if isinstance(model, LoadedModel):
        lm = model
    else:
        if config is None:
            raise ValueError("log_visualisations: a bare module needs its config")
        meta = st.meta
        lm = LoadedModel(
            model.eval(),
            config,
            st.fingerprint,
            tuple(meta["spacing"]),
            float(meta["margin_mm"]),
            source="training run",
        )
    if lm.kind != "segmentation":
        return []
    cid = case_id or pick_case(st, split)
    if cid is None:
        return []
    view = view_from_store([lm], st, cid, threshold=threshold, combine=combine)
    with tempfile.TemporaryDirectory() as tmp:
        summary = render_case(view, Path(tmp, _slug(cid)), html=html, max_vertebrae=max_vertebrae)
        dest = f"{artifact_path}/{_slug(cid)}"
        _log_folder(tracker, run_id, Path(tmp, _slug(cid)), dest)
        logged = [f"{dest}/{Path(f).name}" for f in summary["files"]]
    return logged


# -- the command --------------------------------------------------------------------------------
def visualize(
    out: str | os.PathLike,
    *,
    model: ModelRef | None = None,
    ct: str | os.PathLike | None = None,
    vertebrae: str | os.PathLike | None = None,
    fracture: str | os.PathLike | None = None,
    run: str | None = None,
    label_scheme: str = "verse",
    threshold: float | None = None,
    combine: str = "mean",
    device: str | torch.device | None = None,
    store: str | os.PathLike | Store | None = None,
    workdir: str | os.PathLike = "mlruns",
    html: bool = False,
    log_to: str | None = None,
) -> dict[str, Any]:
    """``vfsearch visualize``: pictures of a model on one CT and/or curves of an MLflow run.

    With ``ct``: ``model`` and ``vertebrae`` are needed (as `vfsearch.pipelines.predict.predict`);
    ``fracture`` adds the ground-truth contour. With ``run`` (an MLflow run id): its training
    curves, and for a sweep's parent run the budget and importance plots. ``log_to``: also
    log the case pictures on this MLflow run. Returns a summary with ``files``.
    """
    if ct is None and run is None:
        raise UserError("visualize: give a CT (with --model and --vertebrae) or --run")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out: {out_dir} exists and is not a folder")
    summary: dict[str, Any] = {"files": []}
    tracker = None
    if run is not None or log_to is not None:
        for option, value in (("--run", run), ("--log-to", log_to)):
            if value is not None and not RUN_ID.match(value):
                raise UserError(f"{option}: {value!r} is not an MLflow run id (32 hex digits)")
        tracker = Tracker(tracking_uri(workdir))
    if ct is not None:
        if model is None or vertebrae is None:
            raise UserError("visualize: a CT needs --model and --vertebrae")
        if fracture is not None and not Path(fracture).exists():
            raise UserError(f"--fracture: {fracture}: not found")
        view = view_from_files(
            model,
            ct,
            vertebrae,
            fracture=fracture,
            label_scheme=label_scheme,
            threshold=threshold,
            combine=combine,
            device=device,
            store=store,
            workdir=workdir,
        )
        case = render_case(view, out_dir, html=html)
        summary.update({k: v for k, v in case.items() if k != "files"})
        summary["files"] += case["files"]
        if tracker is not None and log_to is not None:
            _log_folder(tracker, log_to, out_dir, f"visualisations/{_slug(view.case_id)}")
    if run is not None:
        assert tracker is not None  # opened above whenever a run is given
        try:
            paths = curve_pictures(tracker, run, out_dir / "curves")
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - unknown run ids surface as MlflowException
            raise UserError(f"--run: MLflow run {run}: {str(exc).splitlines()[0]}") from None
        summary["files"] += [str(p) for p in paths]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Terminal lines of a `visualize` summary."""
    lines = []
    for f in summary.get("findings", []):
        what = "+".join(w for w, on in (("predicted", f["predicted"]), ("true", f["true"])) if on)
        lines.append(f"{f['name']:<5} score {f['score']:.3f}  {what}")
    if "findings" in summary and not summary["findings"]:
        lines.append("no vertebra with a predicted or true fracture")
    lines += [f"wrote {f}" for f in summary["files"]]
    return "\n".join(lines)


__all__ = [
    "CaseView",
    "CropView",
    "Finding",
    "curve_pictures",
    "findings",
    "format_summary",
    "hottest_point",
    "log_curves",
    "log_visualisations",
    "pick_case",
    "render_3d",
    "render_case",
    "run_history",
    "sweep_data",
    "view_from_files",
    "view_from_store",
    "visualize",
    "write_html",
]
