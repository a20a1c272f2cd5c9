"""`edge train mesh`: the low-rank mesh head, distilled from MediaPipe's face-landmark model.

1. Pseudo-labels: the FP32 detector finds faces (640 letterbox, score >= 0.9, box >= 40 px in the image);
   the teacher (`edge.mesh.MeshTeacher`) runs on each; confident meshes (face flag >= 0.9) are kept, in image
   pixels, cached in an .npz.
2. The head: per anchor a code of `rank` values; a linear basis (mean + code @ basis) decodes the encoded
   vertices of kept faces (x, y relative to the anchor centre over the anchor size and variance; z over the
   anchor width). Mean and basis start from a PCA of the encoded targets; the head starts at zero.
3. Loss (the paper's mesh loss): L1 on the encoded vertices plus `edge_weight` x L1 on the lengths of the
   mesh's edges, on anchors matched to pseudo-labelled faces. The detector stays frozen.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge.atomic import atomic_file
from edge.errors import ConfigError
from edge.evaluate.teacher import MeshTeacher
from edge.image_io import load_image
from edge.mesh import MESH_VERTICES, mesh_edges
from edge.model import RetinaFace
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import box_iou
from edge.preprocess import letterbox_float
from edge.runners import TorchRunner
from edge.train.augment import FLIP_ORDER, AugmentConfig, augment
from edge.train.data import EpochDataset
from edge.train.multibox import match
from edge.weights.fetch import sha256_file
from edge.weights.registry import MESH_KEYS


@dataclass
class MeshSample:
    path: str
    boxes: np.ndarray  # (N, 4) float32 image pixels
    landmarks: np.ndarray  # (N, 5, 2)
    meshes: np.ndarray  # (N, 468, 3) float32 image pixels

    def __len__(self) -> int:
        return len(self.boxes)


def build_pseudo_labels(paths: list[Path], root: Path, detector, *, min_face: float = 40.0, min_score: float = 0.9,
                        min_flag: float = 0.9, progress: bool = True) -> tuple[list[MeshSample], dict]:
    pipe = Pipeline(TorchRunner(detector), detector.spec.with_input_size(640), PostConfig(min_score, 0.4))
    teacher = MeshTeacher()
    out, stats = [], {"images": 0, "faces_seen": 0, "faces_kept": 0}
    for p in tqdm(paths, desc="pseudo-labels", disable=not progress, mininterval=2.0):
        img = load_image(p)
        det = pipe(img)
        stats["images"] += 1
        keep_b, keep_l, keep_m = [], [], []
        for b, lm in zip(det.boxes, det.landmarks):
            if min(b[2] - b[0], b[3] - b[1]) < min_face:
                continue
            stats["faces_seen"] += 1
            mesh, flag = teacher(img, b, lm)
            if flag >= min_flag:
                keep_b.append(b), keep_l.append(lm), keep_m.append(mesh)
        if keep_b:
            stats["faces_kept"] += len(keep_b)
            out.append(MeshSample(str(p.relative_to(root)), np.array(keep_b, np.float32), np.array(keep_l, np.float32),
                                  np.array(keep_m, np.float32)))
    return out, stats


def save_labels(samples: list[MeshSample], path: Path, meta: dict) -> None:
    counts = np.array([len(s) for s in samples], np.int64)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, paths=np.array([s.path for s in samples]), counts=counts,
                            boxes=np.concatenate([s.boxes for s in samples]), landmarks=np.concatenate([s.landmarks for s in samples]),
                            meshes=np.concatenate([s.meshes for s in samples]), meta=json.dumps(meta))


def load_labels(path: Path, vertices: int = MESH_VERTICES) -> list[MeshSample]:
    """The pseudo-labels of `save_labels`; a file of another topology (vertex count) is refused, naming both."""
    try:
        with np.load(path, allow_pickle=False) as z:  # each z[key] decompresses the array: read each once
            d = {k: z[k] for k in ("paths", "counts", "boxes", "landmarks", "meshes")}
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot read mesh labels {path}: {str(e).splitlines()[0][:120]}") from None
    m = d["meshes"]
    if m.ndim != 3 or m.shape[1:] != (vertices, 3):
        raise ConfigError(f"mesh labels {path} hold meshes of shape {tuple(m.shape[1:])}; this head needs ({vertices}, 3) "
                          f"({vertices} vertices, the MediaPipe topology)")
    if int(d["counts"].sum()) != len(m) or len(d["boxes"]) != len(m) or len(d["landmarks"]) != len(m):
        raise ConfigError(f"mesh labels {path}: {int(d['counts'].sum())} faces counted, {len(m)} meshes, "
                          f"{len(d['boxes'])} boxes, {len(d['landmarks'])} landmark sets")
    ends = np.cumsum(d["counts"])
    starts = ends - d["counts"]
    return [MeshSample(str(p), d["boxes"][a:b], d["landmarks"][a:b], d["meshes"][a:b])
            for p, a, b in zip(d["paths"], starts, ends)]


def mean_face(samples: list[MeshSample]) -> np.ndarray:
    """(468, 3) the average of the labelled meshes, each centred on its box and divided by its width: the
    reference shape from which the mirror pairs are derived (`edge.mesh.mirror_vertices`)."""
    acc, n = np.zeros((MESH_VERTICES, 3)), 0
    for s in samples:
        for b, m in zip(s.boxes, s.meshes):
            w = max(float(b[2] - b[0]), 1e-6)
            c = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, 0.0])
            acc += (m - c) / w
            n += 1
    if not n:
        raise ConfigError("no labelled faces to derive the mesh's mirror pairs from")
    return acc / n


class MeshDataset(EpochDataset):
    """(3, S, S) network input and targets: boxes (N, 4) and meshes (N, 468, 3) normalised by S."""

    def __init__(self, samples: list[MeshSample], root: Path, spec, size: int, seed: int = 0, augment: bool = True,
                 mirror: np.ndarray | None = None):
        """mirror: (468,) the vertex each vertex becomes in a mirrored face (`edge.mesh.mirror_vertices`); with it,
        half the samples are flipped (landmarks and mesh vertices swapped left for right), without it none."""
        self.samples, self.root, self.spec, self.size, self.seed, self.epoch = samples, Path(root), spec, size, seed, 0
        self.cfg = AugmentConfig(flip=0.5 if mirror is not None else 0.0) if augment else None
        self.mirror = mirror
        self.order = None if mirror is None else np.concatenate([FLIP_ORDER, 5 + np.asarray(mirror)])

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(self.root / s.path)
        mean = np.asarray(self.spec.mean, np.float32)
        pts = np.concatenate([s.landmarks, s.meshes[..., :2]], axis=1)
        z = s.meshes[..., 2]
        if self.cfg is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            # z rides along as a third "point" coordinate set: crops shift x, y only; scale applies to all
            x, boxes, pts_out, keep_has, scale, flipped = augment(img, s.boxes, pts, np.arange(len(s)), self.size, rng, self.cfg,
                                                                  mean, flip_order=self.order if self.order is not None else FLIP_ORDER)
            z = z[keep_has] * scale
            if flipped:  # depth does not change sign in a horizontal mirror; it moves with its vertex
                z = z[:, self.mirror]
        else:
            x, scale = letterbox_float(img, self.size, mean)
            boxes, pts_out, z = s.boxes * scale, pts * scale, z * scale
        meshes = np.concatenate([pts_out[:, 5:], z[..., None]], axis=-1) / self.size
        x = (x - mean) / np.asarray(self.spec.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes / self.size, np.float32)).reshape(-1, 4),
            "meshes": torch.from_numpy(np.ascontiguousarray(meshes, np.float32)).reshape(-1, MESH_VERTICES, 3)}


def encode_mesh(meshes: torch.Tensor, pri: torch.Tensor, var) -> torch.Tensor:
    """(P, V, 3) normalised vertices, (P, 4) anchors -> (P, 3V) encoded like the landmarks (z over the anchor width)."""
    xy = (meshes[..., :2] - pri[:, None, :2]) / (var[0] * pri[:, None, 2:])
    z = meshes[..., 2:] / (var[0] * pri[:, None, 2:3])
    return torch.cat([xy, z], dim=-1).reshape(len(meshes), -1)


def matched_targets(out_mesh: torch.Tensor, targets, pri: torch.Tensor, var, cfg):
    """Codes of positive anchors (P, K) and their encoded target meshes (P, 3V). Targets without "meshes" are
    skipped; with "has_mesh" (N,) bool, only anchors of faces that have a mesh count."""

    codes, tgts = [], []
    for i, t in enumerate(targets):
        if t["boxes"].numel() == 0 or "meshes" not in t:
            continue
        lab, idx = match(t["boxes"], pri, cfg)
        pos = lab == 1
        if "has_mesh" in t:
            pos &= t["has_mesh"][idx]
        if pos.any():
            codes.append(out_mesh[i][pos])
            tgts.append(encode_mesh(t["meshes"][idx[pos]], pri[pos], var))
    if not codes:
        return None, None
    return torch.cat(codes), torch.cat(tgts)


def mesh_loss(pred: torch.Tensor, target: torch.Tensor, edges: torch.Tensor, edge_weight: float) -> tuple[torch.Tensor, dict]:
    """pred, target (P, 3V) encoded vertices -> L1 vertex term + edge_weight x L1 edge-length term."""
    p, t = pred.reshape(len(pred), -1, 3), target.reshape(len(target), -1, 3)
    vert = (p - t).abs().mean()
    lp = (p[:, edges[:, 0]] - p[:, edges[:, 1]]).norm(dim=-1)
    lt = (t[:, edges[:, 0]] - t[:, edges[:, 1]]).norm(dim=-1)
    edge = (lp - lt).abs().mean()
    return vert + edge_weight * edge, {"vertex": vert.item(), "edge": edge.item(), "positives": len(pred)}


def pca_init(model, dataset, pri, var, cfg, rank: int, max_rows: int = 8000) -> dict:
    """mesh_mean and mesh_basis from a PCA of encoded targets on positive anchors (no augmentation)."""
    rows, n = [], 0
    with torch.no_grad():
        for i in range(len(dataset)):
            _, t = dataset[i]
            if t["boxes"].numel() == 0:
                continue

            lab, idx = match(t["boxes"], pri, cfg)
            pos = lab == 1
            if pos.any():
                rows.append(encode_mesh(t["meshes"][idx[pos]], pri[pos], var))
                n += int(pos.sum())
            if n >= max_rows:
                break
    x = torch.cat(rows)[:max_rows].double()
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    scale = s[:rank] / np.sqrt(len(x))
    with torch.no_grad():
        model.mesh_mean.copy_(mean.float())
        model.mesh_basis.copy_((vt[:rank] * scale[:, None]).float())
        for h in model.MeshHead:
            torch.nn.init.zeros_(h.conv1x1.weight)
            torch.nn.init.zeros_(h.conv1x1.bias)
    explained = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    # the variance is dominated by where the face sits relative to its anchor; the residual of the
    # projection, as a share of the targets' spread (both mean |.| in encoded units), says more
    xc = x - mean
    resid = xc - (xc @ vt[:rank].T) @ vt[:rank]
    return {"rows": len(x), "explained_variance": explained,
            "residual_share": float(resid.abs().mean() / xc.abs().mean())}


def with_mesh_head(detector, rank: int, tower: int = 0):
    """A copy of `detector` with a fresh low-rank mesh head (the detector's tensors copied); tower: the head's
    depthwise-separable blocks before its 1x1 convolution (`edge.model._TowerHead`)."""

    spec = dataclasses.replace(detector.spec, mesh_vertices=MESH_VERTICES, mesh_rank=rank, mesh_tower=tower)
    model = RetinaFace(spec)
    state = {k: v for k, v in detector.state_dict().items() if not k.startswith(MESH_KEYS)}  # a previous mesh head goes
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(MESH_KEYS) for k in missing), missing
    return model


def save_mesh_head(model, path: Path) -> str:
    """Write the mesh head's tensors (MeshHead.*, mesh_mean, mesh_basis) as a float16 .npz, the form the
    weights registry ships; -> its SHA-256."""

    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{k: v.detach().cpu().numpy().astype(np.float16)
                                  for k, v in model.state_dict().items() if k.startswith(MESH_KEYS)})
    return sha256_file(path)


def _collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def mesh_nme_on(model, samples, root: Path, size: int) -> dict:
    """Mean vertex distance (x, y) between the student's mesh and the teacher's, over sqrt(w * h) of the
    teacher mesh's box, on the faces the student finds (IoU > 0.5 with the pseudo-label box); "edge": the
    mean error of the mesh's edge lengths (x, y) on the same scale (the shape, regardless of placement)."""

    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(size), PostConfig(0.5, 0.4))
    errs, edge_errs, missed = [], [], 0
    e = mesh_edges()
    for s in samples:
        det = pipe(load_image(root / s.path))
        for b, m in zip(s.boxes, s.meshes):
            iou = box_iou(b[None].astype(np.float64), det.boxes.astype(np.float64))[0] if len(det) else np.zeros(0)
            if not len(iou) or iou.max() <= 0.5:
                missed += 1
                continue
            pred = det.mesh[int(iou.argmax())][:, :2]
            lo, hi = m[:, :2].min(0), m[:, :2].max(0)
            norm = np.sqrt(np.prod(hi - lo))
            errs.append(float(np.linalg.norm(pred - m[:, :2], axis=1).mean() / norm))
            lp = np.linalg.norm(pred[e[:, 0]] - pred[e[:, 1]], axis=1)
            lt = np.linalg.norm(m[e[:, 0], :2] - m[e[:, 1], :2], axis=1)
            edge_errs.append(float(np.abs(lp - lt).mean() / norm))
    return {"nme": float(np.mean(errs)) if errs else float("nan"), "edge": float(np.mean(edge_errs)) if edge_errs else float("nan"),
            "nme_p99": float(np.percentile(errs, 99)) if errs else float("nan"),
            "nme_max": float(np.max(errs)) if errs else float("nan"), "faces": len(errs), "missed": missed}


