"""The conversion API behind `edge-convert`: model -> bundle, validated before any work."""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calib_data.build import load_calibration
from converters.base import ConvertOptions, minimal_metadata, tool_version
from converters.bundle import atomic_folder, check_destination, git_revision, write_metadata
from converters.registry import target_module
from edge.bundle import CALIBRATED, FORMAT_VERSION, MESH_DECODER_FILE, RUNNERS, attach_mesh_decoder, path_bytes
from edge.contract import MAX_INPUT_SIZE
from edge.errors import ConfigError
from edge.evaluate.parity import load_gates, run_parity
from edge.pipeline import Pipeline
from edge.preprocess import normalise, prepare
from edge.quiet import native_output_quiet
from edge.runners import TorchRunner
from edge.samples import parity_images
from edge.weights.load import load_weights
from quant.config import check_module_names
from quant.equalize import equalize as cle
from quant.ptq import relu_split_modules, resolve_relu_split
from quant.qat import load_qat

QAT_TARGETS = ("tflite", "openvino", "onnx", "coreml")  # targets a PT2E QAT checkpoint converts to int8 for
FLOAT_MODULE_TARGETS = ("coreml",)  # PT2E int8 PTQ with float modules (TFLite int8 is full-integer: none)
GOLDEN_TOP_K = 256  # anchors per image kept in golden.npz (the reference's highest face scores)
TOOLS = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "litert-torch", "ai-edge-litert", "ai-edge-quantizer",
         "torchao", "openvino", "nncf", "coremltools")


@dataclass
class ConvertResult:
    bundle: Path
    target: str
    precision: str
    model_bytes: int
    seconds: float
    parity: dict  # summary on the built-in pictures; passed None when the target cannot run here
    replaced: str = "new"  # what was at the destination before: "new", "empty folder" or "bundle" (one of ours, replaced)


def golden(model, spec, size: int) -> dict[str, np.ndarray]:
    """FP32 reference on the parity set: canvases, top-k anchors' raw outputs, decoded detections."""

    canvases, names = parity_images(size, spec.mean)
    runner = TorchRunner(model)
    pipe = Pipeline(runner, spec)
    g: dict[str, list] = {"anchor_idx": [], "det_boxes": [], "det_scores": [], "det_landmarks": [], "det_count": []}
    if spec.mesh_vertices:
        g["det_mesh"] = []
    for n in spec.output_names:
        g[f"ref_{n}"] = []
    for c in canvases:  # prepared as the parity check and detection prepare them (a canvas: no resize)
        prep = prepare(c, spec.with_input_size(size))
        out = runner(prep.tensor)
        idx = np.argsort(-out["conf"][0, :, 1], kind="stable")[:GOLDEN_TOP_K]
        g["anchor_idx"].append(idx)
        for n in spec.output_names:
            g[f"ref_{n}"].append(out[n][0, idx])
        det = pipe.postprocess(out, prep)
        g["det_boxes"].append(det.boxes)
        g["det_scores"].append(det.scores)
        g["det_landmarks"].append(det.landmarks)
        if spec.mesh_vertices:
            g["det_mesh"].append(det.mesh)
        g["det_count"].append(len(det))
    res = {"canvases": canvases, "names": np.array(names)}
    for k, v in g.items():
        res[k] = np.concatenate(v) if k.startswith("det_") and k != "det_count" else np.stack(v) if k != "det_count" else np.array(v)
    return res


def _max_change(a, b, spec) -> float:
    """Worst raw-output change between two FP32 models on the parity images (equalisation must keep it ~1e-4)."""

    canvases, _ = parity_images(spec.input_size, spec.mean)
    ra, rb = TorchRunner(a), TorchRunner(b)
    worst = 0.0
    for c in canvases[:2]:
        x = normalise(c, spec.mean, spec.std)
        oa, ob = ra(x), rb(x)
        worst = max(worst, max(float(np.abs(oa[k] - ob[k]).max()) for k in oa))
    return worst


def check_float_modules(target: str, precision: str, float_modules) -> None:
    """--float-modules only where a PT2E int8 program can leave modules float; never for TFLite's full-integer graph."""
    if not float_modules:
        return
    if target == "tflite" and precision in CALIBRATED:
        raise ConfigError("--float-modules: TFLite int8 is a full-integer graph (NPU-ready), no module stays float; "
                          f"--float-modules applies to {', '.join(FLOAT_MODULE_TARGETS)} int8")
    if precision != "int8" or target not in FLOAT_MODULE_TARGETS:
        raise ConfigError(f"--float-modules applies to the PT2E int8 routes ({', '.join(FLOAT_MODULE_TARGETS)}), "
                          f"not {target} {precision}")


