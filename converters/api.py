"""The conversion API behind `edge-convert`: model -> bundle, validated before any work."""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.base import ConvertOptions, minimal_metadata, tool_version
from converters.bundle import (MESH_DECODER_FILE, FORMAT_VERSION, atomic_folder, attach_mesh_decoder, check_destination, git_revision,
                               write_metadata)
from converters.registry import target_module
from edge.contract import MAX_INPUT_SIZE
from edge.errors import ConfigError

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


def parity_images(size: int, mean) -> tuple[np.ndarray, list[str]]:
    """The fixed parity set stored in every bundle: built-in pictures only, letterboxed uint8."""
    from calib_data.build import letterbox_uint8
    from edge.samples import grace_hopper, scene

    imgs = [("grace_hopper", grace_hopper()), ("scene_a", scene(11, (720, 1280), 8)), ("scene_b", scene(12, (1080, 1080), 10)),
            ("scene_c", scene(13, (720, 1280), 12)), ("scene_d", scene(14, (1280, 960), 10))]
    return np.stack([letterbox_uint8(im, size, mean) for _, im in imgs]), [n for n, _ in imgs]


def _canvas_tensor(canvas: np.ndarray, spec) -> np.ndarray:
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(((canvas.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None])


def golden(model, spec, size: int) -> dict[str, np.ndarray]:
    """FP32 reference on the parity set: canvases, top-k anchors' raw outputs, decoded detections."""
    from edge.pipeline import Pipeline
    from edge.preprocess import Prepared
    from edge.runners import TorchRunner

    canvases, names = parity_images(size, spec.mean)
    runner = TorchRunner(model)
    pipe = Pipeline(runner, spec)
    g: dict[str, list] = {"anchor_idx": [], "det_boxes": [], "det_scores": [], "det_landmarks": [], "det_count": []}
    if spec.mesh_vertices:
        g["det_mesh"] = []
    for n in spec.output_names:
        g[f"ref_{n}"] = []
    for c in canvases:
        x = _canvas_tensor(c, spec)
        out = runner(x)
        idx = np.argsort(-out["conf"][0, :, 1], kind="stable")[:GOLDEN_TOP_K]
        g["anchor_idx"].append(idx)
        for n in spec.output_names:
            g[f"ref_{n}"].append(out[n][0, idx])
        det = pipe.postprocess(out, Prepared(x, 1.0, (0.0, 0.0), (size, size)))
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
    from edge.runners import TorchRunner

    canvases, _ = parity_images(spec.input_size, spec.mean)
    ra, rb = TorchRunner(a), TorchRunner(b)
    worst = 0.0
    for c in canvases[:2]:
        x = _canvas_tensor(c, spec)
        oa, ob = ra(x), rb(x)
        worst = max(worst, max(float(np.abs(oa[k] - ob[k]).max()) for k in oa))
    return worst


def path_bytes(p: Path) -> int:
    """Size of a file, or of all files under a folder (an .mlpackage)."""
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.is_file() else 0


def check_float_modules(target: str, precision: str, float_modules) -> None:
    """--float-modules only where a PT2E int8 program can leave modules float; never for TFLite's full-integer graph."""
    if not float_modules:
        return
    if target == "tflite" and precision == "int8":
        raise ConfigError("--float-modules: TFLite int8 is a full-integer graph (NPU-ready), no module stays float; "
                          f"--float-modules applies to {', '.join(FLOAT_MODULE_TARGETS)} int8")
    if precision != "int8" or target not in FLOAT_MODULE_TARGETS:
        raise ConfigError(f"--float-modules applies to the PT2E int8 routes ({', '.join(FLOAT_MODULE_TARGETS)}), "
                          f"not {target} {precision}")


def default_out(target: str, precision: str, size: int) -> Path:
    return Path("bundles") / f"retinaface-{target}-{precision}-{size}"


def convert(target: str, precision: str = "fp32", *, weights: str = "default", arch: str | None = None, input_size: int = 640,
            calib: str | None = None, calib_count: int = 32, out: str | Path | None = None, progress: bool = True,
            equalize: bool | None = None, float_modules=()) -> ConvertResult:
    """Convert the model to one target's bundle. Unsupported requests raise ConfigError before any work.

    equalize: for int8, apply cross-layer equalisation to the backbone first (function-preserving);
    None takes the target's measured default (`Capabilities.int8_equalize`).
    float_modules: for the PT2E int8 routes (tflite, coreml), model modules (e.g. "body.stage1") left float."""
    from calib_data.build import load_calibration
    from edge.weights import load_weights

    mod = target_module(target)
    caps = mod.CAPABILITIES
    caps.check(precision)
    if input_size <= 0 or input_size % 32:
        raise ConfigError(f"input size must be a positive multiple of 32, got {input_size}")
    if input_size > MAX_INPUT_SIZE:
        raise ConfigError(f"input size {input_size} is larger than the limit of {MAX_INPUT_SIZE}")
    if calib is not None and precision != "int8":
        raise ConfigError(f"--calib is only used for int8, not {precision}")
    float_modules = tuple(float_modules or ())
    check_float_modules(target, precision, float_modules)
    out = Path(out) if out else default_out(target, precision, input_size)
    replaced = check_destination(out)  # before any work: never a file or a folder that is not one of our bundles
    t0 = time.perf_counter()
    model, info = load_weights(weights, arch=arch)
    if input_size % model.spec.pad_multiple:
        raise ConfigError(f"{info.arch.name} needs an input size that is a multiple of {model.spec.pad_multiple}, got {input_size}")
    spec = model.spec.with_input_size(input_size)
    model.spec = spec
    if float_modules:
        from quant.config import check_module_names

        check_module_names(model, float_modules)
        if info.kind == "qat":
            raise ConfigError("a QAT checkpoint's float modules were fixed in training (edge compress --float-modules)")
    qat = None
    if info.kind == "qat" and precision == "int8":  # int8 from the trained fake-quantised program, no calibration
        if target not in QAT_TARGETS:
            raise ConfigError(f"QAT checkpoints convert to int8 for {', '.join(QAT_TARGETS)}; for {target} use its float "
                              f"weights with PTQ (--weights the run's final.pth)")
        if calib is not None:
            raise ConfigError("--calib is not used with a QAT checkpoint (its ranges were learnt in training)")
        from quant.qat import load_qat

        qat, model = load_qat(info.path, input_size)
        if getattr(qat, "full_integer", False) and target != "tflite":
            raise ConfigError(f"{info.path} was trained as the full-integer TFLite program (--qat-graph full-integer), which "
                              f"converts for tflite only; for {target} train with --qat-graph float-input")
        if qat.backend == "nncf" and target != "openvino":
            raise ConfigError(f"{info.path} was trained with NNCF's quantisers (--qat-backend nncf), which convert for openvino "
                              f"only; for {target} train with --qat-backend pt2e")
        equalize = False
    cs = None
    if precision == "int8" and qat is None:
        cs = load_calibration(calib, input_size, calib_count, spec.mean, progress)
    meta = {
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
    meta_min = minimal_metadata(meta)
    if progress:
        print(f"edge-convert: {target} {precision} {input_size}x{input_size} from {info.describe()}", file=sys.stderr)
    qmodel, eq_report = model, None
    if equalize is None:
        equalize = caps.int8_equalize
    if precision == "int8" and equalize:
        from quant.equalize import equalize as cle

        qmodel, eq_report = cle(model)
        qmodel.spec = spec
        eq_report["fp32_max_abs_change"] = _max_change(model, qmodel, spec)
    with atomic_folder(out) as tmp:
        conv = mod.convert(qmodel, spec, ConvertOptions(target, precision, input_size, calib, calib_count, progress, qat, float_modules), tmp, cs, meta_min)
        conv.quantization["cross_layer_equalization"] = eq_report
        if float_modules:
            conv.quantization["float_modules"] = list(float_modules)
        gold = golden(model, spec, input_size)
        np.savez_compressed(tmp / "golden.npz", **gold)
        extra = list(conv.extra_files)
        if spec.mesh_rank:  # the per-anchor code is decoded for kept faces by the FP32 basis, in numpy
            np.savez(tmp / MESH_DECODER_FILE, mean=model.mesh_mean.detach().numpy().astype(np.float32),
                     basis=model.mesh_basis.detach().numpy().astype(np.float32))
            meta["mesh_decoder"] = MESH_DECODER_FILE
            extra.append(MESH_DECODER_FILE)
        meta["model_file"] = conv.model_file
        meta["quantization"] = conv.quantization
        meta["format_metadata"] = conv.format_metadata
        meta["reproducibility"] = ({"byte_identical": True} if caps.not_byte_identical is None
                                   else {"byte_identical": False, "tool": caps.convert_requires[0], "why": caps.not_byte_identical})
        from edge.parity import load_gates

        reason = caps.runs_here()
        meta["gates"] = load_gates(target, precision)
        write_metadata(tmp, meta)
        if reason is None:
            from edge.parity_cli import run_parity

            if progress:
                print("  - parity against the FP32 reference on the built-in pictures", file=sys.stderr)
            runner = attach_mesh_decoder(mod.load_runner(tmp, meta), tmp, meta)
            summary, *_ = run_parity(tmp, runner=runner, reference_model_obj=model)
            meta["parity"] = {k: v for k, v in summary.items() if k != "gates"}
            meta["parity"]["runner"] = runner.name
        else:
            meta["parity"] = {"passed": None, "not_run": reason}
        meta["gates"] = load_gates(target, precision)
        write_metadata(tmp, meta)
        size_bytes = sum(path_bytes(tmp / f) for f in [conv.model_file, *extra])
    return ConvertResult(out, target, precision, size_bytes, time.perf_counter() - t0, meta["parity"], replaced)
