"""TFLite through litert-torch.

fp32: litert_torch.convert. fp16: the fp32 flatbuffer with float16 weights (ai-edge-quantizer's
float_casting; dequantised to float at load, so CPU compute stays fp32, GPU delegates use fp16).
int8: PT2E post-training quantisation (per-channel symmetric int8 weights, int8 activations from
histogram observers on the calibration set) of the model behind its own normalisation, folded into its first
convolution (`quant.ptq.CanvasInput`), annotated so that every op is int8 (`quant.ptq.full_integer_quantizer`) and
in the form XNNPACK runs as one partition (`edge.model.integer_graph_form`): a full-integer graph whose
input is the (1, S, S, 3) BGR canvas as int8 (pixel - 128, scale 1) and whose outputs are int8, their
scales in the bundle's metadata (`quantization.io`). The op table is recorded and checked: a float
compute op in an int8 graph fails the conversion. A QAT checkpoint's program (`edge compress`) still
converts to the earlier hybrid graph (float softmax, upsampling and additions; NCHW float input).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, Converted, ConvertOptions, announce
from edge.bundle import CALIBRATED
from edge.errors import ConfigError, ConversionError
from edge.model import TupleOutputs
from edge.quiet import native_output_quiet
from edge.runners.tflite import TFLiteRunner, import_quietly, interpreter_class
from quant.ptq import pt2e_calibrated, quantized_program

CAPABILITIES = Capabilities(
    target="tflite",
    suffix=".tflite",
    routes={
        "fp32": "litert_torch.convert",
        "fp16": "fp32 flatbuffer, float16 weights (ai-edge-quantizer float_casting)",
        "int8": "full-integer, pure int8 (no int16 activations: runs whole on int8-only NPUs and in one XNNPACK "
                "partition on CPUs): PT2E PTQ (per-channel int8 weights, int8 activations, int8 softmax/upsample/add), "
                "canvas input (uint8; --input-dtype int8: the int8 pixel - 128, no QUANTIZE op) "
                "-> litert_torch.convert",
        "int8-mixed": "full-integer 16x8 where it pays: as int8, but int16 activations in backbone "
                      "stage 1, stage2.5 and stage 3 (chosen by `edge sensitivity`), for NPUs with 16x8 kernels and LiteRT; "
                      "a CPU runs those ops outside XNNPACK (about 20x slower than int8)",
    },
    convert_requires=("litert_torch", "ai_edge_quantizer", "torchao"),
    run_requires=("ai_edge_litert", "tflite_runtime", "tensorflow"),
    extra="tflite",
)
METADATA_NAME = "retinaface_edge"
FULL_INTEGER_GRAPH = "full-integer: BGR canvas in (NHWC; normalisation folded into the first convolution), int8 out"


def _convert_fp32(model, x: torch.Tensor, path: Path) -> None:
    import litert_torch  # optional: tflite extra

    with native_output_quiet():
        litert_torch.convert(TupleOutputs(model).eval(), (x,)).export(str(path))


# Measured: ai-edge-litert 2.3 runs the int8-mixed graph; tflite-runtime 2.14 (the Raspberry Pi suite's) refuses
# its QUANTIZE int8 -> int16 (quantize.cc: a requantisation from int8 must give int8 or uint8).
MIXED_RUNTIME = ("LiteRT (ai-edge-litert 2.3 runs it): tflite-runtime 2.14 cannot requantise int8 -> int16 (QUANTIZE); "
                 "on such a runtime convert with --precision int8")


def mixed_int16_modules(model) -> tuple[str, ...]:
    """The int8-mixed recipe, from `edge sensitivity` (80 held-out WIDER pictures: the int8 loss sits in stage 1's
    activations as a whole, all of it int16 0.975 against 0.947, no single block more than 0.957; stage 3 and
    stage2.5 next) and the bundles (150 parity pictures): backbone stage 1 (with the normalisation
    before it) 0.978 recall, with the last block of stage 2 and stage 3 0.981."""
    return ("body.stage1", "body.stage2.5", "body.stage3")


def _convert_int8(model, calib, spec, path: Path, progress: bool, int16_modules=(), relu_split=(),
                  input_dtype: str = "uint8") -> dict:
    """The full-integer route: (1, S, S, 3) canvas in (uint8, or int8 pixel - 128), int8 outputs; int16 activations
    under int16_modules."""
    import litert_torch  # optional: tflite extra
    from litert_torch.quantize.quant_config import QuantConfig  # optional: tflite extra

    gm, quantizer = pt2e_calibrated(model, spec, calib, progress, full_integer=True, int16_modules=int16_modules,
                                    relu_split=relu_split)
    gm = quantized_program(gm, fold_quantize=False)
    x = torch.zeros(1, spec.input_size, spec.input_size, 3)
    with native_output_quiet():
        litert_torch.convert(gm, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    res = {"weights": "int8 per-channel symmetric", "activations": "int8 per-tensor (histogram observer)",
           "graph": FULL_INTEGER_GRAPH}
    if int16_modules:
        res["requantized"] = requantize_boundaries(path, boundary_requantizations(gm))
        res["runtime_needs"] = MIXED_RUNTIME
        res["activations"] = "int16 per-tensor symmetric (min/max) under int16_modules, int8 per-tensor (histogram) elsewhere"
        res["int16_modules"] = list(int16_modules)
    if input_dtype == "uint8":
        uint8_input(path)
    return res


def boundary_requantizations(gm) -> list[tuple[str, float, int]]:
    """(dtype, scale, zero point) of each activation quantize in a converted PT2E program that follows a dequantize
    of the other integer type: the int8 <-> int16 requantisations at the edges of the int16 modules."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != torch.ops.quantized_decomposed.quantize_per_tensor.default:
            continue
        src = n.args[0]
        if (isinstance(src, torch.fx.Node) and src.target == torch.ops.quantized_decomposed.dequantize_per_tensor.default
                and src.args[5] != n.args[5]):
            out.append((str(n.args[5]).removeprefix("torch."), float(n.args[1]), int(n.args[2])))
    return out


