"""`edge compress`: prune the FP32 model in stages, each recovered by distillation from the unpruned FP32 model
(and, with labels, the multi-task loss on ground truth), through the training loop of `edge train`: progress
bar, checkpoints, exact resume, DistributedDataParallel under torchrun."""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from calib_data.build import load_calibration
from edge.anchors import priors
from edge.atomic import atomic_file, write_json
from edge.commands.args import add_model_args
from edge.commands.train import add_train_args
from edge.errors import ConfigError
from edge.evaluate.parity import model_agreement
from edge.image_io import image_files
from edge.model import TupleOutputs
from edge.train.augment import AugmentConfig
from edge.train.data import DetectionDataset, collate
from edge.train.detector import evaluate_on_samples
from edge.train.labels import Sample, read_labels
from edge.train.loop import TrainConfig, dist_env, train
from edge.train.multibox import LossConfig
from edge.weights.load import load_weights, read_state_dict
from edge.widths import shrink_to
from quant.config import check_module_names
from quant.distill import student_step
from quant.equalize import equalize as cle
from quant.features import FeatureTaps, feature_widths, student_taps
from quant.prune import Pruner, stage_config
from quant.ptq import relu_split_modules, resolve_relu_split
from quant.qat import NNCFQATQuantizer, QATQuantizer


def parse_module_ratios(items: list[str]) -> dict[str, float]:
    """["body=0", "fpn=0.5"] -> {"body": 0.0, "fpn": 0.5}; ConfigError on anything else."""

    out = {}
    for it in items:
        name, eq, val = it.partition("=")
        try:
            r = float(val)
        except ValueError:
            r = None
        if not eq or not name or r is None or not 0.0 <= r < 1.0:
            raise ConfigError(f"--prune-module {it!r}: expected NAME=RATIO with RATIO in [0, 1), e.g. body=0 or fpn=0.5")
        out[name] = r
    return out


def cmd_compress(args) -> int:
    # 1. refuse a bad request before any work
    overrides, float_modules, feature_names, qat_only = check_request(args)
    root = Path(args.images)
    val, train_set = split_samples(args, root)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = dist_env()
    if env.world > 1 and args.importance == "taylor":
        raise ConfigError("--importance taylor ranks channels on each process's own batch; use magnitude under torchrun")
    # 2. the FP32 teacher, the held-out list, the training data and the loss
    teacher, info = load_weights(args.weights, arch=args.arch)
    check_module_names(teacher, [*overrides, *(args.freeze or []), *float_modules, *feature_names])
    relu_split = relu_split_modules(teacher, args.relu_split.split(","))
    spec = teacher.spec.with_input_size(args.size)
    teacher.spec = spec
    teacher.to(env.device).eval()
    for prm in teacher.parameters():
        prm.requires_grad = False
    out = Path(args.out)
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "heldout.txt").write_text("".join(s.path + "\n" for s in val))
    pri = torch.from_numpy(priors(args.size, args.size, spec.arch.min_sizes, spec.steps))
    dataset = DetectionDataset(train_set, root, spec, args.size, augment=AugmentConfig(), seed=args.seed)
    features = None
    if feature_names:
        features = {"teacher": FeatureTaps(teacher, feature_names), "student": None, "weight": args.feature_weight,
                    "widths": feature_widths(teacher, feature_names), "names": feature_names}
    step = student_step(teacher, pri, LossConfig(neg_pos=args.neg_pos), args.distill_weight, bool(args.labels), features,
                        args.band_weight)
    t0 = time.perf_counter()
    # 3. pruning in stages, each recovered by distillation
    student, reports = prune_stages(args, teacher, info, spec, dataset, step, features, overrides, feature_names,
                                    len(train_set), out, env, stages=0 if qat_only else args.stages)
    # 4. quantisation-aware training of the pruned model, distilled from the unpruned FP32 one
    qat_report = None
    if args.qat_steps or args.qat_epochs:
        qat_report = quantisation_aware_training(args, student, info, spec, dataset, step, features, float_modules,
                                                 feature_names, len(train_set), out, env, relu_split)
    if features is not None:
        features["teacher"].close()
    checksums = same_weights_everywhere(student, env)
    if not env.main:
        return 0
    # 5. the final float model, its cost and its agreement with the teacher: summary.json, written once
    model = copy.deepcopy(teacher).cpu().eval() if qat_only else final_model(out, args.stages)
    teacher = teacher.cpu()
    model.spec = spec
    summary = summarise(args, teacher, model, spec, root, val, reports, qat_report, checksums, env, t0)
    write_json(out / "summary.json", summary)
    # 6. what was made and how to use it
    print_summary(args, summary, out, len(val), qat_only)
    return 0


