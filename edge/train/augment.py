"""Training-time augmentation in numpy/PIL (runs in DataLoader workers), after the reference
RetinaFace recipes: a constrained random square crop that keeps faces, photometric distortion,
a horizontal flip that swaps left/right landmarks, and a resize to the training size.

Images are BGR uint8 (H, W, 3); boxes (N, 4) x1 y1 x2 y2 and landmarks (N, 5, 2) in pixels.
Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (image left/right).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from edge.preprocess import resize_bilinear

CROP_SCALES = (0.3, 0.45, 0.6, 0.8, 1.0)
FLIP_ORDER = (1, 0, 2, 4, 3)


@dataclass(frozen=True)
class AugmentConfig:
    crop_scales: tuple[float, ...] = CROP_SCALES
    crop_tries: int = 250
    min_face: float = 1.0  # faces smaller than this (pixels at the training size) are dropped after a crop
    photometric: bool = True
    flip: float = 0.5


def random_crop(img, boxes, lmk, has, size: int, rng: np.random.Generator, cfg: AugmentConfig):
    """A square crop of a random scale of the short side that keeps the faces whose centres fall in it.
    Returns (crop, boxes, landmarks, has, cropped?). After `crop_tries` failures the image is returned whole."""
    h, w = img.shape[:2]
    short = min(h, w)
    for _ in range(cfg.crop_tries):
        side = int(rng.choice(cfg.crop_scales) * short)
        if side < 2:
            break
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = (centre[:, 0] > x0) & (centre[:, 0] < x0 + side) & (centre[:, 1] > y0) & (centre[:, 1] < y0 + side)
        if not inside.any():
            continue
        b = boxes[inside].copy()
        b[:, :2] = np.maximum(b[:, :2], (x0, y0))
        b[:, 2:] = np.minimum(b[:, 2:], (x0 + side, y0 + side))
        b -= (x0, y0, x0, y0)
        keep = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * size / side >= cfg.min_face
        if not keep.any():
            continue
        lm = lmk[inside][keep] - (x0, y0)
        return img[y0:y0 + side, x0:x0 + side], b[keep], lm, has[inside][keep], True
    return img, boxes, lmk, has, False


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter (each with probability 0.5), as the reference recipes."""

    out = img.astype(np.float32)
    if rng.random() < 0.5:
        out += rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        out *= rng.uniform(0.5, 1.5)
    np.clip(out, 0, 255, out=out)
    sat, hue = rng.random() < 0.5, rng.random() < 0.5
    if sat or hue:
        hsv = np.asarray(Image.fromarray(out.astype(np.uint8)[..., ::-1]).convert("HSV")).astype(np.float32)
        if sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
        if hue:
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-18, 18) * 256 / 360) % 256
        rgb = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
        out = rgb[..., ::-1].astype(np.float32)
    if not contrast_first and rng.random() < 0.5:
        out = np.clip(out * rng.uniform(0.5, 1.5), 0, 255)
    return out.astype(np.uint8)


def pad_to_square(img: np.ndarray, fill) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img
    side = max(h, w)
    out = np.empty((side, side, 3), img.dtype)
    out[:] = np.asarray(fill, np.float32).round().astype(img.dtype)
    out[:h, :w] = img
    return out


def flip(img, boxes, lmk, width: int, order=FLIP_ORDER):
    """Mirror the image; the points of each face are reordered by `order` (the point each point becomes)."""
    img = img[:, ::-1]
    b = boxes.copy()
    b[:, 0], b[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    lm = lmk[:, order].copy()
    lm[..., 0] = width - lm[..., 0]
    return img, b, lm


def augment(img, boxes, lmk, has, size: int, rng: np.random.Generator, cfg: AugmentConfig, mean, flip_order=FLIP_ORDER):
    """-> (size x size BGR float32 image, boxes, landmarks, has, scale, flipped) with coordinates in pixels of the
    output; `landmarks` may hold any number of points per face, reordered on a flip by `flip_order` (default: the
    five landmarks); scale: output pixels per input pixel."""
    img, boxes, lmk, has, _ = random_crop(img, boxes, lmk, has, size, rng, cfg)
    if cfg.photometric:
        img = photometric(img, rng)
    img = pad_to_square(img, mean)
    flipped = rng.random() < cfg.flip
    if flipped:
        img, boxes, lmk = flip(img, boxes, lmk, img.shape[1], flip_order)
    scale = size / img.shape[0]
    out = resize_bilinear(img, size, size)
    return out, boxes * scale, lmk * scale, has, scale, flipped
