"""The mesh head trained on cached anchor rows: the detector is frozen, so what its heads read (the SSH maps) is
fixed for a given picture. Each training picture is augmented `views` times once; for every anchor that the
mesh head must serve, the feature patch under it (the head's receptive field: (2 * tower + 1)^2 cells), the
anchor's level and slot and the encoded target mesh are kept. Training then runs the head on patches only, so
tens of thousands of steps cost minutes where whole-image training costs hours, and the result is the same head
(a valid convolution on a zero-padded patch is the padded convolution at that cell; checked by a test).

Anchors served: those the multibox matching makes positive (as whole-image training uses), and with
`every_anchor` also every anchor that could be kept for the face after NMS: the frozen detector's own box there
overlaps the face at IoU >= 0.5 and its score is >= `min_score`. A face whose score is close at two anchors can be
kept at either (an int8 model moves scores by a few hundredths), so the mesh must be right at both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from edge.anchors import decode_boxes
from edge.postprocess import box_iou
from edge.train.mesh_head import encode_mesh, mesh_loss
from edge.train.multibox import match


@dataclass
class AnchorRows:
    patches: torch.Tensor  # (N, C, k, k) float16: the SSH map around the anchor's cell, zero outside the map
    level: torch.Tensor  # (N,) long
    slot: torch.Tensor  # (N,) long: which of the cell's anchors
    targets: torch.Tensor  # (N, 3V) float16: the encoded target mesh
    inside: torch.Tensor  # (N, 1, k, k) bool: which cells of the patch lie on the map

    def __len__(self) -> int:
        return len(self.level)


def anchor_cells(spec, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For every anchor of a size x size input: (level, row, column, slot), in the models' output order."""
    levels, rows, cols, slots = [], [], [], []
    na = spec.arch.anchors_per_cell
    for lv, step in enumerate(spec.steps):
        fh = fw = math.ceil(size / step)
        r, c, s = np.meshgrid(np.arange(fh), np.arange(fw), np.arange(na), indexing="ij")
        levels.append(np.full(r.size, lv))
        rows.append(r.ravel())
        cols.append(c.ravel())
        slots.append(s.ravel())
    return tuple(np.concatenate(v) for v in (levels, rows, cols, slots))