def check_request(args) -> tuple[dict, tuple, tuple, bool]:
    """Every refusal, before any work. -> (per-module ratios, float modules, distilled feature maps, QAT only)."""
    root = Path(args.images)
    if not root.is_dir():
        raise ConfigError(f"--images {root}: not a folder")
    if not 0.0 <= args.prune < 1.0:
        raise ConfigError(f"--prune must be in [0, 1), got {args.prune}")
    overrides = parse_module_ratios(args.prune_module or [])
    # --prune 0 with QAT: quantisation-aware training of the model itself, no pruning stage
    qat_only = args.prune == 0.0 and not any(overrides.values())
    if qat_only and not (args.qat_steps or args.qat_epochs):
        raise ConfigError("nothing to prune: --prune 0 and no --prune-module NAME=RATIO above 0 (give --qat-steps to train int8 only)")
    if args.stages < 1:
        raise ConfigError("--stages must be positive")
    if args.qat_steps and args.qat_epochs:
        raise ConfigError("give --qat-steps or --qat-epochs, not both")
    if args.qat_steps < 0 or args.qat_epochs < 0:
        raise ConfigError("--qat-steps and --qat-epochs must not be negative")
    if args.qat_backend == "nncf" and args.observe_steps:
        raise ConfigError("--observe-steps is for the pt2e backend; NNCF QAT starts from its PTQ ranges (--calib)")
    float_modules = tuple(n for n in (args.float_modules or "").split(",") if n)
    if (float_modules or args.qat_ranges != "frozen") and not (args.qat_steps or args.qat_epochs):
        raise ConfigError("--float-modules and --qat-ranges shape the QAT program: give --qat-steps or --qat-epochs")
    if float_modules and args.qat_backend != "pt2e":
        raise ConfigError("--float-modules is for the pt2e QAT program (NNCF places its own quantisers)")
    if args.qat_graph != "float-input" and (not (args.qat_steps or args.qat_epochs) or args.qat_backend != "pt2e"):
        raise ConfigError(f"--qat-graph {args.qat_graph} shapes the pt2e QAT program: give --qat-steps or --qat-epochs with --qat-backend pt2e")
    if args.qat_graph == "full-integer":
        if float_modules:
            raise ConfigError("--qat-graph full-integer has no float modules: drop --float-modules")
    elif args.relu_split:
        raise ConfigError("--relu-split shapes the full-integer QAT program: give --qat-graph full-integer")
    if args.relu_split.strip() == "auto" and args.observe_steps:
        raise ConfigError("--relu-split auto chooses from the calibrated ranges: use it with --observe-steps 0 (the default)")
    if args.qat_ranges == "learnt" and (args.qat_backend != "pt2e" or args.observe_steps):
        raise ConfigError("--qat-ranges learnt is for the pt2e backend, starting from calibrated ranges (--observe-steps 0); "
                          "NNCF's quantisers learn their ranges already")
    if args.size % 32:
        raise ConfigError(f"--size must be a multiple of 32, got {args.size}")
    feature_names = tuple(n for n in (args.distill_features or "").split(",") if n)
    if args.band_weight < 0:
        raise ConfigError(f"--band-weight must not be negative, got {args.band_weight}")
    if args.feature_weight <= 0:
        raise ConfigError(f"--feature-weight must be positive, got {args.feature_weight}")
    if feature_names and args.qat_backend == "nncf" and (args.qat_steps or args.qat_epochs):
        raise ConfigError("--distill-features taps the pt2e QAT program; the nncf backend does not support it")
    if args.stages and args.iters and args.iters // args.stages < 1:
        raise ConfigError("--iters must be at least --stages")
    return overrides, float_modules, feature_names, qat_only


