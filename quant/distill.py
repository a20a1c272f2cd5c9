"""Distillation from the FP32 teacher, needing no labels: the student learns the teacher's soft face
scores on every anchor, and its box, landmark and mesh-code regressions on the anchors the teacher is
confident about (face probability > 0.5). `edge compress` adds it to the training loop of `edge train`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edge.train.multibox import multibox_loss
from quant.features import feature_loss


# Face probabilities inside this band, the teacher's or the student's, are the anchors a detection threshold
# (0.5 by default, anything from ~0.3 to ~0.8 in use) can flip.
SCORE_BAND = (0.1, 0.9)


def face_logit(p: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a face probability, finite at 0 and 1."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def band_loss(s_face: torch.Tensor, t_face: torch.Tensor, band=SCORE_BAND) -> tuple[torch.Tensor, int]:
    """Mean squared face-logit difference over the anchors whose face probability, teacher's or student's, lies in
    `band`: the ones a score threshold decides. The soft-score cross-entropy averages over every anchor, so these
    few (tens among 16,800) weigh almost nothing in it. -> (loss, anchors in the band)."""
    lo, hi = band
    sel = ((t_face > lo) & (t_face < hi)) | ((s_face.detach() > lo) & (s_face.detach() < hi))
    if not sel.any():
        return s_face.sum() * 0, 0
    return F.mse_loss(face_logit(s_face[sel]), face_logit(t_face[sel])), int(sel.sum())


def distill_loss(s: dict, t: dict, conf_thresh: float = 0.5, band_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """band_weight: adds that times `band_loss` (the face logits of the anchors near the score threshold)."""
    s_face, t_face = s["conf"][..., 1].clamp(1e-6, 1 - 1e-6), t["conf"][..., 1]
    cls = F.binary_cross_entropy(s_face, t_face)
    pos = t_face > conf_thresh
    cls_pos = F.binary_cross_entropy(s_face[pos], t_face[pos]) if pos.any() else s_face.sum() * 0
    # without confident anchors every output still joins the graph at weight 0 (DistributedDataParallel
    # expects a gradient, if zero, for every parameter)
    box = F.smooth_l1_loss(s["loc"][pos], t["loc"][pos]) if pos.any() else s["loc"].sum() * 0
    lmk = F.smooth_l1_loss(s["landmarks"][pos], t["landmarks"][pos]) if pos.any() else s["landmarks"].sum() * 0
    loss = cls + cls_pos + 2.0 * box + lmk
    parts = {"cls": cls.item(), "cls_pos": cls_pos.item(), "box": box.item(), "lmk": lmk.item(), "positives": int(pos.sum())}
    if "mesh" in s and "mesh" in t:  # the mesh head's per-anchor codes (the decoder stays the teacher's)
        mesh = F.smooth_l1_loss(s["mesh"][pos], t["mesh"][pos]) if pos.any() else s["mesh"].sum() * 0
        loss = loss + mesh
        parts["mesh"] = mesh.item()
    if band_weight:
        band, n = band_loss(s_face, t_face)
        loss = loss + band_weight * band
        parts.update(band=band.item(), band_anchors=n)
    return loss, parts


def student_step(teacher, pri, loss_cfg, distill_weight: float, use_gt: bool, features: dict | None = None,
                 band_weight: float = 0.0):
    """Loss of one batch: distillation from the FP32 teacher (soft scores everywhere; boxes, landmarks and mesh
    codes where the teacher is confident) plus, with labels, the multi-task loss on ground truth (hard negatives).
    features: {"teacher": FeatureTaps, "student": FeatureTaps or None, "weight": w}: adds w x the feature-map
    loss (quant.features) while a student's taps are set. band_weight: see distill_loss."""

    def step(m, batch, device):
        x, targets = batch
        x = x.to(device)
        out = m(x)
        with torch.no_grad():
            t = teacher(x)
        loss, parts = distill_loss(out, t, band_weight=band_weight)
        loss = distill_weight * loss
        if features is not None:
            t_feats = features["teacher"].pop()
            if features["student"] is not None:
                fl, fp = feature_loss(features["student"].pop(), t_feats)
                loss = loss + features["weight"] * fl
                parts = {**parts, **fp}
        if use_gt:
            gl, gp = multibox_loss(out, [{k: v.to(device) for k, v in tg.items()} for tg in targets], pri.to(device), loss_cfg)
            loss = loss + gl
            parts = {**parts, **{f"gt_{k}": v for k, v in gp.items()}}
        return loss, parts

    return step