def requantize_boundaries(path: Path, requants: list[tuple[str, float, int]]) -> int:
    """Mend, in place, what litert-torch 0.10 leaves at int8/int16 boundaries: it drops the requantisation, so a
    convolution reads int8 and writes int16 (or the reverse), which TFLite refuses. A QUANTIZE to the convolution's
    own type is put before it, at the input scale its bias was quantised with (bias scale / weight scale) and the
    zero point of the program's requantisation at that scale; and 16x8 convolutions get their int32 biases as int64
    (the same integers), as TFLite's 16x8 kernels take them. -> QUANTIZE ops inserted."""
    from ai_edge_litert import schema_py_generated as schema  # optional: tflite extra

    types = {"int8": schema.TensorType.INT8, "int16": schema.TensorType.INT16}
    ops = schema.BuiltinOperator
    inserted, widened = [], set()

    def edit(m):
        g = m.subgraphs[0]
        codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
        if ops.QUANTIZE not in codes:
            c = schema.OperatorCodeT()
            c.builtinCode = c.deprecatedBuiltinCode = ops.QUANTIZE
            c.version = 2
            m.operatorCodes.append(c)
            codes.append(ops.QUANTIZE)
        quantize = codes.index(ops.QUANTIZE)
        new_ops = []
        for op in g.operators:
            if codes[op.opcodeIndex] in (ops.CONV_2D, ops.DEPTHWISE_CONV_2D):
                x, w, b = (g.tensors[j] for j in op.inputs[:3])
                y = g.tensors[op.outputs[0]]
                if x.type != y.type:
                    scale = float(b.quantization.scale[0] / w.quantization.scale[0])
                    match = [r for r in requants if types[r[0]] == y.type and abs(r[1] - scale) <= 1e-4 * scale]
                    if len({r[2] for r in match}) != 1:
                        raise ConversionError(f"int8/int16 boundary at {x.name.decode()}: {len(match)} requantisations to "
                                              f"scale {scale:g} in the program, not one")
                    _, s, zp = match[0]
                    t = schema.TensorT()
                    t.name, t.shape, t.type, t.buffer = x.name + b"_requantized", np.array(x.shape, np.int32), y.type, 0
                    t.quantization = schema.QuantizationParametersT()
                    t.quantization.scale, t.quantization.zeroPoint = np.array([s], np.float32), np.array([zp], np.int64)
                    g.tensors.append(t)
                    q = schema.OperatorT()
                    q.opcodeIndex, q.inputs, q.outputs = quantize, np.array([op.inputs[0]], np.int32), np.array([len(g.tensors) - 1], np.int32)
                    q.builtinOptionsType, q.builtinOptions = schema.BuiltinOptions.QuantizeOptions, schema.QuantizeOptionsT()
                    new_ops.append(q)
                    op.inputs = np.array([len(g.tensors) - 1, *op.inputs[1:]], np.int32)
                    inserted.append(x.name)
                    x = t
                if x.type == schema.TensorType.INT16 and b.type == schema.TensorType.INT32:
                    if b.buffer not in widened:  # a buffer two bias tensors share is widened once
                        buf = m.buffers[b.buffer]
                        buf.data = np.frombuffer(np.asarray(buf.data, np.uint8).tobytes(), "<i4").astype("<i8").view(np.uint8)
                        widened.add(b.buffer)
                    b.type = schema.TensorType.INT64
            new_ops.append(op)
        g.operators = new_ops
        # litert-torch versions a 16x8 CONV_2D 8 (int32 bias); with int64 biases it is version 4, which runtimes
        # from TF 2.3 resolve (tflite-runtime 2.14 refuses version 8)
        for c in m.operatorCodes:
            if max(c.builtinCode, c.deprecatedBuiltinCode) == ops.CONV_2D and c.version == 8:
                c.version = 4

    _edit_flatbuffer(path, edit)
    return len(inserted)


