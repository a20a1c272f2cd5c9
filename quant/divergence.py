"""Where an int8 TFLite bundle departs from the fake-quantised PT2E program it was converted from (a QAT
checkpoint): the program's int8 activation after every LeakyReLU against the TFLite tensor with the same
quantisation parameters and shape, in steps of that tensor's grid. The TFLite side runs with the XNNPACK
delegate (what bundles run) or, with builtin=True, TFLite's built-in kernels; intermediate tensors are kept with
the interpreter's experimental_preserve_all_tensors.

    python -m quant.divergence RUN/qat.pth BUNDLE --image IMG [--builtin] [--json OUT]

A layer whose rounding differs from the simulation shows as a jump in `off` (the fraction of values more than
half a step away) from the layer before.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from edge.atomic import write_json
from edge.bundle import read_metadata
from edge.contract import ModelSpec
from edge.errors import EdgeError
from edge.image_io import load_image
from edge.outputs import check_args
from edge.preprocess import prepare
from edge.runners.tflite import quantize_input
from quant.ptq import module_path
from quant.qat import load_qat


def _leaky_quantisers(gm) -> list[tuple[str, str]]:
    """(module path, fake-quantiser name) of each LeakyReLU's output quantiser, in graph order."""

    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "leaky_relu" in str(node.target):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module":
                out.append(((module_path(node) or ["?"])[-1], str(users[0].target)))
    return out


def leaky_divergence(qat_path, tflite_path, tensor: np.ndarray, builtin: bool = False) -> list[dict]:
    """tensor: one pre-processed input (1, 3, S, S) at the bundle's input size S. -> one row per LeakyReLU matched
    in the TFLite model: name, shape, rel_rms (relative RMS difference), off (fraction of values more than half a
    step apart), max_steps."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # optional: tflite extra
    from torchao.quantization.pt2e import disable_observer  # optional: tflite/train extra

    q, _ = load_qat(qat_path, tensor.shape[-1])
    q.gm.apply(disable_observer)
    taps, values = _leaky_quantisers(q.gm), {}
    hooks = [q.gm.get_submodule(t).register_forward_hook(lambda m, a, o, t=t: values.__setitem__(t, o.detach().clone()))
             for _, t in taps]  # clone: the next op may work in place
    with torch.no_grad():
        q.gm(torch.from_numpy(tensor))
    for h in hooks:
        h.remove()
    kw = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin else {}
    it = Interpreter(model_path=str(tflite_path), experimental_preserve_all_tensors=True, **kw)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], quantize_input(tensor, inp))
    it.invoke()
    details = {d["index"]: d for d in it.get_tensor_details()}
    candidates = [details[o["outputs"][0]] for o in it._get_ops_details()
                  if o["op_name"] == "LEAKY_RELU" and o["outputs"][0] in details]
    rows, used = [], set()
    for name, t in taps:
        fq = q.gm.get_submodule(t)
        s, z = float(fq.scale), int(fq.zero_point)
        ref = values[t].numpy().transpose(0, 2, 3, 1)  # NCHW -> the TFLite tensor's NHWC
        match = next((d for d in candidates if d["index"] not in used and tuple(d["shape"]) == ref.shape
                      and d["quantization"][1] == z and abs(d["quantization"][0] - s) <= 1e-6 * s), None)
        if match is None:
            continue
        used.add(match["index"])
        got = (it.get_tensor(match["index"]).astype(np.float32) - z) * s
        steps = np.abs(got - ref) / s
        rows.append({"name": name, "shape": list(ref.shape), "rel_rms": float(np.sqrt(((got - ref) ** 2).mean() / max((ref ** 2).mean(), 1e-20))),
                     "off": float((steps > 0.5).mean()), "max_steps": float(steps.max())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m quant.divergence", description=__doc__.split("\n\n")[0])
    p.add_argument("qat", help="the QAT checkpoint the bundle was converted from (edge compress ... qat.pth)")
    p.add_argument("bundle", help="its int8 TFLite bundle (edge-convert --target tflite --precision int8 --weights QAT)")
    p.add_argument("--image", required=True)
    p.add_argument("--builtin", action="store_true", help="TFLite's built-in kernels instead of the XNNPACK delegate")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    try:
        check_args(args, files=("json",))
        folder, meta = read_metadata(args.bundle)
        if meta["target"] != "tflite" or meta["precision"] != "int8":
            print(f"error: {args.bundle} is a {meta['target']} {meta['precision']} bundle; this compares int8 TFLite", file=sys.stderr)
            return 2
        spec = ModelSpec.from_dict(meta["spec"])
        prep = prepare(load_image(args.image), spec)
        rows = leaky_divergence(args.qat, folder / meta["model_file"], prep.tensor, builtin=args.builtin)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'layer':32s} {'shape':>18s} {'rel RMS':>8s} {'off':>6s} {'max steps':>9s}")
    for r in rows:
        print(f"{r['name'][:32]:32s} {'x'.join(map(str, r['shape'][1:])):>18s} {r['rel_rms']:8.4f} {r['off']:6.3f} {r['max_steps']:9.1f}")
    if args.json:
        write_json(args.json, {"qat": str(args.qat), "bundle": str(args.bundle), "image": args.image,
                               "kernels": "builtin" if args.builtin else "xnnpack", "layers": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
