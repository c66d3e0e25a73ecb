"""Surface meshes of label maps and probability maps, written as PLY / STL for 3D Slicer.

Adapter for scikit-image (marching cubes); the rest is numpy / scipy. Vertices are physical
millimetres in the volume's own frame (ITK's LPS: x to the patient's left, y posterior, z
superior), so a mesh lands on its CT in 3D Slicer; each file says ``SPACE=LPS`` in its
header, the comment Slicer reads to pick the coordinate system (and LPS is also what it
assumes for files without one).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from vfsearch.adapters.files import atomic_path
from vfsearch.adapters.lazy import importer
from vfsearch.core.geometry import Geometry

_measure = importer("skimage.measure")


@dataclass
class Mesh:
    """Triangle mesh: ``vertices`` ``(n, 3)`` float32 physical mm (x, y, z, LPS), ``faces``
    ``(m, 3)`` int32 vertex indices, ``values`` ``(n,)`` float32 per-vertex scalar (a VerSe
    id for a spine surface, a probability for a fracture surface)."""

    vertices: np.ndarray
    faces: np.ndarray
    values: np.ndarray

    @property
    def n_faces(self) -> int:
        return len(self.faces)

    @classmethod
    def empty(cls) -> Mesh:
        return cls(
            np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros(0, np.float32)
        )


def surface(
    mask: np.ndarray,
    geometry: Geometry,
    *,
    smooth_mm: float = 1.0,
    step: int = 1,
    level: float = 0.5,
    offset_zyx: Sequence[int] = (0, 0, 0),
) -> Mesh:
    """Surface of a binary ``mask`` ``(z, y, x)`` by marching cubes on a lightly smoothed copy.

    ``geometry``: the grid of the full volume; ``offset_zyx``: where ``mask`` starts in it
    (a sub-box). The mask is padded by one voxel so surfaces touching the border close.
    ``smooth_mm``: Gaussian sigma in mm (per-axis in voxels: anisotropic spacing smooths the
    thick-slice axis less); 0 gives the voxel staircase. ``step``: marching-cubes step in
    voxels (coarser meshes for rendering). Empty masks give an empty mesh.
    """

    m = np.pad(np.asarray(mask, dtype=np.float32), 1)
    if not m.any():
        return Mesh.empty()
    if smooth_mm > 0:
        sigma = [smooth_mm / s for s in geometry.spacing[::-1]]
        m = ndimage.gaussian_filter(m, sigma, mode="constant")
    if m.max() <= level:
        return Mesh.empty()
    verts, faces, _, _ = _measure().marching_cubes(
        m, level=level, step_size=max(int(step), 1), allow_degenerate=False
    )
    verts = verts - 1.0 + np.asarray(offset_zyx, dtype=np.float64)  # (n, zyx) in the volume
    return Mesh(
        geometry.zyx_to_physical(verts).astype(np.float32),
        faces.astype(np.int32),
        np.zeros(len(verts), np.float32),
    )


def label_surfaces(
    labels: np.ndarray,
    geometry: Geometry,
    *,
    ids: Sequence[int] | None = None,
    smooth_mm: float = 1.0,
    step: int = 1,
) -> Mesh:
    """One closed surface per label id (a vertebra each), in one mesh; ``values`` = the id.

    Each label is meshed on its own bounding box with its cavities filled, so touching
    vertebrae stay separate surfaces and hidden inner walls add no triangles.
    """
    labels = np.asarray(labels)
    objects = ndimage.find_objects(labels.astype(np.int64))
    ids = [int(v) for v in (ids if ids is not None else np.unique(labels)) if v != 0]
    parts = []
    for vid in ids:
        sl = objects[vid - 1] if vid - 1 < len(objects) else None
        if sl is None:
            continue
        own = ndimage.binary_fill_holes(labels[sl] == vid)
        part = surface(
            own, geometry, smooth_mm=smooth_mm, step=step, offset_zyx=[s.start for s in sl]
        )
        part.values[:] = vid
        parts.append(part)
    return concat(parts)


def probability_surface(
    prob: np.ndarray, geometry: Geometry, threshold: float, *, peak_mm: float = 3.0, step: int = 1
) -> Mesh:
    """Iso-surface of a probability map ``(z, y, x)`` at ``threshold`` (the predicted fracture
    regions), with per-vertex ``values`` = the highest probability within ``peak_mm`` of the
    vertex: the surface itself sits at the threshold everywhere, so colouring by the nearby
    peak is what shows how sure the model is of each region."""
    prob = np.asarray(prob, dtype=np.float32)
    fg = prob >= threshold
    if not fg.any():
        return Mesh.empty()
    sl = tuple(
        slice(max(s.start - 2, 0), s.stop + 2) for s in ndimage.find_objects(fg.astype(np.uint8))[0]
    )
    sub = prob[sl]
    mesh = surface(
        sub,
        geometry,
        smooth_mm=0.0,
        step=step,
        level=float(threshold),
        offset_zyx=[s.start for s in sl],
    )
    if not len(mesh.vertices):
        return mesh
    size = [2 * int(np.ceil(peak_mm / s)) + 1 for s in geometry.spacing[::-1]]
    peak = ndimage.maximum_filter(sub, size=size, mode="nearest")
    idx = geometry.physical_to_index(mesh.vertices.astype(np.float64))[:, ::-1]  # (n, zyx)
    idx = idx - np.asarray([s.start for s in sl])
    mesh.values = ndimage.map_coordinates(peak, idx.T, order=1, mode="nearest").astype(np.float32)
    return mesh


def concat(meshes: Sequence[Mesh]) -> Mesh:
    """One mesh holding all of ``meshes`` (faces re-indexed)."""
    meshes = [m for m in meshes if len(m.vertices)]
    if not meshes:
        return Mesh.empty()
    starts = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return Mesh(
        np.concatenate([m.vertices for m in meshes]).astype(np.float32),
        np.concatenate([m.faces + s for m, s in zip(meshes, starts, strict=True)]).astype(np.int32),
        np.concatenate([m.values for m in meshes]).astype(np.float32),
    )


def components(faces: np.ndarray, n_vertices: int) -> int:
    """Connected components of a triangle mesh (vertices joined by edges; unused vertices
    are not counted)."""
    faces = np.asarray(faces, dtype=np.int64)
    if not len(faces):
        return 0
    a = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    b = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n_vertices, n_vertices))
    _, lab = connected_components(graph, directed=False)
    return len(np.unique(lab[np.unique(faces)]))


# -- files ------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_ply(
    path: str | os.PathLike,
    mesh: Mesh,
    colors: np.ndarray | None = None,
    *,
    value_name: str = "value",
) -> Path:
    """Binary little-endian PLY: vertices (float x, y, z), optional ``colors`` ``(n, 3)``
    uint8 per vertex (3D Slicer shows them), the per-vertex scalar as property
    ``value_name`` (Slicer lists it as a scalar array) and triangles."""
    n, m = len(mesh.vertices), len(mesh.faces)
    props = [("f4", "x"), ("f4", "y"), ("f4", "z")]
    if colors is not None:
        props += [("u1", "red"), ("u1", "green"), ("u1", "blue")]
    props.append(("f4", value_name))
    head = [
        "ply",
        "format binary_little_endian 1.0",
        "comment SPACE=LPS",
        "comment vfsearch: physical mm, x to the patient's left, y posterior, z superior",
        f"element vertex {n}",
    ]
    ply_type = {"f4": "float", "u1": "uchar"}
    head += [f"property {ply_type[t]} {name}" for t, name in props]
    head += [f"element face {m}", "property list uchar int vertex_indices", "end_header", ""]
    vert = np.zeros(n, dtype=[(name, "<" + t) for t, name in props])
    for k, name in enumerate("xyz"):
        vert[name] = mesh.vertices[:, k]
    if colors is not None:
        c = np.asarray(colors, dtype=np.uint8)
        vert["red"], vert["green"], vert["blue"] = c[:, 0], c[:, 1], c[:, 2]
    vert[value_name] = mesh.values
    face = np.zeros(m, dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"] = 3
    face["v"] = mesh.faces
    return _atomic_write(
        Path(path), "\n".join(head).encode("ascii") + vert.tobytes() + face.tobytes()
    )


def write_stl(path: str | os.PathLike, mesh: Mesh, *, name: str = "vfsearch") -> Path:
    """Binary STL (facet normals from the vertex order; no colours, no scalars)."""
    tri = mesh.vertices[mesh.faces].astype(np.float32)  # (m, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normal, axis=1, keepdims=True)
    normal = np.divide(normal, norm, out=np.zeros_like(normal), where=norm > 0)
    rec = np.zeros(len(tri), dtype=[("n", "<f4", (3,)), ("v", "<f4", (3, 3)), ("a", "<u2")])
    rec["n"], rec["v"] = normal, tri
    header = f"SPACE=LPS {name}".encode("ascii")[:80].ljust(80, b" ")
    return _atomic_write(Path(path), header + struct.pack("<I", len(tri)) + rec.tobytes())


__all__ = [
    "Mesh",
    "components",
    "concat",
    "label_surfaces",
    "probability_surface",
    "surface",
    "write_ply",
    "write_stl",
]
