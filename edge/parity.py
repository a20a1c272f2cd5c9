"""Parity building blocks: tensor-level errors and detection matching against the reference."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge.postprocess import Detections, box_iou


def tensor_errors(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs error and SNR in dB (10 log10 of signal power over error power)."""
    out = {}
    for k, r in ref.items():
        c = cand[k].astype(np.float64)
        r = r.astype(np.float64)
        err = c - r
        noise = float(np.mean(err ** 2))
        signal = float(np.mean(r ** 2))
        snr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
        out[k] = {"max_abs": float(np.abs(err).max()), "snr_db": snr}
    return out


def match(ref: Detections, cand: Detections, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching (Hungarian on IoU). Returns (ref_idx, cand_idx, iou) of pairs with IoU >= threshold."""
    if len(ref) == 0 or len(cand) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(ref.boxes.astype(np.float64), cand.boxes.astype(np.float64))
    r, c = linear_sum_assignment(-iou)
    ok = iou[r, c] >= iou_threshold
    return r[ok], c[ok], iou[r, c][ok]


def face_size(boxes: np.ndarray) -> np.ndarray:
    w = np.clip(boxes[:, 2] - boxes[:, 0], 1e-6, None)
    h = np.clip(boxes[:, 3] - boxes[:, 1], 1e-6, None)
    return np.sqrt(w * h)


def detection_agreement(ref: Detections, cand: Detections, iou_threshold: float = 0.5) -> dict:
    """Recall/precision of the candidate against the reference, and errors of the matched pairs
    (landmark and mesh NME normalised by sqrt(w h) of the reference box)."""
    ri, ci, iou = match(ref, cand, iou_threshold)
    res = {"ref_faces": len(ref), "cand_faces": len(cand), "matched": int(len(ri)),
           "recall": float(len(ri) / len(ref)) if len(ref) else 1.0,
           "precision": float(len(ri) / len(cand)) if len(cand) else 1.0,
           "iou": iou.tolist()}
    if len(ri):
        norm = face_size(ref.boxes[ri])
        res["score_abs_err"] = np.abs(ref.scores[ri] - cand.scores[ci]).tolist()
        res["landmark_nme"] = (np.linalg.norm(ref.landmarks[ri] - cand.landmarks[ci], axis=-1).mean(-1) / norm).tolist()
        if ref.mesh is not None and cand.mesh is not None:
            res["mesh_nme"] = (np.linalg.norm(ref.mesh[ri][..., :2] - cand.mesh[ci][..., :2], axis=-1).mean(-1) / norm).tolist()
    return res
