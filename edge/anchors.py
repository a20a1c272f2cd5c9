"""Anchors (priors) and the box/landmark codec. Pure numpy, so it runs on a device.

Priors are (A, 4) float32 rows (cx, cy, w, h), normalised by the input width/height, in the
order the heads emit them: level by level (strides 8, 16, 32), then row-major over the cells,
then over the level's min sizes.
"""
from __future__ import annotations

import math

import numpy as np


def priors(height: int, width: int, min_sizes, steps) -> np.ndarray:
    """Anchors for an input of height x width pixels. Returns (A, 4) float32 (cx, cy, w, h) in [0, 1] units."""
    out = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / height, (np.arange(fw) + 0.5) * step / width, indexing="ij")
        k = len(sizes)
        a = np.empty((fh, fw, k, 4), dtype=np.float64)
        a[..., 0] = cx[..., None]
        a[..., 1] = cy[..., None]
        a[..., 2] = np.asarray(sizes, dtype=np.float64) / width
        a[..., 3] = np.asarray(sizes, dtype=np.float64) / height
        out.append(a.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode_boxes(loc: np.ndarray, pri: np.ndarray, variances=(0.1, 0.2)) -> np.ndarray:
    """loc (..., A, 4) offsets -> (..., A, 4) boxes (x1, y1, x2, y2) in the priors' normalised units."""
    loc = loc.astype(np.float32, copy=False)
    centre = pri[..., :2] + loc[..., :2] * variances[0] * pri[..., 2:]
    size = pri[..., 2:] * np.exp(loc[..., 2:] * variances[1])
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def encode_boxes(boxes: np.ndarray, pri: np.ndarray, variances=(0.1, 0.2)) -> np.ndarray:
    """Inverse of `decode_boxes`: (..., A, 4) x1y1x2y2 (normalised) -> offsets. Boxes need w, h > 0."""
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    size = boxes[..., 2:] - boxes[..., :2]
    g_c = (centre - pri[..., :2]) / (variances[0] * pri[..., 2:])
    g_s = np.log(size / pri[..., 2:]) / variances[1]
    return np.concatenate([g_c, g_s], axis=-1).astype(np.float32)


def decode_points(pts: np.ndarray, pri: np.ndarray, variances=(0.1, 0.2)) -> np.ndarray:
    """pts (..., A, 2K) offsets -> (..., A, K, 2) points in the priors' normalised units."""
    p = pts.astype(np.float32, copy=False).reshape(*pts.shape[:-1], pts.shape[-1] // 2, 2)
    return pri[..., None, :2] + p * variances[0] * pri[..., None, 2:]


def encode_points(points: np.ndarray, pri: np.ndarray, variances=(0.1, 0.2)) -> np.ndarray:
    """Inverse of `decode_points`: (..., A, K, 2) -> (..., A, 2K)."""
    p = (points - pri[..., None, :2]) / (variances[0] * pri[..., None, 2:])
    return p.reshape(*p.shape[:-2], -1).astype(np.float32)
