"""Built-in sample images: only pictures the project may use on a fresh machine.

- grace_hopper: Rear Admiral Grace Hopper, U.S. Navy official photograph (public domain), shipped
  inside the matplotlib wheel as mpl-data/sample_data/grace_hopper.jpg.
- scene: a multi-face test scene composed from that photograph at several scales, flipped and
  tone-shifted, on a textured background (deterministic; nothing downloaded).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from edge.image_io import load_image
from edge.preprocess import letterbox_uint8, resize_bilinear


def grace_hopper_path() -> Path:
    p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not p.is_file():
        raise FileNotFoundError(f"matplotlib's sample photograph is missing: {p}")
    return p


def grace_hopper() -> np.ndarray:
    """BGR uint8 (600, 512, 3)."""
    return load_image(grace_hopper_path())


def scene(seed: int = 0, size: tuple[int, int] = (720, 1280), faces: int = 7) -> np.ndarray:
    """BGR uint8 (H, W, 3): copies of the portrait's head region at several scales on a background."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 90 + 40 * np.sin(xx / (37 + 20 * rng.random())) * np.cos(yy / (53 + 20 * rng.random()))
    canvas = np.stack([base + rng.integers(-30, 30) for _ in range(3)], axis=-1)
    canvas += rng.normal(0, 6, canvas.shape)
    src = grace_hopper().astype(np.float32)
    head = src[20:420, 56:456]  # 400 x 400 crop around the face
    boxes: list[tuple[int, int, int]] = []
    for _ in range(faces * 50):
        if len(boxes) == faces:
            break
        side = int(rng.choice([80, 110, 160, 240, 330]))
        if side >= min(h, w):
            continue
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        if any(x < bx + bs and bx < x + side and y < by + bs and by < y + side for by, bx, bs in boxes):
            continue
        boxes.append((y, x, side))
        patch = resize_bilinear(head, side, side)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        patch = patch * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20)
        canvas[y:y + side, x:x + side] = patch
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def parity_images(size: int, mean) -> tuple[np.ndarray, list[str]]:
    """The fixed parity set stored in every bundle: built-in pictures only, letterboxed uint8."""

    imgs = [("grace_hopper", grace_hopper()), ("scene_a", scene(11, (720, 1280), 8)), ("scene_b", scene(12, (1080, 1080), 10)),
            ("scene_c", scene(13, (720, 1280), 12)), ("scene_d", scene(14, (1280, 960), 10))]
    return np.stack([letterbox_uint8(im, size, mean) for _, im in imgs]), [n for n, _ in imgs]


def moving_faces(frames: int = 60, size: tuple[int, int] = (720, 1280), faces: int = 4, seed: int = 5):
    """Yield (frame, heads) `frames` times: a deterministic BGR uint8 clip made from the built-in portrait, with
    `faces` heads that drift across a textured background and grow or shrink smoothly, each in its own lane so that
    none hides another; heads: (faces, 4) x1, y1, x2, y2 of each pasted head (the truth for ID measurements)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = np.stack([90 + 40 * np.sin(xx / 41 + c) * np.cos(yy / 57) for c in range(3)], axis=-1)
    background = np.clip(background + rng.normal(0, 5, background.shape) + 0.5, 0, 255).astype(np.uint8)
    head = grace_hopper()[20:420, 56:456]
    lane = w / faces
    side0 = [rng.uniform(0.2, 0.3) * h for _ in range(faces)]
    start = [(lane * i + rng.uniform(0, max(1.0, lane - 1.25 * s)), rng.uniform(0.05, 0.45) * h) for i, s in enumerate(side0)]
    speed = [(rng.uniform(-1.0, 1.0), rng.uniform(-2.5, 2.5)) for _ in range(faces)]
    for t in range(frames):
        img, heads = background.copy(), np.zeros((faces, 4), np.float32)
        for i in range(faces):
            side = int(side0[i] * (1 + 0.25 * np.sin(2 * np.pi * t / max(frames, 1) + i)))
            x = int(np.clip(start[i][0] + speed[i][0] * t, lane * i, min(w, lane * (i + 1)) - side))
            y = int(np.clip(start[i][1] + speed[i][1] * t, 0, h - side))
            img[y:y + side, x:x + side] = np.clip(resize_bilinear(head, side, side) + 0.5, 0, 255).astype(np.uint8)
            heads[i] = (x, y, x + side, y + side)
        yield img, heads
