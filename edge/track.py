"""Face IDs across frames: ByteTrack's association (Zhang et al., "ByteTrack: Multi-Object Tracking by Associating
Every Detection Box", ECCV 2022) on a constant-velocity Kalman filter, in numpy.

Each frame: confident detections are matched to every live track (predicted boxes, IoU, Hungarian); then the
low-score detections (which a plain detector threshold would drop: faces turning, blurred, half hidden) are matched
to the tracks still unmatched, at a stricter IoU; a track unmatched for `max_lost` frames ends; a confident detection
left over starts a new track. IDs are never reused.

Written here rather than taken from a library: the maintained trackers did not fit our pins when measured
(roboflow `trackers` 2.6 needs opencv-python beside our opencv-python-headless; norfair 2.3 needs numpy < 2;
supervision 0.31 no longer ships a tracker).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from edge.postprocess import box_iou


@dataclass(frozen=True)
class TrackerConfig:
    high: float = 0.5  # detections at or above: first association, and may start a track
    low: float = 0.1  # detections in [low, high): second association only (they keep tracks alive)
    new_track: float = 0.6  # a detection starts a track only at or above this score
    match_iou: float = 0.2  # first association: IoU with the predicted box at least this
    low_match_iou: float = 0.5  # second association
    max_lost: int = 30  # frames a track survives unmatched (a second at 30 fps)


class _Kalman:
    """Constant velocity on (cx, cy, aspect, h) with ByteTrack's noise model (position and velocity noise scale with h)."""

    POS, VEL = 1.0 / 20, 1.0 / 160

    def __init__(self, box: np.ndarray):
        self.x = np.r_[_xyah(box), np.zeros(4)]
        h = self.x[3]
        std = np.array([2 * self.POS * h, 2 * self.POS * h, 1e-2, 2 * self.POS * h,
                        10 * self.VEL * h, 10 * self.VEL * h, 1e-5, 10 * self.VEL * h])
        self.P = np.diag(std ** 2)
        self.F = np.eye(8)
        self.F[:4, 4:] = np.eye(4)
        self.H = np.eye(4, 8)

    def predict(self) -> None:
        h = self.x[3]
        q = np.array([self.POS * h, self.POS * h, 1e-2, self.POS * h, self.VEL * h, self.VEL * h, 1e-5, self.VEL * h])
        self.x = self.F @ self.x
        self.P = self.F @ self.P @ self.F.T + np.diag(q ** 2)

    def update(self, box: np.ndarray) -> None:
        h = self.x[3]
        r = np.diag(np.array([self.POS * h, self.POS * h, 1e-1, self.POS * h]) ** 2)
        s = self.H @ self.P @ self.H.T + r
        k = np.linalg.solve(s, self.H @ self.P).T
        self.x = self.x + k @ (_xyah(box) - self.H @ self.x)
        self.P = (np.eye(8) - k @ self.H) @ self.P

    @property
    def box(self) -> np.ndarray:
        cx, cy, a, h = self.x[:4]
        w = a * h
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _xyah(box: np.ndarray) -> np.ndarray:
    w, h = max(box[2] - box[0], 1e-3), max(box[3] - box[1], 1e-3)
    return np.array([box[0] + w / 2, box[1] + h / 2, w / h, h], np.float64)


class _Track:
    def __init__(self, track_id: int, box: np.ndarray):
        self.id = track_id
        self.kf = _Kalman(box)
        self.lost = 0


class Tracker:
    """update(boxes, scores) once per frame, in order -> an ID per detection (-1: not tracked)."""

    def __init__(self, config: TrackerConfig = TrackerConfig()):
        self.config = config
        self.tracks: list[_Track] = []
        self._next_id = 1

    def update(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        c = self.config
        boxes, scores = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64).reshape(-1)
        ids = np.full(len(boxes), -1, np.int64)
        for t in self.tracks:
            t.kf.predict()
        high = np.flatnonzero(scores >= c.high)
        low = np.flatnonzero((scores >= c.low) & (scores < c.high))
        unmatched = list(range(len(self.tracks)))
        # 1. confident detections against every live track
        pairs, unmatched, left = self._associate(unmatched, high, boxes, c.match_iou)
        # 2. low-score detections against the tracks still unmatched
        pairs2, unmatched, _ = self._associate(unmatched, low, boxes, c.low_match_iou)
        for ti, di in pairs + pairs2:
            t = self.tracks[ti]
            t.kf.update(boxes[di])
            t.lost = 0
            ids[di] = t.id
        for ti in unmatched:
            self.tracks[ti].lost += 1
        self.tracks = [t for t in self.tracks if t.lost <= c.max_lost]
        # 3. confident detections left over start tracks
        for di in left:
            if scores[di] >= c.new_track:
                self.tracks.append(_Track(self._next_id, boxes[di]))
                ids[di] = self._next_id
                self._next_id += 1
        return ids

    def _associate(self, track_idx: list[int], det_idx: np.ndarray, boxes: np.ndarray, min_iou: float):
        """Hungarian matching on IoU -> ([(track, detection)], unmatched tracks, unmatched detections)."""
        if not track_idx or not len(det_idx):
            return [], list(track_idx), list(det_idx)
        predicted = np.stack([self.tracks[i].kf.box for i in track_idx])
        iou = box_iou(predicted, boxes[det_idx])
        rows, cols = linear_sum_assignment(-iou)
        pairs = [(track_idx[r], int(det_idx[k])) for r, k in zip(rows, cols) if iou[r, k] >= min_iou]
        matched_t, matched_d = {p[0] for p in pairs}, {p[1] for p in pairs}
        return pairs, [i for i in track_idx if i not in matched_t], [int(d) for d in det_idx if int(d) not in matched_d]
