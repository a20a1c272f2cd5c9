"""A torch Dataset over WIDER-format labels: image -> (3, S, S) float32 network input (the model's
channel order, mean and std) and normalised targets. Randomness is drawn from (seed, epoch, index),
so a resumed run sees the same augmentation and DataLoader workers need no seeding of their own."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge.contract import ModelSpec
from edge.image_io import load_image
from edge.train.augment import AugmentConfig, augment
from edge.train.labels import LabelError, Sample


def letterbox(img: np.ndarray, size: int, mean) -> tuple[np.ndarray, float]:
    """The inference letterbox (top-left, long side = size, mean-colour padding) -> (float32 image, scale)."""
    from edge.preprocess import resize_bilinear

    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = np.empty((size, size, 3), np.float32)
    x[:] = mean
    x[:nh, :nw] = resize_bilinear(img, nh, nw)
    return x, scale


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
                 augment: AugmentConfig | None = AugmentConfig(), seed: int = 0):
        if size % spec.pad_multiple:
            raise ValueError(f"training size {size} is not a multiple of {spec.pad_multiple}")
        self.samples, self.root, self.spec, self.size = samples, Path(root), spec, size
        self.augment, self.seed, self.epoch = augment, seed, 0
        missing = [s.path for s in samples if not (self.root / s.path).is_file()]
        if missing:
            raise LabelError(f"{len(missing)} labelled images are not under {self.root}, e.g. {missing[0]}")

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(self.root / s.path)
        mean = np.asarray(self.spec.mean, np.float32)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            x, boxes, lmk, has, _ = augment(img, s.boxes, s.landmarks, s.has_landmarks, self.size, rng, self.augment, mean)
        else:
            x, scale = letterbox(img, self.size, mean)
            boxes, lmk, has = s.boxes * scale, s.landmarks * scale, s.has_landmarks
        x = (x - mean) / np.asarray(self.spec.std, np.float32)
        t = {"boxes": torch.from_numpy(np.ascontiguousarray(boxes / self.size, np.float32)).reshape(-1, 4),
             "landmarks": torch.from_numpy(np.ascontiguousarray(lmk / self.size, np.float32)).reshape(-1, 10),
             "has_landmarks": torch.from_numpy(np.asarray(has, bool))}
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), t


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]
