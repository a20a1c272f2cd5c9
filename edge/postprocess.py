"""Post-processing: score threshold, top-k, NMS, and rescaling to the original image. Pure numpy.

Box convention: (x1, y1, x2, y2) in pixels, continuous coordinates, area = (x2 - x1) * (y2 - y1)
(no "+1"), as torchvision's `box_iou`/`nms`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge.anchors import decode_boxes, decode_points
from edge.mesh import MESH68


@dataclass
class Detections:
    """Faces of one image, sorted by descending score.

    boxes (N, 4) float32 x1, y1, x2, y2 in pixels; scores (N,) float32 in [0, 1];
    landmarks (N, 5, 2) float32 pixels (right eye, left eye, nose, right and left mouth corner);
    mesh (N, V, 3) float32 (x, y in pixels, z in the same scale) or None.
    anchors (N,) int64: the index of the anchor each face was decoded from, where known (our decoder sets it).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    mesh: np.ndarray | None = None
    anchors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, idx) -> Detections:
        return Detections(self.boxes[idx], self.scores[idx], self.landmarks[idx], None if self.mesh is None else self.mesh[idx],
                          None if self.anchors is None else self.anchors[idx])

    def to_json(self) -> list[dict]:
        faces = []
        for i in range(len(self)):
            f = {
                "box": [round(float(v), 2) for v in self.boxes[i]],
                "score": round(float(self.scores[i]), 5),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks[i]],
            }
            if self.mesh is not None:
                f["mesh"] = [[round(float(v), 2) for v in p] for p in self.mesh[i]]
                if self.mesh.shape[1] == 468:
                    f["mesh68"] = [[round(float(v), 2) for v in p] for p in self.mesh[i][MESH68]]
            faces.append(f)
        return faces

    @staticmethod
    def empty(mesh_vertices: int = 0) -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32),
            np.zeros((0, mesh_vertices, 3), np.float32) if mesh_vertices else None,
        )


class QuantizedOutputs(Mapping):
    """A runner's raw outputs as the model wrote them, integer ones with their (scale, zero point), read as float32
    on demand: `outputs[name]` dequantises that output whole, once (cached); `take(name, index)` dequantises only the
    elements indexed. Decoding reads the face scores whole and every other output at the anchors over the score
    threshold only (tens of 16,800): an int8 model's outputs are then never dequantised whole on the way to its faces.

    raw: name -> (B, A, C) or (A, C) array, int8 / uint8 where `quantization` has the name, float32 otherwise.
    quantization: name -> (scale, zero point); real value = (q - zero point) * scale."""

    def __init__(self, raw: dict[str, np.ndarray], quantization: dict[str, tuple[float, int]]):
        self.raw, self.quantization = raw, quantization
        self._float: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._float:
            self._float[name] = self._dequantize(name, self.raw[name])
        return self._float[name]

    def __contains__(self, name) -> bool:  # Mapping's own would read (and dequantise) the output
        return name in self.raw

    def __iter__(self):
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def _dequantize(self, name: str, v: np.ndarray) -> np.ndarray:
        if name not in self.quantization:
            return v.astype(np.float32, copy=False)
        scale, zp = self.quantization[name]
        return ((v.astype(np.float32) - zp) * scale).astype(np.float32, copy=False)

    @property
    def dequantized(self) -> tuple[str, ...]:
        """The outputs read (and dequantised) whole so far."""
        return tuple(self._float)

    def take(self, name: str, index) -> np.ndarray:
        """outputs[name][index] as float32, dequantising only what `index` selects (unless it is cached whole)."""
        if name in self._float:
            return self._float[name][index]
        return self._dequantize(name, self.raw[name][index])

    def batch(self, i: int) -> QuantizedOutputs:
        """The outputs of the i-th image of the batch, still quantised."""
        return QuantizedOutputs({k: v[i] for k, v in self.raw.items()}, self.quantization)


def image_outputs(outputs: Mapping[str, np.ndarray], i: int) -> Mapping[str, np.ndarray]:
    """The outputs of the i-th image of a batch (each (A, C)); quantised outputs stay quantised."""
    if isinstance(outputs, QuantizedOutputs):
        return outputs.batch(i)
    return {k: v[i] for k, v in outputs.items()}


def _take(outputs: Mapping[str, np.ndarray], name: str, index) -> np.ndarray:
    if isinstance(outputs, QuantizedOutputs):
        return outputs.take(name, index)
    return outputs[name][index]


