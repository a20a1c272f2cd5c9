"""Render detections on an image (PIL), for `edge detect --draw` and reports."""
from __future__ import annotations

import numpy as np

from edge.postprocess import Detections

LANDMARK_COLOURS = [(255, 0, 0), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 128, 255)]


def draw_detections(image_bgr: np.ndarray, dets: list[tuple[Detections, tuple[int, int, int]]], scores: bool = True):
    """image_bgr (H, W, 3) uint8; dets: (detections, RGB colour) pairs drawn in order. Returns a PIL RGB image."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1]))
    edges = None
    if any(det.mesh is not None and det.mesh.shape[1] == 468 for det, _ in dets):
        from edge.mesh import mesh_edges  # the MediaPipe tessellation (cached wheel)

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
