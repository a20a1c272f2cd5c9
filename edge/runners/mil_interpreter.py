"""A numpy interpreter for the Core ML mlprograms our converters produce ("interpreted MIL, not
the Core ML runtime"), so CoreML bundles are executed and checked on Linux.

The program is read with coremltools' own MIL reader (milproto -> pymil). Each op is evaluated
with MIL's semantics: tensors carry the dtype the program declares, so an fp16 program computes
every op's result in float32 and rounds it to float16, as Core ML's CPU path stores fp16
activations. Ops are those present in our fp32, fp16, int8-weight and W8A8 programs; any other op
raises UnsupportedOp naming it.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from edge.errors import BundleError


class UnsupportedOp(NotImplementedError):
    pass


_NP = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
       "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def import_coremltools():
    """coremltools, imported with its console output swallowed (on Linux it prints a line per missing native proxy)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import coremltools as ct  # optional: coreml extra
    return ct


def load_program(mlpackage: str | Path):
    """(pymil Program, model spec) of a saved .mlpackage, through coremltools' MIL reader."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load  # optional: coreml extra

    pkg = Path(mlpackage)
    spec = ct.utils.load_spec(str(pkg))
    prog = load(spec, spec.specificationVersion, file_weights_dir=str(pkg / "Data" / "com.apple.CoreML" / "weights"))
    return prog, spec


def _dtype(var) -> type:
    from coremltools.converters.mil.mil import types  # optional: coreml extra

    name = types.builtin_to_string(var.dtype)
    if name not in _NP:
        raise UnsupportedOp(f"dtype {name} of {var.name}")
    return _NP[name]


def _pad_input(x: np.ndarray, pad) -> np.ndarray:
    t, b, l, r = (int(p) for p in np.asarray(pad).ravel())
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def conv2d(x: np.ndarray, w: np.ndarray, bias, strides, pad, dilations, groups: int) -> np.ndarray:
    """NCHW convolution in float32. pad = [top, bottom, left, right]."""
    x = _pad_input(x.astype(np.float32), pad)
    w = w.astype(np.float32)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    sh, sw = int(strides[0]), int(strides[1])
    dh, dw = int(dilations[0]), int(dilations[1])
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), np.float32)
    if groups == c and cg == 1 and o == c:  # depthwise: one tap at a time
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                out += tap * w[None, :, 0, i, j, None, None]
    else:
        og = o // groups
        for g in range(groups):
            xg = x[:, g * cg:(g + 1) * cg]
            cols = np.empty((n, cg, kh, kw, ho, wo), np.float32)
            for i in range(kh):
                for j in range(kw):
                    cols[:, :, i, j] = xg[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            wg = w[g * og:(g + 1) * og].reshape(og, -1)
            out[:, g * og:(g + 1) * og] = np.einsum("ok,nkp->nop", wg, cols.reshape(n, cg * kh * kw, ho * wo)).reshape(n, og, ho, wo)
    if bias is not None:
        out += bias.astype(np.float32)[None, :, None, None]
    return out


def _pads(op, x_shape, w_shape) -> np.ndarray:
    pad_type = op.inputs["pad_type"].val if "pad_type" in op.inputs else "valid"
    if pad_type == "custom":
        return np.asarray(op.inputs["pad"].val, np.int64)
    if pad_type == "valid":
        return np.zeros(4, np.int64)
    if pad_type in ("same", "same_lower"):
        strides = op.inputs["strides"].val
        dil = op.inputs["dilations"].val
        pads = []
        for dim in range(2):
            size, k, s, d = x_shape[2 + dim], w_shape[2 + dim], int(strides[dim]), int(dil[dim])
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            lo = total // 2 if pad_type == "same" else total - total // 2
            pads += [lo, total - lo]
        return np.asarray(pads, np.int64)
    raise UnsupportedOp(f"conv pad_type {pad_type!r}")


def _affine_dequantize(q, zp, scale, axis) -> np.ndarray:
    shape = [1] * q.ndim
    shape[axis] = -1
    zp = np.asarray(zp).reshape(shape) if np.ndim(zp) else zp
    scale = np.asarray(scale).reshape(shape) if np.ndim(scale) else scale
    return (q.astype(np.float32) - np.asarray(zp, np.float32)) * np.asarray(scale, np.float32)


def _axis_shape(ndim: int, axis, v):
    if np.ndim(v) == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[int(axis)] = -1
    return np.asarray(v).reshape(shape)


class MILInterpreter:
    """Runs the "main" function of a pymil Program on numpy inputs."""

    def __init__(self, program):
        self.fn = program.functions["main"]

    def val(self, var, env):
        if var.name in env:
            return env[var.name]
        if var.val is not None:
            return np.asarray(var.val)
        raise KeyError(f"no value for {var.name}")

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {}
        for name, var in self.fn.inputs.items():
            env[name] = np.asarray(inputs[name]).astype(_dtype(var))
        for op in self.fn.operations:
            outs = self.eval_op(op, env)
            for var, v in zip(op.outputs, outs):
                env[var.name] = np.asarray(v).astype(_dtype(var), copy=False) if var.dtype is not None and not isinstance(v, str) else v
        return {o.name: env[o.name] for o in self.fn.outputs}

    def eval_op(self, op, env):
        t = op.op_type
        I = op.inputs  # noqa: E741
        v = lambda k: self.val(I[k], env)  # noqa: E731
        if t == "const":
            return [np.asarray(op.outputs[0].val) if not isinstance(op.outputs[0].val, str) else op.outputs[0].val]
        if t == "constexpr_affine_dequantize":
            return [_affine_dequantize(v("quantized_data"), v("zero_point"), v("scale"), int(v("axis")))]
        if t == "cast":
            return [v("x").astype(_NP[str(v("dtype"))])]
        if t == "quantize":
            x = v("input").astype(np.float32)
            axis = I["axis"].val if "axis" in I else None
            scale = _axis_shape(x.ndim, axis, v("scale").astype(np.float32))
            zp = _axis_shape(x.ndim, axis, v("zero_point").astype(np.float32)) if "zero_point" in I else 0.0
            dt = _NP[str(v("output_dtype"))]
            info = np.iinfo(dt)
            return [np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dt)]  # np.round: half to even, as MIL
        if t == "dequantize":
            x = v("input")
            axis = I["axis"].val if "axis" in I else None
            scale = _axis_shape(x.ndim, axis, v("scale").astype(np.float32))
            zp = _axis_shape(x.ndim, axis, v("zero_point").astype(np.float32)) if "zero_point" in I else 0.0
            return [(x.astype(np.float32) - zp) * scale]
        if t == "conv":
            x, w = v("x"), v("weight")
            bias = v("bias") if "bias" in I else None
            strides = I["strides"].val if "strides" in I else np.ones(2, int)
            dil = I["dilations"].val if "dilations" in I else np.ones(2, int)
            groups = int(I["groups"].val) if "groups" in I else 1
            return [conv2d(x, w, bias, strides, _pads(op, x.shape, w.shape), dil, groups)]
        if t == "relu":
            return [np.maximum(v("x"), 0)]
        if t == "leaky_relu":
            x = v("x").astype(np.float32)
            return [np.where(x >= 0, x, x * np.float32(v("alpha")))]
        if t == "sigmoid":
            return [1 / (1 + np.exp(-v("x").astype(np.float32)))]
        if t in ("add", "sub", "mul", "real_div", "maximum", "minimum"):
            f = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "maximum": np.maximum, "minimum": np.minimum}[t]
            return [f(v("x").astype(np.float32), v("y").astype(np.float32))]
        if t == "concat":
            if "interleave" in I and bool(I["interleave"].val):
                raise UnsupportedOp("concat with interleave=True")
            return [np.concatenate([self.val(x, env) for x in I["values"]], axis=int(v("axis")))]
        if t == "transpose":
            return [np.transpose(v("x"), v("perm"))]
        if t == "reshape":
            return [np.reshape(v("x"), [int(s) for s in v("shape")])]
        if t == "softmax":
            x = v("x").astype(np.float32)
            ax = int(v("axis"))
            e = np.exp(x - x.max(axis=ax, keepdims=True))
            return [e / e.sum(axis=ax, keepdims=True)]
        if t == "upsample_nearest_neighbor":
            sh, sw = float(v("scale_factor_height")), float(v("scale_factor_width"))
            if sh != int(sh) or sw != int(sw):
                raise UnsupportedOp("upsample_nearest_neighbor with a fractional scale")
            return [np.repeat(np.repeat(v("x"), int(sh), axis=-2), int(sw), axis=-1)]
        raise UnsupportedOp(f"MIL op {t!r} ({op.name}) is not implemented by the interpreter")


class InterpretedCoreMLRunner:
    """Runs a CoreML bundle's mlprogram with the numpy interpreter. NCHW float32 in, named outputs (float32) out."""

    def __init__(self, mlpackage: str | Path, output_names, name: str = "coreml"):
        try:
            prog, spec = load_program(mlpackage)
        except Exception as e:  # noqa: BLE001 - coremltools raises RuntimeError/ValueError/KeyError on damaged packages
            raise BundleError(f"{Path(mlpackage).name}: cannot read the mlprogram ({type(e).__name__}: {str(e)[:120]})") from None
        self.interp = MILInterpreter(prog)
        self.input_name = spec.description.input[0].name
        self.output_names = list(output_names)
        self.name = f"{name} (interpreted MIL, not the Core ML runtime)"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.interp({self.input_name: np.asarray(x, np.float32)})
        return {n: np.asarray(out[n], np.float32) for n in self.output_names}
