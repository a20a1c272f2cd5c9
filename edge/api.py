"""The Python API for applications: a `Detector` from a registry name, a checkpoint or any bundle; `detect` on one
image; `stream` over a video file, a camera or a URL, with stable face IDs.

    from edge.api import Detector

    detector = Detector.from_bundle("bundles/retinaface-tflite-int8-640")   # or Detector.from_weights("default")
    for face in detector.detect("photo.jpg"):                                # a path, a PIL image or a BGR array
        print(face.box, face.score, face.landmarks)
    for frame in detector.stream("clip.mp4"):                                # or a camera index, or rtsp://...
        print(frame.index, [(f.track_id, f.box) for f in frame.faces])

Images: numpy arrays are BGR uint8 (H, W, 3), OpenCV's order, unless `rgb=True`; PIL images and paths are read as
they are. Coordinates are pixels of the image given. The commands `edge detect` and `edge stream` are built on this.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.bundle import is_bundle, load_bundle_runner
from edge.errors import ConfigError, ImageError
from edge.image_io import check_image_array, load_image
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import Detections
from edge.runners import TorchRunner
from edge.stream import StreamFrame, detections_stream
from edge.track import TrackerConfig
from edge.weights.load import load_weights


@dataclass(frozen=True)
class Face:
    """One face. box: (x1, y1, x2, y2) pixels; landmarks: (5, 2) pixels (right eye, left eye, nose, right and left
    mouth corner, as the subject sees them); mesh: (468, 3) (x, y pixels, z in the same scale) or None;
    track_id: the face's ID across the frames of a stream (None outside a stream, or for a face not tracked)."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    mesh: np.ndarray | None = None
    track_id: int | None = None

    def to_dict(self) -> dict:
        d = {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5),
             "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks]}
        if self.track_id is not None:
            d["id"] = int(self.track_id)
        if self.mesh is not None:
            d["mesh"] = [[round(float(v), 2) for v in p] for p in self.mesh]
        return d


def faces_of(det: Detections, ids: np.ndarray | None = None) -> list[Face]:
    """Detections -> Face objects (with the tracker's IDs where given; -1 means not tracked)."""
    out = []
    for i in range(len(det)):
        tid = None if ids is None or ids[i] < 0 else int(ids[i])
        out.append(Face(det.boxes[i].copy(), float(det.scores[i]), det.landmarks[i].copy(),
                        None if det.mesh is None else det.mesh[i].copy(), tid))
    return out


@dataclass(frozen=True)
class Frame:
    """One processed frame of a stream: its index in the source, its time in seconds (the source's timestamp for a
    file, the capture clock for a live source), the faces (with IDs), and the frame itself (BGR)."""

    index: int
    timestamp: float
    faces: list[Face]
    image: np.ndarray

    def to_dict(self) -> dict:
        return {"frame": self.index, "time": round(self.timestamp, 4), "faces": [f.to_dict() for f in self.faces]}


class Detector:
    """Faces in images and streams, from any model this project runs (see the module's docstring)."""

    def __init__(self, pipeline: Pipeline, description: str):
        self.pipeline = pipeline
        self.description = description

    @classmethod
    def from_weights(cls, weights: str = "default", *, arch: str | None = None, input_size: int | None = 640,
                     score: float = 0.5, nms: float = 0.4, device: str = "cpu") -> Detector:
        """The PyTorch model of a registry name ("default", ...) or a checkpoint file."""
        model, info = load_weights(weights, arch=arch)
        pipe = Pipeline(TorchRunner(model, device), model.spec.with_input_size(input_size), _post(score, nms))
        return cls(pipe, info.describe())

    @classmethod
    def from_bundle(cls, path: str | Path, *, threads: int | None = None, score: float = 0.5, nms: float = 0.4) -> Detector:
        """A converted bundle (any target this host runs), its files verified by SHA-256 first."""
        runner, spec, desc = load_bundle_runner(path, threads)
        return cls(Pipeline(runner, spec, _post(score, nms)), desc)

    @classmethod
    def load(cls, model: str | Path = "default", **kw) -> Detector:
        """A bundle folder, else registry weights or a checkpoint (`threads` only for bundles, `device` only for weights)."""
        if Path(model).is_dir() and is_bundle(Path(model)):
            return cls.from_bundle(model, **kw)
        return cls.from_weights(str(model), **kw)

    def detections(self, image, *, rgb: bool = False) -> Detections:
        """The faces of one image as arrays (`Detections`), in the image's pixels."""
        prep = self.pipeline.preprocess(as_bgr(image, rgb))
        return self.pipeline.postprocess(self.pipeline.infer(prep), prep)

    def detect(self, image, *, rgb: bool = False) -> list[Face]:
        """The faces of one image (a path, a PIL image, or a numpy array: BGR unless rgb=True), best first."""
        return faces_of(self.detections(image, rgb=rgb))

    def stream(self, source, *, every: int = 1, max_frames: int | None = None, track: bool = True,
               drop: bool | None = None, tracker: TrackerConfig | None = None) -> Iterator[Frame]:
        """Frames of a video file, a camera (an int index or "0") or a URL (rtsp://, http://), each with its faces.
        Decoding runs in its own thread ahead of inference. drop: whether frames that arrive while inference is
        busy are dropped (default: yes for cameras and URLs, which do not wait; never for files).
        every: process every N-th frame; max_frames: stop after this many processed frames."""
        for f in detections_stream(self.pipeline, source, every=every, max_frames=max_frames, track=track, drop=drop,
                                   tracker=tracker):
            yield _frame(f)


def _frame(f: StreamFrame) -> Frame:
    return Frame(f.index, f.timestamp, faces_of(f.detections, f.ids), f.image)


def _post(score: float, nms: float) -> PostConfig:
    for name, v in (("score", score), ("nms", nms)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {v}")
    return PostConfig(score_threshold=score, nms_threshold=nms)


def as_bgr(image, rgb: bool = False) -> np.ndarray:
    """A path, a PIL image or a numpy array (BGR, or RGB with rgb=True) -> checked BGR uint8 (H, W, 3)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, np.ndarray):  # a PIL image
        return check_image_array(np.asarray(image.convert("RGB"))[..., ::-1])
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    img = check_image_array(image)
    return np.ascontiguousarray(img[..., ::-1]) if rgb else img
