"""TFLite through litert-torch.

fp32: litert_torch.convert. fp16: the fp32 flatbuffer with float16 weights (ai-edge-quantizer's
float_casting; dequantised to float at load, so CPU compute stays fp32, GPU delegates use fp16).
int8: PT2E post-training quantisation (per-channel symmetric int8 weights, int8 activations from
histogram observers on the calibration set), converted to a full-integer graph; the softmax and
the FPN's upsample/add stay float, as litert-torch lowers them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, ConvertOptions, Converted, step
from edge.model import TupleOutputs

CAPABILITIES = Capabilities(
    target="tflite",
    suffix=".tflite",
    routes={
        "fp32": "litert_torch.convert",
        "fp16": "fp32 flatbuffer, float16 weights (ai-edge-quantizer float_casting)",
        "int8": "PT2E PTQ (per-channel int8 weights, int8 activations) -> litert_torch.convert",
    },
    convert_requires=("litert_torch", "ai_edge_quantizer", "torchao"),
    run_requires=("ai_edge_litert", "tflite_runtime", "tensorflow"),
    extra="tflite",
)
METADATA_NAME = "retinaface_edge"


def _convert_fp32(model, x: torch.Tensor, path: Path) -> None:
    import litert_torch

    litert_torch.convert(TupleOutputs(model).eval(), (x,)).export(str(path))


def _convert_int8(model, x, calib, spec, path: Path, progress: bool, float_modules=()) -> dict:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    from quant.ptq import converted, pt2e_calibrated

    gm, quantizer = pt2e_calibrated(model, spec, calib, progress, float_modules)
    gm = converted(gm, fold_quantize=False)
    litert_torch.convert(gm, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    return {"weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (histogram observer)"}


def _convert_fp16(src: Path, dst: Path) -> None:
    from ai_edge_quantizer import quantizer

    recipe = [{
        "regex": ".*", "operation": "*", "algorithm_key": "float_casting",
        "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT", "explicit_dequantize": True},
    }]
    quantizer.Quantizer(str(src), recipe).quantize().export_model(str(dst), overwrite=True)


def set_metadata(path: Path, meta_min: dict[str, str]) -> None:
    """Store the minimal metadata as a named buffer in the flatbuffer's `metadata` list."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    buf = path.read_bytes()
    m = schema.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    for b in m.buffers:  # buffers stored after the flatbuffer (offset/size) are inlined before re-packing
        if b.offset and b.offset > 1:
            b.data = np.frombuffer(buf[b.offset:b.offset + b.size], dtype=np.uint8)
            b.offset, b.size = 0, 0
    b = schema.BufferT()
    b.data = np.frombuffer(json.dumps(meta_min).encode(), dtype=np.uint8)
    m.buffers.append(b)
    md = schema.MetadataT()
    md.name = METADATA_NAME
    md.buffer = len(m.buffers) - 1
    m.metadata = [e for e in (m.metadata or []) if e.name != METADATA_NAME.encode()] + [md]
    builder = flatbuffers.Builder(len(buf) + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def read_metadata(path: Path) -> dict | None:
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    for e in m.metadata or []:
        if e.name in (METADATA_NAME, METADATA_NAME.encode()):
            return json.loads(bytes(m.buffers[e.buffer].data).decode())
    return None


def op_summary(path: Path) -> dict:
    interp = _interpreter_class()[0](model_path=str(path))
    tensors = interp.get_tensor_details()
    counts: dict[str, int] = {}
    for op in interp._get_ops_details():
        dtype = np.dtype(tensors[op["inputs"][0]]["dtype"]).name if len(op["inputs"]) and op["inputs"][0] >= 0 else "-"
        key = f"{op['op_name']}:{dtype}"
        counts[key] = counts.get(key, 0) + 1
    return {"ops": dict(sorted(counts.items()))}


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    out = workdir / "model.tflite"
    x = torch.zeros(1, 3, opts.input_size, opts.input_size)
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        import litert_torch
        from litert_torch.quantize.quant_config import QuantConfig

        step(opts.progress, "the QAT program (trained ranges, no calibration), then litert_torch.convert")
        litert_torch.convert(opts.qat.finalize(), (x,), quant_config=QuantConfig(pt2e_quantizer=opts.qat.quantizer)).export(str(out))
        quant.update({"route": "PT2E QAT (edge compress --qat-steps) -> litert_torch.convert", "weights": "int8 per-channel symmetric",
                      "activations": "int8 per-tensor (ranges learnt in QAT)", "qat": opts.qat.report()})
    elif opts.precision == "int8":
        step(opts.progress, f"PT2E: observing {len(calib)} calibration images, then litert_torch.convert")
        quant.update(_convert_int8(model, x, calib, spec, out, opts.progress, opts.float_modules))
    else:
        step(opts.progress, "litert_torch.convert")
        tmp = workdir / "fp32.tflite.tmp"
        _convert_fp32(model, x, tmp if opts.precision == "fp16" else out)
        if opts.precision == "fp16":
            step(opts.progress, "float16 weights")
            _convert_fp16(tmp, out)
            tmp.unlink()
    set_metadata(out, meta_min)
    quant.update(op_summary(out))
    return Converted("model.tflite", quant, "TFLite metadata buffer 'retinaface_edge'")


def _interpreter_class():
    """(Interpreter class, runtime name): ai-edge-litert, else tflite-runtime, else tensorflow.lite."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore

        return Interpreter, "tflite-runtime"
    except ImportError:
        pass
    try:
        import tensorflow as tf  # type: ignore

        return tf.lite.Interpreter, "tensorflow.lite"
    except ImportError:
        pass
    from edge.errors import BundleError

    raise BundleError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime, or tensorflow)")


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float32 input as the interpreter's input tensor `detail` takes it (quantised if the model is)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if detail["dtype"] != np.float32:
        scale, zp = detail["quantization"]
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(detail["dtype"])
    return x


class TFLiteRunner:
    """Runs a .tflite with NCHW float32 input; quantised inputs/outputs are (de)quantised here."""

    def __init__(self, path: str | Path, output_names, threads: int | None = None, name: str = "tflite"):
        cls, runtime = _interpreter_class()
        self.interp = cls(model_path=str(path), num_threads=threads) if threads else cls(model_path=str(path))
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        sig = self.interp.get_signature_list()
        if sig:
            # signature outputs output_0.. follow the exported tuple, i.e. spec.output_names
            key = next(iter(sig))
            details = self.interp.get_signature_runner(key).get_output_details()
            self.outs = [details[n] for n in sig[key]["outputs"]]
        else:
            self.outs = self.interp.get_output_details()
        if len(self.outs) != len(output_names):
            from edge.errors import BundleError

            raise BundleError(f"{Path(path).name}: {len(self.outs)} outputs, the contract names {len(output_names)}")
        self.output_names = list(output_names)
        self.runtime = runtime
        self.name = f"{name} ({runtime})"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.interp.set_tensor(self.inp["index"], quantize_input(x, self.inp))
        self.interp.invoke()
        res = {}
        for name, o in zip(self.output_names, self.outs):
            v = self.interp.get_tensor(o["index"])
            if o["dtype"] != np.float32:
                scale, zp = o["quantization"]
                v = (v.astype(np.float32) - zp) * scale
            res[name] = v.astype(np.float32, copy=False)
        return res


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    return TFLiteRunner(bundle_dir / meta["model_file"], meta["spec"]["output_names"], threads, name=f"tflite-{meta['precision']}")
