"""Render detections on an image (PIL), for `edge detect --draw` and reports."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edge.mesh import mesh_edges
from edge.postprocess import Detections

LANDMARK_COLOURS = [(255, 0, 0), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 128, 255)]


def draw_detections(image_bgr: np.ndarray, dets: list[tuple[Detections, tuple[int, int, int]]], scores: bool = True):
    """image_bgr (H, W, 3) uint8; dets: (detections, RGB colour) pairs drawn in order. Returns a PIL RGB image."""

    img = Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1]))
    edges = None
    if any(det.mesh is not None and det.mesh.shape[1] == 468 for det, _ in dets):
        edges = mesh_edges()
    d = ImageDraw.Draw(img)
    lw = max(1, round(max(img.size) / 800))
    for det, colour in dets:
        for i in range(len(det)):
            x1, y1, x2, y2 = (float(v) for v in det.boxes[i])
            d.rectangle([x1, y1, x2, y2], outline=colour, width=lw)
            r = max(1.0, (x2 - x1) / 30)
            for (x, y), c in zip(det.landmarks[i], LANDMARK_COLOURS):
                d.ellipse([x - r, y - r, x + r, y + r], fill=c)
            if det.mesh is not None:
                if edges is None:
                    for x, y, _ in det.mesh[i]:
                        d.point((float(x), float(y)), fill=colour)
                else:
                    m = det.mesh[i]
                    for a, b in edges:
                        d.line([(float(m[a, 0]), float(m[a, 1])), (float(m[b, 0]), float(m[b, 1]))], fill=colour)
            if scores and x2 - x1 >= 24:
                d.text((x1, max(0, y1 - 11)), f"{det.scores[i]:.2f}", fill=colour)
    return img


def moved(det: Detections, offset_xy: tuple[float, float], scale: float) -> Detections:
    """Detections in the pixels of a crop starting at offset_xy and resized by scale."""
    off = np.asarray(offset_xy, np.float32)
    mesh = None
    if det.mesh is not None:
        mesh = det.mesh.copy()
        mesh[..., :2] = (mesh[..., :2] - off) * scale
        mesh[..., 2] *= scale
    return Detections((det.boxes - np.concatenate([off, off])) * scale, det.scores, (det.landmarks - off) * scale, mesh, det.anchors)


def face_crop(image_bgr: np.ndarray, box, faces: list[tuple[Detections, tuple[int, int, int]]], size: int = 224, margin: float = 0.35):
    """A square crop around `box` (x1, y1, x2, y2), `margin` of its size on each side, resized to size x size, with
    `faces` (each one face, as Detections of length 1, and its RGB colour) drawn on it: box, landmarks and mesh,
    which are legible at this scale. Returns a PIL RGB image."""

    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    x0, y0 = int(np.floor(cx - side / 2)), int(np.floor(cy - side / 2))
    n = max(1, int(np.ceil(side)))
    h, w = image_bgr.shape[:2]
    canvas = np.zeros((n, n, 3), np.uint8)  # outside the image: black
    sx0, sy0, sx1, sy1 = max(0, x0), max(0, y0), min(w, x0 + n), min(h, y0 + n)
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image_bgr[sy0:sy1, sx0:sx1]
    big = np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))
    k = size / n
    return draw_detections(big, [(moved(d, (x0, y0), k), c) for d, c in faces], scores=False)


def track_colour(track_id: int | None) -> tuple[int, int, int]:
    """A stable, distinct RGB colour per track ID (grey for an untracked face)."""
    if track_id is None or track_id < 0:
        return (160, 160, 160)
    h = (track_id * 0.618033988749895) % 1.0  # golden-ratio hue steps
    i, f = int(h * 6), h * 6 - int(h * 6)
    p, q, t = 60, int(255 - 195 * f), int(60 + 195 * f)
    return [(255, t, p), (q, 255, p), (p, 255, t), (p, q, 255), (t, p, 255), (255, p, q)][i % 6]


def draw_stream_frame(image_bgr: np.ndarray, det: Detections, ids: np.ndarray | None, fps: float | None,
                      mesh: bool = False) -> np.ndarray:
    """One annotated video frame (BGR uint8): each face in its track's colour with "id N", landmarks, the mesh
    when asked, and the measured frames per second in the corner."""
    shown = det if mesh else Detections(det.boxes, det.scores, det.landmarks, None, det.anchors)
    if ids is None:
        img = draw_detections(image_bgr, [(shown, (0, 255, 0))], scores=False)
    else:
        img = draw_detections(image_bgr, [(shown.take([i]), track_colour(int(ids[i]))) for i in range(len(det))], scores=False)
    d = ImageDraw.Draw(img)
    px = max(12, round(img.size[1] / 36))  # text height: 20 px on 720p
    font = ImageFont.load_default(size=px)
    if ids is not None:
        for i in range(len(det)):
            x1, y1 = float(det.boxes[i, 0]), float(det.boxes[i, 1])
            d.text((x1, max(0.0, y1 - px - 2)), f"id {int(ids[i])}" if ids[i] >= 0 else "-", fill=track_colour(int(ids[i])),
                   font=font)
    if fps is not None:
        label = f"{fps:5.1f} fps"
        d.rectangle([0, 0, d.textlength(label, font=font) + 10, px + 8], fill=(0, 0, 0))
        d.text((5, 4), label, fill=(255, 255, 255), font=font)
    return np.ascontiguousarray(np.asarray(img)[..., ::-1])
