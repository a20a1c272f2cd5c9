"""WIDER FACE label files, the two formats users have.

- RetinaFace ground truth (`label.txt` of the reference recipes): `# <relative path>` lines,
  then one line per face: `x y w h` followed by five `x y visibility` landmark triples and a
  score (20 numbers). Landmarks of -1 mean "not annotated".
- The official box-only `wider_face_*_bbx_gt.txt`: a path line, a count line, then `count` lines
  `x y w h blur expression illumination invalid occlusion pose` (one line of zeros when count is 0).

Both parse to `Sample(path, boxes (N, 4) float32 x1 y1 x2 y2 pixels, landmarks (N, 5, 2) float32
pixels, has_landmarks (N,) bool)`. Faces with zero width/height and faces flagged invalid are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError


class LabelError(ConfigError):
    """A label file that cannot be parsed; the message names the file and line."""


@dataclass
class Sample:
    path: str
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 in pixels
    landmarks: np.ndarray  # (N, 5, 2) float32 pixels (zeros where absent)
    has_landmarks: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.boxes)


def _sample(path: str, rows: list[list[float]], lmk_rows: list[list[float]] | None) -> Sample:
    boxes = np.asarray([r[:4] for r in rows], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    n = len(boxes)
    lm = np.zeros((n, 5, 2), np.float32)
    has = np.zeros(n, bool)
    if lmk_rows is not None:
        for i, r in enumerate(lmk_rows):
            if len(r) >= 15 and r[0] >= 0:
                lm[i] = np.asarray(r[:15], np.float32).reshape(5, 3)[:, :2]
                has[i] = True
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Sample(path, boxes[keep], lm[keep], has[keep])


def _floats(line: str, where: str) -> list[float]:
    try:
        return [float(v) for v in line.split()]
    except ValueError:
        raise LabelError(f"{where}: expected numbers, got {line.strip()[:80]!r}") from None


def parse_retinaface(text: str, name: str = "labels") -> list[Sample]:
    out: list[Sample] = []
    path, rows, lmks = None, [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            if path is not None:
                out.append(_sample(path, rows, lmks))
            path, rows, lmks = line[1:].strip(), [], []
            continue
        if path is None:
            raise LabelError(f"{name}:{i}: a face line before any '# path' line")
        v = _floats(line, f"{name}:{i}")
        if len(v) < 4:
            raise LabelError(f"{name}:{i}: a face needs at least x y w h, got {len(v)} numbers")
        rows.append(v[:4])
        lmks.append(v[4:19] if len(v) >= 19 else [-1.0])
    if path is not None:
        out.append(_sample(path, rows, lmks))
    return out


def parse_bbx_gt(text: str, name: str = "labels") -> list[Sample]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out: list[Sample] = []
    i = 0
    while i < len(lines):
        path = lines[i].strip()
        if i + 1 >= len(lines):
            raise LabelError(f"{name}:{i + 1}: {path!r} has no face count line")
        try:
            count = int(lines[i + 1].split()[0])
        except ValueError:
            raise LabelError(f"{name}:{i + 2}: expected the face count of {path!r}, got {lines[i + 1].strip()[:80]!r}") from None
        if count < 0:
            raise LabelError(f"{name}:{i + 2}: negative face count {count}")
        n_lines = max(count, 1)
        if i + 2 + n_lines > len(lines):
            raise LabelError(f"{name}: {path!r} announces {count} faces but the file ends first")
        rows = []
        for j in range(count):
            v = _floats(lines[i + 2 + j], f"{name}:{i + 3 + j}")
            if len(v) < 4:
                raise LabelError(f"{name}:{i + 3 + j}: a face needs x y w h, got {len(v)} numbers")
            if len(v) >= 8 and v[7] == 1:  # the "invalid" flag
                continue
            rows.append(v[:4])
        out.append(_sample(path, rows, None))
        i += 2 + n_lines
    return out


def read_labels(path: str | Path) -> list[Sample]:
    """Parse a label file in either format (told apart by its first non-empty line)."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"label file not found: {path}")
    text = path.read_text(errors="replace")
    first = next((ln for ln in text.splitlines() if ln.strip()), None)
    if first is None:
        raise LabelError(f"{path.name}: empty label file")
    samples = parse_retinaface(text, path.name) if first.startswith("#") else parse_bbx_gt(text, path.name)
    if not samples:
        raise LabelError(f"{path.name}: no images in the label file")
    return samples
