"""Distillation from the FP32 teacher: no ground-truth labels. The student learns the teacher's
soft face scores on every anchor, and its box and landmark regressions on the anchors the teacher
is confident about (face probability > 0.5). Images come from a folder (random square crops at
several scales, horizontal flips), part of them held out for validation.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge.image_io import load_image
from edge.preprocess import resize_bilinear


def crops(paths: list[Path], size: int, rng: random.Random, spec):
    """Endless (3, size, size) float32 network inputs: random square crops of 30-100 % of the short side, flips."""
    mean = np.asarray(spec.mean, np.float32)
    while True:
        img = load_image(rng.choice(paths))
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.randint(0, h - side), rng.randint(0, w - side)
        c = resize_bilinear(img[y:y + side, x:x + side], size, size)
        if rng.random() < 0.5:
            c = c[:, ::-1]
        yield np.ascontiguousarray(((c - mean) / np.asarray(spec.std, np.float32)).transpose(2, 0, 1))


def distill_loss(s: dict, t: dict, conf_thresh: float = 0.5) -> tuple[torch.Tensor, dict]:
    s_face, t_face = s["conf"][..., 1].clamp(1e-6, 1 - 1e-6), t["conf"][..., 1]
    cls = F.binary_cross_entropy(s_face, t_face)
    pos = t_face > conf_thresh
    cls_pos = F.binary_cross_entropy(s_face[pos], t_face[pos]) if pos.any() else s_face.sum() * 0
    box = F.smooth_l1_loss(s["loc"][pos], t["loc"][pos]) if pos.any() else s_face.sum() * 0
    lmk = F.smooth_l1_loss(s["landmarks"][pos], t["landmarks"][pos]) if pos.any() else s_face.sum() * 0
    loss = cls + cls_pos + 2.0 * box + lmk
    parts = {"cls": cls.item(), "cls_pos": cls_pos.item(), "box": box.item(), "lmk": lmk.item(), "positives": int(pos.sum())}
    return loss, parts


def distill(student, teacher, images: list[Path], *, steps: int, batch: int = 4, size: int = 640, lr: float = 1e-3,
            seed: int = 0, progress: bool = True, on_step=None) -> list[dict]:
    """Fine-tune `student` towards `teacher` for `steps` steps. Batch norms stay frozen (batches are small)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    teacher.eval()
    student.train()
    for m in student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    gen = crops(images, size, rng, student.spec)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    history = []
    for step in tqdm(range(steps), desc="distilling", disable=not progress):
        x = torch.from_numpy(np.stack([next(gen) for _ in range(batch)]))
        with torch.no_grad():
            t = teacher(x)
        loss, parts = distill_loss(student(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append({"step": step, "loss": float(loss), **parts})
        if on_step:
            on_step(step)
    student.eval()
    return history