def split_samples(args, root: Path) -> tuple[list, list]:
    """The labelled images (or every image, no faces, for distillation only), shuffled by --seed: (held out, training)."""
    if args.labels:
        samples = read_labels(args.labels)
    else:  # distillation only: every image, no faces labelled
        paths = image_files(root)
        samples = [Sample(str(p.relative_to(root)), np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32),
                          np.zeros(0, bool)) for p in paths]
    if len(samples) < 2:
        raise ConfigError(f"need at least 2 images, found {len(samples)}")
    random.Random(args.seed).shuffle(samples)
    n_val = max(1, min(args.val, len(samples) // 5))
    val, train_set = samples[:n_val], samples[n_val:]
    return val, train_set


def prune_stages(args, teacher, info, spec, dataset, step, features, overrides, feature_names, n_images: int, out: Path,
                 env, stages: int):
    """Stage k of `stages` prunes k / stages of the ratio (of the teacher's widths) and recovers by distillation;
    a finished stage is resumed from its final.pth. -> (the student, one report per stage)."""
    iters = args.iters // args.stages if args.iters else None
    student, reports = copy.deepcopy(teacher).cpu(), []
    for prm in student.parameters():  # torch-pruning leaves layers whose weights do not require grad alone
        prm.requires_grad = True
    for k in range(1, stages + 1):
        sdir = out / f"stage{k}"
        final, last = sdir / "final.pth", sdir / "last.pth"
        if final.exists():  # stage done in an earlier run
            student, _ = load_weights(final)
            reports.append({"stage": k, "resumed": "done"})
            continue
        if last.exists() and args.resume:  # stage interrupted: its shapes come from its checkpoint
            shrink_to(student, read_state_dict(last))
            rep = {"stage": k, "resumed": "from last.pth"}
        else:
            pcfg = stage_config(teacher, student, args.prune, args.importance, overrides=overrides, progress=k / args.stages)
            pruner = Pruner(student, pcfg, args.size)
            pruner.prepare()
            if args.importance == "taylor":
                x, tg = collate([dataset[i] for i in range(min(args.batch, len(dataset)))])
                pruner.step(backward=lambda m: step(m, (x, tg), torch.device("cpu"))[0].backward())
            else:
                pruner.step()
            student, rep = pruner.model, {"stage": k, **{key: v for key, v in pruner.report().items() if key != "conv_widths"}}
        student.spec = spec
        frozen = ("mesh_mean", "mesh_basis", *(f"{f}." for f in args.freeze or []))
        for n, prm in student.named_parameters():  # the mesh decoder (mean, basis) stays the teacher's; --freeze
            prm.requires_grad = not n.startswith(frozen)
        reports.append(rep)
        if env.main:
            print(f"stage {k}/{args.stages}: pruned to {sum(p.numel() for p in student.parameters()):,} parameters", file=sys.stderr)
        cfg = TrainConfig(out=str(sdir), epochs=args.epochs, iters=iters, batch=args.batch, lr=args.lr or 1e-3, optimizer="adamw",
                          weight_decay=args.weight_decay if args.weight_decay is not None else 1e-4, warmup=args.warmup,
                          workers=args.workers, seed=args.seed + k, save_every=args.save_every, bn=args.bn or "frozen",
                          amp=args.amp, tf32=args.tf32, progress=not args.quiet,
                          extra={"stage": k, "stages": args.stages, "prune": args.prune, "prune_module": overrides,
                                 "freeze": list(args.freeze or []), "importance": args.importance,
                                 "labels": str(args.labels) if args.labels else None, "distill_weight": args.distill_weight,
                                 "band_weight": args.band_weight,
                                 "distill_features": list(feature_names), "feature_weight": args.feature_weight if feature_names else None,
                                 "images": n_images})
        meta = {"format": 1, "kind": "pruned", "arch": info.arch.name, "teacher": {"name": info.name, "sha256": info.sha256},
                "train": cfg.extra}
        if spec.mesh_vertices:
            meta["mesh"] = {"vertices": spec.mesh_vertices, "rank": spec.mesh_rank}
        if features is not None:
            features["student"] = student_taps(student, feature_names, features["widths"])
        try:
            train(student, dataset, collate, step, cfg, meta=meta, resume=last if last.exists() and args.resume else None, env=env)
        finally:
            if features is not None:
                features["student"].close()
                features["student"] = None
        student = student.cpu().eval()
    return student, reports


def quantisation_aware_training(args, student, info, spec, dataset, step, features, float_modules, feature_names,
                                n_images: int, out: Path, env, relu_split: tuple = ()) -> dict:
    """QAT of `student` (OUT/qat.pth: its float weights and the trained program). -> the QAT report."""
    qdir, qfinal = out / "qat", out / "qat.pth"
    if qfinal.exists():
        return {"resumed": "done"}
    cs, qmodel, eq_report = None, student, None
    if args.qat_backend == "nncf" or not args.observe_steps:  # ranges as PTQ sets them, on edge-convert's calibration set

        cs = load_calibration(args.calib, args.size, args.calib_count, spec.mean, progress=not args.quiet)
    if args.qat_backend == "nncf":
        q = NNCFQATQuantizer(student, size=args.size)
        net = q.prepare(cs.tensors(spec))
    else:
        if args.qat_equalize:  # as edge-convert's PT2E PTQ does: QAT starts where PTQ ends

            qmodel, eq_report = cle(student, activations=None if cs is None else cs.tensors(spec))
            qmodel.spec = spec
        # as edge-convert --relu-split auto chooses, on the model QAT starts from
        relu_split, _ = resolve_relu_split(relu_split, qmodel, cs, spec)
        q = QATQuantizer(qmodel, size=args.size, observe_steps=args.observe_steps, float_modules=float_modules,
                         full_integer=args.qat_graph == "full-integer", relu_split=relu_split,
                         fused_leaky=args.qat_graph == "fused-leaky")
        net = q.prepare()
        if cs is not None:
            q.calibrate(cs.tensors(spec))
        if args.qat_ranges == "learnt":
            q.learn_ranges()
    cfg = TrainConfig(out=str(qdir), iters=args.qat_steps or None, epochs=args.qat_epochs or 1, batch=args.batch,
                      lr=args.qat_lr, optimizer="adamw", weight_decay=0.0,
                      warmup=min(args.warmup, args.qat_steps or args.warmup), workers=args.workers, seed=args.seed + 100,
                      save_every=args.save_every, bn="frozen", progress=not args.quiet,
                      extra={"qat_backend": args.qat_backend, "qat_graph": args.qat_graph, "qat_ranges": args.qat_ranges,
                             "float_modules": list(float_modules), "relu_split": list(relu_split) or None,
                             "equalize": bool(args.qat_equalize and args.qat_backend == "pt2e"),
                             "distill_features": list(feature_names), "feature_weight": args.feature_weight if feature_names else None,
                             "band_weight": args.band_weight, "qat_steps": args.qat_steps, "qat_epochs": args.qat_epochs,
                             "observe_steps": args.observe_steps, "images": n_images,
                             "calib": None if cs is None else (args.calib or "built-in"), "calib_count": args.calib_count})
    last = qdir / "last.pth"
    if features is not None and q.backend == "pt2e":
        features["student"] = student_taps(qmodel, feature_names, features["widths"], q.gm)
    try:
        train(net, dataset, collate, step, cfg, meta={"format": 1, "kind": "qat-run", "arch": info.arch.name},
              resume=last if last.exists() and args.resume else None, env=env, after_step=q.step)
    finally:
        if features is not None and features["student"] is not None:
            features["student"].close()
            features["student"] = None
    if q.backend == "pt2e":
        q.write_back()  # learnt ranges into the program's own quantisers: the checkpoint has one layout
    qat_report = {**q.report(), "cross_layer_equalization": eq_report}
    if env.main:
        meta = {"format": 1, "kind": "qat", "arch": info.arch.name, "teacher": {"name": info.name, "sha256": info.sha256},
                "train": cfg.extra, "qat": qat_report, "size": args.size}
        if spec.mesh_vertices:
            meta["mesh"] = {"vertices": spec.mesh_vertices, "rank": spec.mesh_rank}
        program = q.quantized if q.backend == "nncf" else net
        ck = {"state_dict": q.float_state(qmodel), "qat_state": {k: v.detach().cpu() for k, v in program.state_dict().items()},
              "retinaface_edge": meta}
        if q.backend == "nncf":
            ck["nncf_config"] = json.dumps(q.config())
        with atomic_file(qfinal) as tmp:
            torch.save(ck, tmp)
    return qat_report


def same_weights_everywhere(student, env) -> list[float]:
    """The parameter checksum of every process (under torchrun they must all agree)."""
    checksums = [float(sum(v.double().sum() for v in student.state_dict().values() if v.is_floating_point()))]
    if env.world > 1:  # every process must end with the same weights

        gathered = [None] * env.world
        dist.all_gather_object(gathered, checksums[0])
        checksums = gathered
        dist.destroy_process_group()
    return checksums


def final_model(out: Path, stages: int):
    """OUT/final.pth, a copy of the last stage's, loaded."""
    stage_final = out / f"stage{stages}" / "final.pth"
    with atomic_file(out / "final.pth") as tmp:
        tmp.write_bytes(stage_final.read_bytes())
    model, _ = load_weights(out / "final.pth")
    return model


def summarise(args, teacher, model, spec, root: Path, val, reports, qat_report, checksums, env, t0: float) -> dict:
    """Stages, cost (GMACs, parameters) of teacher and student, and their agreement on the held-out images."""
    import torch_pruning as tp  # optional: train extra

    x = torch.zeros(1, 3, args.size, args.size)
    macs = [tp.utils.count_ops_and_params(TupleOutputs(m), x) for m in (teacher, model)]
    summary = {"stages": reports, "gmacs": [macs[0][0] / 1e9, macs[1][0] / 1e9], "params": [int(macs[0][1]), int(macs[1][1])],
               "heldout": {"images": len(val), "list": "heldout.txt"},
               "world_size": env.world, "param_checksums": checksums, "qat": qat_report, "seconds": round(time.perf_counter() - t0, 1)}
    paths = [root / s.path for s in val]
    summary["agreement_with_teacher"] = model_agreement(paths, teacher, model, spec)
    if args.labels:
        summary["heldout_ap"] = {"teacher": evaluate_on_samples(teacher, val, root, args.size),
                                 "student": evaluate_on_samples(model, val, root, args.size)}
    return summary


def print_summary(args, summary: dict, out: Path, n_val: int, qat_only: bool) -> None:
    a = summary["agreement_with_teacher"]
    if not qat_only:
        print(f"pruned {args.prune:.0%} in {args.stages} stage(s): {summary['gmacs'][0]:.3f} -> {summary['gmacs'][1]:.3f} GMACs at "
              f"{args.size}, {summary['params'][0]:,} -> {summary['params'][1]:,} parameters")
    if not qat_only:  # the float student is the teacher itself: its int8 agreement is edge parity's
        print(f"teacher-face recall on {n_val} held-out images {a['recall']:.3f} (precision {a['precision']:.3f}, "
              f"mean IoU {a['mean_iou'] or 0:.4f})")
    if "heldout_ap" in summary:
        h = summary["heldout_ap"]
        print(f"held-out AP (all faces, IoU 0.5): teacher {h['teacher']['ap']:.4f}, student {h['student']['ap']:.4f}")
    if args.qat_steps or args.qat_epochs:
        where = ("tflite (full-integer)" if args.qat_graph == "full-integer" else
                 "openvino" if args.qat_backend == "nncf" else
                 "openvino or coreml" if args.qat_graph == "fused-leaky" else "tflite, openvino, onnx or coreml")
        print(f"wrote {out / 'qat.pth'}: the QAT model (`edge-convert --precision int8 --weights` it for {where})",
              file=sys.stderr)
    if not qat_only:
        print(f"wrote {out / 'final.pth'} (use with --weights; `edge eval widerface --list {out / 'heldout.txt'}` for easy/medium/hard)",
              file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("compress", help="prune the model in stages, each recovered by distillation from the FP32 model")
    add_model_args(p, bundle=False)
    p.add_argument("--images", required=True, help="training images (a held-out part validates)")
    p.add_argument("--labels", default=None, help="WIDER-format labels for --images: adds the multi-task loss on ground truth")
    p.add_argument("--prune", type=float, default=0.3, help="fraction of channels removed (multiples of 8 kept)")
    p.add_argument("--prune-module", action="append", metavar="NAME=RATIO",
                   help="ratio for a module and everything under it (longest name wins), e.g. body=0 fpn=0.5; repeatable")
    p.add_argument("--freeze", action="append", metavar="NAME",
                   help="do not train the parameters under this module (e.g. body, with --prune-module body=0); repeatable")
    p.add_argument("--stages", type=int, default=1, help="iterative pruning: prune, fine-tune, prune again ...")
    p.add_argument("--importance", choices=("magnitude", "taylor"), default="magnitude")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--band-weight", type=float, default=0.0,
                   help="adds this times the squared face-logit difference on the anchors whose face probability (teacher's "
                   "or student's) is in (0.1, 0.9): the faces a score threshold decides (0: off)")
    p.add_argument("--distill-features", default="", metavar="NAMES",
                   help="comma-separated modules whose output maps are also distilled from the teacher's (widths must "
                   "match: modules the pruning leaves whole), in pruning stages and pt2e QAT, e.g. body.stage1,body.stage2,body.stage3")
    p.add_argument("--feature-weight", type=float, default=1.0, help="weight of the feature-map loss (--distill-features)")
    p.add_argument("--neg-pos", type=float, default=7.0, help="hard negatives per positive (with --labels)")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--val", type=int, default=100, help="held-out images")
    p.add_argument("--qat-steps", type=int, default=0, help="then quantisation-aware training for this many steps (OUT/qat.pth)")
    p.add_argument("--qat-epochs", type=int, default=0, help="quantisation-aware training for this many passes over the "
                   "training images instead of --qat-steps")
    p.add_argument("--qat-backend", choices=("pt2e", "nncf"), default="pt2e",
                   help="pt2e: one PT2E program for tflite, openvino, onnx and coreml; nncf: NNCF's quantisers, openvino only")
    p.add_argument("--qat-lr", type=float, default=2e-5)
    p.add_argument("--observe-steps", type=int, default=0,
                   help="0: QAT activation ranges calibrated as PTQ does (histograms over --calib), then frozen; "
                   "N: moving-average min/max over the first N training steps instead")
    p.add_argument("--float-modules", default="", metavar="NAMES",
                   help="pt2e QAT: comma-separated model modules left float in the program, e.g. body.stage1")
    p.add_argument("--qat-graph", choices=("float-input", "full-integer", "fused-leaky"), default="float-input",
                   help="the pt2e QAT program: float-input (converts for tflite, openvino, onnx and coreml), full-integer "
                        "(TFLite's full-integer graph, uint8 canvas in: converts for tflite only) or fused-leaky (float input, "
                        "each convolution into its LeakyReLU unrounded, as OpenVINO and Core ML run it: converts for "
                        "openvino and coreml only)")
    p.add_argument("--relu-split", default="", metavar="NAMES",
                   help="--qat-graph full-integer: comma-separated modules (e.g. body.stage1) whose LeakyReLU convolutions "
                   "the program computes as two convolutions with fused ReLUs (as edge-convert --relu-split; more accurate "
                   "int8, slower); auto: the layers whose output's negative side is widest on the calibration pictures")
    p.add_argument("--qat-ranges", choices=("frozen", "learnt"), default="frozen",
                   help="pt2e: activation ranges frozen after calibration, or scales trained with the weights (LSQ)")
    p.add_argument("--no-qat-equalize", dest="qat_equalize", action="store_false",
                   help="pt2e QAT: skip the cross-layer equalisation of the backbone that edge-convert's PT2E PTQ applies "
                   "first (function-preserving), so QAT starts from the model PTQ quantises")
    p.add_argument("--calib", default=None, help="QAT calibration images: a folder or a built .npz (default: the built-in set, "
                   "as edge-convert)")
    p.add_argument("--calib-count", type=int, default=32)
    add_train_args(p)
    p.set_defaults(func=cmd_compress)
