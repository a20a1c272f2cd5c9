"""The TFLite runner: ai-edge-litert, tflite-runtime or tensorflow.lite; int8/uint8 inputs quantised by the tensors'
own parameters, integer outputs handed over with them and dequantised where they are read."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.contract import ModelSpec
from edge.errors import BundleError
from edge.postprocess import QuantizedOutputs
from edge.quiet import native_output_quiet


def import_quietly() -> None:
    """Import the converter stack with its native start-up notices held back (absl's "All log messages before
    absl::InitializeLog()", TensorFlow's oneDNN notice: printed on import, whatever TF_CPP_MIN_LOG_LEVEL says)."""
    with native_output_quiet():
        import litert_torch  # noqa: F401  # optional: tflite extra
        from litert_torch.quantize import pt2e_quantizer  # noqa: F401  # optional: tflite extra


def interpreter_class():
    """(Interpreter class, runtime name): ai-edge-litert, else tflite-runtime, else tensorflow.lite."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # optional: tflite extra

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore  # optional: device runtime

        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf  # type: ignore  # optional: device runtime

        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError:
        pass

    raise BundleError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime, or tensorflow)")


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float32 input as the interpreter's input tensor `detail` takes it (quantised if the model is)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if detail["dtype"] != np.float32:
        scale, zp = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(detail["dtype"])
    return x


def xnnpack_partitions(interp) -> int | None:
    """Delegate nodes in an allocated interpreter's execution plan: the parts of the graph XNNPACK (the default CPU
    delegate) runs; 0: all of it runs in TFLite's builtin kernels (tflite-runtime 2.14 delegates no int8 op).
    None: the interpreter does not list its nodes. (targets/common/runtimes.py has the same function for devices.)"""
    try:
        ops = interp._get_ops_details()  # private in every runtime interpreter_class() loads, but present in all
    except AttributeError:
        return None
    return sum(o["op_name"] == "DELEGATE" for o in ops)


class TFLiteRunner:
    """Runs a .tflite. `__call__` takes the (1, 3, H, W) float32 normalised tensor; a quantised input is quantised
    here; the outputs come as `QuantizedOutputs` (integer ones as written, float32 wherever read). A full-integer
    bundle's model takes the (1, H, W, 3) BGR canvas itself (`canvas_input`): `run_image` hands it the uint8 canvas
    (as int8, pixel - 128: exact), and `__call__` turns the tensor back into pixels (x * std + mean, rounded: exact
    for a canvas, the nearest integer pixel for a resized image)."""

    def __init__(self, path: str | Path, output_names, threads: int | None = None, name: str = "tflite", mean=None, std=None):
        cls, runtime = interpreter_class()
        with native_output_quiet(litert=False):  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            self.interp = cls(model_path=str(path), num_threads=threads) if threads else cls(model_path=str(path))
            self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.xnnpack_partitions = xnnpack_partitions(self.interp)
        sig = self.interp.get_signature_list()
        if sig:
            # signature outputs output_0.. follow the exported tuple, i.e. spec.output_names
            key = next(iter(sig))
            details = self.interp.get_signature_runner(key).get_output_details()
            self.outs = [details[n] for n in sig[key]["outputs"]]
        else:
            self.outs = self.interp.get_output_details()
        if len(self.outs) != len(output_names):
            raise BundleError(f"{Path(path).name}: {len(self.outs)} outputs, the contract names {len(output_names)}")
        self.output_names = list(output_names)
        # integer outputs: name -> (scale, zero point), read where they are dequantised
        self.output_quantization = {name: (float(o["quantization"][0]), int(o["quantization"][1]))
                                    for name, o in zip(self.output_names, self.outs) if o["dtype"] != np.float32}
        self.runtime = runtime
        self.name = f"{name} ({runtime})"
        shape = self.inp["shape"]
        self.canvas_input = len(shape) == 4 and shape[-1] == 3 and self.inp["dtype"] in (np.int8, np.uint8)
        if self.canvas_input and tuple(self.inp["quantization"]) not in ((1.0, -128), (1.0, 0)):
            raise BundleError(f"{Path(path).name}: a canvas input must have scale 1 (pixels as integers), got {self.inp['quantization']}")

        self.mean = np.asarray(ModelSpec().mean if mean is None else mean, np.float32)
        self.std = np.asarray(ModelSpec().std if std is None else std, np.float32)
        self.takes_pixels = self.canvas_input  # the pipeline hands over a rounded canvas for a resized image too
        if not self.canvas_input:
            self.run_image = None  # the pipeline then hands over the normalised tensor

    def run_image(self, canvas: np.ndarray) -> QuantizedOutputs:
        if canvas.ndim != 4 or canvas.shape[-1] != 3 or canvas.dtype != np.uint8:
            raise ValueError(f"run_image takes a (1, H, W, 3) uint8 BGR canvas, got {canvas.dtype} {canvas.shape}")
        if self.inp["dtype"] == np.int8:
            canvas = (canvas ^ np.uint8(0x80)).view(np.int8)  # pixel - 128, exactly
        return self._run(np.ascontiguousarray(canvas))

    def __call__(self, x: np.ndarray) -> QuantizedOutputs:
        if self.canvas_input:
            pixels = np.rint(x[0].transpose(1, 2, 0) * self.std + self.mean)
            return self.run_image(np.clip(pixels, 0, 255).astype(np.uint8)[None])
        return self._run(quantize_input(x, self.inp))

    def _run(self, x: np.ndarray) -> QuantizedOutputs:
        """-> the outputs as the model wrote them; integer ones are dequantised where they are read (whole, or at
        the anchors decoding keeps: `edge.postprocess.QuantizedOutputs`)."""
        self.interp.set_tensor(self.inp["index"], x)
        self.interp.invoke()
        raw = {name: self.interp.get_tensor(o["index"]) for name, o in zip(self.output_names, self.outs)}
        return QuantizedOutputs(raw, self.output_quantization)


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    spec = meta["spec"]
    return TFLiteRunner(bundle_dir / meta["model_file"], spec["output_names"], threads, name=f"tflite-{meta['precision']}",
                        mean=spec.get("mean"), std=spec.get("std"))
