"""Independent torch implementations of the reference recipe (Pytorch_Retinaface's PriorBox,
decode and decode_landm, and greedy NMS with torchvision's box_iou semantics), to check the
numpy pipeline against. torchvision itself cannot be installed beside torch 2.13's CPU build
here (its PyPI wheel fails with "operator torchvision::nms does not exist"), so NMS is written
in torch ops following torchvision's definition: keep boxes by descending score, drop any box
whose IoU with a kept box is > threshold."""
from itertools import product
from math import ceil

import torch


def prior_box(min_sizes, steps, image_size):
    anchors = []
    for k, step in enumerate(steps):
        fh, fw = ceil(image_size[0] / step), ceil(image_size[1] / step)
        for i, j in product(range(fh), range(fw)):
            for ms in min_sizes[k]:
                anchors += [(j + 0.5) * step / image_size[1], (i + 0.5) * step / image_size[0], ms / image_size[1], ms / image_size[0]]
    return torch.tensor(anchors).view(-1, 4)


def decode(loc, priors, variances):
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:], priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def decode_landm(pre, priors, variances):
    return torch.cat([priors[:, :2] + pre[:, 2 * k: 2 * k + 2] * variances[0] * priors[:, 2:] for k in range(5)], dim=1)


def box_iou(a, b):
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes, scores, iou_threshold):
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order].double(), boxes[order].double())
    removed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if removed[i]:
            continue
        keep.append(int(order[i]))
        removed |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def detect(outputs, min_sizes, steps, variances, hw, score=0.5, nms_thr=0.4, top_k=5000, keep_top_k=750):
    """Raw outputs of one image (numpy, no batch dim) -> boxes, scores, landmarks in input pixels."""
    pri = prior_box(min_sizes, steps, hw)
    h, w = hw
    loc = torch.from_numpy(outputs["loc"])
    conf = torch.from_numpy(outputs["conf"])
    lm = torch.from_numpy(outputs["landmarks"])
    boxes = decode(loc, pri, variances) * torch.tensor([w, h, w, h])
    lms = decode_landm(lm, pri, variances) * torch.tensor([w, h] * 5)
    scores = conf[:, 1]
    inds = torch.nonzero(scores > score).squeeze(1)
    order = torch.sort(scores[inds], descending=True, stable=True).indices[:top_k]
    inds = inds[order]
    keep = nms(boxes[inds], scores[inds], nms_thr)[:keep_top_k]
    sel = inds[keep]
    return boxes[sel].numpy(), scores[sel].numpy(), lms[sel].numpy().reshape(-1, 5, 2)
