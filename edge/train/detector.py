"""`edge train detector`: the paper's multi-task loss on WIDER-format labels, from the built-in
weights (fine-tuning), from a checkpoint, or from scratch; runs unchanged under `torchrun`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from edge.errors import ConfigError


def evaluate_on_samples(model, samples, root: str | Path, size: int, progress: bool = False) -> dict:
    """WIDER-protocol AP (IoU 0.5, all labelled faces count, none ignored) of `model` on labelled images,
    letterboxed to `size` (score 0.02, NMS 0.4, <= 750 boxes)."""
    from tqdm import tqdm

    from edge.eval_widerface import SETTINGS, WiderGT, evaluate
    from edge.pipeline import Pipeline, PostConfig
    from edge.runners import TorchRunner

    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(size), PostConfig(0.02, 0.4, 5000, 750))
    gt, preds = WiderGT(), {}
    for s in SETTINGS:
        gt.keep[s] = {}
    for s in tqdm(samples, desc="evaluating", disable=not progress, mininterval=2.0):
        b = s.boxes.astype(np.float64)
        gt.boxes[s.path] = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        for k in SETTINGS:
            gt.keep[k][s.path] = np.arange(len(b))
        det = pipe(Path(root) / s.path)
        d = det.boxes.astype(np.float64)
        preds[s.path] = np.concatenate([d[:, :2], d[:, 2:] - d[:, :2], det.scores[:, None]], axis=1)
    r = evaluate(preds, gt)
    return {"ap": r["easy"], "images": len(samples), "faces": int(sum(len(s) for s in samples)), "size": size}


def reinit_heads(model) -> None:
    """Fresh random head convolutions (the backbone, FPN and SSH keep their weights)."""
    g = torch.Generator().manual_seed(0)
    for heads in (model.ClassHead, model.BboxHead, model.LandmarkHead):
        for h in heads:
            torch.nn.init.normal_(h.conv1x1.weight, std=0.01, generator=g)
            torch.nn.init.zeros_(h.conv1x1.bias)


def init_variant(source, arch) -> tuple[torch.nn.Module, set[str]]:
    """A model of configuration `arch` started from `source`'s weights wherever names and shapes agree
    (P2-P6: backbone, P3-P5 FPN and SSH; cascade: everything, and the second-stage heads start as copies
    of the first). Returns (model, names of the tensors that did not come from `source`)."""
    from edge.contract import ModelSpec
    from edge.model import RetinaFace

    model = RetinaFace(ModelSpec(arch=arch))
    src = source.state_dict()
    state = model.state_dict()
    taken = set()
    for k, v in state.items():
        k1 = k.replace("Head2.", "Head.")  # cascade: the second stage copies the first
        if k1 in src and src[k1].shape == v.shape:
            state[k] = src[k1].clone()
            if k1 == k:
                taken.add(k)
    model.load_state_dict(state)
    return model, set(state) - taken


def detector_step(pri: torch.Tensor, loss_cfg, cascade: bool = False, mesh_weight: float = 1.0, edge_weight: float = 1.0):
    """The multi-task loss; with mesh pseudo-labels in the targets and a mesh head, plus `mesh_weight` x the mesh
    loss (L1 vertices + `edge_weight` x L1 edge lengths) on positive anchors of faces that have a mesh."""
    from edge.train.multibox import cascade_loss, multibox_loss

    def step(model, batch, device):
        x, targets = batch
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        out = model(x.to(device))
        p = pri.to(device)
        loss, parts = cascade_loss(out, targets, p) if cascade else multibox_loss(out, targets, p, loss_cfg)
        if "mesh" in out and any("meshes" in t for t in targets):
            from edge.mesh import mesh_edges
            from edge.train.mesh import matched_targets, mesh_loss

            core = model.module if hasattr(model, "module") else model
            codes, tgts = matched_targets(out["mesh"], targets, p, loss_cfg.variances, loss_cfg)
            if codes is not None:
                pred = core.mesh_mean + codes @ core.mesh_basis
                lm, mp = mesh_loss(pred, tgts, torch.from_numpy(mesh_edges()).to(device), edge_weight)
                loss = loss + mesh_weight * lm
                parts = {**parts, "mesh_vertex": mp["vertex"], "mesh_edge": mp["edge"]}
            else:
                parts = {**parts, "mesh_vertex": 0.0, "mesh_edge": 0.0}
        return loss, parts

    return step


def cmd_train_detector(args) -> int:
    from edge.anchors import priors
    from edge.contract import ModelSpec
    from edge.model import RetinaFace
    from edge.train.augment import AugmentConfig
    from edge.train.data import DetectionDataset, collate
    from edge.train.labels import read_labels
    from edge.train.loop import TrainConfig, dist_env, train
    from edge.train.multibox import LossConfig
    from edge.weights import ARCHS, PYTORCH_RETINAFACE, load_weights

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
        from edge.train.mesh import load_labels as load_mesh_labels

        meshes = {m.path: (m.boxes, m.meshes) for m in load_mesh_labels(Path(args.mesh_labels))}
    elif model.spec.mesh_vertices:  # no mesh labels: the mesh head is carried along unchanged
        from edge.weights import MESH_KEYS

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
        import torch.distributed as dist

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


def register(sub) -> None:
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
