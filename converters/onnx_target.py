"""ONNX: torch.onnx.export(dynamo=True), run by onnxruntime.

fp16: onnxruntime's float16 converter (weights and compute fp16, float32 input/output).
int8: onnxruntime static quantisation, QDQ format, int8 weights per channel, uint8 activations
calibrated on the calibration set (99.999th-percentile ranges: on group.jpg, recall of FP32 faces
0.976 against 0.916 with MinMax, after cross-layer equalisation). The PT2E program cannot be exported to ONNX QDQ
with int8 weights (it keeps fp32 weights and runs slower than fp32; see STACK-NOTES), so the
ONNX int8 route quantises the exported fp32 graph instead.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, ConvertOptions, Converted, step
from edge.model import TupleOutputs

CAPABILITIES = Capabilities(
    target="onnx",
    suffix=".onnx",
    routes={
        "fp32": "torch.onnx.export(dynamo=True), batch norms folded",
        "fp16": "fp32 export, then onnxruntime.transformers.float16 (float32 I/O kept)",
        "int8": "fp32 export, then onnxruntime quantize_static: QDQ, int8 per-channel weights, uint8 activations (percentile)",
    },
    convert_requires=("onnx", "onnxscript", "onnxruntime"),
    run_requires=("onnxruntime",),
    extra="onnx",
)


def export_fp32(model, spec, path: Path, size: int) -> None:
    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            TupleOutputs(model).eval(), (x,), dynamo=True, input_names=["input"],
            output_names=list(spec.output_names), external_data=False, verbose=False,
        )
    prog.save(str(path))


class _Reader:
    """onnxruntime CalibrationDataReader over the calibration tensors."""

    def __init__(self, tensors):
        self.it = iter(tensors)

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {"input": x}


def _set_metadata(path: Path, meta_min: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta_min.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    import onnx

    out = workdir / "model.onnx"
    fp32 = workdir / "fp32.onnx.tmp"
    step(opts.progress, "exporting with torch.onnx.export(dynamo=True)")
    export_fp32(model, spec, fp32 if opts.precision != "fp32" else out, opts.input_size)
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        step(opts.progress, "casting to float16")
        m16 = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        onnx.save(m16, str(out))
    elif opts.precision == "int8":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        step(opts.progress, f"calibrating on {len(calib)} images and quantising (QDQ, per-channel)")
        pre = workdir / "pre.onnx.tmp"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out), _Reader(calib.tensors(spec)), quant_format=QuantFormat.QDQ, per_channel=True,
            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.Percentile,
            # softmax output stays float: one [0, 1] scale for a probability pair gains nothing
            nodes_to_exclude=[n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Softmax"],
        )
        pre.unlink()
        quant.update({"weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor asymmetric (99.999th percentile)"})
    if fp32.exists():
        fp32.unlink()
    _set_metadata(out, meta_min)
    quant["ops"] = op_summary(out)
    return Converted("model.onnx", quant, "ONNX metadata_props")


def op_summary(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path))
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    int8_w = sum(1 for i in m.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) == 4)
    fp16_w = sum(1 for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16 and len(i.dims) == 4)
    return {"nodes": counts, "int8_conv_weights": int8_w, "fp16_conv_weights": fp16_w}


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    from edge.runners import OnnxRunner

    return OnnxRunner(str(bundle_dir / meta["model_file"]), threads=threads, name=f"onnxruntime-{meta['precision']}")
