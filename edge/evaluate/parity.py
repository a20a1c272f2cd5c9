"""Parity building blocks: tensor-level errors and detection matching against the reference."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from edge.bundle import load_bundle_runner, read_metadata
from edge.contract import ModelSpec
from edge.draw import draw_detections, face_crop
from edge.errors import BundleError, ConfigError
from edge.image_io import image_files, load_image
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import Detections, box_iou
from edge.runners import TorchRunner
from edge.samples import parity_images
from edge.weights.load import load_weights
from edge.weights.registry import REGISTRY


def tensor_errors(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs error and SNR in dB (10 log10 of signal power over error power)."""
    out = {}
    for k, r in ref.items():
        c = cand[k].astype(np.float64)
        r = r.astype(np.float64)
        err = c - r
        noise = float(np.mean(err ** 2))
        signal = float(np.mean(r ** 2))
        snr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
        out[k] = {"max_abs": float(np.abs(err).max()), "snr_db": snr}
    return out


def match(ref: Detections, cand: Detections, iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching (Hungarian on IoU). Returns (ref_idx, cand_idx, iou) of pairs with IoU >= threshold."""
    if len(ref) == 0 or len(cand) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(ref.boxes.astype(np.float64), cand.boxes.astype(np.float64))
    r, c = linear_sum_assignment(-iou)
    ok = iou[r, c] >= iou_threshold
    return r[ok], c[ok], iou[r, c][ok]


def face_size(boxes: np.ndarray) -> np.ndarray:
    w = np.clip(boxes[:, 2] - boxes[:, 0], 1e-6, None)
    h = np.clip(boxes[:, 3] - boxes[:, 1], 1e-6, None)
    return np.sqrt(w * h)


def detection_agreement(ref: Detections, cand: Detections, iou_threshold: float = 0.5, ref_at_cand: Detections | None = None) -> dict:
    """Recall/precision of the candidate against the reference, and errors of the matched pairs
    (landmark and mesh NME normalised by sqrt(w h) of the reference box).

    ref_at_cand: the reference's faces decoded at the candidate's anchors (aligned with `cand`). With it the
    errors are also measured anchor for anchor (`*_at_anchor`), and pairs whose faces were kept on different
    anchors are counted (`anchor_switches`): two near-equal anchors of one face can swap places in NMS after a
    tiny score change, and then the matched pair compares two anchors' predictions, not the candidate's error."""
    ri, ci, iou = match(ref, cand, iou_threshold)
    res = {"ref_faces": len(ref), "cand_faces": len(cand), "matched": len(ri),
           "recall": float(len(ri) / len(ref)) if len(ref) else 1.0,
           "precision": float(len(ri) / len(cand)) if len(cand) else 1.0,
           "iou": iou.tolist(), "pairs": [[int(a), int(b)] for a, b in zip(ri, ci)]}
    if len(ri):
        norm = face_size(ref.boxes[ri])
        res["score_abs_err"] = np.abs(ref.scores[ri] - cand.scores[ci]).tolist()
        res["landmark_nme"] = (np.linalg.norm(ref.landmarks[ri] - cand.landmarks[ci], axis=-1).mean(-1) / norm).tolist()
        if ref.mesh is not None and cand.mesh is not None:
            res["mesh_nme"] = (np.linalg.norm(ref.mesh[ri][..., :2] - cand.mesh[ci][..., :2], axis=-1).mean(-1) / norm).tolist()
        if ref_at_cand is not None and ref.anchors is not None and cand.anchors is not None:
            at = ref_at_cand.take(ci)
            res["anchor_switches"] = int(np.sum(ref.anchors[ri] != cand.anchors[ci]))
            res["switched"] = (ref.anchors[ri] != cand.anchors[ci]).tolist()
            res["landmark_nme_at_anchor"] = (np.linalg.norm(at.landmarks - cand.landmarks[ci], axis=-1).mean(-1) / norm).tolist()
            if at.mesh is not None and cand.mesh is not None:
                res["mesh_nme_at_anchor"] = (np.linalg.norm(at.mesh[..., :2] - cand.mesh[ci][..., :2], axis=-1).mean(-1) / norm).tolist()
    return res


# --- the harness -------------------------------------------------------------------------------

GATES_FILE = Path(__file__).parents[1] / "parity_gates.json"  # edge/parity_gates.json, the reviewed bounds


def load_gates(target: str, precision: str) -> dict:
    """The reviewed bounds for one target x precision (defaults per precision, overridden per target)."""
    doc = json.loads(GATES_FILE.read_text())
    g = dict(doc["defaults"][precision])
    g.update(doc["targets"].get(target, {}).get(precision, {}))
    g = {k: v for k, v in g.items() if not k.startswith("_")}
    g["score_threshold"] = doc["score_threshold"]
    g["match_iou"] = doc["match_iou"]
    return g


@dataclass
class ImageParity:
    name: str
    agreement: dict
    tensors: dict
    signal: dict  # per output: (sum of squares of reference, sum of squared error, count)


@dataclass
class ParityReport:
    target: str
    precision: str
    reference_device: str
    candidate: str
    images: list[ImageParity] = field(default_factory=list)

    def summary(self) -> dict:
        ref_faces = sum(i.agreement["ref_faces"] for i in self.images)
        cand_faces = sum(i.agreement["cand_faces"] for i in self.images)
        matched = sum(i.agreement["matched"] for i in self.images)
        ious, serr, lmk = self.values("iou"), self.values("score_abs_err"), self.values("landmark_nme")
        has_mesh = any("mesh_nme" in i.agreement for i in self.images)
        mesh = self.values("mesh_nme") if has_mesh else None
        by_anchor = all("landmark_nme_at_anchor" in i.agreement for i in self.images if i.agreement["matched"])
        lmk_at = self.values("landmark_nme_at_anchor") if by_anchor else lmk
        mesh_at = (self.values("mesh_nme_at_anchor") if by_anchor else mesh) if has_mesh else None
        switched = self.values("switched").astype(bool) if by_anchor else None  # aligned with `ious`
        tensors = {}
        for name in (self.images[0].tensors if self.images else {}):
            sig = sum(i.signal[name][0] for i in self.images)
            err = sum(i.signal[name][1] for i in self.images)
            tensors[name] = {"max_abs": max(i.tensors[name]["max_abs"] for i in self.images),
                             "snr_db": float("inf") if err == 0 else float(10 * np.log10(sig / err))}
        return {
            "target": self.target, "precision": self.precision, "reference_device": self.reference_device,
            "candidate": self.candidate, "images": len(self.images), "ref_faces": ref_faces, "cand_faces": cand_faces,
            # the faces on which the two disagree, each side: a shift of the candidate's scores trades one for the
            # other (recall up, precision down), their sum does not move with it
            "missed_faces": ref_faces - matched, "extra_faces": cand_faces - matched,
            "recall": matched / ref_faces if ref_faces else 1.0,
            "precision_vs_ref": matched / cand_faces if cand_faces else 1.0,
            "mean_iou": float(ious.mean()) if ious.size else None,
            "min_iou": float(ious.min()) if ious.size else None,
            "score_mae": float(serr.mean()) if serr.size else None,
            "landmark_nme": float(lmk.mean()) if lmk.size else None,
            "mesh_nme": float(mesh.mean()) if mesh is not None and mesh.size else None,
            # the worst faces, measured anchor for anchor where the anchors are known (see detection_agreement)
            "errors_by_anchor": by_anchor,
            "landmark_nme_p99": _p99(lmk_at),
            "landmark_nme_max": float(lmk_at.max()) if lmk_at.size else None,
            "mesh_nme_p99": _p99(mesh_at) if mesh_at is not None else None,
            "mesh_nme_max": float(mesh_at.max()) if mesh_at is not None and mesh_at.size else None,
            "anchor_switches": sum(i.agreement.get("anchor_switches", 0) for i in self.images) if by_anchor else None,
            # mean IoU of the pairs kept on the reference's anchor and of the switched ones (which compare two anchors'
            # boxes of one face): how much of the mean IoU's gap is the candidate's error, how much NMS's choice
            "mean_iou_same_anchor": _mean(ious[~switched]) if by_anchor else None,
            "mean_iou_switched": _mean(ious[switched]) if by_anchor else None,
            "switched_mesh_nme_max": _switched_max(self.images) if by_anchor and has_mesh else None,
            "tensors": tensors,
            "worst_images": [w.name for w in self.worst(3)],
        }

    def values(self, key: str) -> np.ndarray:
        """One agreement list (per matched pair) over all images."""
        return np.concatenate([np.asarray(i.agreement.get(key, []), float) for i in self.images]) if self.images else np.zeros(0)

    def worst(self, k: int = 3) -> list[ImageParity]:
        def key(i: ImageParity):
            a = i.agreement
            return (a["recall"], a["precision"], float(np.mean(a["iou"])) if a["iou"] else 1.0)

        return sorted(self.images, key=key)[:k]


def _worst_faces(rep: ParityReport, dets: dict, images: dict, png: Path, k: int = 6) -> str | None:
    """A grid of the k matched faces with the largest mesh NME (landmark NME without a mesh), reference and
    candidate side by side, zoomed so that mesh and landmarks can be told apart. Returns the file name."""

    key = "mesh_nme" if any("mesh_nme" in i.agreement for i in rep.images) else "landmark_nme"
    faces = [(v, i, n) for i in rep.images for n, v in enumerate(i.agreement.get(key, []))]
    faces = sorted(faces, key=lambda f: -f[0])[:k]
    if not faces:
        return None
    size, pad, label = 224, 6, 18
    grid = Image.new("RGB", (2 * size + 3 * pad, len(faces) * (size + label + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, (v, im, n) in enumerate(faces):
        ref, cand = dets[im.name]
        ri, ci = im.agreement["pairs"][n]
        y = pad + row * (size + label + pad)
        switched = im.agreement.get("switched", [False] * (n + 1))[n]
        at = im.agreement.get(key + "_at_anchor")
        text = f"{Path(im.name).name}  {key.replace('_', ' ')} {v:.3f}" + (f" (same anchor {at[n]:.3f})" if at else "")
        draw.text((pad, y), text + ("  ANCHOR SWITCH" if switched else ""), fill=(0, 0, 0))
        box = ref.boxes[ri]
        grid.paste(face_crop(images[im.name], box, [(ref.take([ri]), (0, 255, 0))], size), (pad, y + label))
        grid.paste(face_crop(images[im.name], box, [(cand.take([ci]), (255, 0, 255))], size), (2 * pad + size, y + label))
    grid.save(png)
    return png.name


def _mean(v: np.ndarray) -> float | None:
    return float(v.mean()) if v.size else None


def _p99(v: np.ndarray) -> float | None:
    return float(np.percentile(v, 99)) if v.size else None


def _switched_max(images) -> float | None:
    """The largest mesh NME between the reference's face and the candidate's kept on another anchor."""
    v = [m for i in images for m, s in zip(i.agreement.get("mesh_nme", []), i.agreement.get("switched", [])) if s]
    return float(max(v)) if v else None


def check_gates(summary: dict, gates: dict) -> list[str]:
    """Names of the failed bounds, with the measured value ([] = passed)."""
    failed = []
    checks = [("recall", "recall_min", 1), ("precision_vs_ref", "precision_min", 1), ("mean_iou", "mean_iou_min", 1),
              ("min_iou", "min_iou_min", 1), ("score_mae", "score_mae_max", -1), ("landmark_nme", "landmark_nme_max", -1),
              ("mesh_nme", "mesh_nme_max", -1), ("landmark_nme_p99", "landmark_nme_p99_max", -1),
              ("mesh_nme_p99", "mesh_nme_p99_max", -1)]
    for key, bound, sign in checks:
        v = summary.get(key)
        if v is None or bound not in gates:
            continue
        if (sign > 0 and v < gates[bound]) or (sign < 0 and v > gates[bound]):
            failed.append(f"{key} {v:.4f} {'<' if sign > 0 else '>'} {gates[bound]}")
    if summary["ref_faces"] == 0:
        failed.append("the reference found no faces: nothing was compared")
    return failed


def compare(reference, candidate, spec, images, *, target: str, precision: str, reference_device: str,
            score_threshold: float = 0.5, match_iou: float = 0.5, progress: bool = False) -> tuple[ParityReport, dict]:
    """Run reference and candidate runners through the same pipeline on `images` ((name, BGR array)
    pairs). Returns the report and the detections per image (for pictures)."""

    post = PostConfig(score_threshold=score_threshold)
    rp, cp = Pipeline(reference, spec, post), Pipeline(candidate, spec, post)
    rep = ParityReport(target, precision, reference_device, getattr(candidate, "name", "candidate"))
    dets = {}
    for name, im in tqdm(images, desc="parity", unit="img", disable=not progress):
        prep = rp.preprocess(im)
        a, b = rp.infer(prep), cp.infer(prep)
        ref, cand = rp.postprocess(a, prep), cp.postprocess(b, prep)
        at = rp.faces_at(a, prep, cand.anchors) if cand.anchors is not None else None
        sig = {k: (float(np.sum(a[k].astype(np.float64) ** 2)), float(np.sum((a[k].astype(np.float64) - b[k]) ** 2))) for k in a}
        rep.images.append(ImageParity(name, detection_agreement(ref, cand, match_iou, at), tensor_errors(a, b), sig))
        dets[name] = (ref, cand)
    return rep, dets


def write_report(rep: ParityReport, summary: dict, gates: dict, failed: list[str], dets: dict, images: dict, out_dir: str | Path) -> Path:
    """Markdown report with a summary table, error histograms and overlays of the worst images."""

    matplotlib.use("Agg")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    at = "_at_anchor" if summary.get("errors_by_anchor") else ""
    panels = [("IoU of matched boxes", rep.values("iou"), None),
              ("landmark NME" + (", anchor for anchor" if at else ""), rep.values("landmark_nme" + at), summary.get("landmark_nme_p99"))]
    if summary.get("mesh_nme") is not None:
        panels.append(("mesh-vertex NME" + (", anchor for anchor" if at else ""), rep.values("mesh_nme" + at), summary.get("mesh_nme_p99")))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), dpi=110)
    for ax, (title, v, p99) in zip(np.atleast_1d(axes), panels):
        ax.hist(v, bins=40, color="tab:blue")
        if p99 is not None:
            ax.axvline(p99, color="tab:red", lw=1)
            ax.text(p99, ax.get_ylim()[1] * 0.9, " p99", color="tab:red", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{title} (n={len(v)})", fontsize=9)
        ax.set_ylabel("faces (log)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{rep.target} {rep.precision} vs FP32 reference ({rep.reference_device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "errors.png")
    plt.close(fig)
    worst_pngs = []
    for k, w in enumerate(rep.worst(3)):  # boxes and landmarks only: meshes of a crowd would hide every difference
        ref, cand = dets[w.name]
        png = f"worst_{k + 1}_{Path(w.name).stem}.png"
        draw_detections(images[w.name], [(replace(ref, mesh=None), (0, 255, 0)), (replace(cand, mesh=None), (255, 0, 255))], scores=False).save(out / png)
        worst_pngs.append((w, png))
    faces_png = _worst_faces(rep, dets, images, out / "worst_faces.png")

    def fmt(v, d=4):
        return "null" if v is None else f"{v:.{d}f}"

    lines = [
        f"# Parity: {rep.target} {rep.precision}",
        "",
        f"**{'PASSED' if not failed else 'FAILED'}**" + ("" if not failed else ": " + "; ".join(failed)),
        "",
        f"Reference: FP32 PyTorch on {rep.reference_device}. Candidate: {rep.candidate}. {summary['images']} images, "
        f"faces with score >= {gates['score_threshold']}, matched one-to-one (Hungarian) at IoU >= {gates['match_iou']}.",
        "",
        "| measure | value | gate |",
        "| --- | --- | --- |",
        f"| reference faces / candidate faces | {summary['ref_faces']} / {summary['cand_faces']} | |",
        f"| reference faces missed / candidate faces extra | {summary['missed_faces']} / {summary['extra_faces']} | |",
        f"| recall | {fmt(summary['recall'])} | >= {gates.get('recall_min')} |",
        f"| precision vs reference | {fmt(summary['precision_vs_ref'])} | >= {gates.get('precision_min')} |",
        f"| mean IoU | {fmt(summary['mean_iou'])} | >= {gates.get('mean_iou_min')} |",
        f"| min IoU | {fmt(summary['min_iou'])} | >= {gates.get('min_iou_min')} |",
        f"| score MAE | {fmt(summary['score_mae'])} | <= {gates.get('score_mae_max')} |",
        f"| landmark NME | {fmt(summary['landmark_nme'])} | <= {gates.get('landmark_nme_max')} |",
        f"| mesh NME | {fmt(summary['mesh_nme'])} | <= {gates.get('mesh_nme_max')} |",
        "",
        "| output | max abs error | SNR (dB) |",
        "| --- | --- | --- |",
        *[f"| {n} | {t['max_abs']:.3g} | {t['snr_db']:.1f} |" for n, t in summary["tensors"].items()],
        "",
        "![errors](errors.png)",
        "",
        f"Worst faces: landmark NME p99 {fmt(summary.get('landmark_nme_p99'))} (gate <= {gates.get('landmark_nme_p99_max')}), "
        f"max {fmt(summary.get('landmark_nme_max'))}; mesh NME p99 {fmt(summary.get('mesh_nme_p99'))} "
        f"(gate <= {gates.get('mesh_nme_p99_max')}), max {fmt(summary.get('mesh_nme_max'))}"
        + (" (anchor for anchor: the candidate's face against the reference decoded at the same anchor)." if at else "."),
        "" if summary.get("anchor_switches") is None else
        f"Faces kept on a different anchor than the reference's: {summary['anchor_switches']} of {sum(i.agreement['matched'] for i in rep.images)} "
        f"matched; the largest mesh NME between such a pair is {fmt(summary.get('switched_mesh_nme_max'))} (the model's own "
        "difference between two anchors of one face, not a quantisation error). Mean IoU of the faces kept on the "
        f"reference's anchor {fmt(summary.get('mean_iou_same_anchor'))}, of the switched ones {fmt(summary.get('mean_iou_switched'))}.",
        "",
        *(["## Worst faces (reference left, green; candidate right, magenta)", "", f"![worst faces]({faces_png})", ""] if faces_png else []),
        "## Worst images (reference green, candidate magenta; boxes and landmarks)",
        "",
    ]
    for w, png in worst_pngs:
        a = w.agreement
        lines += [f"### {w.name}: recall {a['recall']:.3f}, precision {a['precision']:.3f}, mean IoU {fmt(float(np.mean(a['iou'])) if a['iou'] else None)}",
                  "", f"![{w.name}]({png})", ""]
    lines += ["## Per image", "", "| image | ref | cand | recall | precision | mean IoU | landmark NME |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for i in rep.images:
        a = i.agreement
        lines.append(f"| {i.name} | {a['ref_faces']} | {a['cand_faces']} | {a['recall']:.3f} | {a['precision']:.3f} | "
                     f"{fmt(float(np.mean(a['iou'])) if a['iou'] else None)} | {fmt(float(np.mean(a['landmark_nme'])) if a.get('landmark_nme') else None)} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def reference_model(meta: dict, weights: str | None = None):
    """The FP32 model the bundle was converted from, checked by SHA-256."""

    w = meta["weights"]
    by_name = w.get("known") and w["name"] in REGISTRY and (w["name"] == "default" or REGISTRY[w["name"]].file)
    source = weights or (w["name"] if by_name else w.get("path") or w["name"])
    try:
        model, info = load_weights(source, arch=None if w.get("known") else w["arch"])
    except Exception as e:  # noqa: BLE001 - re-raised with the bundle's context
        raise BundleError(f"cannot load the bundle's reference weights {source!r} ({e}); pass --weights") from None
    if info.sha256 != w["sha256"]:
        raise BundleError(f"reference weights {source!r} have SHA-256 {info.sha256[:12]}, the bundle was made from {w['sha256'][:12]}")
    return model


def reference_runner(model, device: str):
    """TorchRunner on CUDA when asked and available (TF32 off), else CPU. -> (runner, device used)."""

    if device == "cuda" and torch.cuda.is_available():
        return TorchRunner(model, "cuda"), f"cuda ({torch.cuda.get_device_name(0)}, TF32 disabled)"
    used = "cpu" if device == "cpu" else "cpu (CUDA asked for but not available)"
    return TorchRunner(model, "cpu"), used


def builtin_images(spec) -> list[tuple[str, np.ndarray]]:
    canvases, names = parity_images(spec.input_size, spec.mean)
    return list(zip(names, canvases))


def folder_images(folder: str | Path, limit: int | None) -> list[tuple[str, np.ndarray]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder")
    paths = image_files(folder)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ConfigError(f"--images {folder}: no images found")
    return [(str(p.relative_to(folder)), load_image(p)) for p in paths]


def run_parity(bundle: str | Path, images=None, *, reference_device: str = "cpu", weights: str | None = None,
               runner=None, reference_model_obj=None, meta: dict | None = None, progress: bool = False):
    """-> (summary dict with "passed", report, detections, images dict). `runner`/`reference_model_obj`/`meta`
    let edge-convert check a bundle still in its temporary folder, before its metadata is written."""
    folder, meta = (Path(bundle), meta) if meta is not None else read_metadata(bundle)
    spec = ModelSpec.from_dict(meta["spec"])
    if runner is None:
        runner, spec, _ = load_bundle_runner(folder)
    model = reference_model_obj if reference_model_obj is not None else reference_model(meta, weights)
    ref, used = reference_runner(model, reference_device)
    gates = load_gates(meta["target"], meta["precision"])
    imgs = images if images is not None else builtin_images(spec)
    rep, dets = compare(ref, runner, spec, imgs, target=meta["target"], precision=meta["precision"], reference_device=used,
                        score_threshold=gates["score_threshold"], match_iou=gates["match_iou"], progress=progress)
    summary = rep.summary()
    failed = check_gates(summary, gates)
    summary = {"passed": not failed, "failed": failed, **summary, "gates": gates}
    return summary, rep, dets, dict(imgs)


def model_agreement(images, teacher, student, spec) -> dict:
    """Recall/precision/mean IoU of the student's faces against the teacher's (score 0.5), pooled over images."""

    tp, sp = Pipeline(TorchRunner(teacher), spec), Pipeline(TorchRunner(student), spec)
    ref = cand = matched = 0
    ious = []
    for p in images:
        prep = tp.preprocess(p)
        a = detection_agreement(tp.postprocess(tp.runner(prep.tensor), prep), sp.postprocess(sp.runner(prep.tensor), prep))
        ref, cand, matched = ref + a["ref_faces"], cand + a["cand_faces"], matched + a["matched"]
        ious += a["iou"]
    return {"images": len(images), "teacher_faces": ref, "student_faces": cand, "recall": matched / ref if ref else 1.0,
            "precision": matched / cand if cand else 1.0, "mean_iou": float(np.mean(ious)) if ious else None}
