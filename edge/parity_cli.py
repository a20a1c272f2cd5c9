"""`edge parity BUNDLE`: the bundle against the FP32 PyTorch reference, with the bundle's gates."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import BundleError, ConfigError


def reference_model(meta: dict, weights: str | None = None):
    """The FP32 model the bundle was converted from, checked by SHA-256."""
    from edge.weights import REGISTRY, load_weights

    w = meta["weights"]
    by_name = w.get("known") and w["name"] in REGISTRY and (w["name"] == "default" or REGISTRY[w["name"]].file)
    source = weights or (w["name"] if by_name else w.get("path") or w["name"])
    try:
        model, info = load_weights(source, arch=None if w.get("known") else w["arch"])
    except Exception as e:  # noqa: BLE001 - re-raised with the bundle's context
        raise BundleError(f"cannot load the bundle's reference weights {source!r} ({e}); pass --weights") from None
    if info.sha256 != w["sha256"]:
        raise BundleError(f"reference weights {source!r} have SHA-256 {info.sha256[:12]}, the bundle was made from {w['sha256'][:12]}")
    return model


def reference_runner(model, device: str):
    """TorchRunner on CUDA when asked and available (TF32 off), else CPU. -> (runner, device used)."""
    import torch

    from edge.runners import TorchRunner

    if device == "cuda" and torch.cuda.is_available():
        return TorchRunner(model, "cuda"), f"cuda ({torch.cuda.get_device_name(0)}, TF32 disabled)"
    used = "cpu" if device == "cpu" else "cpu (CUDA asked for but not available)"
    return TorchRunner(model, "cpu"), used


def builtin_images(spec) -> list[tuple[str, np.ndarray]]:
    from converters.api import parity_images

    canvases, names = parity_images(spec.input_size, spec.mean)
    return list(zip(names, canvases))


def folder_images(folder: str | Path, limit: int | None) -> list[tuple[str, np.ndarray]]:
    from calib_data.build import image_files
    from edge.image_io import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    paths = image_files(folder)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ConfigError(f"--images {folder}: no images found")
    return [(str(p.relative_to(folder)), load_image(p)) for p in paths]


def run_parity(bundle: str | Path, images=None, *, reference_device: str = "cpu", weights: str | None = None,
               runner=None, reference_model_obj=None, progress: bool = False):
    """-> (summary dict with "passed", report, detections, images dict). `runner`/`reference_model_obj`
    let edge-convert check a bundle still in its temporary folder."""
    from converters.bundle import load_bundle_runner, read_metadata
    from edge.contract import ModelSpec
    from edge.parity import check_gates, compare, load_gates

    folder, meta = read_metadata(bundle)
    spec = ModelSpec.from_dict(meta["spec"])
    if runner is None:
        runner, spec, _ = load_bundle_runner(folder)
    model = reference_model_obj if reference_model_obj is not None else reference_model(meta, weights)
    ref, used = reference_runner(model, reference_device)
    gates = load_gates(meta["target"], meta["precision"])
    imgs = images if images is not None else builtin_images(spec)
    rep, dets = compare(ref, runner, spec, imgs, target=meta["target"], precision=meta["precision"], reference_device=used,
                        score_threshold=gates["score_threshold"], match_iou=gates["match_iou"], progress=progress)
    summary = rep.summary()
    failed = check_gates(summary, gates)
    summary = {"passed": not failed, "failed": failed, **summary, "gates": gates}
    return summary, rep, dets, dict(imgs)


def cmd_parity(args) -> int:
    from edge.atomic import write_json
    from edge.outputs import check_args
    from edge.parity import write_report

    check_args(args, files=("json",), folders=("report",))
    imgs = folder_images(args.images, args.limit) if args.images else None
    other, against = None, None
    if args.against:  # another FP32 model as the reference: the unpruned model, or the pruned one a QAT bundle came from
        from edge.weights import load_weights

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
          f"{s['images']} images, {s['ref_faces']} reference faces]")
    print(f"  recall {f(s['recall'])}  precision {f(s['precision_vs_ref'])}  mean IoU {f(s['mean_iou'])}  min IoU {f(s['min_iou'])}  "
          f"score MAE {f(s['score_mae'])}  landmark NME {f(s['landmark_nme'])}  mesh NME {f(s['mesh_nme'])}")
    print(f"  worst faces{' (anchor for anchor)' if s.get('errors_by_anchor') else ''}: landmark NME p99 {f(s.get('landmark_nme_p99'))} "
          f"max {f(s.get('landmark_nme_max'))}  mesh NME p99 {f(s.get('mesh_nme_p99'))} max {f(s.get('mesh_nme_max'))}"
          + (f"  anchor switches {s['anchor_switches']}" if s.get("anchor_switches") is not None else ""))
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
