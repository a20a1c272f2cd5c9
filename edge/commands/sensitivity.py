"""`edge sensitivity`: which blocks of the full-integer int8 graph lose the faces, and what int16 activations
there would buy (quant.sensitivity). A table per block, then the blocks ranked by recall gained, then (with
--cumulative K) the best 1..K blocks in int16 together: the mixed recipe such a table chooses."""
from __future__ import annotations

import sys
import time

from calib_data.build import load_calibration
from edge.atomic import write_json
from edge.errors import ConfigError
from edge.evaluate.parity import folder_images
from edge.outputs import check_args
from edge.weights.load import load_weights
from quant.config import check_module_names
from quant.sensitivity import Block, blocks_of, program_agreement, reference_detections, sensitivity, simulated_program


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def cmd_sensitivity(args) -> int:
    check_args(args, files=("json",))
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.cumulative < 0:
        raise ConfigError(f"--cumulative must be 0 or more, got {args.cumulative}")
    if args.size % 32:
        raise ConfigError(f"--size must be a multiple of 32, got {args.size}")
    model, info = load_weights(args.weights, arch=args.arch)
    spec = model.spec.with_input_size(args.size)
    model.spec = spec
    if args.blocks:
        names = [n for n in args.blocks.split(",") if n]
        check_module_names(model, names)
        blocks = [Block(n, (n,)) for n in names]
    else:
        blocks = blocks_of(model, args.level)
    images = folder_images(args.images, args.limit)
    calib = load_calibration(args.calib, args.size, args.calib_count, spec.mean, progress=not args.quiet)
    t0 = time.perf_counter()

    def progress(i, n, name):
        if not args.quiet:
            print(f"  [{i + 1}/{n}] {name} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    res = sensitivity(model, spec, calib, images, blocks, progress)
    base = res["baseline"]
    print(f"int16 activations per block against all-int8 (simulated full-integer program; {res['images']} images, "
          f"{res['reference_faces']} FP32 faces; {info.describe()}, {args.size}x{args.size})")
    print(f"{'block':<16} {'MACs':>6} {'recall':>7} {'d recall':>9} {'precision':>9} {'mean IoU':>9} {'lmk NME':>8} {'mesh NME':>9}")
    print(f"{'(all int8)':<16} {'':>6} {_fmt(base['recall'])} {'':>9} {_fmt(base['precision']):>9} {_fmt(base['mean_iou']):>9} "
          f"{_fmt(base['landmark_nme']):>8} {_fmt(base['mesh_nme']):>9}")
    for r in res["blocks"]:
        print(f"{r['block']:<16} {100 * r['macs_share']:5.1f}% {_fmt(r['recall'])} {r['d_recall']:+9.4f} {_fmt(r['precision']):>9} "
              f"{_fmt(r['mean_iou']):>9} {_fmt(r['landmark_nme']):>8} {_fmt(r['mesh_nme']):>9}")
    ranked = sorted(res["blocks"], key=lambda r: -r["d_recall"])
    print("ranked by recall gained: " + ", ".join(f"{r['block']} {r['d_recall']:+.4f}" for r in ranked))
    if args.cumulative:
        res["cumulative"] = []
        reference = reference_detections(model, spec, images)
        for k in range(1, min(args.cumulative, len(ranked)) + 1):
            modules = tuple(m for r in ranked[:k] for m in r["modules"])
            if not args.quiet:
                print(f"  [top {k} together] ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            program = simulated_program(model, spec, calib, modules)
            figs = program_agreement(reference, model, images, program)
            share = sum(r["macs_share"] for r in ranked[:k])
            res["cumulative"].append({"blocks": [r["block"] for r in ranked[:k]], "macs_share": share, **figs})
            print(f"top {k} in int16 ({', '.join(r['block'] for r in ranked[:k])}; {100 * share:.1f}% of MACs): "
                  f"recall {_fmt(figs['recall'])}, precision {_fmt(figs['precision'])}, mean IoU {_fmt(figs['mean_iou'])}, "
                  f"landmark NME {_fmt(figs['landmark_nme'])}")
    res.update({"weights": info.describe(), "size": args.size, "calibration": calib.summary(), "level": args.level,
                "simulation": "PT2E quantise/dequantise pairs of the full-integer graph; edge-convert --target tflite "
                              "--precision int8-mixed converts the normalisation and stage 1 in int16"})
    if args.json:
        write_json(args.json, res)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-block effect of int16 activations on the full-integer int8 graph's parity")
    p.add_argument("--images", required=True, help="folder of real pictures to measure on (the FP32 model's faces are the reference)")
    p.add_argument("--limit", type=int, default=60, help="at most N images from --images (default 60)")
    p.add_argument("--weights", default="default", help="registry name or checkpoint path (default: built-in 'default')")
    p.add_argument("--arch", default=None, help="configuration of an unknown checkpoint")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--level", choices=["unit", "stage"], default="unit",
                   help="unit: every backbone block, the FPN, each SSH, the heads; stage: backbone stages, FPN, SSHs, heads")
    p.add_argument("--blocks", default=None, metavar="NAMES", help="comma-separated modules instead, e.g. body.stage1.1,fpn")
    p.add_argument("--cumulative", type=int, default=0, metavar="K",
                   help="then the K blocks that gain most, in int16 together (1, 2, ... K)")
    p.add_argument("--calib", default=None, help="calibration images (folder or .npz; default: the built-in set)")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sensitivity)
