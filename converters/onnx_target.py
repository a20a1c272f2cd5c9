"""ONNX: torch.onnx.export(dynamo=True), run by onnxruntime.

fp16: onnxruntime's float16 converter (weights and compute fp16, float32 input/output).
int8: onnxruntime static quantisation, QDQ format, int8 weights per channel, uint8 activations
calibrated on the calibration set (99.999th-percentile ranges: on group.jpg, recall of FP32 faces
0.976 against 0.916 with MinMax, after cross-layer equalisation).
int8 from a PT2E QAT checkpoint: the trained program (quantize/dequantize pairs) exported as it is keeps
float weights behind QuantizeLinear -> Clip -> DequantizeLinear and float biases, which onnxruntime does not
fuse into int8 convolutions (slower than fp32; see STACK-NOTES). `qdq_from_pt2e` rewrites it into the form
quantize_static writes: int8 weight initializers, int32 biases at input scale x weight scale, uint8
activations (the same grid as the program's int8 one, zero point + 128).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from converters.base import Capabilities, Converted, ConvertOptions, announce
from edge.model import TupleOutputs
from edge.quiet import native_output_quiet

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
    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta_min.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def qdq_from_pt2e(m) -> dict:
    """Rewrite, in place, an ONNX export of a converted PT2E program (fold_quantize=False) into onnxruntime's
    fusable QDQ form. Each QuantizeLinear(float initializer) [-> Clip] -> DequantizeLinear on a weight becomes
    an int8 initializer feeding the DequantizeLinear (the same integers: round half to even, then the
    clip); each convolution's float bias becomes int32 at input scale x weight scale behind its own
    DequantizeLinear; int8 per-tensor activations become uint8 (zero point + 128, the same real values).
    -> counts of what was rewritten."""

    g = m.graph
    inits = {i.name: i for i in g.initializer}
    arr = lambda name: numpy_helper.to_array(inits[name])  # noqa: E731
    prod = {o: n for n in g.node for o in n.output}
    drop, added, counts = set(), [], {"weights": 0, "biases": 0, "activations": 0}
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        src, clip = prod.get(dq.input[0]), None
        if src is not None and src.op_type == "Clip":
            clip, src = src, prod.get(src.input[0])
        if src is None or src.op_type != "QuantizeLinear" or src.input[0] not in inits:
            continue
        w, s, zp = arr(src.input[0]), arr(src.input[1]), arr(src.input[2])
        shape = [1] * w.ndim
        if s.ndim:
            shape[_attr(src, "axis", 1)] = -1
        info = np.iinfo(zp.dtype)
        lo, hi = info.min, info.max
        if clip is not None:
            lo, hi = max(lo, int(arr(clip.input[1]))), min(hi, int(arr(clip.input[2])))
        q = np.clip(np.rint(w / s.reshape(shape)) + zp.reshape(shape).astype(np.float32), lo, hi).astype(zp.dtype)
        name = f"{src.input[0]}_quantized"
        added.append(numpy_helper.from_array(q, name))
        dq.input[0] = name
        drop.update(n.name or id(n) for n in (src, clip) if n is not None)
        counts["weights"] += 1
    kept = [n for n in g.node if (n.name or id(n)) not in drop]
    inits.update({t.name: t for t in added})
    prod = {o: n for n in kept for o in n.output}
    bias_nodes = []
    for conv in (n for n in kept if n.op_type == "Conv" and len(n.input) == 3 and n.input[2] in inits):
        dx, dw = prod.get(conv.input[0]), prod.get(conv.input[1])
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        sb = (arr(dx.input[1]).astype(np.float64) * arr(dw.input[1]).astype(np.float64)).astype(np.float32)
        b = arr(conv.input[2])
        bq = np.clip(np.rint(b / sb), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        base = conv.input[2]
        added += [numpy_helper.from_array(bq, f"{base}_quantized"), numpy_helper.from_array(sb, f"{base}_scale"),
                  numpy_helper.from_array(np.zeros_like(bq), f"{base}_zero_point")]
        bias_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                           [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", axis=0))
        conv.input[2] = f"{base}_dequantized"
        counts["biases"] += 1
    inits.update({t.name: t for t in added})
    for n in kept:  # activations: per-tensor int8 -> uint8 (weights keep int8: their data input is an initializer)
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[0] in inits or len(n.input) < 3:
            continue
        zp = arr(n.input[2])
        if zp.dtype != np.int8 or zp.ndim:
            continue
        name = f"{n.input[2]}_uint8"
        if name not in inits:
            t = numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name)
            added.append(t)
            inits[name] = t
        n.input[2] = name
        counts["activations"] += 1
    del g.node[:]
    g.node.extend(bias_nodes + kept)
    used = {i for n in g.node for i in n.input}
    keep_inits = [t for t in list(g.initializer) + added if t.name in used]
    seen: set[str] = set()
    del g.initializer[:]
    g.initializer.extend(t for t in keep_inits if not (t.name in seen or seen.add(t.name)))
    del g.value_info[:]  # the exporter's intermediate types say int8 where activations are now uint8
    onnx.checker.check_model(m)
    return counts


def export_qat(qat, spec, path: Path, size: int) -> dict:
    """The PT2E QAT program -> ONNX QDQ at `path` (int8 weights, uint8 activations). -> qdq_from_pt2e's counts."""

    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(qat.finalize(), (x,), dynamo=True, input_names=["input"],
                                 output_names=list(spec.output_names), external_data=False, verbose=False)
    m = prog.model_proto
    counts = qdq_from_pt2e(m)
    for n in m.graph.node:  # the exporter's per-node stack traces: half the file, nothing a runtime reads
        del n.metadata_props[:]
        n.doc_string = ""
    onnx.save(m, str(path))
    return counts


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    out = workdir / "model.onnx"
    fp32 = workdir / "fp32.onnx.tmp"
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        announce(opts.progress, "the QAT program (trained ranges, no calibration), torch.onnx.export, then int8 weights")
        counts = export_qat(opts.qat, spec, out, opts.input_size)
        quant.update({"route": "PT2E QAT (edge compress --qat-steps) -> torch.onnx.export -> QDQ (int8 weights folded)",
                      "weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor (ranges learnt in QAT)",
                      "rewritten": counts, "qat": opts.qat.report()})
    else:
        announce(opts.progress, "exporting with torch.onnx.export(dynamo=True)")
        export_fp32(model, spec, fp32 if opts.precision != "fp32" else out, opts.input_size)
    if opts.precision == "fp16":
        announce(opts.progress, "casting to float16")
        m16 = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        onnx.save(m16, str(out))
    elif opts.precision == "int8" and opts.qat is None:
        announce(opts.progress, f"calibrating on {len(calib)} images and quantising (QDQ, per-channel)")
        pre = workdir / "pre.onnx.tmp"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        with native_output_quiet(litert=False):  # onnxruntime's calibrator prints its steps ("Collecting tensor ...")
            quantize_static(
                str(pre), str(out), _Reader(calib.tensors(spec)), quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                calibrate_method=CalibrationMethod.Percentile,
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
    m = onnx.load(str(path))
    counts: dict[str, int] = {}
    for n in m.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    int8_w = sum(1 for i in m.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and len(i.dims) == 4)
    fp16_w = sum(1 for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16 and len(i.dims) == 4)
    return {"nodes": counts, "int8_conv_weights": int8_w, "fp16_conv_weights": fp16_w}


