"""`edge parity BUNDLE`: the bundle against the FP32 PyTorch reference, with the bundle's gates."""
from __future__ import annotations

from edge.atomic import write_json
from edge.errors import ConfigError
from edge.evaluate.parity import folder_images, run_parity, write_report
from edge.outputs import check_args
from edge.weights.load import load_weights


def cmd_parity(args) -> int:
    check_args(args, files=("json",), folders=("report",))
    imgs = folder_images(args.images, args.limit) if args.images else None
    other, against = None, None
    if args.against:  # another FP32 model as the reference: the unpruned model, or the pruned one a QAT bundle came from

        if args.weights:
            raise ConfigError("--against and --weights both name the reference; give one")
        other, info = load_weights(args.against)
        against = info.describe()
    summary, rep, dets, images = run_parity(args.bundle, imgs, reference_device=args.reference_device, weights=args.weights,
                                            reference_model_obj=other, progress=not args.quiet)
    if against:
        summary["against"] = against
        print(f"reference: {against} (not the bundle's own weights)")
    s = summary

    def f(v):
        return "null" if v is None else f"{v:.4f}"

    print(f"parity {args.bundle}: {'PASSED' if s['passed'] else 'FAILED'}  [{s['target']} {s['precision']}; reference {s['reference_device']}; "
          f"{s['images']} images, {s['ref_faces']} reference faces; {s['missed_faces']} missed, {s['extra_faces']} extra]")
    print(f"  recall {f(s['recall'])}  precision {f(s['precision_vs_ref'])}  mean IoU {f(s['mean_iou'])}  min IoU {f(s['min_iou'])}  "
          f"score MAE {f(s['score_mae'])}  landmark NME {f(s['landmark_nme'])}  mesh NME {f(s['mesh_nme'])}")
    print(f"  worst faces{' (anchor for anchor)' if s.get('errors_by_anchor') else ''}: landmark NME p99 {f(s.get('landmark_nme_p99'))} "
          f"max {f(s.get('landmark_nme_max'))}  mesh NME p99 {f(s.get('mesh_nme_p99'))} max {f(s.get('mesh_nme_max'))}"
          + (f"  anchor switches {s['anchor_switches']} (mean IoU same anchor {f(s.get('mean_iou_same_anchor'))}, switched "
             f"{f(s.get('mean_iou_switched'))})" if s.get("anchor_switches") is not None else ""))
    print("  tensors: " + ", ".join(f"{n} max|err| {t['max_abs']:.3g} SNR {t['snr_db']:.1f} dB" for n, t in s["tensors"].items()))
    for msg in s["failed"]:
        print(f"  gate failed: {msg}")
    if args.json:
        write_json(args.json, s)
    if args.report:
        path = write_report(rep, s, s["gates"], s["failed"], dets, images, args.report)
        print(f"  report: {path}")
    return 0 if s["passed"] else 1


def register(sub) -> None:
    p = sub.add_parser("parity", help="check a bundle against the FP32 PyTorch reference")
    p.add_argument("bundle")
    p.add_argument("--images", default=None, help="folder of images (default: the bundle's built-in parity pictures)")
    p.add_argument("--limit", type=int, default=None, help="at most N images from --images")
    p.add_argument("--reference-device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--weights", default=None, help="the reference checkpoint, when it is not where the bundle says")
    p.add_argument("--against", default=None, metavar="WEIGHTS",
                   help="compare with this FP32 model instead of the bundle's own (e.g. default, for a pruned bundle)")
    p.add_argument("--json", default=None)
    p.add_argument("--report", default=None, help="folder for report.md and its pictures")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_parity)