def box_area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) -> (N, M) IoU; 0 where the union is empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS. Returns indices of kept boxes, by descending score (ties: lower index first).

    A box is suppressed when its IoU with a kept, higher-ranked box is > iou_threshold.
    max_keep: stop once that many are kept (the same first max_keep as a full run).
    """
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float64)
    areas = box_area(b)
    keep = []
    alive = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(order[i])
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = np.nonzero(alive[i + 1:])[0] + i + 1
        if rest.size == 0:
            break
        lt = np.maximum(b[i, :2], b[rest, :2])
        rb = np.minimum(b[i, 2:], b[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        alive[rest[iou > iou_threshold]] = False
    return np.asarray(keep, dtype=np.int64)


def final_stage(outputs: Mapping[str, np.ndarray], pri: np.ndarray, variances) -> tuple[Mapping[str, np.ndarray], np.ndarray]:
    """(outputs, priors) of the stage faces are decoded from: a cascade's second stage is encoded against the
    first stage's boxes, which become its priors."""
    if "loc2" not in outputs:
        return outputs, pri
    b1 = decode_boxes(outputs["loc"], pri, variances)
    pri = np.concatenate([(b1[:, :2] + b1[:, 2:]) / 2, b1[:, 2:] - b1[:, :2]], axis=1)
    rest = {k: v for k, v in outputs.items() if k not in ("loc2", "conf2", "landmarks2")}  # applied once only
    return {**rest, "loc": outputs["loc2"], "conf": outputs["conf2"], "landmarks": outputs["landmarks2"]}, pri


def decode_detections(
    outputs: Mapping[str, np.ndarray],
    pri: np.ndarray,
    input_hw: tuple[int, int],
    *,
    variances=(0.1, 0.2),
    score_threshold: float = 0.5,
    nms_threshold: float = 0.4,
    top_k: int = 5000,
    keep_top_k: int = 750,
    mesh_decoder: tuple[np.ndarray, np.ndarray] | None = None,
) -> Detections:
    """Raw outputs of one image (each (A, C), batch dim removed) -> Detections in input pixels.

    Steps, as the reference implementation: keep scores > score_threshold, the top_k of those,
    decode, NMS, then at most keep_top_k faces.
    """
    h, w = input_hw
    outputs, pri = final_stage(outputs, pri, variances)
    scores = _take(outputs, "conf", (slice(None), 1)).astype(np.float32)
    idx = np.nonzero(scores > score_threshold)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")][:top_k]
    boxes = decode_boxes(_take(outputs, "loc", idx), pri[idx], variances) * np.array([w, h, w, h], np.float32)
    keep = nms(boxes.astype(np.float32), scores[idx], nms_threshold, max_keep=keep_top_k)
    return decode_at(outputs, pri, idx[keep], input_hw, variances=variances, mesh_decoder=mesh_decoder)


def decode_at(outputs: Mapping[str, np.ndarray], pri: np.ndarray, idx: np.ndarray, input_hw: tuple[int, int], *,
              variances=(0.1, 0.2), mesh_decoder: tuple[np.ndarray, np.ndarray] | None = None) -> Detections:
    """The faces that raw outputs of one image (each (A, C)) give at the anchors `idx`, in that order, in input
    pixels: no threshold, no NMS. (The parity harness decodes the reference at the candidate's anchors with it.)"""
    h, w = input_hw
    outputs, pri = final_stage(outputs, pri, variances)
    idx = np.asarray(idx, np.int64)
    p = pri[idx]
    boxes = decode_boxes(_take(outputs, "loc", idx), p, variances) * np.array([w, h, w, h], np.float32)
    lms = decode_points(_take(outputs, "landmarks", idx), p, variances) * np.array([w, h], np.float32)
    det = Detections(boxes.astype(np.float32), _take(outputs, "conf", (idx, 1)).astype(np.float32), lms.astype(np.float32), anchors=idx)
    if "mesh" in outputs:
        raw = _take(outputs, "mesh", idx).astype(np.float32)
        if mesh_decoder is not None:  # low-rank head: (mean (3V,), basis (K, 3V)) decode the per-anchor code
            raw = mesh_decoder[0] + raw @ mesh_decoder[1]
        elif raw.shape[-1] % 3:
            raise ValueError(f"a mesh output of {raw.shape[-1]} values per anchor is a low-rank code: pass mesh_decoder")
        nv = raw.shape[-1] // 3
        raw = raw.reshape(len(idx), nv, 3)
        xy = decode_points(raw[..., :2].reshape(len(idx), 2 * nv), p, variances) * np.array([w, h], np.float32)
        # z shares the x scale: offset from the anchor centre's depth 0, in anchor widths
        z = raw[..., 2:] * variances[0] * p[:, None, 2:3] * w
        det.mesh = np.concatenate([xy, z], axis=-1).astype(np.float32)
    return det


def rescale(det: Detections, scale: float, pad_xy: tuple[float, float], image_hw: tuple[int, int]) -> Detections:
    """Input-pixel detections -> original image pixels (undo letterbox scale and padding); boxes clipped."""
    px, py = pad_xy
    h, w = image_hw
    off = np.array([px, py], np.float32)
    boxes = (det.boxes - np.concatenate([off, off])) / scale
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    lms = (det.landmarks - off) / scale
    mesh = None
    if det.mesh is not None:
        mesh = det.mesh.copy()
        mesh[..., :2] = (mesh[..., :2] - off) / scale
        mesh[..., 2] /= scale
    return Detections(boxes.astype(np.float32), det.scores, lms.astype(np.float32), mesh, det.anchors)
