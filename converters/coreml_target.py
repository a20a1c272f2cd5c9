"""CoreML mlprogram with coremltools, from a torch.export program.

fp32 / fp16: compute precision of the whole program. int8w: fp16 program whose conv weights are
int8 per-channel (constexpr dequantise at load; linear_quantize_weights with no size threshold,
so the small depthwise kernels are int8 too). int8 (W8A8): the PT2E program calibrated on the
calibration set, or the trained one of a PT2E QAT checkpoint, converted with folded weights, so
activations carry quantize/dequantize pairs.

Core ML itself runs only on macOS. Elsewhere bundles run in `edge.runners.mil_interpreter`, a numpy
interpreter of the program, labelled "interpreted MIL, not the Core ML runtime" wherever it reports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from converters.base import Capabilities, Converted, ConvertOptions, announce
from edge.model import TupleOutputs
from edge.quiet import native_output_quiet
from edge.runners.coreml import dtype_enum, runs_here
from edge.runners.mil_interpreter import import_coremltools
from quant.ptq import drop_requantize_before_leaky, pt2e_calibrated, quantized_program

CAPABILITIES = Capabilities(
    target="coreml",
    suffix=".mlpackage",
    routes={
        "fp32": "torch.export -> ct.convert(mlprogram, FLOAT32)",
        "fp16": "torch.export -> ct.convert(mlprogram, FLOAT16)",
        "int8w": "fp16 mlprogram, then linear_quantize_weights (int8 per-channel, all convs)",
        "int8": "PT2E PTQ (W8A8), convert_pt2e(fold_quantize=True), each convolution into its LeakyReLU unrounded "
                "(quantised once after the activation) -> ct.convert",
    },
    convert_requires=("coremltools", "torchao", "litert_torch"),
    run_requires=("coremltools: the Core ML runtime on macOS, the numpy MIL interpreter elsewhere",),
    extra="coreml",
    runs_here=runs_here,
    not_byte_identical=("coremltools 9 writes a fresh UUID per item into Manifest.json and serialises protobuf map fields "
                        "in no fixed order, so two saves of the same program differ in bytes; the programs themselves "
                        "are identical (same spec text, same weight.bin)"),
)


def _convert_program(gm_or_model, x, spec, precision):
    ct = import_coremltools()
    ep = torch.export.export(gm_or_model, (x,)).run_decompositions({})
    cp = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    with native_output_quiet(litert=False):  # coremltools draws a progress bar per conversion pass
        return ct.convert(
            ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, compute_precision=cp,
            inputs=[ct.TensorType(name="input", shape=tuple(x.shape))],
            outputs=[ct.TensorType(name=n) for n in spec.output_names],
        )


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    ct = import_coremltools()
    x = torch.zeros(1, 3, opts.input_size, opts.input_size)
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        announce(opts.progress, "the QAT program (trained ranges, no calibration), folded, then ct.convert (W8A8)")
        gm, report = opts.qat.finalize(fold_quantize=True), opts.qat.report()
        # as for PTQ below; a fused-leaky program has no rounding there to drop
        fused = drop_requantize_before_leaky(gm) + report.get("leaky_relu_inputs_unquantized", 0)
        ml = _convert_program(gm, x, spec, "fp16")
        quant.update({"route": "PT2E QAT (edge compress --qat-steps), convert_pt2e(fold_quantize=True) -> ct.convert",
                      "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (ranges learnt in QAT)",
                      "leaky_relu_inputs_unquantized": fused, "qat": report})
    elif opts.precision == "int8":
        announce(opts.progress, f"PT2E: observing {len(calib)} calibration images")
        gm, _ = pt2e_calibrated(model, spec, calib, opts.progress, opts.float_modules)
        gm = quantized_program(gm, fold_quantize=True)
        fused = drop_requantize_before_leaky(gm)  # each convolution runs into its LeakyReLU unrounded
        announce(opts.progress, "ct.convert (W8A8)")
        ml = _convert_program(gm, x, spec, "fp16")
        quant.update({"weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (quantize/dequantize in the program)",
                      "leaky_relu_inputs_unquantized": fused})
    else:
        announce(opts.progress, "ct.convert")
        ml = _convert_program(TupleOutputs(model).eval(), x, spec, "fp32" if opts.precision == "fp32" else "fp16")
        if opts.precision == "int8w":
            from coremltools.optimize.coreml import (  # optional: coreml extra
                OpLinearQuantizerConfig,
                OptimizationConfig,
                linear_quantize_weights,
            )

            announce(opts.progress, "int8 weights (per channel)")
            cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel", weight_threshold=0))
            with native_output_quiet(litert=False):  # coremltools' progress bar
                ml = linear_quantize_weights(ml, cfg)
            quant.update({"weights": "int8 per-channel symmetric", "activations": "fp16"})
    ml.user_defined_metadata.update(meta_min)
    ml.short_description = "RetinaFace-MobileNet-0.25 (retinaface-edge)"
    ml.save(str(workdir / "model.mlpackage"))
    quant.update(structure(workdir / "model.mlpackage"))
    return Converted("model.mlpackage", quant, "CoreML user_defined_metadata")


def structure(path: Path) -> dict:
    """Names, shapes, op types and weight dtypes read from the saved program (no runtime needed)."""
    ct = import_coremltools()
    spec = ct.utils.load_spec(str(path))
    desc = spec.description

    def shape(f):
        return list(f.type.multiArrayType.shape)

    prog = spec.mlProgram
    int8_types = {dtype_enum("INT8"), dtype_enum("UINT8")}
    ops: dict[str, int] = {}
    int8_consts = 0
    for fn in prog.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
                # int8 weights: constexpr_affine_dequantize's quantized_data (conv kernels are rank 4)
                q = op.attributes.get("quantized_data") if op.type.startswith("constexpr") else None
                if q is not None and q.type.tensorType.dataType in int8_types and q.type.tensorType.rank >= 4:
                    int8_consts += 1
    return {
        "inputs": {i.name: shape(i) for i in desc.input},
        "outputs": {o.name: shape(o) for o in desc.output},
        "ops": dict(sorted(ops.items())),
        "int8_weight_tensors": int8_consts,
    }


