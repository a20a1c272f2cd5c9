"""Jetson stream: an ONNX bundle through onnxruntime (TensorRT, CUDA or CPU) on a camera, a file, a URL or a
GStreamer pipeline (the CSI camera, with --gstreamer: "nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720
! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink").

    python targets/jetson/stream.py BUNDLE 0 --jsonl faces.jsonl

Needs numpy, onnxruntime (onnxruntime-gpu on a Jetson) and OpenCV (with GStreamer for CSI cameras).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
import devstream  # noqa: E402
import runtimes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    devstream.add_args(ap, "a camera index (0), a video file, a URL, or with --gstreamer a GStreamer pipeline")
    ap.add_argument("--gstreamer", action="store_true", help="SOURCE is a GStreamer pipeline ending in appsink")
    a = ap.parse_args(argv)
    holder = {}

    def make_runner(folder, meta):
        run, holder["runtime"] = runtimes.onnxruntime(folder / meta["model_file"], meta["spec"]["output_names"])
        return run

    summary = devstream.run_stream(a.bundle, a.source, make_runner, "onnxruntime", a.jsonl, a.max_frames, a.every,
                                   gstreamer=a.gstreamer, score=a.score)
    summary["runtime"] = holder.get("runtime", "onnxruntime")
    devstream.write_summary(a.json, summary)
    return 0 if summary["frames"] else 1


if __name__ == "__main__":
    sys.exit(main())
