"""AFLW2000-3D: 2D NME of facial landmarks, per yaw band.

Protocol: the detector runs on the full 450x450 image; the detection matched to the ground
truth is the one whose box best overlaps (IoU) the box of the 68 ground-truth landmarks; none
overlapping is a miss, reported as the miss rate, and the NME is averaged over the faces found.
Per face: mean over points of the (x, y) distance / sqrt(w * h) of the ground-truth landmarks'
box. Bands by |yaw|: [0, 30], (30, 60], (60, 90] degrees; nme_mean is the mean of the three bands.

Without a mesh head, the 5 landmarks are compared with their 68-point counterparts: eye centres
(mean of 36-41 and of 42-47), nose tip (30), mouth corners (48, 54) — the image-left eye first,
as RetinaFace orders them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge.image_io import load_image
from edge.mesh import mesh_to_68
from edge.postprocess import box_iou

BANDS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0 + 1e-6))


def five_from_68(pts68: np.ndarray) -> np.ndarray:
    """(..., 68, 2) -> (..., 5, 2) in RetinaFace's landmark order."""
    return np.stack([
        pts68[..., 36:42, :].mean(-2), pts68[..., 42:48, :].mean(-2), pts68[..., 30, :], pts68[..., 48, :], pts68[..., 54, :],
    ], axis=-2)


def load_labels(data_dir: str | Path) -> dict[str, np.ndarray]:
    d = np.load(Path(data_dir) / "labels.npz")
    return {"names": d["names"], "pts": d["pt3d_68"][:, :2, :].transpose(0, 2, 1).astype(np.float64), "yaw": np.degrees(d["pose_para"][:, 1])}


def nme_per_face(pred: np.ndarray, gt68: np.ndarray, points: int) -> float:
    gt = gt68 if points == 68 else five_from_68(gt68)
    lo, hi = gt68.min(0), gt68.max(0)
    norm = np.sqrt((hi[0] - lo[0]) * (hi[1] - lo[1]))
    return float(np.linalg.norm(pred - gt, axis=1).mean() / norm)


def summarise(nme: np.ndarray, yaw: np.ndarray, found: np.ndarray, points: int) -> dict:
    """nme (N,) per face (NaN where missed), yaw (N,) degrees, found (N,) bool."""
    res = {}
    ay = np.abs(yaw)
    for (lo, hi), key in zip(BANDS, ("nme_0_30", "nme_30_60", "nme_60_90")):
        sel = found & (ay >= lo) & (ay <= hi) if lo == 0 else found & (ay > lo) & (ay <= hi)
        res[key] = float(nme[sel].mean()) if sel.any() else float("nan")
        res[key.replace("nme", "faces")] = int(sel.sum())
    res["nme_mean"] = float(np.mean([res["nme_0_30"], res["nme_30_60"], res["nme_60_90"]]))
    # the worst faces, not only the means: the 99th percentile and the largest NME over every face found
    res["nme_p99"] = float(np.percentile(nme[found], 99)) if found.any() else float("nan")
    res["nme_max"] = float(nme[found].max()) if found.any() else float("nan")
    res["miss_rate"] = float(1.0 - found.mean())
    res["points"] = points
    res["images"] = int(len(found))
    return res


def evaluate(pipeline, data_dir: str | Path, limit: int | None = None, progress: bool = True, teacher=None) -> dict:
    """teacher: a `edge.mesh.MeshTeacher` run on the face the pipeline found (its 468 vertices -> 68 points)."""

    lab = load_labels(data_dir)
    n = len(lab["names"]) if limit is None else min(limit, len(lab["names"]))
    has_mesh = "mesh" in pipeline.spec.output_names or teacher is not None
    points = 68 if has_mesh else 5
    nme = np.full(n, np.nan)
    found = np.zeros(n, dtype=bool)
    for i in tqdm(range(n), desc="aflw2000", unit="img", disable=not progress, mininterval=2.0):
        gt68 = lab["pts"][i]
        img = load_image(Path(data_dir) / "images" / f"{lab['names'][i]}.jpg")
        det = pipeline(img)
        if len(det) == 0:
            continue
        gbox = np.array([[*gt68.min(0), *gt68.max(0)]])
        iou = box_iou(gbox, det.boxes.astype(np.float64))[0]
        j = int(iou.argmax())
        if iou[j] <= 0:
            continue
        found[i] = True
        if has_mesh:
            mesh = teacher(img, det.boxes[j], det.landmarks[j])[0] if teacher is not None else det.mesh[j]
            pred = mesh_to_68(mesh)[:, :2].astype(np.float64)
        else:
            pred = det.landmarks[j].astype(np.float64)
        nme[i] = nme_per_face(pred, gt68, points)
    res = summarise(nme, lab["yaw"][:n], found, points)
    res["compared"] = ("68 points (mesh68) of the MediaPipe teacher's mesh on the faces our detector found" if teacher is not None
                       else "68 points (mesh68) of the mesh" if has_mesh
                       else "5 landmarks vs eye centres, nose tip and mouth corners of the 68")
    return res
