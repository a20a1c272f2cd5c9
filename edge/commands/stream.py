"""`edge stream SOURCE`: faces in a video file, a camera or a URL, with stable IDs; JSON Lines, an annotated video,
a live window. Decoding, inference and drawing/encoding run in three threads (`edge.stream`, and a writer here)."""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

from tqdm import tqdm

from edge.api import Detector, faces_of
from edge.atomic import write_json
from edge.commands.args import add_model_args, input_size_arg, unit_float
from edge.draw import draw_stream_frame
from edge.errors import ConfigError, OutputError
from edge.outputs import check_output_file, display
from edge.stream import VideoSource, detections_stream, import_cv2, parse_source

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv")
FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}


def _partial(dest: Path) -> Path:
    """Where an output is written until it is complete (the naming `edge.atomic` cleans up after a killed run)."""
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}{dest.suffix}")


class _Writer(threading.Thread):
    """Draws and encodes the annotated video and writes the JSON Lines, behind inference (a bounded queue)."""

    def __init__(self, jsonl: Path | None, video: Path | None, fps: float, mesh: bool):
        super().__init__(daemon=True, name="edge-stream-writer")
        self.q: queue.Queue = queue.Queue(maxsize=8)
        self.jsonl, self.video, self.fps, self.mesh = jsonl, video, fps, mesh
        self.frames = 0
        self.error: BaseException | None = None
        self._out = open(_partial(jsonl), "w", encoding="utf-8") if jsonl else None  # noqa: SIM115 - closed in finish()
        self._vw = None

    def run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                self.write(item)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            self.error = e
            while True:  # keep draining so the producer never blocks
                if self.q.get() is None:
                    return

    def write(self, item) -> None:
        """One frame: its JSON line, and its annotated picture in the video."""
        record, frame, det, ids, fps = item
        if self._out is not None:
            self._out.write(json.dumps(record) + "\n")
        if self.video is not None:
            img = draw_stream_frame(frame, det, ids, fps, self.mesh)
            if self._vw is None:
                cv2 = import_cv2()
                h, w = img.shape[:2]
                self._vw = cv2.VideoWriter(str(_partial(self.video)), cv2.VideoWriter_fourcc(*FOURCC[self.video.suffix.lower()]),
                                           self.fps, (w, h))
                if not self._vw.isOpened():
                    raise OutputError(f"--draw {display(self.video)}: OpenCV cannot encode {self.video.suffix} here")
            self._vw.write(img)
        self.frames += 1

    def finish(self) -> list[Path]:
        """Close and put the outputs in place (also after Ctrl-C: what was written is complete and playable)."""
        done = []
        if self._out is not None:
            self._out.close()
            os.replace(_partial(self.jsonl), self.jsonl)
            done.append(self.jsonl)
        if self._vw is not None:
            self._vw.release()
            os.replace(_partial(self.video), self.video)
            done.append(self.video)
        elif self.video is not None:
            _partial(self.video).unlink(missing_ok=True)
        return done


def check_outputs(args) -> tuple[Path | None, Path | None]:
    """Every output checked before the source is even opened."""
    jsonl = check_output_file(args.jsonl, "--jsonl") if args.jsonl else None
    if args.json:
        check_output_file(args.json, "--json")
    video = None
    if args.draw:
        video = check_output_file(args.draw, "--draw")
        if video.suffix.lower() not in VIDEO_SUFFIXES:
            raise OutputError(f"--draw {display(video)}: needs a video extension ({', '.join(VIDEO_SUFFIXES)})")
    target, kind = parse_source(args.source)
    for out in (jsonl, video):
        if out is not None and kind == "file" and Path(target).resolve() == out.resolve():
            raise OutputError(f"{display(out)} is the source; an input is never overwritten")
    if jsonl is not None and video is not None and jsonl.resolve() == video.resolve():
        raise OutputError("--jsonl and --draw name the same file")
    return jsonl, video


def _show_window(cv2) -> None:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ConfigError("--show needs a display (DISPLAY is not set)")
    try:
        cv2.namedWindow("edge stream", cv2.WINDOW_NORMAL)
    except cv2.error:
        raise ConfigError("--show needs an OpenCV built with a GUI (opencv-python, not -headless)") from None


