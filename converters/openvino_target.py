"""OpenVINO IR: ov.convert_model from the PyTorch model; fp16 by compressing weights at save;
int8 with NNCF post-training quantisation (per-channel int8 weights, asymmetric u8 activations,
the MIXED preset) on the calibration set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, Converted, ConvertOptions, announce
from edge.model import TupleOutputs
from edge.quiet import native_output_quiet
from quant.ptq import drop_requantize_before_leaky

CAPABILITIES = Capabilities(
    target="openvino",
    suffix=".xml",
    routes={
        "fp32": "ov.convert_model(torch model)",
        "fp16": "ov.convert_model, saved with compress_to_fp16 (fp16 weights)",
        "int8": "ov.convert_model, then nncf.quantize (MIXED preset: symmetric per-channel weights, asymmetric activations)",
    },
    convert_requires=("openvino", "nncf"),
    run_requires=("openvino",),
    extra="openvino",
    int8_equalize=False,
)


def _to_ov(model, spec, size: int):
    import openvino as ov  # optional: openvino extra

    x = torch.zeros(1, 3, size, size)
    return _named(ov.convert_model(TupleOutputs(model).eval(), example_input=x, input=[1, 3, size, size]), spec)


def _named(m, spec):
    m.inputs[0].get_tensor().set_names({"input"})
    m.set_friendly_name("retinaface_edge")
    for out, name in zip(m.outputs, spec.output_names):
        out.get_tensor().set_names({name})
    return m


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    import openvino as ov  # optional: openvino extra

    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        x = torch.zeros(1, 3, opts.input_size, opts.input_size)
        if opts.qat.backend == "nncf":  # NNCF's fake quantisers become FakeQuantize ops: u8 convolutions on the CPU plugin
            announce(opts.progress, "ov.convert_model of the NNCF QAT model")
            with torch.no_grad():
                m = _named(ov.convert_model(opts.qat.finalize(), example_input=x, input=[1, 3, opts.input_size, opts.input_size]), spec)
            quant.update({"route": "NNCF QAT (edge compress --qat-backend nncf) -> ov.convert_model",
                          "activations": "u8 per-tensor asymmetric (NNCF MIXED preset, ranges trained)"})
        else:  # the converted PT2E program (quantize/dequantize pairs): OpenVINO fuses them into u8 convolutions
            announce(opts.progress, "ov.convert_model of the QAT program")
            gm = opts.qat.finalize()
            fused = drop_requantize_before_leaky(gm)  # OpenVINO fuses convolution and LeakyReLU: one rounding after both
            m = _named(ov.convert_model(torch.export.export(gm, (x,))), spec)
            quant.update({"route": "PT2E QAT (edge compress --qat-steps) -> ov.convert_model",
                          "activations": "int8 per-tensor (ranges learnt in QAT)", "leaky_relu_inputs_unquantized": fused})
        quant.update({"weights": "int8 per-channel symmetric", "qat": opts.qat.report()})
    else:
        announce(opts.progress, "ov.convert_model")
        m = _to_ov(model, spec, opts.input_size)
    if opts.precision == "int8" and opts.qat is None:
        import nncf  # optional: openvino extra

        announce(opts.progress, f"nncf.quantize on {len(calib)} calibration images")
        data = list(calib.tensors(spec))
        # MIXED (asymmetric activations) suits the LeakyReLU maps: on group.jpg recall of FP32 faces
        # 0.988 vs 0.940 with PERFORMANCE (symmetric), and equalising first lowers it (0.976)
        with native_output_quiet(litert=False):  # nncf draws progress bars (statistics collection, bias correction)
            m = nncf.quantize(m, nncf.Dataset(data), subset_size=len(data), preset=nncf.QuantizationPreset.MIXED)
        quant.update({"weights": "int8 per-channel symmetric", "activations": "u8 per-tensor asymmetric (NNCF MIXED preset)"})
    replaced = two_class_sigmoid(m)
    if replaced:
        quant["softmax_as_sigmoid"] = replaced
    for k, v in meta_min.items():
        m.set_rt_info(v, ["retinaface_edge", k.split(".", 1)[1]])
    ov.save_model(m, str(workdir / "model.xml"), compress_to_fp16=opts.precision == "fp16")
    quant.update(op_summary(workdir / "model.xml"))
    return Converted("model.xml", quant, "OpenVINO rt_info 'retinaface_edge'", extra_files=["model.bin"])


def two_class_sigmoid(m) -> int:
    """Every softmax over a last axis of 2 (the class scores) becomes a sigmoid of the logit difference:
    softmax(l0, l1) = (sigmoid(l0 - l1), sigmoid(l1 - l0)), equal to float rounding (conf within 6e-8 measured).
    The plugin's softmax over 16,800 pairs took ~11 % of an int8 inference (per-layer profile, merge1_50 at
    640x640); the element-wise sigmoid is ~0.1 ms cheaper there. Returns how many were replaced."""
    import openvino.opset13 as ops  # optional: openvino extra

    count = 0
    for node in m.get_ordered_ops():
        if node.get_type_name() != "Softmax":
            continue
        shape = node.get_output_partial_shape(0)
        rank = shape.rank.get_length() if shape.rank.is_static else 0
        axis = int(node.get_attributes().get("axis", 1))
        if rank == 0 or axis not in (-1, rank - 1) or not shape[rank - 1].is_static or shape[rank - 1].get_length() != 2:
            continue
        x = node.input_value(0)
        one, minus = np.array([1], np.int64), np.array([-1], np.int64)
        l0 = ops.slice(x, np.array([0], np.int64), one, one, minus)
        l1 = ops.slice(x, one, np.array([2], np.int64), one, minus)
        d = ops.subtract(l1, l0)
        s = ops.sigmoid(ops.concat([ops.negative(d), d], -1))
        s.set_friendly_name(node.get_friendly_name())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(s.output(0))
        count += 1
    if count:
        m.validate_nodes_and_infer_types()
    return count


def op_summary(path: Path) -> dict:
    import openvino as ov  # optional: openvino extra

    m = ov.Core().read_model(str(path))
    counts: dict[str, int] = {}
    for op in m.get_ordered_ops():
        t = op.get_type_name()
        if t in ("Constant", "Parameter", "Result"):
            continue
        counts[t] = counts.get(t, 0) + 1
    consts: dict[str, int] = {}
    for op in m.get_ordered_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 4:  # conv 4-D, group conv 5-D
            et = op.get_output_element_type(0).get_type_name()
            consts[et] = consts.get(et, 0) + 1
    return {"ops": dict(sorted(counts.items())), "conv_weight_types": consts}


