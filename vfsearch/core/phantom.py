"""Synthetic thoracolumbar CT (T4-L5) with vertebra labels and fracture-region masks.

Pure compute: numpy and ``scipy.ndimage``/``scipy.special`` only (layer 0). Files are written
by `vfsearch.pipelines.synth` through `vfsearch.adapters.volumes`.

Conventions
-----------
* Arrays are ``(z, y, x)``. The phantom is built in vfsearch's canonical orientation (identity
  direction: x to the patient's left, y posterior, z superior; array index 0 is the inferior
  end) and then stored the way dcm2niix often writes NIfTI: direction ``diag(-1, -1, 1)``
  ("RAS-stored"), i.e. the x and y array axes are flipped. `PhantomCase` holds the stored
  arrays; ``to_canonical(case.ct, case.geometry)`` brings them back to canonical.
* ``vertebrae`` labels the whole vertebra (body and posterior elements) with VerSe ids 11-24
  (T4..L5). T3 (top) and S1 (bottom) are drawn as bone but left unlabelled, as on a real scan
  labelled T4..L5 only. Discs, canal and soft tissue are 0.
* ``fracture`` (0/1) marks only the deformed endplate zone and its sclerotic condensation band
  inside the vertebral body of a fractured vertebra, not the whole vertebra.

Physics in brief: every bone surface is an (approximate) signed distance field; the CT value is
the analytic partial-volume profile of a thin cortical shell (~0.5 mm, ~1300 HU) around a
textured trabecular core, blurred along the surface normal by the scanner point-spread function
plus the voxel box, so a cortex measured at 1-3 mm voxels reads a few hundred HU, as in real CT.

Heights are snapped to the voxel grid: endplates sit on voxel boundaries (curvature stays within
+-0.4 voxel), so a fracture's height loss is a whole number of voxels and the label-measured
height ratio equals the planned one. Genant grades follow the height loss that was realised
(1: 20-25 %, 2: 25-40 %, 3: >= 40 %); on a coarse grid a requested grade 1 may become grade 2.

Variety
-------
``make_case(variety=v)`` (0-1) randomises per case what differs between scanners and patients,
so that a model does not learn one scanner's look. Each knob's range widens linearly from the
standard phantom's (``v = 0``: exactly the standard output, bit for bit, for a seed) to the
``VARIETY_*`` ranges at ``v = 1``; the draws come from a stream spawned from the case generator,
so the anatomy and fractures of a seed are those of ``v = 0`` (on the drawn grid):

* spacing (only when the caller passes ``spacing=None``): in-plane 0.6-1.0 mm (``small``:
  1.5-2.5 mm), slices 1-3 mm;
* noise: sigma 5-40 HU (log-uniform), grain: Gaussian correlation of 0.3-1.8 voxels in-plane and
  0-0.8 voxels along z;
* bone: trabecular HU 80-300 (osteopenic to dense, +-10 % between the levels of a case), texture
  SD 15-60 HU with a 0.5-2 mm grain, stretched along z (vertical trabeculae) in osteopenic bone;
  cortical shell 0.3-1.2 mm thick at 700-1600 HU;
* partial volume: slices 1-1.6 x thicker than their spacing (a z blur growing with the slice
  thickness) and a softer kernel (in-plane blur sigma up to 0.5 mm);
* neighbours, each present with probability ``v`` (gas: ``0.85 v``): ribs T3-T12 in a chest wall
  (lateral of the transverse processes, 2.5 mm clear of them), the descending aorta anterior-left
  of the spine (21-27 mm wide in a fat halo, contrast 150-350 HU or plain 30-55 HU, sometimes
  calcified plaques) down to its bifurcation near L4, and 1-8 bowel gas pockets (-1000 HU) in
  front of the lumbar spine; the abdomen in front of the spine grows to make room for them.
  They are never labelled and never touch a vertebra (the spine is drawn over them), so the
  label map and fracture mask keep their meaning and intact vertebrae stay intact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from vfsearch.core.errors import BadValue, UserError
from vfsearch.core.geometry import Geometry, to_canonical
from vfsearch.core.labels import TARGET_IDS, name

DEFAULT_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.0)  # x, y, z mm
SMALL_SPACING: tuple[float, float, float] = (2.0, 2.0, 2.0)
STORED_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
MORPHOLOGIES = ("wedge", "biconcave", "crush")
GRADE_LOSS = {1: (0.20, 0.25), 2: (0.25, 0.40), 3: (0.40, 0.55)}  # height-loss bands
MEASURE_AT = (0.15, 0.50, 0.85)  # fractions of the body's antero-posterior depth

AIR_HU = -1000.0
SOFT_HU = 40.0
FAT_HU = -100.0
DISC_HU = 85.0
CSF_HU = 15.0
LUNG_HU = -850.0


@dataclass
class PhantomCase:
    """One synthetic case, arrays as stored (direction ``diag(-1, -1, 1)``), all ``(z, y, x)``.

    ``ct`` int16 HU; ``vertebrae`` uint8 VerSe ids 11..24 (whole vertebra); ``fracture`` uint8
    0/1; ``meta`` maps each VerSe id to ``{"name", "grade" (0-3), "morphology"
    ("none|wedge|biconcave|crush"), "height_ratio" (measured min/max of the body heights at
    15/50/85 % of its depth), "heights_mm", "height_loss", "endplate"}``; ``info`` holds
    case-level values (seed, spacing, bone density, noise sigma, ...).
    """

    ct: np.ndarray
    vertebrae: np.ndarray
    fracture: np.ndarray
    geometry: Geometry
    meta: dict[int, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# anatomy tables (T3, T4..L5, S1): mm, before per-case scaling
# --------------------------------------------------------------------------------------------

_LEVELS = (10, *TARGET_IDS, 25)  # 10 = T3 and 25 = "S1" are drawn but not labelled


def _interp(anchors: dict[int, float], vid: int) -> float:
    keys = sorted(anchors)
    return float(np.interp(vid, keys, [anchors[k] for k in keys]))


_HEIGHT = {10: 16.5, 11: 17.0, 15: 19.5, 19: 23.0, 20: 24.5, 22: 26.5, 24: 27.0, 25: 28.0}
_DEPTH = {10: 23.0, 11: 24.0, 19: 29.0, 22: 33.0, 24: 34.0, 25: 35.0}
_WIDTH = {10: 27.0, 11: 28.0, 19: 38.0, 22: 48.0, 24: 52.0, 25: 54.0}
_DISC = {10: 3.5, 11: 4.0, 19: 6.0, 22: 9.0, 24: 10.0, 25: 10.0}  # disc above this level
_CANAL_X = {10: 8.0, 19: 9.0, 24: 12.0, 25: 12.0}
_CANAL_Y = {10: 7.5, 19: 7.5, 24: 8.5, 25: 8.5}
_PEDICLE_R = {10: 2.8, 19: 3.5, 24: 4.5, 25: 4.5}
_SPINOUS_LEN = {10: 32.0, 19: 30.0, 24: 27.0, 25: 20.0}
_SPINOUS_DROP = {10: 0.75, 16: 0.6, 19: 0.3, 20: 0.05, 25: 0.0}  # inferior slope dz/dy
_TRANSVERSE_X = {10: 27.0, 19: 24.0, 22: 38.0, 24: 34.0, 25: 30.0}
_TRANSVERSE_Y = {10: 11.0, 19: 8.0, 20: 2.0, 25: 0.0}


@dataclass
class _Vertebra:
    vid: int  # VerSe id; 10 and 25 are unlabelled neighbours
    label: int
    z_lo: int  # first voxel index of the body (canonical z)
    n: int  # body height in voxels
    cx: float
    cy: float  # canal centre, mm
    a: float  # body half width
    b: float  # body half depth of the ellipse
    depth: float  # antero-posterior depth at the midline (posterior wall flattened)
    y_ant: float
    y_post: float
    canal: tuple[float, float]
    inner_hu: float
    grade: int = 0
    morphology: str = "none"
    k_sup: int = 0
    k_inf: int = 0
    band_mm: float = 0.0
    band_hu: float = 0.0
    concavity: float = 0.0


# --------------------------------------------------------------------------------------------
# fracture profiles: loss weight (0..1) over the body's AP fraction t (0 anterior, 1 posterior)
# and lateral fraction u (-1..1). Flat around t = 0.15, 0.5 and 0.85 so the measured heights
# do not depend on where exactly a measurement samples.
# --------------------------------------------------------------------------------------------


def _ramp(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 at ``v <= lo``, 1 at ``v >= hi``, cosine in between."""
    s = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    return 0.5 - 0.5 * np.cos(np.pi * s)


