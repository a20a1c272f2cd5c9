"""WIDER FACE evaluation, written from the official protocol (the evaluation kit's
wider_eval / the widely used Python port):

- ground truth from the official .mat files: all boxes from wider_face_val.mat, the keep list
  of each setting (easy / medium / hard) from its gt_list; boxes not in the keep list are
  "ignored": a detection matching one is neither a true nor a false positive;
- scores min-max normalised over the whole run;
- per image, detections in descending score order are matched greedily to the ground-truth box
  of highest IoU (boxes as x, y, w, h; IoU with the kit's "+1" pixel areas), IoU >= 0.5;
- 1,000 thresholds t_k = 1 - (k + 1) / 1000; at each, proposals and recalled faces summed over
  images; precision = recalled / proposals, recall = recalled / keep faces;
- AP: VOC all-point interpolation over the precision envelope.

Only images that were evaluated count (their keep faces form the denominator).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from scipy.io import loadmat
from tqdm import tqdm

from edge.errors import ConfigError

THRESH_NUM = 1000
SETTINGS = ("easy", "medium", "hard")


@dataclass
class WiderGT:
    """Ground truth per image key "event/name": boxes (N, 4) x, y, w, h and keep index arrays (0-based) per setting."""

    boxes: dict[str, np.ndarray] = field(default_factory=dict)
    keep: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def load_gt(gt_dir: str | Path) -> WiderGT:
    gt_dir = Path(gt_dir)
    face = loadmat(gt_dir / "wider_face_val.mat")
    subsets = {s: loadmat(gt_dir / f"wider_{s}_val.mat")["gt_list"] for s in SETTINGS}
    gt = WiderGT()
    for s in SETTINGS:
        gt.keep[s] = {}
    for i, ev in enumerate(face["event_list"]):
        event = str(ev[0][0])
        files = face["file_list"][i][0]
        boxes = face["face_bbx_list"][i][0]
        for j in range(len(files)):
            key = f"{event}/{files[j][0][0]}"
            gt.boxes[key] = boxes[j][0].astype(np.float64).reshape(-1, 4)
            for s in SETTINGS:
                k = subsets[s][i][0][j][0]
                gt.keep[s][key] = (np.asarray(k, dtype=np.int64).ravel() - 1) if np.size(k) else np.zeros(0, np.int64)
    return gt


def bbox_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) x1, y1, x2, y2 -> IoU with the kit's "+1" areas (as its box_overlaps)."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.where((iw > 0) & (ih > 0), iw * ih, 0.0)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(inter > 0, inter / np.where(union > 0, union, 1), 0.0)


def image_eval(pred: np.ndarray, gt: np.ndarray, keep_mask: np.ndarray, iou_thresh: float = 0.5):
    """One image. pred (P, 5) x, y, w, h, score sorted by descending score; gt (G, 4) x, y, w, h;
    keep_mask (G,) bool. Returns (pred_recall (P,): keep faces recalled by preds[:i+1],
    proposal (P,): 1 where pred i counts as a proposal, 0 where it matched an ignored face)."""
    p = pred[:, :4].astype(np.float64).copy()
    g = gt.astype(np.float64).copy()
    p[:, 2:] += p[:, :2]
    g[:, 2:] += g[:, :2]
    ov = bbox_overlaps(p, g)
    best = ov.argmax(axis=1)
    matched = ov[np.arange(len(p)), best] >= iou_thresh
    hits_keep = matched & keep_mask[best]
    proposal = np.where(matched & ~keep_mask[best], 0, 1)
    # a keep face is recalled by the first detection that matches it; later matches add nothing
    first = np.zeros(len(p), dtype=np.int64)
    idx = np.nonzero(hits_keep)[0]
    if idx.size:
        _, first_pos = np.unique(best[idx], return_index=True)
        first[idx[first_pos]] = 1
    return np.cumsum(first), proposal


def img_pr_info(scores: np.ndarray, proposal: np.ndarray, pred_recall: np.ndarray) -> np.ndarray:
    """(THRESH_NUM, 2): proposals and recalled faces among detections with score >= each threshold."""
    thresh = 1 - (np.arange(THRESH_NUM) + 1) / THRESH_NUM
    # scores are descending: the detections above a threshold are a prefix
    n = np.searchsorted(-scores, -thresh, side="right")
    cum_prop = np.concatenate([[0], np.cumsum(proposal)])
    rec = np.concatenate([[0], pred_recall])
    return np.stack([cum_prop[n], rec[n]], axis=1).astype(np.float64)


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def normalise_scores(preds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Min-max normalise column 4 over the whole run (as the kit's norm_score)."""
    all_scores = [p[:, 4] for p in preds.values() if len(p)]
    if not all_scores:
        return preds
    lo = min(0.0 + min(s.min() for s in all_scores), 1.0)
    hi = max(s.max() for s in all_scores)
    diff = hi - lo if hi > lo else 1.0
    out = {}
    for k, p in preds.items():
        q = p.astype(np.float64).copy()
        q[:, 4] = (q[:, 4] - lo) / diff
        out[k] = q
    return out


