"""Anchor matching and the paper's multi-task loss (RetinaFace, CVPR 2020, eq. 1):

    L = L_cls + lambda_box * L_box + lambda_pts * L_pts (+ lambda_mesh * L_mesh)

- matching: IoU of every ground-truth box with every anchor (point form). An anchor is positive
  when its best IoU >= `pos_iou`, background below `neg_iou`, ignored in between; each face's best
  anchor is forced positive (if that IoU >= `min_best_iou`), as the reference implementations do;
- classification: cross-entropy over face/background with online hard example mining: per image
  all positives and the `neg_pos` x as many highest-loss negatives;
- boxes: smooth-L1 on the variance-encoded offsets of positive anchors (weight 2 by default);
- landmarks: smooth-L1 on positive anchors whose face has landmarks (faces from box-only labels
  are masked out).
Every term is summed and divided by the number of positives (landmarks: by the positives with
landmarks), as in the reference recipes.

Tensors: priors (A, 4) cx, cy, w, h normalised; targets per image boxes (N, 4) x1 y1 x2 y2 and
landmarks (N, 10) normalised to the input size, has_landmarks (N,) bool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    pos_iou: float = 0.35
    neg_iou: float = 0.35
    min_best_iou: float = 0.2
    neg_pos: float = 3.0
    box_weight: float = 2.0
    landmark_weight: float = 1.0
    variances: tuple[float, float] = (0.1, 0.2)

    def __post_init__(self):
        if not 0 < self.neg_iou <= self.pos_iou <= 1:
            raise ValueError(f"need 0 < neg_iou <= pos_iou <= 1, got {self.neg_iou} / {self.pos_iou}")
        if self.neg_pos <= 0:
            raise ValueError(f"neg_pos must be > 0, got {self.neg_pos}")


def point_form(pri: torch.Tensor) -> torch.Tensor:
    return torch.cat([pri[:, :2] - pri[:, 2:] / 2, pri[:, :2] + pri[:, 2:] / 2], dim=1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) x1 y1 x2 y2 -> (N, M) IoU."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def encode(matched: torch.Tensor, pri: torch.Tensor, var) -> torch.Tensor:
    centre = ((matched[:, :2] + matched[:, 2:]) / 2 - pri[:, :2]) / (var[0] * pri[:, 2:])
    size = torch.log(((matched[:, 2:] - matched[:, :2]) / pri[:, 2:]).clamp(min=1e-6)) / var[1]
    return torch.cat([centre, size], dim=1)


def encode_points(points: torch.Tensor, pri: torch.Tensor, var) -> torch.Tensor:
    """points (A, 2K) -> offsets (A, 2K) (x, y relative to the anchor centre over its size and the variance)."""
    p = points.reshape(points.shape[0], -1, 2)
    return ((p - pri[:, None, :2]) / (var[0] * pri[:, None, 2:])).reshape(points.shape[0], -1)


def match(boxes: torch.Tensor, pri: torch.Tensor, cfg: LossConfig):
    """One image. Returns (labels (A,) long: 1 face, 0 background, -1 ignored; matched face index (A,))."""
    a = pri.shape[0]
    labels = torch.zeros(a, dtype=torch.long, device=pri.device)
    index = torch.zeros(a, dtype=torch.long, device=pri.device)
    if boxes.numel() == 0:
        return labels, index
    iou = box_iou(boxes, point_form(pri))  # (N, A)
    best_prior_iou, best_prior = iou.max(dim=1)
    valid = best_prior_iou >= cfg.min_best_iou
    best_iou, index = iou.max(dim=0)
    if valid.any():
        faces = torch.nonzero(valid).squeeze(1)
        best_iou[best_prior[faces]] = 2.0
        index[best_prior[faces]] = faces  # later faces win ties, as in the reference loop
    labels[best_iou >= cfg.pos_iou] = 1
    labels[(best_iou >= cfg.neg_iou) & (best_iou < cfg.pos_iou)] = -1
    return labels, index


def multibox_loss(out: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]], pri: torch.Tensor,
                  cfg: LossConfig = LossConfig()) -> tuple[torch.Tensor, dict]:
    """out: the model's dict (loc (B, A, 4), conf (B, A, 2) softmax probabilities, landmarks (B, A, 10)).
    Returns (loss, parts) with parts as Python floats for logging."""
    var = cfg.variances
    b = out["loc"].shape[0]
    labels, loc_t, lmk_t, lmk_mask = [], [], [], []
    all_pri = pri
    for i in range(b):
        t = targets[i]
        pri = all_pri[i] if all_pri.dim() == 3 else all_pri  # per-image anchors (the cascade's second stage)
        lab, idx = match(t["boxes"], pri, cfg)
        labels.append(lab)
        if t["boxes"].numel():
            loc_t.append(encode(t["boxes"][idx], pri, var))
            lmk_t.append(encode_points(t["landmarks"][idx], pri, var))
            lmk_mask.append(t["has_landmarks"][idx] & (lab == 1))
        else:
            loc_t.append(torch.zeros_like(pri))
            lmk_t.append(torch.zeros(pri.shape[0], 10, device=pri.device))
            lmk_mask.append(torch.zeros(pri.shape[0], dtype=torch.bool, device=pri.device))
    labels = torch.stack(labels)
    loc_t, lmk_t, lmk_mask = torch.stack(loc_t), torch.stack(lmk_t), torch.stack(lmk_mask)
    pos = labels == 1
    n_pos = int(pos.sum())
    norm = max(n_pos, 1)
    # log of the softmax output (the model emits probabilities); the clamp keeps log finite
    logp = torch.log(out["conf"].clamp(min=1e-12))
    ce = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, A)
    with torch.no_grad():
        mining = ce.detach().clone()
        mining[labels != 0] = -1.0  # only background competes
        n_neg = (pos.sum(1, keepdim=True).clamp(min=1) * cfg.neg_pos).long().clamp(max=labels.shape[1] - 1)
        order = mining.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)
        neg = (rank < n_neg) & (labels == 0)
    loss_cls = ce[pos | neg].sum() / norm
    loss_box = F.smooth_l1_loss(out["loc"][pos], loc_t[pos], reduction="sum") / norm if n_pos else out["loc"].sum() * 0
    n_lmk = int(lmk_mask.sum())
    loss_lmk = (F.smooth_l1_loss(out["landmarks"][lmk_mask], lmk_t[lmk_mask], reduction="sum") / n_lmk
                if n_lmk else out["landmarks"].sum() * 0)
    loss = loss_cls + cfg.box_weight * loss_box + cfg.landmark_weight * loss_lmk
    parts = {"cls": loss_cls.item(), "box": loss_box.item(), "landmarks": loss_lmk.item(),
             "positives": n_pos / b, "negatives": int(neg.sum()) / b}
    return loss, parts


# The paper's cascade: the first stage matches anchors at IoU 0.7 / 0.3, the second stage matches the
# first stage's regressed boxes at 0.5 / 0.4.
CASCADE_STAGE1 = LossConfig(pos_iou=0.7, neg_iou=0.3)
CASCADE_STAGE2 = LossConfig(pos_iou=0.5, neg_iou=0.4)


def decode(loc: torch.Tensor, pri: torch.Tensor, var) -> torch.Tensor:
    """(..., A, 4) offsets -> (..., A, 4) boxes (cx, cy, w, h): the form anchors take."""
    centre = pri[..., :2] + loc[..., :2] * var[0] * pri[..., 2:]
    size = pri[..., 2:] * torch.exp((loc[..., 2:] * var[1]).clamp(-6, 6))
    return torch.cat([centre, size], dim=-1)


def cascade_loss(out: dict[str, torch.Tensor], targets, pri: torch.Tensor, stage1: LossConfig = CASCADE_STAGE1,
                 stage2: LossConfig = CASCADE_STAGE2) -> tuple[torch.Tensor, dict]:
    """Both stages' multi-task losses; the second stage's anchors are the first stage's boxes (no gradient)."""
    l1, p1 = multibox_loss(out, targets, pri, stage1)
    with torch.no_grad():
        pri2 = decode(out["loc"].detach().float(), pri, stage1.variances)
    second = {"loc": out["loc2"], "conf": out["conf2"], "landmarks": out["landmarks2"]}
    l2, p2 = multibox_loss(second, targets, pri2, stage2)
    return l1 + l2, {**p1, **{f"{k}2": v for k, v in p2.items()}}