def loss_weight(morphology: str, t: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Height-loss weight of a fracture shape at AP fraction ``t`` and lateral fraction ``u``.

    wedge: anterior collapse (1 for t <= 0.27, 0 for t >= 0.73); biconcave: central
    depression (1 within radius 0.2 of the centre, 0 beyond 0.5, rim intact); crush: middle and
    posterior collapse (0 for t <= 0.25, 1 for t >= 0.4).
    """
    if morphology == "wedge":
        return 1.0 - _ramp(t, 0.27, 0.73) + 0.0 * u
    if morphology == "biconcave":
        rho = np.sqrt(((t - 0.5) / 0.5) ** 2 + u**2)
        return 1.0 - _ramp(rho, 0.2, 0.5)
    if morphology == "crush":
        return _ramp(t, 0.25, 0.40) * (1.0 - 0.3 * _ramp(np.abs(u), 0.7, 1.0))
    raise UserError(
        f"fracture morphology: must be one of {', '.join(MORPHOLOGIES)}, got {morphology!r}"
    )


_SUP_SHARE = {"wedge": 0.8, "biconcave": 0.5, "crush": 0.6}


def grade_of_loss(loss: float) -> int:
    """Genant grade of a height loss fraction (0 below 20 %)."""
    if loss >= 0.40 - 1e-9:
        return 3
    if loss >= 0.25 - 1e-9:
        return 2
    if loss > 0.20 - 1e-9:
        return 1
    return 0


def _voxel_loss(n: int, grade: int, rng: np.random.Generator) -> int:
    """Whole voxels of height loss for a body of ``n`` voxels, near the grade's band."""
    lo, hi = GRADE_LOSS[grade]
    want = rng.uniform(lo + 0.005, hi - 0.005)
    ks = np.arange(1, max(2, n - 1))
    losses = ks / n
    ok = ks[(losses > 0.20 + 1e-6) & (losses < 0.6)]  # ratio strictly below 0.8
    if len(ok) == 0:
        return 0
    in_band = ok[(ok / n >= lo - 1e-9) & (ok / n < hi - 1e-9)]
    pool = in_band if len(in_band) else ok
    return int(pool[np.argmin(np.abs(pool / n - want))])


# --------------------------------------------------------------------------------------------
# signed distances (mm, positive inside)
# --------------------------------------------------------------------------------------------


def _ellipse_sd(dx: np.ndarray, dy: np.ndarray, a: float, b: float) -> np.ndarray:
    """First-order signed distance to an ellipse (exact on the boundary, clipped far away)."""
    f = (dx / a) ** 2 + (dy / b) ** 2
    g = 2.0 * np.sqrt((dx / a**2) ** 2 + (dy / b**2) ** 2)
    return np.clip((1.0 - f) / np.maximum(g, 1e-3), -60.0, 60.0)


def _segment_sd(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float
) -> np.ndarray:
    """Signed distance to a 2D capsule (segment ``p0``-``p1`` with radius ``r``)."""
    vx, vy = p1[0] - p0[0], p1[1] - p0[1]
    wx, wy = x - p0[0], y - p0[1]
    h = np.clip((wx * vx + wy * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
    return r - np.sqrt((wx - h * vx) ** 2 + (wy - h * vy) ** 2)


def _phi(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    out: np.ndarray = ndtr(x).astype(np.float32)
    return out


class _Grid:
    """Canonical voxel grid: centre coordinates in mm along each axis."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        spacing_zyx: tuple[float, float, float],
        origin_zyx: tuple[float, float, float],
    ):
        self.shape = shape
        self.sp = spacing_zyx
        self.z = (origin_zyx[0] + spacing_zyx[0] * np.arange(shape[0])).astype(np.float32)
        self.y = (origin_zyx[1] + spacing_zyx[1] * np.arange(shape[1])).astype(np.float32)
        self.x = (origin_zyx[2] + spacing_zyx[2] * np.arange(shape[2])).astype(np.float32)

    def box(
        self, zr: tuple[float, float], yr: tuple[float, float], xr: tuple[float, float]
    ) -> tuple[slice, slice, slice] | None:
        out: list[slice] = []
        for axis, (lo, hi) in zip((self.z, self.y, self.x), (zr, yr, xr), strict=True):
            i0 = int(np.searchsorted(axis, lo, side="left"))
            i1 = int(np.searchsorted(axis, hi, side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.z[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.x[sl[2]][None, None, :],
        )


class _Bone:
    """Union of bone primitives: max signed distance, its blur width, core HU and label."""

    def __init__(self, shape: tuple[int, int, int]):
        self.d = np.full(shape, -30.0, dtype=np.float32)
        self.s = np.ones(shape, dtype=np.float32)
        self.inner = np.zeros(shape, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)

    def add(
        self,
        sl: tuple[slice, slice, slice],
        d: np.ndarray,
        s: np.ndarray,
        inner: np.ndarray | float,
        label: int,
    ) -> None:
        d = np.broadcast_to(d, self.d[sl].shape)
        upd = d > self.d[sl]
        self.d[sl][upd] = d[upd]
        self.s[sl][upd] = np.broadcast_to(s, upd.shape)[upd]
        self.inner[sl][upd] = np.broadcast_to(np.asarray(inner, np.float32), upd.shape)[upd]
        lab = self.label[sl]
        lab[upd & (d >= 0)] = label
        lab[upd & (d < 0)] = 0


# --------------------------------------------------------------------------------------------
# the case
# --------------------------------------------------------------------------------------------


def case_rng(seed: int, index: int = 0) -> np.random.Generator:
    """Generator of case ``index`` of a dataset with ``seed`` (independent of the case count)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]))


# --------------------------------------------------------------------------------------------
# variety: per-case scanner and patient randomisation (opt-in, ``make_case(variety=...)``)
# --------------------------------------------------------------------------------------------

# full ranges at variety 1; at variety v a value is ``base + v * (draw - base)`` where ``base``
# is what variety 0 uses, so the range of each knob widens linearly from today's to these
VARIETY_INPLANE_MM = (0.6, 1.0)  # default field of view (small: SMALL_VARIETY_INPLANE_MM)
SMALL_VARIETY_INPLANE_MM = (1.5, 2.5)
VARIETY_SLICE_MM = (1.0, 3.0)
VARIETY_TRABECULAR_HU = (80.0, 300.0)  # osteopenic to dense
VARIETY_TEXTURE_SD_HU = (15.0, 60.0)
VARIETY_TEXTURE_MM = (0.5, 2.0)  # trabecular texture correlation length
VARIETY_CORTEX_HU = (700.0, 1600.0)
VARIETY_CORTEX_MM = (0.3, 1.2)
VARIETY_NOISE_HU = (5.0, 40.0)  # log-uniform
VARIETY_NOISE_BLUR_XY = (0.3, 1.8)  # voxels (grain size), variety 0: 0.6
VARIETY_NOISE_BLUR_Z = (0.0, 0.8)  # voxels, variety 0: 0
VARIETY_SLICE_FACTOR = (1.0, 1.6)  # slice thickness / slice spacing (overlapping slices)
VARIETY_KERNEL_MM = (0.0, 0.5)  # extra in-plane blur sigma (a softer kernel)
VARIETY_DENSITY_PER_LEVEL = 0.1  # +- share of trabecular HU between the levels of a case


def check_variety(variety: float) -> float:
    """``variety`` as a float in [0, 1]; `ValueError` otherwise."""
    v = float(variety)
    if not 0.0 <= v <= 1.0:  # also refuses NaN
        raise ValueError(f"variety must be between 0 and 1, got {variety}")
    return v


@dataclass
class _Variety:
    """Draws of one case at variety ``level`` (full-range values are blended in `make_case`)."""

    level: float
    rng: np.random.Generator  # the variety stream; the neighbouring structures draw on
    spacing: tuple[float, float, float]  # x, y, z mm, already blended
    trab_hu: float
    level_density: dict[int, float]  # per level factor on the trabecular HU
    tex_sd: float
    tex_mm: float
    cort_hu: float
    cort_mm: float
    noise_sd: float
    noise_blur_xy: float
    noise_blur_z: float
    slice_factor: float
    kernel_mm: float
    extra_front: float  # mm of abdomen added in front of the spine (room for aorta and gas)
    ribs: bool
    aorta: bool
    contrast: bool
    gas: bool


def _variety_rng(rng: np.random.Generator) -> np.random.Generator:
    """An independent stream derived from the case generator without consuming its draws."""
    try:
        return rng.spawn(1)[0]
    except (TypeError, ValueError, AttributeError):  # a generator without a SeedSequence
        return np.random.default_rng(int(rng.integers(0, 2**63 - 1)))


def _draw_variety(vrng: np.random.Generator, v: float, small: bool) -> _Variety:
    """All per-case variety draws, in a fixed order (the spacing already blended at ``v``)."""

    def mix(base: float, lo: float, hi: float) -> float:
        return base + v * (float(vrng.uniform(lo, hi)) - base)

    def full(lo: float, hi: float) -> float:
        return float(vrng.uniform(lo, hi))

    xy_base = SMALL_SPACING[0] if small else DEFAULT_SPACING[0]
    xy_lo, xy_hi = SMALL_VARIETY_INPLANE_MM if small else VARIETY_INPLANE_MM
    sxy = round(mix(xy_base, xy_lo, xy_hi), 2)
    sz = round(mix(DEFAULT_SPACING[2], *VARIETY_SLICE_MM), 2)
    trab = full(*VARIETY_TRABECULAR_HU)
    dens = {
        lv: 1.0 + v * full(-VARIETY_DENSITY_PER_LEVEL, VARIETY_DENSITY_PER_LEVEL) for lv in _LEVELS
    }
    tex_sd, tex_mm = full(*VARIETY_TEXTURE_SD_HU), full(*VARIETY_TEXTURE_MM)
    cort_hu, cort_mm = full(*VARIETY_CORTEX_HU), full(*VARIETY_CORTEX_MM)
    lo, hi = np.log(VARIETY_NOISE_HU[0]), np.log(VARIETY_NOISE_HU[1])
    noise_sd = float(np.exp(vrng.uniform(lo, hi)))
    blur_xy, blur_z = mix(0.6, *VARIETY_NOISE_BLUR_XY), mix(0.0, *VARIETY_NOISE_BLUR_Z)
    slice_factor, kernel_mm = mix(1.0, *VARIETY_SLICE_FACTOR), mix(0.0, *VARIETY_KERNEL_MM)
    extra_front = v * (40.0 if small else full(10.0, 50.0))
    ribs, aorta = bool(vrng.random() < v), bool(vrng.random() < v)
    contrast, gas = bool(vrng.random() < 0.5), bool(vrng.random() < 0.85 * v)
    return _Variety(
        level=v,
        rng=vrng,
        spacing=(sxy, sxy, sz),
        trab_hu=trab,
        level_density=dens,
        tex_sd=tex_sd,
        tex_mm=tex_mm,
        cort_hu=cort_hu,
        cort_mm=cort_mm,
        noise_sd=noise_sd,
        noise_blur_xy=blur_xy,
        noise_blur_z=blur_z,
        slice_factor=slice_factor,
        kernel_mm=kernel_mm,
        extra_front=extra_front,
        ribs=ribs,
        aorta=aorta,
        contrast=contrast,
        gas=gas,
    )


def _blend(base: float, drawn: float, v: float) -> float:
    return base + v * (drawn - base)


def make_case(
    seed: int | np.random.Generator,
    *,
    spacing: tuple[float, float, float] | None = None,
    small: bool = False,
    fracture_rate: float = 0.22,
    variety: float = 0.0,
) -> PhantomCase:
    """Generate one synthetic thoracolumbar CT case (T4..L5).

    ``spacing`` is (x, y, z) in mm; default 0.8 x 0.8 x 2.0 (``small``: 2 x 2 x 2 with a
    ~64 x 64 in-plane field of view, well under a second). ``fracture_rate`` is the expected
    share of fractured vertebrae (about 0.22 gives 20-25 %); when it is above 0 every case has
    at least one fracture. ``variety`` (0-1, `ValueError` outside) randomises per case what
    differs between scanners and patients (see the module docstring, "Variety"): 0 gives
    exactly the standard phantom, 1 the full ranges; with ``spacing=None`` the spacing is drawn
    too. Returns a `PhantomCase` (arrays as stored, see the module docstring).
    """
    rng = seed if isinstance(seed, np.random.Generator) else case_rng(int(seed), 0)
    variety = check_variety(variety)
    # the variety draws come from a stream of their own: the main stream, and so the anatomy
    # and fractures of a seed, stay as they are at variety 0
    vary = _draw_variety(_variety_rng(rng), variety, small) if variety > 0 else None
    if spacing is None and vary is not None:
        sp_xyz: tuple[float, ...] = vary.spacing
    else:
        sp_xyz = tuple(float(v) for v in (spacing or (SMALL_SPACING if small else DEFAULT_SPACING)))
    if len(sp_xyz) != 3 or min(sp_xyz) < 0.3 or max(sp_xyz) > 4.0:
        raise BadValue("spacing", f"each value must be between 0.3 and 4 mm, got {sp_xyz}")
    if not 0.0 <= fracture_rate <= 1.0:
        raise BadValue("fracture_rate", f"must be between 0 and 1, got {fracture_rate}")
    sx, sy, sz = sp_xyz

    # ---- per-case anatomy and physics parameters
    scale_h = rng.uniform(0.94, 1.06)
    scale_w = rng.uniform(0.92, 1.08)
    trab_hu = rng.uniform(100.0, 220.0)  # trabecular density varies between patients
    tex_sd = rng.uniform(25.0, 40.0)
    cort_hu = rng.uniform(1150.0, 1300.0)
    cort_mm = rng.uniform(0.5, 0.6)
    noise_sd = rng.uniform(12.0, 28.0)
    soft_hu = SOFT_HU + rng.uniform(-4.0, 6.0)
    fat_hu = FAT_HU + rng.uniform(-10.0, 10.0)
    kyph, lord, scol = rng.uniform(3, 8), rng.uniform(3, 8), rng.uniform(-4, 4)
    if vary is not None:  # widen today's ranges towards the variety ranges
        trab_hu = _blend(trab_hu, vary.trab_hu, variety)
        tex_sd = _blend(tex_sd, vary.tex_sd, variety)
        cort_hu = _blend(cort_hu, vary.cort_hu, variety)
        cort_mm = _blend(cort_mm, vary.cort_mm, variety)
        noise_sd = _blend(noise_sd, vary.noise_sd, variety)
    # point-spread function (FWHM ~ voxel, at least 1 mm as for a body kernel) plus the voxel
    # box along each axis: the blur a surface gets
    s_zyx = tuple(float(np.sqrt((max(v, 1.0) / 2.355) ** 2 + v * v / 12.0)) for v in (sz, sy, sx))

    # ---- z layout on the grid: bodies and discs are whole voxels, from S1 (bottom) up to T3
    margin_lo, margin_hi = 16.0, 12.0
    levels = list(_LEVELS)[::-1]  # 25 (S1), 24 (L5), ..., 11 (T4), 10 (T3)
    heights = {v: _interp(_HEIGHT, v) * scale_h * rng.uniform(0.98, 1.02) for v in levels}
    n_vox = {v: max(4, round(heights[v] / sz)) for v in levels}
    disc_vox = {v: max(1, round(_interp(_DISC, v) * scale_h / sz)) for v in levels}
    z_lo: dict[int, int] = {}
    k = 0
    for v in levels:
        z_lo[v] = k
        k += n_vox[v] + disc_vox[v]
    # crop: part of S1 below L5 and part of T3 above T4 stay in the field of view
    k_first = z_lo[24] - disc_vox[25] - round(margin_lo / sz)
    k_last = z_lo[11] + n_vox[11] + disc_vox[11] + round(margin_hi / sz)
    nz = k_last - k_first
    for v in levels:
        z_lo[v] -= k_first

    # ---- cross-sections and spine curve (translation only, so heights stay vertical)
    z_t4 = (z_lo[11] + n_vox[11] / 2) * sz
    z_t12 = (z_lo[19] + n_vox[19] / 2) * sz
    z_l5 = (z_lo[24] + n_vox[24] / 2) * sz
    verts: dict[int, _Vertebra] = {}
    for v in levels:
        zc = (z_lo[v] + n_vox[v] / 2) * sz
        if zc >= z_t12:
            cy = kyph * np.sin(np.pi * np.clip((zc - z_t12) / (z_t4 - z_t12), 0, 1))
        else:
            cy = -lord * np.sin(np.pi * np.clip((zc - z_l5) / (z_t12 - z_l5), 0, 1))
        cx = scol * np.sin(np.pi * np.clip((zc - z_l5) / (z_t4 - z_l5), 0, 1))
        a = _interp(_WIDTH, v) / 2 * scale_w * rng.uniform(0.97, 1.03)
        depth = _interp(_DEPTH, v) * scale_w * rng.uniform(0.97, 1.03)
        b = depth / 1.8  # the posterior wall flattens the ellipse at 0.8 b behind its centre
        rcx, rcy = _interp(_CANAL_X, v), _interp(_CANAL_Y, v)
        y_post = cy - rcy - 0.5
        verts[v] = _Vertebra(
            vid=v,
            label=v if v in TARGET_IDS else 0,
            z_lo=z_lo[v],
            n=n_vox[v],
            cx=float(cx),
            cy=float(cy),
            a=a,
            b=b,
            depth=depth,
            y_ant=y_post - depth,
            y_post=y_post,
            canal=(rcx, rcy),
            inner_hu=trab_hu if vary is None else trab_hu * vary.level_density[v],
            concavity=min(0.4 * sz, 1.2) * rng.uniform(0.5, 1.0),
        )

    # ---- fractures: more likely at the thoracolumbar junction and mid-thorax
    ids = list(TARGET_IDS)
    idx = np.arange(len(ids))
    weight = 1 + 1.5 * np.exp(-0.5 * (idx - 8.5) ** 2) + 0.8 * np.exp(-0.5 * (idx - 3.5) ** 2)
    p = np.clip(fracture_rate * weight * len(ids) / weight.sum(), 0.0, 0.95)
    chosen = [ids[i] for i in idx[rng.random(len(ids)) < p]]
    if fracture_rate > 0 and not chosen:
        chosen = [ids[int(rng.choice(idx, p=weight / weight.sum()))]]
    for v in ids:  # draw for every level, so a case's shape does not depend on which broke
        grade = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
        morph = str(rng.choice(MORPHOLOGIES, p=[0.5, 0.3, 0.2]))
        band_mm = max(3.0, 1.5 * sz) + rng.uniform(0.0, 1.5)
        band_hu = rng.uniform(180.0, 320.0)
        sup_first = rng.random() < 0.8  # superior endplates break more often
        kv = _voxel_loss(verts[v].n, grade, rng)
        if v not in chosen or kv == 0:
            continue
        share = _SUP_SHARE[morph] if sup_first else 1.0 - _SUP_SHARE[morph]
        k_sup = round(kv * share)
        vt = verts[v]
        vt.k_sup, vt.k_inf = k_sup, kv - k_sup
        vt.grade = grade_of_loss(kv / vt.n)
        vt.morphology, vt.band_mm, vt.band_hu = morph, band_mm, band_hu

    # ---- torso and field of view (the body outline follows from the spine's extent)
    tips = {v: _spinous(verts[v])[1] for v in levels}
    y_tip = max(t[1] + 3.0 for t in tips.values())
    # the torso encloses the spine with soft tissue in front (the abdomen; little when small)
    y_front = min(vt.y_ant for vt in verts.values())
    if small:
        a_t, front, back, m = rng.uniform(56, 60), rng.uniform(16, 20), rng.uniform(6, 9), 4.0
        fat_mm = rng.uniform(4.0, 6.0)
    else:
        a_t, front, back, m = rng.uniform(110, 125), rng.uniform(60, 80), rng.uniform(18, 28), 8.0
        fat_mm = rng.uniform(10.0, 25.0)
    if vary is not None:
        front += vary.extra_front
    b_t = (y_tip + back - (y_front - front)) / 2
    y_tc = y_tip + back - b_t
    nx = round(2 * (a_t + m) / sx)
    ny = round(2 * (b_t + m) / sy)
    origin_zyx = (0.0, y_tc - (ny - 1) * sy / 2, -(nx - 1) * sx / 2)
    grid = _Grid((nz, ny, nx), (sz, sy, sx), origin_zyx)

    # ---- background tissue: air, fat layer, soft tissue (2D, the same on every slice)
    yy, xx = grid.y[:, None], grid.x[None, :]
    d_t = _ellipse_sd(xx, yy - y_tc, a_t, b_t)
    ant = np.clip((y_tc - yy) / b_t, 0, 1)  # a little more fat in front
    in_body = _phi(d_t / s_zyx[2])
    in_muscle = _phi((d_t - fat_mm * (1 + 0.3 * ant)) / s_zyx[2])
    bg2d = AIR_HU + in_body * (fat_hu - AIR_HU) + in_muscle * (soft_hu - fat_hu)
    ct = np.broadcast_to(bg2d.astype(np.float32), grid.shape).copy()

    # lungs (default size only: a small torso has no room beside the spine)
    if a_t > 80:
        _add_lungs(ct, grid, verts, a_t, b_t, y_tc, s_zyx, rng)

    # neighbouring structures (label 0), drawn before the spine so bone and discs stay on top
    structures: dict[str, Any] = {}
    if vary is not None:
        torso = _Torso(a_t, b_t, y_tc, fat_mm, fat_hu, trab_hu, cort_hu, small, a_t > 80, bg2d)
        structures = _add_neighbours(ct, grid, verts, torso, s_zyx, vary)

    # ---- spinal canal and discs, then bone, inside a box around the spine
    xs_all = [vt.cx for vt in verts.values()]
    spine_sl = grid.box(
        (-1e9, 1e9),
        (min(vt.y_ant for vt in verts.values()) - 12, y_tip + 10),
        (min(xs_all) - 60, max(xs_all) + 60),
    )
    assert spine_sl is not None
    bone = _Bone(tuple(s.stop - s.start for s in spine_sl))
    sub = _Grid(
        bone.d.shape,
        (sz, sy, sx),
        (
            float(grid.z[spine_sl[0]][0]),
            float(grid.y[spine_sl[1]][0]),
            float(grid.x[spine_sl[2]][0]),
        ),
    )
    bg = ct[spine_sl]
    _add_canal(bg, sub, verts, levels, s_zyx)
    for lower, upper in itertools.pairwise(levels):
        _add_disc(bg, sub, verts[lower], verts[upper], s_zyx)

    tex = rng.standard_normal(bone.d.shape, dtype=np.float32)
    from scipy.ndimage import gaussian_filter

    if vary is None:
        tex_sigma = [max(0.5, 0.8 / v) for v in (sz, sy, sx)]
    else:
        # coarser grain at random; osteopenic bone keeps its vertical trabeculae (streaks)
        tex_mm = _blend(0.8, vary.tex_mm, variety)
        streak = 1.0 + 1.5 * variety * float(np.clip((170.0 - trab_hu) / 90.0, 0.0, 1.0))
        tex_sigma = [max(0.5, tex_mm * streak / sz), max(0.5, tex_mm / sy), max(0.5, tex_mm / sx)]
    tex = gaussian_filter(tex, tex_sigma, mode="wrap")
    tex *= tex_sd / max(float(tex.std()), 1e-6)
    fracture_sub = np.zeros(bone.d.shape, dtype=bool)
    for v in levels:
        _add_vertebra(bone, sub, verts[v], s_zyx, fracture_sub)
    bone.inner += tex

    f_bone = _phi(bone.d / bone.s)
    f_core = _phi((bone.d - cort_mm) / bone.s)
    bg *= 1.0 - f_bone
    bg += cort_hu * (f_bone - f_core) + bone.inner * f_core
    fracture_sub &= np.isin(bone.label, [v for v in TARGET_IDS if verts[v].grade > 0])
    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[spine_sl] = bone.label
    fracture = np.zeros(grid.shape, dtype=np.uint8)
    fracture[spine_sl] = fracture_sub

    noise_blur = (0.0, 0.6, 0.6)
    slice_mm = sz
    if vary is not None:
        # partial volume: a slice thicker than its spacing (overlapping reconstruction) widens
        # the z profile by a box of the extra thickness; a softer kernel blurs in-plane
        slice_mm = vary.slice_factor * sz
        pv = (
            float(np.sqrt((vary.slice_factor**2 - 1.0) / 12.0)),
            vary.kernel_mm / sy,
            vary.kernel_mm / sx,
        )
        if max(pv) > 0.05:
            ct = gaussian_filter(ct, pv, mode="nearest")
        noise_blur = (vary.noise_blur_z, vary.noise_blur_xy, vary.noise_blur_xy)

    # ---- noise: correlated in-plane like filtered back-projection noise
    noise = rng.standard_normal(grid.shape, dtype=np.float32)
    noise = gaussian_filter(noise, noise_blur, mode="wrap")
    noise *= noise_sd / max(float(noise[:: max(1, nz // 16)].std()), 1e-6)
    ct += noise
    ct_i16 = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    # ---- meta: heights measured on the label map, as a reader of the files would
    spacing_zyx = (sz, sy, sx)
    meta: dict[int, dict[str, Any]] = {}
    for v in TARGET_IDS:
        vt = verts[v]
        h = measure_heights(labels, v, spacing_zyx)
        meta[v] = {
            "name": name(v),
            "grade": vt.grade,
            "morphology": vt.morphology,
            "height_ratio": round(h["ratio"], 4),
            "heights_mm": [round(x, 2) for x in h["heights_mm"]],
            "height_loss": round((vt.k_sup + vt.k_inf) / vt.n, 4),
            "endplate": (
                "none"
                if vt.grade == 0
                else "both"
                if vt.k_sup and vt.k_inf
                else "superior"
                if vt.k_sup
                else "inferior"
            ),
            "band_mm": round(vt.band_mm, 2),
        }

    # ---- store as dcm2niix often does: x and y flipped, direction diag(-1, -1, 1)
    origin = (float(grid.x[-1]), float(grid.y[-1]), float(grid.z[0]))
    geometry = Geometry((sx, sy, sz), origin, STORED_DIRECTION)
    info: dict[str, Any] = {
        "spacing": [sx, sy, sz],
        "shape_zyx": [nz, ny, nx],
        "small": bool(small),
        "fracture_rate": float(fracture_rate),
        "trabecular_hu": round(trab_hu, 1),
        "cortex_hu": round(cort_hu, 1),
        "cortex_mm": round(cort_mm, 3),
        "noise_sigma_hu": round(noise_sd, 2),
        "soft_tissue_hu": round(soft_hu, 1),
        "fat_hu": round(fat_hu, 1),
        "z_order": "inferior to superior",
        "labels": "whole vertebra (body + posterior elements), VerSe ids 11-24",
    }
    if vary is not None:
        info["variety"] = variety
        info["slice_thickness_mm"] = round(slice_mm, 2)
        info["kernel_blur_mm"] = round(vary.kernel_mm, 3)
        info["noise_blur_vox_zyx"] = [round(float(b), 3) for b in noise_blur]
        info["texture_sd_hu"] = round(tex_sd, 1)
        info["structures"] = structures
    flip = (slice(None), slice(None, None, -1), slice(None, None, -1))
    return PhantomCase(
        np.ascontiguousarray(ct_i16[flip]),
        np.ascontiguousarray(labels[flip]),
        np.ascontiguousarray(fracture[flip]),
        geometry,
        meta,
        info,
    )


def _spinous(vt: _Vertebra) -> tuple[tuple[float, float], tuple[float, float]]:
    rcy = vt.canal[1]
    base = (vt.cx, vt.cy + rcy + 2.0)
    tip = (vt.cx, vt.cy + rcy + 2.0 + _interp(_SPINOUS_LEN, vt.vid))
    return base, tip


def _add_lungs(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    a_t: float,
    b_t: float,
    y_tc: float,
    s_zyx: tuple[float, ...],
    rng: np.random.Generator,
) -> None:
    z_dia = (verts[18].z_lo + verts[18].n / 2) * grid.sp[0]  # diaphragm dome near T11
    sl = grid.box((z_dia - 5, 1e9), (-1e9, 1e9), (-1e9, 1e9))
    if sl is None:
        return
    z, y, x = grid.coords(sl)
    lung = np.full(np.broadcast_shapes(z.shape, y.shape, x.shape), -60.0, dtype=np.float32)
    for side in (-1, 1):
        cx, ax, ay = side * 0.55 * a_t, 0.38 * a_t, 0.72 * b_t
        d2 = _ellipse_sd(x - cx, y - (y_tc + 0.05 * b_t), ax, ay)
        d2 = np.minimum(d2, np.abs(x) - 34.0)  # mediastinum and spine stay soft tissue
        r2 = ((x - cx) / ax) ** 2 + ((y - y_tc) / ay) ** 2
        dz = z - (z_dia + 30.0 * np.clip(1 - r2, 0, 1))  # domed diaphragm
        lung = np.maximum(lung, np.minimum(d2, dz))
    f = _phi(lung / s_zyx[2])
    hu = LUNG_HU + rng.uniform(-30, 30)
    ct[sl] = ct[sl] * (1 - f) + hu * f


@dataclass
class _Torso:
    a: float  # half width, mm
    b: float  # half depth
    yc: float  # centre (y)
    fat_mm: float
    fat_hu: float
    trab_hu: float
    cort_hu: float
    small: bool
    lungs: bool
    bg2d: np.ndarray  # the background slice before the lungs: air, fat, soft tissue

    def inner(self, inset: float) -> tuple[float, float]:
        """Half axes of the ellipse ``inset`` mm inside the subcutaneous fat (thicker in front)."""
        return self.a - self.fat_mm - inset, self.b - 1.3 * self.fat_mm - inset


def _level_z(vt: _Vertebra, sz: float) -> float:
    """Centre of a vertebral body along z, mm."""
    return (vt.z_lo + vt.n / 2 - 0.5) * sz


def _spine_front(grid: _Grid, verts: dict[int, _Vertebra]) -> np.ndarray:
    """Per slice, a y (mm) in front of the vertebral bodies and discs within 15 mm along z."""
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    sz = grid.sp[0]
    front = np.full(grid.shape[0], np.inf)
    for vt in verts.values():
        lo, hi = (vt.z_lo - 0.5) * sz - 12.0, (vt.z_lo + vt.n - 0.5) * sz + 12.0
        sel = (grid.z >= lo) & (grid.z <= hi)
        front[sel] = np.minimum(front[sel], vt.y_ant - 1.5)  # a disc bulges ~1 mm further
    finite = np.isfinite(front)
    front[~finite] = float(front[finite].min()) if finite.any() else 0.0
    r = max(1, round(15.0 / sz))
    front = minimum_filter1d(front, 2 * r + 1, mode="nearest")
    # a moving mean narrower than the minimum's window stays in front of every body it passes
    out: np.ndarray = uniform_filter1d(front, 2 * (r // 2) + 1, mode="nearest")
    return out


def _add_neighbours(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    torso: _Torso,
    s_zyx: tuple[float, ...],
    vary: _Variety,
) -> dict[str, Any]:
    """Ribs, aorta and bowel gas into the background ``ct`` (canonical, float32), in place.

    None of them is labelled (label 0) and none touches a vertebra: the aorta and the gas lie
    in front of the spine's anterior surface, the ribs start lateral of the transverse
    processes; the spine is drawn afterwards, on top. Returns what was drawn (for ``info``).
    """
    rng = vary.rng
    front = _spine_front(grid, verts)
    out: dict[str, Any] = {"ribs": 0, "aorta": None, "gas_pockets": 0}
    path = None
    if vary.ribs and torso.lungs:  # the ribs lie in the chest wall, outside the lungs
        _add_chest_wall(ct, grid, verts, torso, 16.0, s_zyx)
    if vary.aorta:
        out["aorta"], path = _add_aorta(ct, grid, verts, torso, front, s_zyx, rng, vary.contrast)
    if vary.gas:
        out["gas_pockets"] = _add_gas(ct, grid, verts, torso, front, path, s_zyx, rng)
    if vary.ribs:
        out["ribs"] = _add_ribs(ct, grid, verts, torso, s_zyx, rng)
    return out


def _add_chest_wall(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    torso: _Torso,
    width: float,
    s_zyx: tuple[float, ...],
) -> None:
    """Above the diaphragm, the lungs give way to the chest wall: fat and ``width`` mm muscle."""
    z_dia = (verts[18].z_lo + verts[18].n / 2) * grid.sp[0]  # as in `_add_lungs`
    sl = grid.box((z_dia - 6.0, 1e9), (-1e9, 1e9), (-1e9, 1e9))
    if sl is None:
        return
    y, x = grid.y[:, None], grid.x[None, :]
    d_t = _ellipse_sd(x, y - torso.yc, torso.a, torso.b)
    fat = torso.fat_mm * (1 + 0.3 * np.clip((torso.yc - y) / torso.b, 0, 1))
    f = _phi((fat + width - d_t) / s_zyx[2])
    ct[sl] = ct[sl] * (1.0 - f) + torso.bg2d * f


def _add_aorta(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    torso: _Torso,
    front: np.ndarray,
    s_zyx: tuple[float, ...],
    rng: np.random.Generator,
    contrast: bool,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Descending aorta anterior-left of the spine down to its bifurcation near L4.

    ~21-27 mm wide (narrowing by 15 % towards the bifurcation), in a halo of fat, contrast
    enhanced (150-350 HU) or not (30-55 HU), sometimes with calcified wall plaques. Returns its
    info and its path per slice: centre x, centre y and radius (mm; radius 0 below its end).
    """
    sz = grid.sp[0]
    order = sorted(verts.values(), key=lambda vt: vt.z_lo)
    zs = [_level_z(vt, sz) for vt in order]
    cx = np.interp(grid.z, zs, [vt.cx for vt in order])
    z_l2, z_t11 = _level_z(verts[21], sz), _level_z(verts[18], sz)
    off = np.interp(grid.z, [z_l2, z_t11], [rng.uniform(6.0, 14.0), rng.uniform(14.0, 24.0)])
    r_top = float(rng.uniform(10.5, 13.5))
    z_bif = _level_z(verts[23], sz) - float(rng.uniform(0.0, 0.5)) * verts[23].n * sz
    z_top = float(grid.z[-1])
    taper = np.clip((grid.z - z_bif) / max(z_top - z_bif, 1.0), 0.0, 1.0)
    r = r_top * (0.85 + 0.15 * taper)
    gap, halo = float(rng.uniform(1.5, 4.0)), float(rng.uniform(1.0, 4.0))
    xa = cx + off
    ya = front - gap - r
    hu = float(rng.uniform(150.0, 350.0) if contrast else rng.uniform(30.0, 55.0))
    pad = r_top + halo + 6.0
    sl = grid.box(
        (z_bif - pad, 1e9),
        (float(ya.min()) - pad, float(ya.max()) + pad),
        (float(xa.min()) - pad, float(xa.max()) + pad),
    )
    info: dict[str, Any] = {
        "contrast": contrast,
        "blood_hu": round(hu, 1),
        "diameter_mm": round(2 * r_top, 1),
        "calcifications": 0,
    }
    r_path = np.where(grid.z >= z_bif, r, 0.0)
    if sl is None:
        return info, (xa, ya, r_path)
    z, y, x = grid.coords(sl)
    kz = sl[0]
    rr = np.sqrt((x - xa[kz][:, None, None]) ** 2 + (y - ya[kz][:, None, None]) ** 2)
    r3 = r[kz][:, None, None]
    s_xy, s_z = s_zyx[2], s_zyx[0]
    f_fat = _phi((r3 + halo - rr) / s_xy) * _phi((z - z_bif + halo) / s_z)
    f = _phi((r3 - rr) / s_xy) * _phi((z - z_bif) / s_z)
    box = ct[sl] * (1.0 - f_fat) + torso.fat_hu * f_fat
    ct[sl] = box * (1.0 - f) + hu * f
    # calcified plaques on the wall, mostly in the abdominal aorta
    n_calc = int(rng.integers(1, 7)) if rng.random() < 0.4 else 0
    for _ in range(n_calc):
        k = int(np.clip(round(rng.uniform(z_bif, min(z_top, z_bif + 150.0)) / sz), 0, len(xa) - 1))
        ang, rq = float(rng.uniform(0.0, 2 * np.pi)), float(rng.uniform(1.0, 2.5))
        c = (float(grid.z[k]), ya[k] + (r[k] - rq) * np.sin(ang), xa[k] + (r[k] - rq) * np.cos(ang))
        _add_blob(ct, grid, c, (rq, rq, rq), float(rng.uniform(300.0, 900.0)), s_zyx)
    info["calcifications"] = n_calc
    return info, (xa, ya, np.where(r_path > 0, r_path + halo, 0.0))


def _add_blob(
    ct: np.ndarray,
    grid: _Grid,
    centre_zyx: tuple[float, float, float],
    radii_zyx: tuple[float, float, float],
    hu: float,
    s_zyx: tuple[float, ...],
) -> None:
    """A blurred ellipsoid of ``hu`` (axis-aligned, first-order signed distance)."""
    s = float(np.mean(s_zyx))
    pad = [rv + 3.0 * s for rv in radii_zyx]
    sl = grid.box(*((c - p, c + p) for c, p in zip(centre_zyx, pad, strict=True)))
    if sl is None:
        return
    z, y, x = grid.coords(sl)
    q = np.sqrt(
        ((z - centre_zyx[0]) / radii_zyx[0]) ** 2
        + ((y - centre_zyx[1]) / radii_zyx[1]) ** 2
        + ((x - centre_zyx[2]) / radii_zyx[2]) ** 2
    )
    f = _phi(min(radii_zyx) * (1.0 - q) / s)
    ct[sl] = ct[sl] * (1.0 - f) + hu * f


def _add_gas(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    torso: _Torso,
    front: np.ndarray,
    aorta: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    s_zyx: tuple[float, ...],
    rng: np.random.Generator,
) -> int:
    """1-8 bowel gas pockets (air, -1000 HU) in the abdomen in front of the lumbar spine."""
    sz = grid.sp[0]
    z_lo = (verts[24].z_lo - 0.5) * sz  # L5 bottom .. L1 top
    z_hi = (verts[20].z_lo + verts[20].n - 0.5) * sz
    a_in, b_in = torso.inner(3.0)
    n_want = min(8, 1 + int(rng.poisson(2.5)))
    placed = 0
    for _ in range(n_want):
        r = float(rng.uniform(3.0, 7.0) if torso.small else rng.uniform(5.0, 16.0))
        ry, rz = r * float(rng.uniform(0.6, 1.3)), r * float(rng.uniform(0.6, 1.5))
        for _try in range(40):
            zq, xq = float(rng.uniform(z_lo, z_hi)), float(rng.uniform(-a_in, a_in))
            k = int(np.clip(round(zq / sz), 0, grid.shape[0] - 1))
            y_max = float(front[k]) - 8.0 - ry  # clear of the spine
            if y_max <= torso.yc - b_in:
                continue
            yq = float(rng.uniform(torso.yc - b_in, y_max))
            corners = ((xq - r, yq), (xq + r, yq), (xq, yq - ry), (xq, yq + ry))
            if any((cx / a_in) ** 2 + ((cy - torso.yc) / b_in) ** 2 > 1.0 for cx, cy in corners):
                continue
            clear = max(r, ry) + 3.0
            if aorta is not None and np.hypot(xq - aorta[0][k], yq - aorta[1][k]) < (
                aorta[2][k] + clear if aorta[2][k] > 0 else 0.0
            ):
                continue
            _add_blob(ct, grid, (zq, yq, xq), (rz, ry, r), AIR_HU, s_zyx)
            placed += 1
            break
    return placed


def _add_ribs(
    ct: np.ndarray,
    grid: _Grid,
    verts: dict[int, _Vertebra],
    torso: _Torso,
    s_zyx: tuple[float, ...],
    rng: np.random.Generator,
) -> int:
    """Ribs of T3..T12: from just lateral of each transverse process along the chest wall.

    A tube (cortex around marrow, a little taller than wide) that starts 2.5 mm clear of the
    transverse process, reaches the inner chest wall and follows it anteriorly while sloping
    down; T11 and T12 are short (floating) ribs. Returns the number of ribs drawn.
    """
    sz = grid.sp[0]
    n = 0
    for vid in range(10, 20):
        vt = verts[vid]
        zc = (vt.z_lo - 0.5) * sz + 0.55 * vt.n * sz  # the transverse process' level
        r = float(rng.uniform(2.5, 3.5) if torso.small else rng.uniform(3.5, 5.0))
        shell = float(rng.uniform(0.7, 1.4))
        cort = torso.cort_hu * float(rng.uniform(0.8, 1.0))
        marrow = torso.trab_hu * float(rng.uniform(0.7, 1.0))
        slope = float(rng.uniform(0.3, 0.55))
        span = float(rng.uniform(0.5, 0.9) if vid >= 18 else rng.uniform(1.3, 1.8))
        a_in, b_in = torso.inner(r + 2.0)
        for side in (-1.0, 1.0):
            tx = vt.cx + side * _interp(_TRANSVERSE_X, vid)
            ty = vt.cy + _interp(_TRANSVERSE_Y, vid)
            p0x = tx + side * (3.2 + r * 1.3 + 2.5)  # 3.2: the transverse process' radius
            th1 = float(np.arccos(np.clip((ty - torso.yc) / b_in, -0.95, 0.95)))
            if a_in * np.sin(th1) < abs(p0x) + 2.0:
                continue  # no room between the process and the wall
            th = np.minimum(th1 + np.linspace(0.0, span, max(2, int(span / 0.15) + 1)), 2.9)
            px = np.concatenate([[p0x], side * a_in * np.sin(th)])
            py = np.concatenate([[ty], torso.yc + b_in * np.cos(th)])
            arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(px), np.diff(py)))])
            pz = zc - slope * arc
            _add_tube(ct, grid, np.stack([pz, py, px], axis=1), r, shell, cort, marrow, s_zyx)
            n += 1
    return n


def _add_tube(
    ct: np.ndarray,
    grid: _Grid,
    pts_zyx: np.ndarray,
    r: float,
    shell: float,
    cort_hu: float,
    marrow_hu: float,
    s_zyx: tuple[float, ...],
    aspect: float = 1.3,
) -> None:
    """A bony tube along a polyline: a ``shell`` mm cortex around marrow, ``aspect`` x taller."""
    s = float(np.sqrt((s_zyx[0] ** 2 + s_zyx[2] ** 2) / 2.0))
    pad = r * aspect + 3.0 * s + 1.0
    lo, hi = pts_zyx.min(axis=0) - pad, pts_zyx.max(axis=0) + pad
    sl = grid.box((lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2]))
    if sl is None:
        return
    sub = _Grid(
        cast("tuple[int, int, int]", tuple(v.stop - v.start for v in sl)),
        grid.sp,
        (float(grid.z[sl[0]][0]), float(grid.y[sl[1]][0]), float(grid.x[sl[2]][0])),
    )
    d = np.full(sub.shape, -30.0, dtype=np.float32)
    for p0, p1 in itertools.pairwise(pts_zyx):
        a, b = np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad
        ssl = sub.box((a[0], b[0]), (a[1], b[1]), (a[2], b[2]))
        if ssl is None:
            continue
        z, y, x = sub.coords(ssl)
        v = (p1 - p0) / np.array([aspect, 1.0, 1.0])
        wz, wy, wx = (z - p0[0]) / aspect, y - p0[1], x - p0[2]
        h = np.clip((wz * v[0] + wy * v[1] + wx * v[2]) / max(float(v @ v), 1e-9), 0.0, 1.0)
        dist = np.sqrt((wz - h * v[0]) ** 2 + (wy - h * v[1]) ** 2 + (wx - h * v[2]) ** 2)
        d[ssl] = np.maximum(d[ssl], (r - dist).astype(np.float32))
    f_b = _phi(d / s)
    f_c = _phi((d - shell) / s)
    ct[sl] = ct[sl] * (1.0 - f_b) + cort_hu * (f_b - f_c) + marrow_hu * f_c


def _add_canal(
    bg: np.ndarray,
    g: _Grid,
    verts: dict[int, _Vertebra],
    levels: Sequence[int],
    s_zyx: tuple[float, ...],
) -> None:
    zs = np.array([(verts[v].z_lo + verts[v].n / 2) * g.sp[0] for v in levels])
    z = g.z - 0.0
    cx = np.interp(z, zs, [verts[v].cx for v in levels])[:, None, None]
    cy = np.interp(z, zs, [verts[v].cy for v in levels])[:, None, None]
    rx = np.interp(z, zs, [verts[v].canal[0] for v in levels])[:, None, None]
    ry = np.interp(z, zs, [verts[v].canal[1] for v in levels])[:, None, None]
    y, x = g.y[None, :, None], g.x[None, None, :]
    d = _ellipse_sd(x - cx, y - cy, rx, ry).astype(np.float32)
    f = _phi(d / s_zyx[2])
    bg *= 1 - f
    bg += CSF_HU * f


def _body_frame(vt: _Vertebra, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP fraction t (0 anterior .. 1 posterior wall) and lateral fraction u of the body."""
    t = (y - vt.y_ant) / vt.depth
    u = (x - vt.cx) / vt.a
    return t, u


def _endplates(
    vt: _Vertebra, y: np.ndarray, x: np.ndarray, sz: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inferior and superior endplate heights (mm) over (y, x) and the loss weight."""
    t, u = _body_frame(vt, y, x)
    r2 = np.clip(((t - 0.5) / 0.5) ** 2 + u**2, 0, 1)
    conc = vt.concavity * (1 - r2)  # physiological concavity, within +-0.4 voxel
    z_inf = (vt.z_lo - 0.5) * sz + conc
    z_sup = (vt.z_lo + vt.n - 0.5) * sz - conc
    w = loss_weight(vt.morphology, t, u) if vt.grade else np.zeros_like(t * u)
    z_sup = z_sup - w * vt.k_sup * sz
    z_inf = z_inf + w * vt.k_inf * sz
    return z_inf.astype(np.float32), z_sup.astype(np.float32), w.astype(np.float32)


def _add_disc(
    bg: np.ndarray, g: _Grid, lower: _Vertebra, upper: _Vertebra, s_zyx: tuple[float, ...]
) -> None:
    sz = g.sp[0]
    z0 = (lower.z_lo + lower.n - 0.5 - lower.k_sup) * sz - 1.5
    z1 = (upper.z_lo - 0.5 + upper.k_inf) * sz + 1.5
    cx = (lower.cx + upper.cx) / 2
    a, b = (lower.a + upper.a) / 2 * 1.03, (lower.b + upper.b) / 2 * 1.03
    y_post = (lower.y_post + upper.y_post) / 2
    yc = y_post - 0.8 * b
    sl = g.box((z0, z1), (yc - b - 3, y_post + 3), (cx - a - 3, cx + a + 3))
    if sl is None:
        return
    z, y, x = g.coords(sl)
    d = np.minimum(_ellipse_sd(x - cx, y - yc, a, b), y_post - y)
    f = _phi(d / s_zyx[2]) * np.ones_like(z)
    nucleus = _phi((_ellipse_sd(x - cx, y - yc, 0.5 * a, 0.5 * b)) / 2.0)
    hu = DISC_HU + 20.0 * (1 - nucleus) - 10.0 * nucleus
    bg[sl] = bg[sl] * (1 - f) + hu * f


def _add_vertebra(
    bone: _Bone, g: _Grid, vt: _Vertebra, s_zyx: tuple[float, ...], fracture: np.ndarray
) -> None:
    sz = g.sp[0]
    s_z, s_xy = s_zyx[0], s_zyx[2]
    z_bot, z_top = (vt.z_lo - 0.5) * sz, (vt.z_lo + vt.n - 0.5) * sz
    H = z_top - z_bot
    yc = vt.y_post - 0.8 * vt.b
    # ---- body
    sl = g.box(
        (z_bot - 4, z_top + 4), (vt.y_ant - 4, vt.y_post + 4), (vt.cx - vt.a - 4, vt.cx + vt.a + 4)
    )
    if sl is not None:
        z, y, x = g.coords(sl)
        d_xy = np.minimum(_ellipse_sd(x - vt.cx, y - yc, vt.a, vt.b), vt.y_post - y)
        z_inf, z_sup, w = _endplates(vt, y, x, sz)
        d_sup, d_inf = z_sup - z, z - z_inf
        d_z = np.minimum(d_sup, d_inf)
        d = np.minimum(d_xy, d_z)
        s = np.where(d_xy < d_z, np.float32(s_xy), np.float32(s_z))
        inner = np.full(d.shape, vt.inner_hu, dtype=np.float32)
        if vt.grade:
            # sclerotic condensation band under each deformed endplate, and its mask
            mask = np.zeros(d.shape, dtype=bool)
            k_max = max(vt.k_sup, vt.k_inf)
            for k, dist in ((vt.k_sup, d_sup), (vt.k_inf, d_inf)):
                if k == 0:
                    continue
                # the less deformed endplate condenses less
                band = max(0.6 * sz, vt.band_mm * np.sqrt(k / k_max))
                zone = (w >= 0.25) & (dist <= band)
                taper = np.clip(1.0 - dist / band, 0.0, 1.0) ** 0.5
                inner += vt.band_hu * np.where(zone, taper * np.minimum(1.0, w / 0.5), 0.0)
                mask |= zone & (d >= 0)
            fracture[sl] |= mask
        bone.add(sl, d, s, inner, vt.label)
    # ---- posterior elements (denser than the body's core)
    inner_pe = vt.inner_hu + 80.0
    rcx, rcy = vt.canal
    pr = _interp(_PEDICLE_R, vt.vid)
    ped_x = rcx + pr
    zc = z_bot + 0.55 * H
    prims: list[tuple[tuple[float, float], tuple[float, float], float, float, float, float]] = []
    for side in (-1, 1):
        px = vt.cx + side * ped_x
        # pedicle, lamina, superior and inferior articular processes, transverse process
        prims.append(
            ((px, vt.y_post - 2.0), (px, vt.cy + 1.0), pr, zc - 0.25 * H, zc + 0.3 * H, 0.0)
        )
        prims.append(
            (
                (px, vt.cy + 1.0),
                (vt.cx, vt.cy + rcy + 2.5),
                3.0,
                z_bot + 0.1 * H,
                z_top - 0.05 * H,
                0.0,
            )
        )
        prims.append(
            ((px, vt.cy + 2.0), (px + side * 1.5, vt.cy + 6.0), 3.5, zc, z_top + 0.45 * H, 0.0)
        )
        prims.append(
            (
                (px, vt.cy + 4.0),
                (px - side * 1.0, vt.cy + 8.0),
                3.0,
                z_bot - 0.35 * H,
                zc - 0.1 * H,
                0.0,
            )
        )
        tx = vt.cx + side * _interp(_TRANSVERSE_X, vt.vid)
        prims.append(
            (
                (px, vt.cy + 2.0),
                (tx, vt.cy + _interp(_TRANSVERSE_Y, vt.vid)),
                3.2,
                zc - 4.5,
                zc + 4.5,
                0.0,
            )
        )
    base, tip = _spinous(vt)
    sp_h = 7.0 + 8.0 * np.clip((vt.vid - 15) / 9.0, 0, 1)
    prims.append(
        (base, tip, 2.8, zc - sp_h / 2 - 2, zc + sp_h / 2 - 2, _interp(_SPINOUS_DROP, vt.vid))
    )
    for p0, p1, r, z0, z1, drop in prims:
        ylo, yhi = min(p0[1], p1[1]) - r - 3, max(p0[1], p1[1]) + r + 3
        zlo = z0 - drop * (yhi - p0[1]) - 3
        sl = g.box(
            (zlo, z1 + 3), (ylo, yhi), (min(p0[0], p1[0]) - r - 3, max(p0[0], p1[0]) + r + 3)
        )
        if sl is None:
            continue
        z, y, x = g.coords(sl)
        d_xy = _segment_sd(x, y, p0, p1, r)
        zz = z + drop * np.maximum(y - p0[1], 0.0)  # spinous processes slope downwards
        d_z = np.minimum(zz - z0, z1 - zz)
        d = np.minimum(d_xy, d_z)
        s = np.where(d_xy < d_z, np.float32(s_xy), np.float32(s_z))
        bone.add(sl, d.astype(np.float32), s, inner_pe, vt.label)


# --------------------------------------------------------------------------------------------
# measurement on label maps (canonical orientation)
# --------------------------------------------------------------------------------------------


def body_extent(
    mask: np.ndarray, spacing_zyx: tuple[float, float, float], band_mm: float = 3.0
) -> tuple[int, int, int]:
    """Antero-posterior extent ``(y_first, y_stop, x_mid)`` of a vertebral body.

    ``mask`` is one vertebra in canonical orientation (y posterior). Near the midline the body
    is the anterior run of the label, separated from the lamina by the spinal canal; when no
    gap is found (a partial label), the anterior 45 % of the label's depth is taken.
    """
    _zz, _yy, xx = np.nonzero(mask)
    if len(xx) == 0:
        raise ValueError("empty vertebra mask")
    x_mid = round(float(np.median(xx)))
    hw = max(0, round(band_mm / spacing_zyx[2]))
    band = mask[:, :, max(0, x_mid - hw) : x_mid + hw + 1]
    prof = band.sum(axis=(0, 2))
    ys = np.nonzero(prof)[0]
    y0, y_end = int(ys[0]), int(ys[-1]) + 1
    low = prof <= 0.05 * prof.max()
    gap = np.nonzero(low[y0:y_end])[0]
    y1 = y0 + int(gap[0]) if len(gap) else y0 + max(1, round(0.45 * (y_end - y0)))
    return y0, y1, x_mid


def estimate_body(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Vertebral-body part of a whole-vertebra mask (canonical orientation), bool (z, y, x)."""
    y0, y1, _ = body_extent(mask, spacing_zyx)
    body = np.zeros_like(mask, dtype=bool)
    body[:, y0:y1, :] = mask[:, y0:y1, :]
    return body


def measure_heights(
    labels: np.ndarray, vid: int, spacing_zyx: tuple[float, float, float]
) -> dict[str, Any]:
    """Body heights (mm) at 15/50/85 % of the AP depth in the mid-sagittal slice, and min/max.

    ``labels`` in canonical orientation (z superior, y posterior). Returns
    ``{"heights_mm": [h15, h50, h85], "ratio": min/max, "depth_mm": depth}``.
    """
    mask = labels == vid
    if not mask.any():
        return {"heights_mm": [0.0, 0.0, 0.0], "ratio": 0.0, "depth_mm": 0.0}
    y0, y1, xm = body_extent(mask, spacing_zyx)
    sag = mask[:, :, xm]
    depth = y1 - y0
    heights = []
    for f in MEASURE_AT:
        yi = min(y1 - 1, max(y0, int(np.floor(y0 + f * depth))))
        heights.append(float(sag[:, yi].sum()) * spacing_zyx[0])
    hmax = max(heights)
    return {
        "heights_mm": heights,
        "ratio": (min(heights) / hmax) if hmax else 0.0,
        "depth_mm": depth * spacing_zyx[1],
    }


# --------------------------------------------------------------------------------------------
# fractures on a real scan
# --------------------------------------------------------------------------------------------


def fully_imaged(mask: np.ndarray) -> bool:
    """Whether a vertebra's label stays clear of the volume's edge along the height axis.

    ``mask`` is one vertebra in canonical orientation, so axis 0 is z (superior), the axis
    `measure_heights` measures body heights along. A vertebra whose label reaches the first
    or last z slice is cut by the scan's edge: its true height is unknown, so it cannot take
    a height-reducing fracture (a "ratio 0.00 -> 0.00" compression of a stump).
    """
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    return bool(len(zs)) and zs[0] > 0 and zs[-1] < mask.shape[0] - 1


@dataclass
class SimulatedFracture:
    """Result of `simulate_fractures`: arrays in the input's grid and orientation."""

    ct: np.ndarray
    fracture: np.ndarray  # uint8 0/1
    vertebrae: np.ndarray  # the label map with the compressed bodies
    meta: dict[int, dict[str, Any]]


def simulate_fracture(
    ct: np.ndarray,
    vertebrae: np.ndarray,
    spacing_or_geometry: Geometry | tuple[float, float, float],
    targets: dict[int, tuple[int, str]],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[int, dict[str, Any]]]:
    """Compress chosen vertebral bodies of a real CT; returns ``(ct, fracture_mask, meta)``.

    See `simulate_fractures`, which also returns the compressed label map.
    """
    res = simulate_fractures(ct, vertebrae, spacing_or_geometry, targets, rng)
    return res.ct, res.fracture, res.meta


def simulate_fractures(
    ct: np.ndarray,
    vertebrae: np.ndarray,
    spacing_or_geometry: Geometry | tuple[float, float, float],
    targets: dict[int, tuple[int, str]],
    rng: np.random.Generator,
) -> SimulatedFracture:
    """Simulate compression fractures on a real CT (HU, ``(z, y, x)``).

    ``vertebrae`` holds VerSe ids (whole vertebrae); ``targets`` maps a VerSe id to
    ``(grade 1-3, morphology)``. With a `Geometry` the arrays may have any orientation (they are
    brought to canonical and back); with a spacing ``(z, y, x)`` in mm they must already be
    canonical (z superior, y posterior). Each chosen body is resampled along z within its
    columns (the adjacent discs stretch into the freed space), a sclerotic band of raised HU is
    laid under each deformed endplate, and the fracture mask marks that zone. The band's depth
    (the larger of 3 mm and 1.5 voxels, plus 0-1.5 mm) and HU rise (180-320 HU) are drawn
    from ``rng`` per vertebra; the meta records both (``band_mm``, ``band_hu``). A vertebra
    cut by the scan's edge (see `fully_imaged`) is refused with a `UserError`.
    """
    if isinstance(spacing_or_geometry, Geometry):
        ct_c, geom_c, ro = to_canonical(ct, spacing_or_geometry)
        lab_c = ro.apply(vertebrae)
        sp = geom_c.spacing[::-1]  # (z, y, x)
    else:
        ct_c, lab_c, ro = ct, vertebrae, None
        sp = cast("tuple[float, float, float]", tuple(float(v) for v in spacing_or_geometry))
    if ct_c.shape != lab_c.shape:
        raise UserError(f"vertebrae: label grid {lab_c.shape} differs from CT {ct_c.shape}")
    work = ct_c.astype(np.float32)
    labels = lab_c.astype(np.uint8).copy()
    frac = np.zeros(labels.shape, dtype=bool)
    meta: dict[int, dict[str, Any]] = {}
    for vid in sorted(targets):
        grade, morph = targets[vid]
        if grade not in GRADE_LOSS:
            raise BadValue("fracture", f"grade must be 1, 2 or 3, got {grade}")
        loss_weight(morph, np.zeros(1), np.zeros(1))  # validates the morphology name
        if not (labels == vid).any():
            raise BadValue("fracture", f"vertebra {name(vid)} ({vid}) is not in the label map")
        if not fully_imaged(labels == vid):
            raise BadValue(
                "fracture",
                f"vertebra {name(vid)} ({vid}) is cut by the scan's "
                f"edge (its label reaches the first or last slice along the "
                f"height axis); only a fully imaged vertebra can be fractured",
            )
        before = measure_heights(labels, vid, sp)
        work, labels, m, info = _compress(work, labels, vid, sp, grade, morph, before, rng)
        frac |= m
        meta[vid] = {"name": name(vid), **info, "height_ratio_before": round(before["ratio"], 4)}
    info_dtype = ct.dtype
    if np.issubdtype(info_dtype, np.integer):
        lim = np.iinfo(info_dtype)
        out = np.clip(np.rint(work), lim.min, lim.max).astype(info_dtype)
    else:
        out = work.astype(info_dtype)
    frac_u8 = frac.astype(np.uint8)
    labels_out = labels.astype(vertebrae.dtype)
    if ro is not None:
        out, frac_u8, labels_out = ro.undo(out), ro.undo(frac_u8), ro.undo(labels_out)
    return SimulatedFracture(out, frac_u8, labels_out, meta)


def _compress(
    ct: np.ndarray,
    labels: np.ndarray,
    vid: int,
    sp: tuple[float, float, float],
    grade: int,
    morph: str,
    before: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """One vertebra: resample its body columns along z; returns new ct, labels, mask, info."""
    sz = sp[0]
    mask = labels == vid
    y0, y1, _xm = body_extent(mask, sp)
    body = np.zeros_like(mask)
    body[:, y0:y1] = mask[:, y0:y1]
    zz, yy, xx = np.nonzero(body)
    if len(zz) == 0:
        raise UserError(f"vertebrae: no vertebral body found for {name(vid)}")
    # the vertebra's box, with room for the adjacent discs
    pad = int(np.ceil(12.0 / sz)) + 2
    z_a, z_b = max(0, zz.min() - pad), min(labels.shape[0], zz.max() + pad + 1)
    ya, yb_ = yy.min(), yy.max() + 1
    xa, xb = xx.min(), xx.max() + 1
    sl = (slice(z_a, z_b), slice(ya, yb_), slice(xa, xb))
    bb, lab, img = body[sl], labels[sl], ct[sl]
    nzb = bb.shape[0]
    has = bb.any(axis=0)
    kz = np.arange(nzb)[:, None, None]
    lo = np.where(bb, kz, nzb).min(axis=0).astype(np.float32)  # first body voxel per column
    hi = np.where(bb, kz, -1).max(axis=0).astype(np.float32)
    other = (lab != 0) & (lab != vid)
    # free room above / below each column up to another vertebra (at most 8 mm)
    room_mm = 8.0
    above = np.where(other & (kz > hi), kz, nzb).min(axis=0) - hi - 1
    below = lo - np.where(other & (kz < lo), kz, -1).max(axis=0) - 1
    room = room_mm / sz
    above = np.clip(np.minimum(above, room), 1.0, None)
    below = np.clip(np.minimum(below, room), 1.0, None)
    above = np.minimum(above, nzb - 1 - hi)
    below = np.minimum(below, lo)
    # body frame from the mid-sagittal extent
    t = ((np.arange(ya, yb_) + 0.5 - y0) / max(1, y1 - y0))[:, None]
    half_w = max(1.0, (xb - xa) / 2.0)
    u = ((np.arange(xa, xb) - (xa + xb - 1) / 2.0) / half_w)[None, :]
    w = loss_weight(morph, t, u).astype(np.float32) * has
    share = _SUP_SHARE[morph] if rng.random() < 0.8 else 1.0 - _SUP_SHARE[morph]
    lo_b, hi_b = float(GRADE_LOSS[grade][0]), float(GRADE_LOSS[grade][1])
    target_ratio = 1.0 - rng.uniform(lo_b + 0.3 * (hi_b - lo_b), hi_b - 0.2 * (hi_b - lo_b))
    band_mm = max(3.0, 1.5 * sz) + rng.uniform(0.0, 1.5)
    band_hu = rng.uniform(180.0, 320.0)
    height = (hi - lo + 1).clip(0)
    base = np.asarray(before["heights_mm"], dtype=float)
    loss = 1.0 - target_ratio
    best = None
    for _ in range(10):
        # adjust the loss until the height loss against the intact body lands in the grade's
        # band and the measured min/max ratio is below 0.8 (a natural wedge can hide a loss)
        result = _remap(img, lab, bb, lo, hi, above, below, w * loss * height, share, vid)
        new_lab = labels.copy()
        new_lab[sl] = result[1]
        after = measure_heights(new_lab, vid, sp)
        achieved = float(
            np.max(1.0 - np.asarray(after["heights_mm"])[base > 0] / base[base > 0], initial=0.0)
        )
        best = (result, achieved)
        if lo_b <= achieved < hi_b and after["ratio"] < 0.8:
            break
        if after["ratio"] >= 0.8 and achieved >= lo_b:
            loss = min(0.7, loss + 0.05)
        else:
            loss = float(np.clip(loss + (1.0 - target_ratio) - achieved, 0.05, 0.7))
    assert best is not None
    result, achieved = best
    img_new, lab_new, top, bot = result
    # sclerotic band under the deformed endplates
    zc = kz.astype(np.float32)
    dist_top = (top[None] - zc) * sz  # mm below the new superior boundary
    dist_bot = (zc - bot[None]) * sz
    in_body = lab_new == vid
    in_body &= np.broadcast_to(has, in_body.shape)
    m = np.zeros(in_body.shape, dtype=bool)
    for part, dist in ((share, dist_top), (1.0 - share, dist_bot)):
        if part <= 0:
            continue
        # the less deformed endplate condenses less
        band = max(0.6 * sz, band_mm * np.sqrt(part / max(share, 1.0 - share)))
        zone = in_body & (w[None] >= 0.25) & (dist >= 0) & (dist <= band)
        taper = np.clip(1.0 - dist / band, 0, 1) ** 0.5 * np.minimum(1.0, w[None] / 0.5)
        img_new = img_new + np.where(zone, band_hu * taper, 0.0).astype(np.float32)
        m |= zone
    ct = ct.copy()
    ct[sl] = img_new
    labels = labels.copy()
    labels[sl] = lab_new
    full = np.zeros(labels.shape, dtype=bool)
    full[sl] = m
    after = measure_heights(labels, vid, sp)
    info = {
        "grade": grade_of_loss(achieved) or grade,
        "requested_grade": grade,
        "morphology": morph,
        "height_ratio": round(after["ratio"], 4),
        "heights_mm": [round(x, 2) for x in after["heights_mm"]],
        "height_loss": round(achieved, 4),
        "band_mm": round(band_mm, 2),
        "band_hu": round(band_hu, 1),
        "endplate": "both" if 0 < share < 1 else "superior",
    }
    return ct, labels, full, info


def _remap(
    img: np.ndarray,
    lab: np.ndarray,
    body: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    above: np.ndarray,
    below: np.ndarray,
    loss: np.ndarray,
    share: float,
    vid: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Piecewise-linear resampling of each body column along z (voxel units).

    Old column: [lo-0.5-below, lo-0.5, hi+0.5, hi+0.5+above]; new: the body boundaries move
    inwards by ``loss * share`` (top) and ``loss * (1 - share)`` (bottom); the discs stretch.
    """
    nzb = img.shape[0]
    kz = np.arange(nzb, dtype=np.float32)[:, None, None]
    loss = np.minimum(loss, np.maximum(hi - lo - 1.0, 0.0))  # keep at least ~2 voxels
    b0, b1 = lo - 0.5, hi + 0.5
    s0, s1 = b0 - below, b1 + above
    n0, n1 = b0 + loss * (1 - share), b1 - loss * share
    old = kz.copy() * np.ones_like(lo)[None]
    seg_lo = (kz >= s0) & (kz < n0)
    seg_mid = (kz >= n0) & (kz <= n1)
    seg_hi = (kz > n1) & (kz <= s1)
    old = np.where(seg_lo, s0 + (kz - s0) * (b0 - s0) / np.maximum(n0 - s0, 1e-3), old)
    old = np.where(seg_mid, b0 + (kz - n0) * (b1 - b0) / np.maximum(n1 - n0, 1e-3), old)
    old = np.where(seg_hi, b1 + (kz - n1) * (s1 - b1) / np.maximum(s1 - n1, 1e-3), old)
    active = cast(np.ndarray, body.any(axis=0))[None] & (loss[None] > 0)  # body is 3D
    old = np.where(active, old, kz)
    old = np.clip(old, 0, nzb - 1)
    k0 = np.floor(old).astype(np.int64)
    k1 = np.minimum(k0 + 1, nzb - 1)
    fr = (old - k0).astype(np.float32)
    src = img.astype(np.float32)
    new_img = np.take_along_axis(src, k0, 0) * (1 - fr) + np.take_along_axis(src, k1, 0) * fr
    kn = np.clip(np.rint(old).astype(np.int64), 0, nzb - 1)
    new_lab = np.take_along_axis(lab, kn, 0)
    # the body's new boundaries, continuous voxel coordinates
    return new_img.astype(np.float32), new_lab, n1, n0
