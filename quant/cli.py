"""`edge compress`: prune the FP32 model and recover it by distillation from itself (no labels)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def agreement_on(images, teacher, student, spec) -> dict:
    """Recall/precision/mean IoU of the student's faces against the teacher's (score 0.5), pooled over images."""
    from edge.parity import detection_agreement
    from edge.pipeline import Pipeline
    from edge.runners import TorchRunner

    tp, sp = Pipeline(TorchRunner(teacher), spec), Pipeline(TorchRunner(student), spec)
    ref = cand = matched = 0
    ious = []
    for p in images:
        prep = tp.preprocess(p)
        a = detection_agreement(tp.postprocess(tp.runner(prep.tensor), prep), sp.postprocess(sp.runner(prep.tensor), prep))
        ref, cand, matched = ref + a["ref_faces"], cand + a["cand_faces"], matched + a["matched"]
        ious += a["iou"]
    return {"images": len(images), "teacher_faces": ref, "student_faces": cand, "recall": matched / ref if ref else 1.0,
            "precision": matched / cand if cand else 1.0, "mean_iou": float(np.mean(ious)) if ious else None}


def cmd_compress(args) -> int:
    import random

    import torch

    from calib_data.build import IMAGE_SUFFIXES
    from edge.atomic import atomic_file
    from edge.errors import ConfigError
    from edge.weights import load_weights
    from quant.distill import distill
    from quant.prune import PruneConfig, compress

    folder = Path(args.images)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise ConfigError(f"--images {folder}: need at least 2 images, found {len(paths)}")
    random.Random(0).shuffle(paths)
    n_val = max(1, min(args.val, len(paths) // 5))
    val, train = paths[:n_val], paths[n_val:]
    torch.set_num_threads(args.threads) if args.threads else None
    teacher, info = load_weights(args.weights, arch=args.arch)
    spec = teacher.spec.with_input_size(args.size)
    teacher.spec = spec
    t0 = time.perf_counter()
    student, report = compress(teacher, PruneConfig(ratio=args.prune))
    student.spec = spec
    print(f"pruned {args.prune:.0%}: {report['gmacs_before']:.3f} -> {report['gmacs_after']:.3f} GMACs, "
          f"{report['params_before']:,} -> {report['params_after']:,} parameters", file=sys.stderr)
    before = agreement_on(val, teacher, student, spec)
    history = distill(student, teacher, train, steps=args.steps, batch=args.batch, size=args.size, lr=args.lr, progress=not args.quiet)
    after = agreement_on(val, teacher, student, spec)
    meta = {"format": 1, "kind": "pruned", "arch": info.arch.name, "teacher": {"name": info.name, "sha256": info.sha256},
            "prune": report, "distill": {"steps": args.steps, "batch": args.batch, "size": args.size, "lr": args.lr,
                                         "train_images": len(train), "final_loss": history[-1]["loss"] if history else None},
            "validation": {"before_distill": before, "after_distill": after}, "seconds": round(time.perf_counter() - t0, 1)}
    with atomic_file(args.out) as tmp:
        torch.save({"state_dict": student.state_dict(), "retinaface_edge": meta}, tmp)
    print(f"teacher-face recall on {len(val)} held-out images: {before['recall']:.3f} after pruning -> {after['recall']:.3f} "
          f"after {args.steps} distillation steps (precision {after['precision']:.3f}, mean IoU {after['mean_iou'] or 0:.4f})")
    print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=1))
    return 0


def register(sub) -> None:
    from edge.cli import add_model_args

    p = sub.add_parser("compress", help="prune and distil the model into a smaller checkpoint")
    add_model_args(p, bundle=False)
    p.add_argument("--images", required=True, help="unlabelled training images (a held-out part validates)")
    p.add_argument("--prune", type=float, default=0.3, help="fraction of channels removed (multiples of 8 kept)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--val", type=int, default=40, help="held-out images for validation")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="checkpoint to write (.pth; written atomically)")
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compress)