def check_relu_split(target: str, precision: str, relu_split) -> None:
    """--relu-split only for TFLite's pure-int8 graph (int8-mixed's stage 1 is int16 already)."""
    if relu_split and (target != "tflite" or precision != "int8"):
        raise ConfigError(f"--relu-split applies to tflite int8, not {target} {precision}")


INPUT_DTYPES = ("uint8", "int8")


def check_input_dtype(target: str, precision: str, input_dtype: str) -> None:
    """--input-dtype int8 only for TFLite's full-integer int8 graph (the others take a float tensor or, int8-mixed,
    start in int16)."""
    if input_dtype not in INPUT_DTYPES:
        raise ConfigError(f"--input-dtype must be one of {', '.join(INPUT_DTYPES)}, got {input_dtype!r}")
    if input_dtype != "uint8" and (target != "tflite" or precision != "int8"):
        raise ConfigError(f"--input-dtype {input_dtype} applies to tflite int8 (the full-integer graph), "
                          f"not {target} {precision}")


def default_out(target: str, precision: str, size: int) -> Path:
    return Path("bundles") / f"retinaface-{target}-{precision}-{size}"


def convert(target: str, precision: str = "fp32", *, weights: str = "default", arch: str | None = None, input_size: int = 640,
            calib: str | None = None, calib_count: int = 32, out: str | Path | None = None, progress: bool = True,
            equalize: bool | None = None, float_modules=(), relu_split=(), input_dtype: str = "uint8") -> ConvertResult:
    """Convert the model to one target's bundle. Unsupported requests raise ConfigError before any work.

    equalize: for int8, apply cross-layer equalisation to the backbone first (function-preserving);
    None takes the target's measured default (`Capabilities.int8_equalize`).
    float_modules: for the PT2E int8 routes (tflite, coreml), model modules (e.g. "body.stage1") left float.
    relu_split: for TFLite int8, model modules whose LeakyReLU convolutions the graph computes as two convolutions with
    fused ReLUs (`edge.model.LeakyAsReLUs`): more accurate, slower (docs/full-integer.md).
    input_dtype: for TFLite int8, the canvas the graph takes: "uint8" (the image as it is; a QUANTIZE op makes the
    int8 pixel - 128 the graph computes on) or "int8" (that pixel - 128 itself, which the caller makes by flipping each
    byte's top bit; TFLite's QUANTIZE kernel is a scalar loop on x86: docs/full-integer.md)."""
    t0 = time.perf_counter()
    mod = target_module(target)
    float_modules = tuple(float_modules or ())
    relu_split = tuple(relu_split or ())
    # 1. refuse a bad request before any work, the destination included
    out = Path(out) if out else default_out(target, precision, input_size)
    replaced = check_request(mod.CAPABILITIES, precision, input_size, calib, float_modules, out, relu_split,
                             input_dtype)
    # 2. the FP32 model (the reference), and the QAT program where the checkpoint is one
    model, info = load_reference(weights, arch, input_size, float_modules)
    spec = model.spec
    qat, model = qat_program(info, model, target, precision, calib, input_size)
    trained = None
    if quantises_trained_weights(qat, target):
        trained, qat = qat.report(), None
    if input_dtype != "uint8" and qat is not None and not getattr(qat, "full_integer", False):
        raise ConfigError(f"--input-dtype {input_dtype}: this QAT checkpoint's program takes the float tensor "
                          "(edge compress --qat-graph full-integer trains the graph that takes the canvas)")
    if relu_split:
        if qat is not None:
            raise ConfigError("--relu-split: a QAT checkpoint's program is converted as it was trained (train it with "
                              "edge compress --relu-split)")
        relu_split = relu_split_modules(model, relu_split)
    # 3. calibration (PTQ int8) and cross-layer equalisation (int8, where the target measured it helps)
    cs = load_calibration(calib, input_size, calib_count, spec.mean, progress) if precision in CALIBRATED and qat is None else None
    meta = base_metadata(target, precision, spec, info, cs)
    if progress:
        print(f"edge-convert: {target} {precision} {input_size}x{input_size} from {info.describe()}", file=sys.stderr)
    if equalize is None or qat is not None:  # a QAT program was trained on the model as it is
        equalize = mod.CAPABILITIES.int8_equalize and qat is None
    # by activation range too for int8 (int8-mixed measured better without: its stage 1 is int16 already)
    qmodel, eq_report = (equalized(model, spec, cs if precision == "int8" else None) if precision in CALIBRATED and equalize
                         else (model, None))
    relu_split, split_rule = resolve_relu_split(relu_split, qmodel, cs, spec)
    if split_rule and progress:
        print(f"  - --relu-split auto: {', '.join(relu_split) or 'no layer'}", file=sys.stderr)
    with atomic_folder(out) as tmp:
        # 4. the target's conversion
        opts = ConvertOptions(target, precision, input_size, calib, calib_count, progress, qat, float_modules,
                              relu_split, input_dtype)
        conv = mod.convert(qmodel, spec, opts, tmp, cs, minimal_metadata(meta))
        conv.quantization["cross_layer_equalization"] = eq_report
        if float_modules:
            conv.quantization["float_modules"] = list(float_modules)
        split = relu_split or tuple(getattr(qat, "relu_split", ()))
        if split:
            conv.quantization["relu_split"] = list(split)
        if split_rule:
            conv.quantization["relu_split_rule"] = split_rule
        if trained is not None:
            conv.quantization.update(route=conv.quantization["route"] + ", of the weights trained by edge compress "
                                     "--qat-graph fused-leaky", qat=trained)
        # 5. the FP32 reference stored beside it: golden outputs, and the mesh decoder of a low-rank head
        extra = [*conv.extra_files, *write_reference(tmp, model, spec, meta)]
        meta.update(model_file=conv.model_file, quantization=conv.quantization, format_metadata=conv.format_metadata,
                    reproducibility=reproducibility(mod.CAPABILITIES), gates=load_gates(target, precision))
        # 6. parity against the FP32 model on the built-in pictures, before the bundle is put in place
        meta["parity"] = parity_check(tmp, meta, model, mod.CAPABILITIES, progress)
        # 7. the metadata, once, with every file's hash
        write_metadata(tmp, meta)
        size_bytes = sum(path_bytes(tmp / f) for f in [conv.model_file, *extra])
    return ConvertResult(out, target, precision, size_bytes, time.perf_counter() - t0, meta["parity"], replaced)