# Ops that only move, copy or requantise integers; every other op of an int8 graph must have integer inputs.
FLOAT_FREE_OPS = {"QUANTIZE", "DEQUANTIZE", "DELEGATE"}


def float_compute_ops(ops: dict[str, int]) -> dict[str, int]:
    """The entries of an op table ("OP:in->out" -> count) that compute in floating point: any op other than a
    (de)quantise whose input or output is a float tensor."""
    out = {}
    for key, n in ops.items():
        op, _, types = key.partition(":")
        if op in FLOAT_FREE_OPS:
            continue
        if "float" in types:
            out[key] = n
    return out


def io_quantization(r: TFLiteRunner) -> dict:
    """The graph's input and outputs as device code reads them: layout, dtype, scale and zero point."""
    inp = r.inp
    shape = [int(v) for v in inp["shape"]]
    res = {"input": {"shape": shape, "dtype": np.dtype(inp["dtype"]).name,
                     "layout": "NHWC" if shape[-1] == 3 else "NCHW",
                     "scale": float(inp["quantization"][0]), "zero_point": int(inp["quantization"][1])}}
    if r.canvas_input:
        res["input"]["format"] = CANVAS_FORMAT
    res["outputs"] = {n: {"dtype": np.dtype(o["dtype"]).name, "scale": float(o["quantization"][0]),
                          "zero_point": int(o["quantization"][1])} for n, o in zip(r.output_names, r.outs)}
    return res


def _convert_fp16(src: Path, dst: Path) -> None:
    from ai_edge_quantizer import quantizer  # optional: tflite extra

    recipe = [{
        "regex": ".*", "operation": "*", "algorithm_key": "float_casting",
        "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"}, "compute_precision": "FLOAT", "explicit_dequantize": True},
    }]
    with native_output_quiet():
        quantizer.Quantizer(str(src), recipe).quantize().export_model(str(dst), overwrite=True)


