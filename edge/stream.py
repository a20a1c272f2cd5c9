"""Video, camera and URL streams through a pipeline, with face IDs: decoding in its own thread, ahead of inference.

A source is a video file, a camera index (an int, or a string of digits) or a URL (rtsp://, http://, https://),
read with OpenCV. The reader thread fills a bounded queue; when inference falls behind, a live source (camera,
URL: they do not wait) drops the oldest waiting frame, a file never drops (the reader waits). A frame that fails
to decode in the middle of a file is skipped with a warning and the stream goes on.
"""
from __future__ import annotations

import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge.errors import ConfigError, EdgeError, ImageWarning
from edge.outputs import display
from edge.pipeline import Pipeline
from edge.postprocess import Detections
from edge.track import Tracker, TrackerConfig

URL_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://", "tcp://")
QUEUE_FRAMES = 4  # frames decoded ahead of inference
MAX_BAD_FRAMES = 25  # consecutive undecodable frames after which a file is taken to end there


class StreamError(EdgeError):
    """A video source that cannot be opened or read: a missing or unreadable file, no camera, an unreachable URL."""


@dataclass(frozen=True)
class StreamFrame:
    index: int  # in the source, counting every frame read
    timestamp: float  # seconds: the file's own time, or since the stream started for a live source
    detections: Detections
    ids: np.ndarray | None  # a track ID per face (-1: not tracked), None without tracking
    image: np.ndarray  # BGR


def import_cv2():
    try:
        import cv2  # optional: bench extra
    except ImportError:
        raise ConfigError("video streams need OpenCV: pip install 'retinaface-edge[bench]' (opencv-python-headless)") from None
    return cv2


def parse_source(source) -> tuple[object, str]:
    """-> (what OpenCV opens, kind: "camera", "url" or "file"); a missing file is refused here."""
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return int(source), "camera"
    s = str(source)
    if s.lower().startswith(URL_SCHEMES):
        return s, "url"
    p = Path(s)
    if not p.exists():
        raise StreamError(f"{display(p)}: no such file")
    if not p.is_file():
        raise StreamError(f"{display(p)}: not a file")
    return str(p), "file"


class VideoSource:
    """An opened source: `read()` -> (ok, frame); `fps` and `frames` where the source says."""

    def __init__(self, source, open_timeout_s: float = 10.0):
        cv2 = import_cv2()
        self.target, self.kind = parse_source(source)
        self.name = f"camera {self.target}" if self.kind == "camera" else display(self.target)
        if self.kind == "url":
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_timeout_s * 1000), cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                      int(open_timeout_s * 1000)]
            self.cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        else:
            self.cap = cv2.VideoCapture(self.target)
        if not self.cap.isOpened():
            self.cap.release()
            why = {"camera": "no camera there (or it is busy)", "url": "cannot connect (unreachable, or not a video stream)",
                   "file": "not a video OpenCV can read"}[self.kind]
            raise StreamError(f"{self.name}: {why}")
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0) or None
        n = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frames = n if self.kind == "file" and n > 0 else None
        self.cv2 = cv2

    @property
    def live(self) -> bool:
        return self.kind != "file"

    def position_ms(self) -> float:
        return float(self.cap.get(self.cv2.CAP_PROP_POS_MSEC))

    def read(self):
        return self.cap.read()

    def release(self) -> None:
        self.cap.release()


def read_frames(src: VideoSource, stop: threading.Event) -> Iterator[tuple[int, float, np.ndarray]]:
    """(index, timestamp s, BGR frame) until the end of the source or `stop`; undecodable frames of a file are
    skipped with a warning (a run of MAX_BAD_FRAMES ends it)."""
    index, bad, t0 = 0, 0, time.perf_counter()
    while not stop.is_set():
        ok, frame = src.read()
        if not ok or frame is None:
            if src.kind == "file" and src.frames is not None and index + bad < src.frames - 1 and bad < MAX_BAD_FRAMES:
                bad += 1
                warnings.warn(f"{src.name}: frame {index + bad - 1} could not be decoded; skipped", ImageWarning)
                continue
            if src.live and bad < MAX_BAD_FRAMES and index > 0:  # a live source may hiccup
                bad += 1
                continue
            return
        ts = src.position_ms() / 1000.0 if src.kind == "file" else time.perf_counter() - t0
        yield index, ts, frame
        index, bad = index + 1, 0