def check_request(caps, precision: str, input_size: int, calib, float_modules: tuple, out: Path,
                  relu_split: tuple = (), input_dtype: str = "uint8") -> str:
    """Refuse what cannot be done, before any work. -> what is at `out` ("new", "empty folder", "bundle")."""
    caps.check(precision)
    if input_size <= 0 or input_size % 32:
        raise ConfigError(f"input size must be a positive multiple of 32, got {input_size}")
    if input_size > MAX_INPUT_SIZE:
        raise ConfigError(f"input size {input_size} is larger than the limit of {MAX_INPUT_SIZE}")
    if calib is not None and precision not in CALIBRATED:
        raise ConfigError(f"--calib is only used for int8, not {precision}")
    check_float_modules(caps.target, precision, float_modules)
    check_relu_split(caps.target, precision, relu_split)
    check_input_dtype(caps.target, precision, input_dtype)
    return check_destination(out)  # never a file or a folder that is not one of our bundles


def load_reference(weights: str, arch: str | None, input_size: int, float_modules: tuple):
    """-> (the FP32 model at `input_size`, LoadedWeights)."""
    model, info = load_weights(weights, arch=arch)
    if input_size % model.spec.pad_multiple:
        raise ConfigError(f"{info.arch.name} needs an input size that is a multiple of {model.spec.pad_multiple}, got {input_size}")
    model.spec = model.spec.with_input_size(input_size)
    if float_modules:
        check_module_names(model, float_modules)
        if info.kind == "qat":
            raise ConfigError("a QAT checkpoint's float modules were fixed in training (edge compress --float-modules)")
    return model, info


def quantises_trained_weights(qat, target: str) -> bool:
    """OpenVINO from a fused-leaky checkpoint: NNCF's PTQ of the weights the program trained (calibrated), not the
    program: OpenVINO's own graph (the program's ran 1.3x slower) and closer to FP32 (docs/full-integer.md)."""
    return bool(getattr(qat, "fused_leaky", False)) and target == "openvino"