def served_anchors(t: dict, pri: torch.Tensor, cfg, loc: torch.Tensor | None, score: torch.Tensor | None, var,
                   min_score: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(anchor indices, face indices, how many of them only the detector's own boxes add) for one picture."""
    lab, idx = match(t["boxes"], pri, cfg)
    pos = lab == 1
    extra = torch.zeros_like(pos)
    if loc is not None:
        boxes = decode_boxes(loc.numpy(), pri.numpy(), var)
        iou = torch.from_numpy(box_iou(t["boxes"].double().numpy(), boxes.astype(np.float64)))  # (faces, A)
        best, face = iou.max(dim=0)
        extra = (best >= 0.5) & (score >= min_score) & ~pos
        pos = pos | extra
        idx = torch.where(extra, face, idx)
    a = torch.nonzero(pos).squeeze(1)
    return a, idx[a], int(extra.sum())


def build_rows(detector, dataset, views: int, pri: torch.Tensor, cfg, radius: int, *, every_anchor: bool = False,
               min_score: float = 0.3, progress: bool = True) -> tuple[AnchorRows, dict]:
    """Augment each picture of `dataset` (a `MeshDataset`) `views` times and cache the rows (see the module)."""
    spec, size = dataset.spec, dataset.size
    var = spec.variances
    level, row, col, slot = (torch.from_numpy(v) for v in anchor_cells(spec, size))
    k = 2 * radius + 1
    patches, levels, slots, targets, inside = [], [], [], [], []
    stats = {"pictures": 0, "faces": 0, "rows": 0, "extra_rows": 0}
    detector.eval()
    bar = tqdm(total=views * len(dataset), desc="anchor rows", unit="view", disable=not progress, mininterval=2.0)
    with torch.no_grad():
        for v in range(views):
            dataset.epoch = v
            for i in range(len(dataset)):
                bar.update()
                x, t = dataset[i]
                if t["boxes"].numel() == 0:
                    continue
                feats = detector.features(x[None])
                loc = score = None
                if every_anchor:
                    loc = torch.cat([h(f) for h, f in zip(detector.BboxHead, feats)], dim=1)[0]
                    score = F.softmax(torch.cat([h(f) for h, f in zip(detector.ClassHead, feats)], dim=1)[0], dim=-1)[:, 1]
                a, fi, n_extra = served_anchors(t, pri, cfg, loc, score, var, min_score)
                stats["extra_rows"] += n_extra
                if not len(a):
                    continue
                padded = [F.pad(f[0], (radius,) * 4) for f in feats]
                on_map = [F.pad(torch.ones(1, *f.shape[2:], dtype=torch.bool), (radius,) * 4) for f in feats]
                for lv in torch.unique(level[a]).tolist():
                    sel = a[level[a] == lv]
                    r, c = row[sel], col[sel]
                    win = padded[lv].unfold(1, k, 1).unfold(2, k, 1)  # (C, H, W, k, k)
                    patches.append(win[:, r, c].permute(1, 0, 2, 3).to(torch.float16))
                    inside.append(on_map[lv].unfold(1, k, 1).unfold(2, k, 1)[:, r, c].permute(1, 0, 2, 3))
                    levels.append(level[sel])
                    slots.append(slot[sel])
                    targets.append(encode_mesh(t["meshes"][fi[level[a] == lv]], pri[sel], var).to(torch.float16))
                stats["pictures"] += 1
                stats["faces"] += len(t["boxes"])
    bar.close()
    if not patches:
        none = torch.zeros(0, dtype=torch.long)
        return AnchorRows(torch.zeros(0), none, none, torch.zeros(0), torch.zeros(0, dtype=torch.bool)), stats
    rows = AnchorRows(torch.cat(patches), torch.cat(levels), torch.cat(slots), torch.cat(targets), torch.cat(inside))
    stats["rows"] = len(rows)
    return rows, stats


def head_at(head, patch: torch.Tensor, inside: torch.Tensor, width: int, slot: torch.Tensor) -> torch.Tensor:
    """The head's output for the anchor `slot` of the centre cell of each patch (N, C, k, k) -> (N, width):
    each 3x3 convolution of the tower run without padding, so that k = 2 * depth + 1 shrinks to 1; what a
    block computes off the map is zeroed before the next one, as the whole map's zero padding has it."""
    x = patch
    for m in getattr(head, "tower", ()):
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            if x.shape[-1] < inside.shape[-1]:
                cut = (inside.shape[-1] - x.shape[-1]) // 2
                x = x * inside[..., cut:-cut, cut:-cut]
            x = F.conv2d(x, m.weight, m.bias, groups=m.groups)
        else:
            x = m(x)
    y = head.conv1x1(x).reshape(len(x), -1, width)
    return y[torch.arange(len(x)), slot]


def train_on_rows(model, rows: AnchorRows, *, steps: int, batch: int, lr: float, basis_lr_scale: float,
                  edge_weight: float, edges: torch.Tensor, seed: int = 0, warmup: int = 200,
                  progress: bool = True) -> list[dict]:
    """Adam on the mesh head (mean and basis at lr x basis_lr_scale), cosine decay after a linear warm-up;
    -> a log row every 100 steps (step, loss, vertex, edge, lr)."""
    width = model.spec.output_width("mesh")
    head = [p for n, p in model.named_parameters() if n.startswith("MeshHead")]
    opt = torch.optim.Adam([{"params": head, "lr": lr}, {"params": [model.mesh_mean, model.mesh_basis], "lr": lr * basis_lr_scale}])
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    log, acc = [], []
    for step in tqdm(range(1, steps + 1), desc="mesh head", unit="step", disable=not progress, mininterval=2.0):
        f = min(1.0, step / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        idx = torch.randint(len(rows), (batch,), generator=gen)
        lv = rows.level[idx]
        picked, codes = [], []
        for level in torch.unique(lv).tolist():
            sel = idx[lv == level]
            picked.append(sel)
            codes.append(head_at(model.MeshHead[level], rows.patches[sel].float(), rows.inside[sel], width, rows.slot[sel]))
        idx, codes = torch.cat(picked), torch.cat(codes)
        pred = model.mesh_mean + codes @ model.mesh_basis
        loss, info = mesh_loss(pred, rows.targets[idx].float(), edges, edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc.append((loss.item(), info["vertex"], info["edge"]))
        if step % 100 == 0 or step == steps:
            a = np.mean(acc, axis=0)
            log.append({"step": step, "loss": float(a[0]), "vertex": float(a[1]), "edge": float(a[2]), "lr": opt.param_groups[0]["lr"]})
            acc = []
    return log