class _Reader(threading.Thread):
    """Decodes ahead into a bounded queue; `drop`: a full queue loses its oldest frame instead of waiting."""

    DONE = object()

    def __init__(self, src: VideoSource, every: int, drop: bool):
        super().__init__(daemon=True, name="edge-stream-reader")
        self.src, self.every, self.drop = src, every, drop
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.stop = threading.Event()
        self.dropped = 0
        self.error: BaseException | None = None
        self.caught: list = []

    def run(self) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ImageWarning)
                for index, ts, frame in read_frames(self.src, self.stop):
                    if index % self.every:
                        continue
                    self._put((index, ts, frame))
                    self.caught.extend(caught)
                    caught.clear()
                self.caught.extend(caught)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            self.error = e
        finally:
            self._put(self.DONE)

    def _put(self, item) -> None:
        """Queue a frame: a live source drops the oldest waiting frame when the queue is full, a file waits. The end
        marker always waits for room (it never displaces a frame); nothing is queued once the consumer stopped."""
        if self.drop and item is not self.DONE:
            while not self.stop.is_set():
                try:
                    self.q.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self.q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass
            return
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


def detections_stream(pipe: Pipeline, source, *, every: int = 1, max_frames: int | None = None, track: bool = True,
                      drop: bool | None = None, tracker: TrackerConfig | None = None,
                      threaded: bool = True) -> Iterator[StreamFrame]:
    """Every `every`-th frame of `source` through `pipe`, with track IDs (ByteTrack's two thresholds: faces down to
    `tracker.low` keep their tracks alive, only those at the pipeline's score threshold are returned).
    threaded=False: decode in this thread, one frame after another (the plain loop, for comparison)."""
    if every < 1:
        raise ConfigError(f"--every must be at least 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"--max-frames must be at least 1, got {max_frames}")
    src = VideoSource(source)
    cfg = tracker or TrackerConfig(high=pipe.post.score_threshold, new_track=pipe.post.score_threshold)  # every face shown has an ID
    trk = Tracker(cfg) if track else None
    keep = pipe.post.score_threshold
    if trk is not None:  # the low-score faces feed the tracker's second association
        pipe = Pipeline(pipe.runner, pipe.spec, type(pipe.post)(**{**pipe.post.__dict__, "score_threshold": min(keep, cfg.low)}),
                        pipe.mesh_decoder)
    reader = _Reader(src, every, src.live if drop is None else drop)
    plain = None if threaded else ((i, ts, f) for i, ts, f in read_frames(src, reader.stop) if i % every == 0)
    if threaded:
        reader.start()
    done = 0
    try:
        while max_frames is None or done < max_frames:
            if plain is not None:
                item = next(plain, _Reader.DONE)
            else:
                item = reader.q.get()
                for w in reader.caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                reader.caught.clear()
            if item is _Reader.DONE:
                if reader.error is not None:
                    raise reader.error
                break
            index, ts, frame = item
            prep = pipe.preprocess(frame)
            det = pipe.postprocess(pipe.infer(prep), prep)
            ids = None
            if trk is not None:
                all_ids = trk.update(det.boxes, det.scores)
                shown = np.flatnonzero(det.scores >= keep)
                det, ids = det.take(shown), all_ids[shown]
            done += 1
            yield StreamFrame(index, ts, det, ids, frame)
    finally:
        reader.stop.set()
        try:  # let the reader leave a blocking put
            while True:
                reader.q.get_nowait()
        except queue.Empty:
            pass
        if threaded:
            reader.join(timeout=5)
        src.release()


def write_video(path: str | Path, frames, fps: float = 25.0) -> int:
    """Write BGR frames to a video file (.avi: MJPG, .mp4: mp4v) -> the number of frames written."""
    cv2 = import_cv2()
    path = Path(path)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    vw, n = None, 0
    try:
        for f in frames:
            if vw is None:
                vw = cv2.VideoWriter(str(path), fourcc, fps, (f.shape[1], f.shape[0]))
                if not vw.isOpened():
                    raise ConfigError(f"OpenCV cannot write {path.suffix} video here")
            vw.write(f)
            n += 1
    finally:
        if vw is not None:
            vw.release()
    return n
