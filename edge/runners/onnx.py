"""The onnxruntime loader of ONNX bundles."""
from __future__ import annotations

from pathlib import Path

from edge.runners import OnnxRunner


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    return OnnxRunner(str(bundle_dir / meta["model_file"]), threads=threads, name=f"onnxruntime-{meta['precision']}")