def cmd_stream(args) -> int:
    jsonl, video = check_outputs(args)
    if args.bundle and args.input_size != 640:
        raise ConfigError("--input-size is fixed by the bundle")
    cv2 = import_cv2()
    if args.show:
        _show_window(cv2)
    probe = VideoSource(args.source)  # opened once here for its rate and length (a clear error before any work)
    src_fps, total, live = probe.fps, probe.frames, probe.live
    probe.release()
    detector = (Detector.from_bundle(args.bundle, threads=args.threads, score=args.score, nms=args.nms) if args.bundle else
                Detector.from_weights(args.weights, arch=args.arch, input_size=args.input_size, score=args.score, nms=args.nms))
    length = "live" if live else f"{total or '?'} frames"
    rate = f", {src_fps:.1f} fps" if src_fps else ""
    print(f"model: {detector.description}; source {probe.name} ({length}{rate})", file=sys.stderr)
    writer = _Writer(jsonl, video, (src_fps or 25.0) / args.every, args.mesh) if (jsonl or video) else None
    if writer is not None and not args.plain:
        writer.start()
    expected = None if live else (-(-total // args.every) if total else None)
    if args.max_frames and expected:
        expected = min(expected, args.max_frames)
    bar = tqdm(total=expected if not live else args.max_frames, unit="frame", disable=args.quiet, desc="stream")
    times: deque = deque(maxlen=30)
    frames, ids_seen, t0, interrupted = 0, set(), time.perf_counter(), False
    try:
        for f in detections_stream(detector.pipeline, args.source, every=args.every, max_frames=args.max_frames,
                                   track=not args.no_track, drop=None if not args.no_drop else False, threaded=not args.plain):
            times.append(time.perf_counter())
            fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
            written = f.detections if args.mesh else dataclasses.replace(f.detections, mesh=None)
            faces = [face.to_dict() for face in faces_of(written, f.ids)]  # the API's JSON form
            ids_seen.update(face["id"] for face in faces if "id" in face)
            record = {"frame": f.index, "time": round(f.timestamp, 4), "faces": faces}
            if writer is not None:
                if writer.error is not None:
                    raise writer.error
                item = (record, f.image, f.detections, f.ids, fps)
                if args.plain:
                    writer.write(item)
                else:
                    writer.q.put(item)
            if args.show:
                cv2.imshow("edge stream", draw_stream_frame(f.image, f.detections, f.ids, fps, args.mesh))
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            frames += 1
            bar.update(1)
            if fps is not None:
                bar.set_postfix(fps=f"{fps:.1f}", faces=len(faces), refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        if writer is not None and not args.plain:
            writer.q.put(None)
            writer.join()
        if writer is not None:
            written = writer.finish()
            for p in written:
                print(f"wrote {display(p)} ({writer.frames} frames)", file=sys.stderr)
        if args.show:
            cv2.destroyAllWindows()
    if writer is not None and writer.error is not None:
        raise writer.error
    secs = time.perf_counter() - t0
    print(f"{frames} frames in {secs:.1f} s ({frames / secs if secs else 0:.1f} fps), {len(ids_seen)} face IDs"
          + (" (interrupted)" if interrupted else ""), file=sys.stderr)
    if args.json:
        write_json(args.json, {"source": str(args.source), "model": detector.description, "mode": "plain" if args.plain else "threaded",
                               "threads": args.threads, "every": args.every, "frames": frames, "seconds": round(secs, 3),
                               "fps": round(frames / secs, 2) if secs else None, "face_ids": len(ids_seen),
                               "interrupted": interrupted})
    return 130 if interrupted else 0


def register(sub) -> None:
    p = sub.add_parser("stream", help="faces in a video file, a camera index or a URL, with stable IDs")
    p.add_argument("source", help="a video file, a camera index (0) or a URL (rtsp://, http://)")
    add_model_args(p)
    p.add_argument("--input-size", type=input_size_arg, default=640)
    p.add_argument("--score", type=unit_float, default=0.5)
    p.add_argument("--nms", type=unit_float, default=0.4)
    p.add_argument("--threads", type=int, default=None, help="inference threads (bundles)")
    p.add_argument("--jsonl", default=None, help="one JSON line per processed frame: frame, time, faces with IDs")
    p.add_argument("--draw", default=None, help="annotated video (.mp4, .avi, .mkv): boxes, landmarks, IDs, FPS")
    p.add_argument("--mesh", action="store_true", help="draw (and write) the face meshes too")
    p.add_argument("--show", action="store_true", help="a live window (needs a display and OpenCV with a GUI)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many processed frames")
    p.add_argument("--every", type=int, default=1, help="process every N-th frame")
    p.add_argument("--no-track", action="store_true", help="no face IDs")
    p.add_argument("--no-drop", action="store_true", help="never drop frames of a live source (they queue instead)")
    p.add_argument("--json", default=None, help="the run's summary: frames, seconds, frames per second, face IDs")
    p.add_argument("--plain", action="store_true",
                   help="no threads: decode, infer, draw and write one after another (to measure what the threads gain)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stream)
