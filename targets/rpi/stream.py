"""Raspberry Pi stream: a TFLite bundle on the camera (Picamera2), a USB camera, a file or a URL.

    python targets/rpi/stream.py BUNDLE picamera --jsonl faces.jsonl --threads 4
    python targets/rpi/stream.py BUNDLE clip.mp4 --max-frames 300

Needs numpy, a TFLite runtime (tflite-runtime or ai-edge-litert) and OpenCV (python3-opencv) or Picamera2.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import devstream  # noqa: E402
import runtimes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    devstream.add_args(ap, "picamera (the Pi camera, Picamera2), a camera index (0), a video file or a URL")
    a = ap.parse_args(argv)
    holder = {}

    def make_runner(folder, meta):
        run, holder["runtime"] = runtimes.tflite(folder / meta["model_file"], meta["spec"]["output_names"], threads=a.threads)
        return run

    summary = devstream.run_stream(a.bundle, a.source, make_runner, "tflite", a.jsonl, a.max_frames, a.every, score=a.score)
    summary["runtime"] = holder.get("runtime", "tflite")
    devstream.write_summary(a.json, summary)
    return 0 if summary["frames"] else 1


if __name__ == "__main__":
    sys.exit(main())
