"""`edge-convert`: the model -> a bundle for one target (or all), and what the bundle is."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from converters.api import INPUT_DTYPES, check_float_modules, check_input_dtype, check_relu_split, convert, default_out
from converters.bundle import check_destination
from converters.registry import TARGET_MODULES, capabilities
from edge.atomic import Terminated
from edge.bundle import PRECISIONS
from edge.commands.args import input_size_arg, setup_process
from edge.errors import ConfigError, EdgeError
from edge.outputs import display
from edge.quiet import set_verbose


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def targets_table() -> str:
    caps = [capabilities(t) for t in TARGET_MODULES]
    w = max(len(", ".join(c.routes)) for c in caps)
    w2 = max(len(", ".join(c.convert_requires)) for c in caps)
    rows = [f"target    {'precisions':<{w}} {'converts with':<{w2}} runs with"]
    for t, c in zip(TARGET_MODULES, caps):
        rows.append(f"{t:<9} {', '.join(c.routes):<{w}} {', '.join(c.convert_requires):<{w2}} {' | '.join(c.run_requires)}")
        for p, route in c.routes.items():
            rows.append(f"{'':<9}   {p}: {route}")
    return "\n".join(rows)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-convert", description="Convert RetinaFace-MobileNet-0.25 to an edge runtime bundle.")
    ap.add_argument("--target", choices=[*TARGET_MODULES, "all"], help="runtime to convert for")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="fp32 | fp16 | int8 (weights and activations) | int8w (int8 weights only)")
    ap.add_argument("--weights", default="default", help="registry name or checkpoint path")
    ap.add_argument("--arch", default=None, help="configuration of an unknown checkpoint")
    ap.add_argument("--input-size", type=input_size_arg, default=640, help="square input side, a multiple of 32")
    ap.add_argument("--calib", default=None, help="int8 calibration: a folder of images or a set built by calib_data.build")
    ap.add_argument("--calib-count", type=int, default=32, help="images taken from a --calib folder (default 32)")
    ap.add_argument("--out", default=None, help="bundle folder (for --target all: the parent folder)")
    ap.add_argument("--equalize", choices=["auto", "on", "off"], default="auto",
                    help="int8: cross-layer equalisation of the backbone before quantising (auto: per target, as measured)")
    ap.add_argument("--float-modules", default="", metavar="NAMES",
                    help="int8 for tflite and coreml: comma-separated model modules left float, e.g. body.stage1 "
                    "(the high-resolution layers that lose most to int8)")
    ap.add_argument("--relu-split", default="", metavar="NAMES",
                    help="tflite int8: comma-separated modules (e.g. body.stage1) whose conv + LeakyReLU layers the graph "
                    "computes as two convolutions with fused ReLUs: fewer faces lost to int8, slower (docs/full-integer.md); "
                    "auto: the layers whose output's negative side is widest on the calibration pictures")
    ap.add_argument("--input-dtype", choices=INPUT_DTYPES, default="uint8",
                    help="tflite int8: the canvas the graph takes: uint8, the image as it is (default; a QUANTIZE "
                    "op first), or int8, pixel - 128 (each byte's top bit flipped by the caller): on x86 TFLite's "
                    "QUANTIZE kernel is a scalar loop, about a fifth of a 2-thread run (docs/full-integer.md)")
    ap.add_argument("--no-parity-gate", action="store_true", help="exit 0 even when the bundle fails its parity gates")
    ap.add_argument("--list", action="store_true", help="print the targets table and exit")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="let the converters' own output through (litert-torch progress, "
                    "TensorFlow and TFLite log lines, library warnings)")
    return ap


def main(argv=None) -> int:
    setup_process()
    ap = make_parser()
    args = ap.parse_args(argv)
    if args.verbose:
        set_verbose(True)
        warnings.resetwarnings()
    if args.list:
        print(targets_table())
        return 0
    if not args.target:
        ap.error("--target is required (or --list)")

    results = []
    try:
        if args.input_size is None:
            raise ConfigError("bundles have a fixed input size; 'native' is for edge detect/eval with --weights")
        targets = list(TARGET_MODULES) if args.target == "all" else [args.target]
        float_modules = tuple(n for n in args.float_modules.split(",") if n)
        relu_split = tuple(n for n in args.relu_split.split(",") if n)
        for t in targets:  # refuse before any work
            capabilities(t).check(args.precision)
            check_float_modules(t, args.precision, float_modules)
            check_relu_split(t, args.precision, relu_split)
            check_input_dtype(t, args.precision, args.input_dtype)
        if args.target == "all":  # --out is the parent folder
            outs = {t: Path(args.out or "bundles") / default_out(t, args.precision, args.input_size).name for t in targets}
        else:
            outs = {args.target: Path(args.out) if args.out else default_out(args.target, args.precision, args.input_size)}
        for t, out in outs.items():  # every destination checked before any conversion starts
            if check_destination(out) == "bundle":
                print(f"edge-convert: {display(out)} holds a bundle written by retinaface-edge; it will be replaced", file=sys.stderr)
        for t in targets:
            out = outs[t]
            results.append(convert(t, args.precision, weights=args.weights, arch=args.arch, input_size=args.input_size,
                                   calib=args.calib, calib_count=args.calib_count, out=out, progress=not args.quiet,
                                   equalize={'auto': None, 'on': True, 'off': False}[args.equalize], float_modules=float_modules,
                                   relu_split=relu_split, input_dtype=args.input_dtype))
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no bundle was written" if not results else
              f"interrupted: {len(results)} bundle(s) written, the one in progress was not", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: no bundle was written" if not results else
              f"terminated: {len(results)} bundle(s) written, the one in progress was not", file=sys.stderr)
        return 143
    print()
    print(f"{'target':<9} {'precision':<9} {'size':>9}  {'parity':>8}  {'recall':>6}  {'mean IoU':>8}  {'lmk NME':>7}  {'s':>4}  bundle")
    failed = False
    for r in results:
        p = r.parity
        if p.get("passed") is None:
            verdict, rec, iou, nme = "not run", "-", "-", "-"
        else:
            verdict = "passed" if p["passed"] else "FAILED"
            failed |= not p["passed"]
            rec = f"{p['recall']:.3f}"
            iou = f"{p['mean_iou']:.4f}" if p.get("mean_iou") is not None else "-"
            nme = f"{p['landmark_nme']:.4f}" if p.get("landmark_nme") is not None else "-"
        print(f"{r.target:<9} {r.precision:<9} {_size(r.model_bytes):>9}  {verdict:>8}  {rec:>6}  {iou:>8}  {nme:>7}  {r.seconds:>4.0f}  {r.bundle}")
        if p.get("passed") is None:
            print(f"          {p['not_run']}")
        for msg in p.get("failed", []):
            print(f"          gate failed: {msg}")
    if failed and not args.no_parity_gate:
        print("edge-convert: a bundle failed its parity gates (marked in its metadata.json); --no-parity-gate to accept it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