def qat_program(info, model, target: str, precision: str, calib, input_size: int):
    """-> (the trained fake-quantised program or None, the FP32 model). int8 from a QAT checkpoint takes its
    program (no calibration); each kind of program converts for the targets named in the messages."""
    if info.kind == "qat" and precision == "int8-mixed":
        raise ConfigError("a QAT checkpoint's program is int8 throughout: convert it with --precision int8")
    if info.kind != "qat" or precision != "int8":
        return None, model
    if target not in QAT_TARGETS:
        raise ConfigError(f"QAT checkpoints convert to int8 for {', '.join(QAT_TARGETS)}; for {target} use its float "
                          f"weights with PTQ (--weights the run's final.pth)")
    with native_output_quiet(litert=False):  # rebuilding the program imports the quantizer's TensorFlow: its notices
        qat, model = load_qat(info.path, input_size)
    if calib is not None and not quantises_trained_weights(qat, target):
        raise ConfigError("--calib is not used with a QAT checkpoint (its ranges were learnt in training)")
    if getattr(qat, "full_integer", False) and target != "tflite":
        raise ConfigError(f"{info.path} was trained as the full-integer TFLite program (--qat-graph full-integer), which "
                          f"converts for tflite only; for {target} train with --qat-graph float-input")
    if getattr(qat, "fused_leaky", False) and target not in ("openvino", "coreml"):
        raise ConfigError(f"{info.path} was trained with each convolution running into its LeakyReLU unrounded (--qat-graph "
                          f"fused-leaky), as openvino and coreml compute it; {target} rounds there: train with --qat-graph "
                          + ("full-integer" if target == "tflite" else "float-input"))
    if qat.backend == "nncf" and target != "openvino":
        raise ConfigError(f"{info.path} was trained with NNCF's quantisers (--qat-backend nncf), which convert for openvino "
                          f"only; for {target} train with --qat-backend pt2e")
    return qat, model


def base_metadata(target: str, precision: str, spec, info, cs) -> dict:
    """What is known of a bundle before conversion: contract, anchors, weights, calibration, tools, revision."""
    return {
        "format_version": FORMAT_VERSION,
        "target": target,
        "precision": precision,
        "spec": spec.to_dict(),
        "anchors": {"min_sizes": spec.arch.min_sizes, "steps": spec.steps, "variances": spec.variances},
        "weights": {"name": info.name, "path": str(Path(info.path).resolve()), "sha256": info.sha256, "arch": info.arch.name,
                    "known": info.known, "params": info.params, "mesh_sha256": info.mesh_sha256},
        "calibration": cs.summary() if cs is not None else None,
        "tools": {t: tool_version(t) for t in TOOLS if tool_version(t)},
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def equalized(model, spec, cs=None):
    """-> (the model after cross-layer equalisation, by weight range and, given the calibration set `cs`, by
    activation range; its report with the worst FP32 output change)."""
    qmodel, report = cle(model, activations=None if cs is None else cs.tensors(spec))
    qmodel.spec = spec
    report["fp32_max_abs_change"] = _max_change(model, qmodel, spec)
    return qmodel, report


def write_reference(folder: Path, model, spec, meta: dict) -> list[str]:
    """golden.npz (the FP32 outputs on the parity pictures) and, for a low-rank mesh head, the FP32 decoder that
    turns each kept face's per-anchor code into vertices in numpy. -> the extra files written besides golden.npz."""
    np.savez_compressed(folder / "golden.npz", **golden(model, spec, spec.input_size))
    if not spec.mesh_rank:
        return []
    np.savez(folder / MESH_DECODER_FILE, mean=model.mesh_mean.detach().numpy().astype(np.float32),
             basis=model.mesh_basis.detach().numpy().astype(np.float32))
    meta["mesh_decoder"] = MESH_DECODER_FILE
    return [MESH_DECODER_FILE]


def reproducibility(caps) -> dict:
    if caps.not_byte_identical is None:
        return {"byte_identical": True}
    return {"byte_identical": False, "tool": caps.convert_requires[0], "why": caps.not_byte_identical}


def parity_check(folder: Path, meta: dict, model, caps, progress: bool) -> dict:
    """The bundle in its temporary folder against the FP32 model on the built-in pictures (the parity record)."""
    reason = caps.runs_here()
    if reason is not None:
        return {"passed": None, "not_run": reason}
    if progress:
        print("  - parity against the FP32 reference on the built-in pictures", file=sys.stderr)
    runner = attach_mesh_decoder(RUNNERS[meta["target"]].load_runner(folder, meta), folder, meta)
    summary, *_ = run_parity(folder, runner=runner, reference_model_obj=model, meta=meta)
    return {**{k: v for k, v in summary.items() if k != "gates"}, "runner": runner.name}
