"""`edge train detector`: the paper's multi-task loss on WIDER-format labels, from the built-in
weights (fine-tuning), from a checkpoint, or from scratch; runs unchanged under `torchrun`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge.contract import ModelSpec
from edge.evaluate.widerface import SETTINGS, WiderGT, evaluate
from edge.mesh import mesh_edges
from edge.model import RetinaFace
from edge.pipeline import Pipeline, PostConfig
from edge.runners import TorchRunner
from edge.train.mesh_head import matched_targets, mesh_loss
from edge.train.multibox import cascade_loss, multibox_loss


def evaluate_on_samples(model, samples, root: str | Path, size: int, progress: bool = False) -> dict:
    """WIDER-protocol AP (IoU 0.5, all labelled faces count, none ignored) of `model` on labelled images,
    letterboxed to `size` (score 0.02, NMS 0.4, <= 750 boxes)."""

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

    def step(model, batch, device):
        x, targets = batch
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        out = model(x.to(device))
        p = pri.to(device)
        loss, parts = cascade_loss(out, targets, p) if cascade else multibox_loss(out, targets, p, loss_cfg)
        if "mesh" in out and any("meshes" in t for t in targets):
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


