"""The CoreML runner: the Core ML runtime on macOS, the numpy MIL interpreter elsewhere."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from edge.runners.mil_interpreter import InterpretedCoreMLRunner, import_coremltools


def runs_here() -> str | None:
    return None  # the Core ML runtime on macOS; elsewhere the numpy MIL interpreter (labelled as such)


def dtype_enum(name: str) -> int:
    from coremltools.proto import MIL_pb2  # optional: coreml extra

    return MIL_pb2.DataType.Value(name)


class CoreMLRunner:
    """The Core ML runtime (macOS only)."""

    def __init__(self, path: Path, output_names, name: str = "coreml"):
        ct = import_coremltools()
        self.model = ct.models.MLModel(str(path))
        self.output_names = list(output_names)
        self.name = f"{name} (Core ML runtime)"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # fp16 programs declare a FLOAT16 input (iOS 17 target)
        dt = np.float16 if self.model.get_spec().description.input[0].type.multiArrayType.dataType == 65552 else np.float32
        out = self.model.predict({"input": np.ascontiguousarray(x, dtype=dt)})
        return {n: np.asarray(out[n], dtype=np.float32) for n in self.output_names}


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    name = f"coreml-{meta['precision']}"
    if platform.system() == "Darwin":
        return CoreMLRunner(bundle_dir / meta["model_file"], meta["spec"]["output_names"], name=name)

    return InterpretedCoreMLRunner(bundle_dir / meta["model_file"], meta["spec"]["output_names"], name=name)
