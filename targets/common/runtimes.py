"""Device runtimes behind one call: NCHW float32 -> {output name: array}. Each import is lazy, so a
device needs only its own runtime."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
from edgecheck import QuantizedOutput


def xnnpack_partitions(interpreter) -> int | None:
    """Delegate nodes in an allocated interpreter's execution plan: the parts of the graph XNNPACK (the default
    CPU delegate) runs; 0: the whole graph runs in TFLite's builtin kernels (measured: tflite-runtime 2.14's x86_64
    wheel delegates no int8 op, so a full-integer bundle runs there 6x slower than its fp32; ai-edge-litert 2.3
    runs it as one partition). None: the interpreter does not list its nodes."""
    try:
        ops = interpreter._get_ops_details()  # private in every runtime listed here, but present in all of them
    except AttributeError:
        return None
    return sum(o["op_name"] == "DELEGATE" for o in ops)


def tflite(model_path: Path, output_names, threads: int | None = None):
    """ai-edge-litert, else tflite-runtime, else tensorflow.lite. Returns (runner, runtime name). The runner
    takes the NCHW float32 tensor, or, for a full-integer bundle, the (1, H, W, 3) uint8 BGR canvas."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        name = "ai-edge-litert"
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter  # type: ignore

            name = "tflite-runtime"
        except ImportError:
            import tensorflow as tf  # type: ignore

            Interpreter, name = tf.lite.Interpreter, "tensorflow.lite"
    it = Interpreter(model_path=str(model_path), num_threads=threads) if threads else Interpreter(model_path=str(model_path))
    it.allocate_tensors()
    partitions = xnnpack_partitions(it)
    if partitions is not None:
        name = f"{name}; XNNPACK partitions: {partitions}"
    inp = it.get_input_details()[0]
    sig = it.get_signature_list()
    if sig:
        key = next(iter(sig))
        details = it.get_signature_runner(key).get_output_details()
        outs = [details[n] for n in sig[key]["outputs"]]
    else:
        outs = it.get_output_details()

    def run(x):
        if x.dtype == np.uint8:  # a full-integer bundle's input: the (1, H, W, 3) BGR canvas itself
            if inp["dtype"] == np.int8:
                x = (x ^ np.uint8(0x80)).view(np.int8)  # pixel - 128 (scale 1, zero point -128), exactly
            it.set_tensor(inp["index"], np.ascontiguousarray(x))
            it.invoke()
            return _outputs()
        x = np.ascontiguousarray(x, np.float32)
        if inp["dtype"] != np.float32:
            scale, zp = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(inp["dtype"])
        it.set_tensor(inp["index"], x)
        it.invoke()
        return _outputs()

    def _outputs():  # integer outputs as written, dequantised where they are read (edgecheck.QuantizedOutput)
        res = {}
        for n, o in zip(output_names, outs):
            v = it.get_tensor(o["index"])
            res[n] = v.astype(np.float32) if o["dtype"] == np.float32 else QuantizedOutput(v, *o["quantization"])
        return res

    return run, name


def onnxruntime(model_path: Path, output_names, providers=None):
    import onnxruntime as ort

    avail = ort.get_available_providers()
    wanted = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
    sess = ort.InferenceSession(str(model_path), providers=wanted)
    names = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0].name

    def run(x):
        return dict(zip(names, sess.run(None, {inp: np.ascontiguousarray(x, np.float32)})))

    return run, f"onnxruntime ({', '.join(sess.get_providers())})"


def openvino(model_path: Path, output_names, device: str = "CPU"):
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_path), device, {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {})
    req = compiled.create_infer_request()

    def run(x):
        req.infer({0: np.ascontiguousarray(x, np.float32)})
        return {n: np.asarray(req.get_tensor(n).data, np.float32).copy() for n in output_names}

    return run, f"openvino {ov.__version__} ({device})"


def coreml(model_path: Path, output_names):
    if platform.system() != "Darwin":
        raise RuntimeError("Core ML runs only on macOS")
    import coremltools as ct

    m = ct.models.MLModel(str(model_path))

    def run(x):
        out = m.predict({"input": np.ascontiguousarray(x, np.float32)})
        return {n: np.asarray(out[n], np.float32) for n in output_names}

    return run, "Core ML"
