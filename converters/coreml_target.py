"""CoreML mlprogram with coremltools, from a torch.export program.

fp32 / fp16: compute precision of the whole program. int8w: fp16 program whose conv weights are
int8 per-channel (constexpr dequantise at load; linear_quantize_weights with no size threshold,
so the small depthwise kernels are int8 too). int8 (W8A8): the PT2E program calibrated on the
calibration set, or the trained one of a PT2E QAT checkpoint, converted with folded weights, so
activations carry quantize/dequantize pairs.

Core ML itself runs only on macOS. Elsewhere bundles run in `converters.mil_interpreter`, a numpy
interpreter of the program, labelled "interpreted MIL, not the Core ML runtime" wherever it reports.
"""
from __future__ import annotations

import contextlib
import io
import platform
from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, ConvertOptions, Converted, step
from edge.model import TupleOutputs


def _runs_here() -> str | None:
    return None  # the Core ML runtime on macOS; elsewhere the numpy MIL interpreter (labelled as such)


CAPABILITIES = Capabilities(
    target="coreml",
    suffix=".mlpackage",
    routes={
        "fp32": "torch.export -> ct.convert(mlprogram, FLOAT32)",
        "fp16": "torch.export -> ct.convert(mlprogram, FLOAT16)",
        "int8w": "fp16 mlprogram, then linear_quantize_weights (int8 per-channel, all convs)",
        "int8": "PT2E PTQ (W8A8), convert_pt2e(fold_quantize=True) -> ct.convert",
    },
    convert_requires=("coremltools", "torchao", "litert_torch"),
    run_requires=("coremltools: the Core ML runtime on macOS, the numpy MIL interpreter elsewhere",),
    extra="coreml",
    runs_here=_runs_here,
    not_byte_identical=("coremltools 9 writes a fresh UUID per item into Manifest.json and serialises protobuf map fields "
                        "in no fixed order, so two saves of the same program differ in bytes; the programs themselves "
                        "are identical (same spec text, same weight.bin)"),
)


def _ct():
    # coremltools prints a line per missing native proxy when imported on Linux; keep the console clean
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import coremltools as ct
    return ct


def _convert_program(gm_or_model, x, spec, precision):
    ct = _ct()
    ep = torch.export.export(gm_or_model, (x,)).run_decompositions({})
    cp = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    return ct.convert(
        ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17, compute_precision=cp,
        inputs=[ct.TensorType(name="input", shape=tuple(x.shape))], outputs=[ct.TensorType(name=n) for n in spec.output_names],
    )


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    ct = _ct()
    x = torch.zeros(1, 3, opts.input_size, opts.input_size)
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        step(opts.progress, "the QAT program (trained ranges, no calibration), folded, then ct.convert (W8A8)")
        ml = _convert_program(opts.qat.finalize(fold_quantize=True), x, spec, "fp16")
        quant.update({"route": "PT2E QAT (edge compress --qat-steps), convert_pt2e(fold_quantize=True) -> ct.convert",
                      "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (ranges learnt in QAT)",
                      "qat": opts.qat.report()})
    elif opts.precision == "int8":
        from quant.ptq import converted, pt2e_calibrated

        step(opts.progress, f"PT2E: observing {len(calib)} calibration images")
        gm, _ = pt2e_calibrated(model, spec, calib, opts.progress, opts.float_modules)
        gm = converted(gm, fold_quantize=True)
        step(opts.progress, "ct.convert (W8A8)")
        ml = _convert_program(gm, x, spec, "fp16")
        quant.update({"weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (quantize/dequantize in the program)"})
    else:
        step(opts.progress, "ct.convert")
        ml = _convert_program(TupleOutputs(model).eval(), x, spec, "fp32" if opts.precision == "fp32" else "fp16")
        if opts.precision == "int8w":
            from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

            step(opts.progress, "int8 weights (per channel)")
            cfg = OptimizationConfig(global_config=OpLinearQuantizerConfig(mode="linear_symmetric", granularity="per_channel", weight_threshold=0))
            ml = linear_quantize_weights(ml, cfg)
            quant.update({"weights": "int8 per-channel symmetric", "activations": "fp16"})
    ml.user_defined_metadata.update(meta_min)
    ml.short_description = "RetinaFace-MobileNet-0.25 (retinaface-edge)"
    ml.save(str(workdir / "model.mlpackage"))
    quant.update(structure(workdir / "model.mlpackage"))
    return Converted("model.mlpackage", quant, "CoreML user_defined_metadata")


def structure(path: Path) -> dict:
    """Names, shapes, op types and weight dtypes read from the saved program (no runtime needed)."""
    ct = _ct()
    spec = ct.utils.load_spec(str(path))
    desc = spec.description

    def shape(f):
        return list(f.type.multiArrayType.shape)

    prog = spec.mlProgram
    int8_types = {_dtype_enum("INT8"), _dtype_enum("UINT8")}
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


def _dtype_enum(name: str) -> int:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Value(name)


class CoreMLRunner:
    """The Core ML runtime (macOS only)."""

    def __init__(self, path: Path, output_names, name: str = "coreml"):
        ct = _ct()
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
    from converters.mil_interpreter import InterpretedCoreMLRunner

    return InterpretedCoreMLRunner(bundle_dir / meta["model_file"], meta["spec"]["output_names"], name=name)
