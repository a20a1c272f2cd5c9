"""The one input/output contract of the detector.

Everything downstream (pipeline, converters, parity, evaluators, benchmarks) reads the model's
`ModelSpec`; nothing re-derives input layout, normalisation, anchors or output shapes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRIDES = (8, 16, 32)
# Largest square input side accepted. 4096^2 is 16.8 M pixels, past every camera frame the detector is used on;
# the first feature map alone is 0.5 GB of float32 there, and larger sides only run out of memory.
MAX_INPUT_SIZE = 4096
STRIDES_P2_P6 = (4, 8, 16, 32, 64)
# Per-anchor width of each raw output, in the order the model returns them.
OUTPUT_WIDTHS = {"loc": 4, "conf": 2, "landmarks": 10}
# The cascade's second stage: the same outputs, encoded against the first stage's decoded boxes.
CASCADE_WIDTHS = {"loc2": 4, "conf2": 2, "landmarks2": 10}


@dataclass(frozen=True)
class ArchConfig:
    """What distinguishes two checkpoints of the same network.

    name: registry key of the configuration.
    leaky_slope: negative slope of every activation; 0.0 means plain ReLU.
    min_sizes: anchor sizes in input pixels, one tuple per pyramid level.
    steps: the levels' strides: (8, 16, 32) for P3-P5, (4, 8, 16, 32, 64) for the P2-P6 variant.
    cascade: a second stage of heads regressing from the first stage's boxes (outputs loc2, conf2, landmarks2).
    """

    name: str
    leaky_slope: float
    min_sizes: tuple[tuple[int, ...], ...]
    steps: tuple[int, ...] = STRIDES
    cascade: bool = False

    def __post_init__(self):
        if len(self.steps) != len(self.min_sizes) or tuple(self.steps) not in (STRIDES, STRIDES_P2_P6):
            raise ValueError(f"steps must be {STRIDES} or {STRIDES_P2_P6}, one per min_sizes level; got {self.steps}")

    @property
    def anchors_per_cell(self) -> int:
        counts = {len(s) for s in self.min_sizes}
        if len(counts) != 1:
            raise ValueError(f"every level needs the same number of anchors, got {self.min_sizes}")
        return counts.pop()


# Pytorch_Retinaface (biubug6) mobilenet0.25: LeakyReLU 0.1 everywhere, anchors 16..512.
PYTORCH_RETINAFACE = ArchConfig("pytorch_retinaface", 0.1, ((16, 32), (64, 128), (256, 512)))
# Face-Detector-1MB-with-landmark's RetinaFace: plain ReLU, smaller anchors 10..256.
FACE_DETECTOR_1MB = ArchConfig("face_detector_1mb", 0.0, ((10, 20), (32, 64), (128, 256)))
# Training configurations from the paper (RetinaFace, CVPR 2020), measured against the default (README, Training):
# a 5-level pyramid P2-P6 with three anchor scales per level (2^(k/3)), 16..406 px ...
PYRAMID_P2_P6 = ArchConfig("pytorch_retinaface_p2p6", 0.1,
                           ((16, 20, 25), (32, 40, 51), (64, 81, 102), (128, 161, 203), (256, 323, 406)), STRIDES_P2_P6)
# ... and the two-stage cascade on the default's levels and anchors.
CASCADE = ArchConfig("pytorch_retinaface_cascade", 0.1, PYTORCH_RETINAFACE.min_sizes, STRIDES, cascade=True)
ARCHS = {a.name: a for a in (PYTORCH_RETINAFACE, FACE_DETECTOR_1MB, PYRAMID_P2_P6, CASCADE)}


@dataclass(frozen=True)
class ModelSpec:
    """Input/output contract of one RetinaFace model.

    Input: float32 NCHW, channels BGR, value = pixel (0..255) - mean, divided by std.
    H and W are multiples of 32 (the largest stride), so every pyramid level divides exactly.
    Outputs (A = number of anchors for the input size, see `num_anchors`):
      loc (B, A, 4) float32: box offsets, encoded with `variances` against the anchors.
      conf (B, A, 2) float32: softmax probabilities (background, face).
      landmarks (B, A, 10) float32: 5 points (x, y) encoded like box centres.
      mesh (B, A, 3 * mesh_vertices) when the model has a full mesh head, or (B, A, mesh_rank) with a
        low-rank head: a per-anchor code that the weights' linear basis decodes (for kept faces only).
    """

    arch: ArchConfig = PYTORCH_RETINAFACE
    input_size: int | None = 640  # square letterbox side; None = native size padded to 32
    layout: str = "NCHW"
    channel_order: str = "BGR"
    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    steps: tuple[int, ...] | None = None  # None: the configuration's strides
    variances: tuple[float, float] = (0.1, 0.2)
    fpn_channels: int = 64
    mesh_vertices: int = 0  # 0: no mesh head
    mesh_rank: int = 0  # 0: 3 * mesh_vertices values per anchor; > 0: a code of this width per anchor
    mesh_tower: int = 0  # depthwise-separable 3x3 blocks before the mesh head's 1x1 convolution, per level
    pad_multiple: int | None = None  # None: the largest stride

    def __post_init__(self):
        if self.steps is None:
            object.__setattr__(self, "steps", tuple(self.arch.steps))
        if tuple(self.steps) != tuple(self.arch.steps):
            raise ValueError(f"steps {self.steps} do not match configuration {self.arch.name} ({self.arch.steps})")
        if self.pad_multiple is None:
            object.__setattr__(self, "pad_multiple", max(self.steps))

    @property
    def output_names(self) -> tuple[str, ...]:
        names = tuple(OUTPUT_WIDTHS) + (tuple(CASCADE_WIDTHS) if self.arch.cascade else ())
        return names + ("mesh",) if self.mesh_vertices else names

    def output_width(self, name: str) -> int:
        if name == "mesh":
            return self.mesh_rank or 3 * self.mesh_vertices
        return {**OUTPUT_WIDTHS, **CASCADE_WIDTHS}[name]

    def num_anchors(self, height: int, width: int) -> int:
        """Anchors for an input of height x width (both multiples of `pad_multiple`)."""
        cells = sum(-(-height // s) * -(-width // s) for s in self.steps)
        return cells * self.arch.anchors_per_cell

    def output_shapes(self, height: int, width: int, batch: int = 1) -> dict[str, tuple[int, int, int]]:
        a = self.num_anchors(height, width)
        return {n: (batch, a, self.output_width(n)) for n in self.output_names}

    def with_input_size(self, input_size: int | None) -> "ModelSpec":
        return dataclasses.replace(self, input_size=input_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output_names"] = list(self.output_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Inverse of `to_dict`; raises ValueError/TypeError/KeyError on anything malformed."""

        def numbers(v, n, kind=float):
            if not isinstance(v, (list, tuple)) or len(v) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ValueError(f"expected {n} numbers, got {v!r}"[:100])
            return tuple(kind(x) for x in v)

        if not isinstance(d, dict):
            raise TypeError("spec must be an object")
        d = dict(d)
        d.pop("output_names", None)
        a = d.pop("arch")
        sizes = a["min_sizes"]
        if not isinstance(sizes, (list, tuple)) or len(sizes) not in (len(STRIDES), len(STRIDES_P2_P6)):
            raise ValueError(f"min_sizes must list {len(STRIDES)} or {len(STRIDES_P2_P6)} levels")
        min_sizes = tuple(numbers(s, len(s) if isinstance(s, (list, tuple)) and s else -1, int) for s in sizes)
        if not isinstance(a["name"], str) or not isinstance(a["leaky_slope"], (int, float)):
            raise ValueError("arch name/leaky_slope malformed")
        steps = numbers(d["steps"], len(min_sizes), int)
        cascade = a.get("cascade", False)
        if not isinstance(cascade, bool):
            raise ValueError("arch cascade must be true or false")
        arch = ArchConfig(a["name"], float(a["leaky_slope"]), min_sizes, steps, cascade)
        d["mean"], d["std"] = numbers(d["mean"], 3), numbers(d["std"], 3)
        d["steps"], d["variances"] = steps, numbers(d["variances"], 2)
        for k in ("fpn_channels", "mesh_vertices", "mesh_rank", "mesh_tower", "pad_multiple"):
            if k in d and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0):
                raise ValueError(f"{k} must be a non-negative integer")
        if d.get("input_size") is not None and (not isinstance(d["input_size"], int) or isinstance(d["input_size"], bool)):
            raise ValueError("input_size must be an integer or null")
        for k in ("layout", "channel_order"):
            if k in d and not isinstance(d[k], str):
                raise ValueError(f"{k} must be a string")
        return cls(arch=arch, **d)