def evaluate(preds: dict[str, np.ndarray], gt: WiderGT, iou_thresh: float = 0.5) -> dict:
    """preds: key "event/name" -> (P, 5) x, y, w, h, score. Only these images are evaluated.
    Returns {"easy": ap, "medium": ap, "hard": ap, "images": n, "curves": {setting: (prec, rec)}}."""
    unknown = sorted(set(preds) - set(gt.boxes))
    if unknown:
        raise KeyError(f"{len(unknown)} predicted images are not in the ground truth, e.g. {unknown[0]}")
    preds = normalise_scores(preds)
    ordered = {}
    for k, p in preds.items():
        order = np.argsort(-p[:, 4], kind="stable")
        ordered[k] = p[order]
    result: dict = {"curves": {}}
    for s in SETTINGS:
        pr = np.zeros((THRESH_NUM, 2))
        faces = 0
        for k, p in ordered.items():
            keep = gt.keep[s][k]
            faces += len(keep)
            g = gt.boxes[k]
            if len(g) == 0 or len(p) == 0:
                continue
            mask = np.zeros(len(g), dtype=bool)
            mask[keep] = True
            rec, prop = image_eval(p, g, mask, iou_thresh)
            pr += img_pr_info(p[:, 4], prop, rec)
        # no proposals above a threshold: precision undefined, taken as 0 (no effect on the envelope)
        precision = np.divide(pr[:, 1], pr[:, 0], out=np.zeros(THRESH_NUM), where=pr[:, 0] > 0)
        recall = pr[:, 1] / max(faces, 1)
        result[s] = voc_ap(recall, precision)
        result["curves"][s] = (precision, recall)
    result["images"] = len(preds)
    return result


def save_txt(preds: dict[str, np.ndarray], out_dir: str | Path) -> None:
    """The official per-image prediction files: <event>/<name>.txt with name, count, then x y w h score."""
    out_dir = Path(out_dir)
    for k, p in preds.items():
        event, name = k.split("/", 1)
        d = out_dir / event
        d.mkdir(parents=True, exist_ok=True)
        lines = [name, str(len(p))] + [f"{x:.1f} {y:.1f} {w:.1f} {h:.1f} {s:.6f}" for x, y, w, h, s in p]
        (d / f"{name}.txt").write_text("\n".join(lines) + "\n")


def image_list(images_dir: str | Path, list_file: str | Path | None, gt: WiderGT) -> tuple[Path, list[str]]:
    """-> (folder holding <event>/<name>.jpg, keys "event/name"). Accepts the split folder (with
    images/ and dev.txt) or the images folder itself; the list defaults to dev.txt when present,
    else every .jpg found that the ground truth knows."""

    root = Path(images_dir)
    img_root = root / "images" if (root / "images").is_dir() else root
    if not img_root.is_dir():
        raise ConfigError(f"--images {images_dir}: no such folder")
    if list_file is None and (root / "dev.txt").is_file():
        list_file = root / "dev.txt"
    if list_file is not None:
        rels = [l.strip() for l in Path(list_file).read_text().splitlines() if l.strip()]
    else:
        rels = sorted(str(p.relative_to(img_root)) for p in img_root.glob("*/*.jpg"))
    keys = [r[:-4] if r.endswith(".jpg") else r for r in rels]
    keys = [k for k in keys if k in gt.boxes]
    if not keys:
        raise ConfigError(f"no images under {img_root} match the WIDER FACE ground truth")
    return img_root, keys


def predict(pipeline, img_root: Path, keys: list[str], progress: bool = True) -> dict[str, np.ndarray]:
    """Run the pipeline over the images -> key -> (P, 5) x, y, w, h, score (original pixels)."""

    preds = {}
    for k in tqdm(keys, desc="widerface", unit="img", disable=not progress, mininterval=2.0):
        det = pipeline(img_root / f"{k}.jpg")
        b = det.boxes.astype(np.float64)
        preds[k] = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2], det.scores[:, None]], axis=1)
    return preds


def plot_pr(result: dict, out: str | Path, title: str) -> None:
    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for s in SETTINGS:
        prec, rec = result["curves"][s]
        ax.plot(rec, prec, label=f"{s}: AP {100 * result[s]:.2f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