def _edit_flatbuffer(path: Path, edit) -> None:
    """Load the .tflite as ai-edge-litert's object model, let `edit(model)` change it, pack it back in place."""
    import flatbuffers  # optional: tflite extra
    from ai_edge_litert import schema_py_generated as schema  # optional: tflite extra

    buf = path.read_bytes()
    m = schema.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    for b in m.buffers:  # buffers stored after the flatbuffer (offset/size) are inlined before re-packing
        if b.offset and b.offset > 1:
            b.data = np.frombuffer(buf[b.offset:b.offset + b.size], dtype=np.uint8)
            b.offset, b.size = 0, 0
    edit(m)
    builder = flatbuffers.Builder(len(buf) + 4096)
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))


def set_metadata(path: Path, meta_min: dict[str, str]) -> None:
    """Store the minimal metadata as a named buffer in the flatbuffer's `metadata` list."""
    from ai_edge_litert import schema_py_generated as schema  # optional: tflite extra

    def edit(m):
        b = schema.BufferT()
        b.data = np.frombuffer(json.dumps(meta_min).encode(), dtype=np.uint8)
        m.buffers.append(b)
        md = schema.MetadataT()
        md.name = METADATA_NAME
        md.buffer = len(m.buffers) - 1
        m.metadata = [e for e in (m.metadata or []) if e.name != METADATA_NAME.encode()] + [md]

    _edit_flatbuffer(path, edit)


def uint8_input(path: Path) -> None:
    """Give a full-integer graph a uint8 input: the canvas as it is (scale 1, zero point 0), turned into the int8
    pixel - 128 that the graph starts from by one QUANTIZE op put first (what TensorFlow's converter does for
    `inference_input_type=tf.uint8`). Exact: the same scale on both sides, the zero points 128 apart."""
    from ai_edge_litert import schema_py_generated as schema  # optional: tflite extra

    def edit(m):
        g = m.subgraphs[0]
        (old,) = g.inputs
        t = g.tensors[old]
        q = t.quantization
        if t.type != schema.TensorType.INT8 or list(q.scale) != [1.0] or list(q.zeroPoint) != [-128]:
            raise ValueError(f"uint8_input: the graph's input is not the int8 pixel - 128 (type {t.type}, {q.scale}, {q.zeroPoint})")
        new = schema.TensorT()
        new.name = b"canvas_uint8"
        new.shape = np.array(t.shape, dtype=np.int32)
        new.type = schema.TensorType.UINT8
        new.buffer = 0  # buffer 0 is the empty one by convention
        new.quantization = schema.QuantizationParametersT()
        new.quantization.scale = np.array([1.0], np.float32)
        new.quantization.zeroPoint = np.array([0], np.int64)
        g.tensors.append(new)
        idx = len(g.tensors) - 1
        codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in m.operatorCodes]
        if schema.BuiltinOperator.QUANTIZE in codes:
            opcode = codes.index(schema.BuiltinOperator.QUANTIZE)
        else:
            c = schema.OperatorCodeT()
            c.builtinCode = c.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
            c.version = 2
            m.operatorCodes.append(c)
            opcode = len(m.operatorCodes) - 1
        op = schema.OperatorT()
        op.opcodeIndex = opcode
        op.inputs = np.array([idx], np.int32)
        op.outputs = np.array([old], np.int32)
        op.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
        op.builtinOptions = schema.QuantizeOptionsT()
        g.operators.insert(0, op)
        g.inputs = np.array([idx], np.int32)
        for sig in m.signatureDefs or []:
            for tm in sig.inputs:
                if tm.tensorIndex == old:
                    tm.tensorIndex = idx

    _edit_flatbuffer(path, edit)


def embedded_metadata(path: Path) -> dict | None:
    from ai_edge_litert import schema_py_generated as schema  # optional: tflite extra

    m = schema.ModelT.InitFromPackedBuf(bytearray(path.read_bytes()), 0)
    for e in m.metadata or []:
        if e.name in (METADATA_NAME, METADATA_NAME.encode()):
            return json.loads(bytes(m.buffers[e.buffer].data).decode())
    return None


