"""A torch Dataset over WIDER-format labels: image -> (3, S, S) float32 network input (the model's
channel order, mean and std) and normalised targets. Randomness is drawn from (seed, epoch, index),
so a resumed run sees the same augmentation and DataLoader workers need no seeding of their own."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from edge.contract import ModelSpec
from edge.image_io import load_image
from edge.postprocess import box_iou
from edge.preprocess import letterbox_float
from edge.train.augment import AugmentConfig, augment
from edge.train.labels import LabelError, Sample


class EpochDataset(torch.utils.data.Dataset):
    """`samples` plus the epoch that seeds the augmentation (set by the training loop)."""

    samples: list
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)


class DetectionDataset(EpochDataset):
    def __init__(self, samples: list[Sample], root: str | Path, spec: ModelSpec, size: int, *,
                 augment: AugmentConfig | None = AugmentConfig(), seed: int = 0, meshes: dict | None = None):
        """meshes: image path -> (boxes (M, 4), meshes (M, 468, 3)) pseudo-labels in image pixels; each labelled
        face takes the mesh whose box overlaps it at IoU > 0.5 (targets gain "meshes" and "has_mesh").
        Flips are off with meshes (mirroring a mesh needs its left/right vertex pairs)."""
        if meshes is not None and augment is not None:
            augment = dataclasses.replace(augment, flip=0.0)
        self.meshes = meshes
        if size % spec.pad_multiple:
            raise ValueError(f"training size {size} is not a multiple of {spec.pad_multiple}")
        self.samples, self.root, self.spec, self.size = samples, Path(root), spec, size
        self.augment, self.seed, self.epoch = augment, seed, 0
        missing = [s.path for s in samples if not (self.root / s.path).is_file()]
        if missing:
            raise LabelError(f"{len(missing)} labelled images are not under {self.root}, e.g. {missing[0]}")

    def _mesh_for(self, s: Sample):
        return _mesh_for_sample(s, self.meshes.get(s.path))

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(self.root / s.path)
        mean = np.asarray(self.spec.mean, np.float32)
        pts, z, has_mesh = s.landmarks, None, None
        if self.meshes is not None:  # mesh vertices ride along as extra points; z is only scaled
            mesh, has_mesh = self._mesh_for(s)
            pts, z = np.concatenate([s.landmarks, mesh[..., :2]], axis=1), mesh[..., 2]
        index = np.arange(len(s))
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            x, boxes, pts, index, scale, _ = augment(img, s.boxes, pts, index, self.size, rng, self.augment, mean)
        else:
            x, scale = letterbox_float(img, self.size, mean)
            boxes, pts = s.boxes * scale, pts * scale
        x = (x - mean) / np.asarray(self.spec.std, np.float32)
        t = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes / self.size, np.float32)).reshape(-1, 4),
             "landmarks": torch.from_numpy(np.ascontiguousarray(pts[:, :5] / self.size, np.float32)).reshape(-1, 10),
             "has_landmarks": torch.from_numpy(np.asarray(s.has_landmarks[index], bool))}
        if z is not None:
            m = np.concatenate([pts[:, 5:], z[index][..., None] * scale], axis=-1) / self.size
            t["meshes"] = torch.from_numpy(np.ascontiguousarray(m, np.float32)).reshape(-1, 468, 3)
            t["has_mesh"] = torch.from_numpy(has_mesh[index])
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), t


def _mesh_for_sample(sample: Sample, entry) -> tuple[np.ndarray, np.ndarray]:
    n = len(sample)
    out, has = np.zeros((n, 468, 3), np.float32), np.zeros(n, bool)
    if entry is None or n == 0 or not len(entry[0]):
        return out, has
    iou = box_iou(sample.boxes.astype(np.float64), np.asarray(entry[0], np.float64))
    best = iou.argmax(axis=1)
    has = iou[np.arange(n), best] > 0.5
    out[has] = np.asarray(entry[1], np.float32)[best[has]]
    return out, has


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