def op_table(path: Path) -> dict[str, int]:
    """The graph's ops as "OP:input dtype->output dtype" -> count, read from the flatbuffer before any delegate
    is applied (ai-edge-litert's op details; the first input and output tensor stand for the op)."""
    interp = interpreter_class()[0](model_path=str(path), experimental_op_resolver_type=_builtin_resolver())
    interp.allocate_tensors()
    tensors = interp.get_tensor_details()
    counts: dict[str, int] = {}

    def dtype(ids):
        ids = [i for i in ids if i >= 0]
        return np.dtype(tensors[ids[0]]["dtype"]).name if ids else "-"

    for op in interp._get_ops_details():
        key = f"{op['op_name']}:{dtype(op['inputs'])}->{dtype(op['outputs'])}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _builtin_resolver():
    from ai_edge_litert.interpreter import OpResolverType  # optional: tflite extra

    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def op_summary(path: Path) -> dict:
    return {"ops": op_table(path)}


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    import_quietly()
    out = workdir / "model.tflite"
    x = torch.zeros(1, 3, opts.input_size, opts.input_size)
    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision in CALIBRATED and opts.float_modules:
        raise ConfigError("--float-modules: TFLite int8 is a full-integer graph (NPU-ready); it has no float modules")
    if opts.precision == "int8" and opts.qat is not None:
        import litert_torch  # optional: tflite extra
        from litert_torch.quantize.quant_config import QuantConfig  # optional: tflite extra

        full = getattr(opts.qat, "full_integer", False)
        announce(opts.progress, "the QAT program (trained ranges, no calibration), then litert_torch.convert" + (" (full-integer)" if full else ""))
        xq = torch.zeros(1, opts.input_size, opts.input_size, 3) if full else x
        with native_output_quiet():
            litert_torch.convert(opts.qat.finalize(), (xq,), quant_config=QuantConfig(pt2e_quantizer=opts.qat.quantizer)).export(str(out))
        if full and opts.input_dtype == "uint8":
            uint8_input(out)
        quant.update({"route": "PT2E QAT (edge compress --qat-steps) -> litert_torch.convert", "weights": "int8 per-channel symmetric",
                      "activations": "int8 per-tensor (ranges learnt in QAT)", "qat": opts.qat.report()})
        if full:
            quant["graph"] = FULL_INTEGER_GRAPH
    elif opts.precision in CALIBRATED:
        wide = mixed_int16_modules(model) if opts.precision == "int8-mixed" else ()
        announce(opts.progress, f"PT2E: observing {len(calib)} calibration images, then litert_torch.convert (full-integer"
                 + (", int16 activations in " + ", ".join(wide) + ")" if wide else ")"))
        if wide:
            announce(opts.progress, f"int8-mixed runs on {MIXED_RUNTIME}")
        quant.update(_convert_int8(model, calib, spec, out, opts.progress, wide, opts.relu_split, opts.input_dtype))
    else:
        announce(opts.progress, "litert_torch.convert")
        tmp = workdir / "fp32.tflite.tmp"
        _convert_fp32(model, x, tmp if opts.precision == "fp16" else out)
        if opts.precision == "fp16":
            announce(opts.progress, "float16 weights")
            _convert_fp16(tmp, out)
            tmp.unlink()
    set_metadata(out, meta_min)
    quant.update(op_summary(out))
    runner = TFLiteRunner(out, spec.output_names)
    quant["io"] = io_quantization(runner)
    # how the runtime here runs it: the full-integer int8 graph is one XNNPACK partition on ai-edge-litert
    quant["xnnpack"] = {"runtime": runner.runtime, "partitions": runner.xnnpack_partitions}
    quant["float_compute_ops"] = float_compute_ops(quant["ops"])
    quant["full_integer"] = opts.precision in CALIBRATED and not quant["float_compute_ops"]
    if opts.precision in CALIBRATED and (opts.qat is None or getattr(opts.qat, "full_integer", False)) and quant["float_compute_ops"]:
        raise ConversionError(f"the int8 graph kept float compute ops: {quant['float_compute_ops']}")
    return Converted("model.tflite", quant, "TFLite metadata buffer 'retinaface_edge'")


CANVAS_FORMAT = "bgr_pixels_nhwc"  # the input is the BGR canvas itself; the model normalises it (folded into its first convolution)


