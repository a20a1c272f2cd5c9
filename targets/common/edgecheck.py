"""On-device parity check: numpy + one runtime + a bundle folder. No torch, no project install.

This file is self-contained on purpose (copy `targets/` and a bundle onto the device). Its
decoding and NMS mirror `edge.anchors` / `edge.postprocess`; the project's test suite checks that
they agree. Matching is greedy on IoU (no scipy on devices): pairs are taken by descending IoU,
each face at most once.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

SUPPORTED_FORMAT = 1
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # as the project's bundle writer names files


class BundleCheckError(Exception):
    pass


def sha256_path(p: Path) -> str:
    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p).as_posix()}\0{file_hash(f)}\n".encode())
        return h.hexdigest()
    return file_hash(p)


def _fail(folder: Path, msg: str):
    raise BundleCheckError(f"bundle {folder.name or folder}: {msg}")


def _check_name(folder: Path, what: str, name) -> str:
    """A file of the bundle is named by a plain file name inside it: no folder part, no '..', not absolute."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        _fail(folder, f"{what} {name!r} is not a plain file name inside the bundle (tampered metadata?)"[:300])
    return name


def load_bundle(folder: str | Path) -> tuple[Path, dict, dict]:
    """-> (folder, metadata, golden arrays), after checking the metadata's shape, the format version and
    every file's SHA-256. Every file this suite reads (the model, golden.npz, the mesh decoder) must be
    in the metadata's hash list, so nothing outside the list is ever loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleCheckError(f"{folder}: not a bundle folder")
    meta_path = folder / "metadata.json"
    if not meta_path.is_file():
        _fail(folder, "no metadata.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        _fail(folder, f"metadata.json is not valid JSON ({str(e)[:120]})")
    if not isinstance(meta, dict):
        _fail(folder, f"metadata.json holds a JSON {type(meta).__name__}, not an object: not a bundle's metadata")
    version = meta.get("format_version")
    if not isinstance(version, int):
        _fail(folder, "metadata.json has no integer format_version")
    if version > SUPPORTED_FORMAT:
        _fail(folder, f"format version {version} is newer than this suite ({SUPPORTED_FORMAT})")
    for key, kind in (("target", str), ("precision", str), ("files", dict), ("spec", dict), ("gates", dict)):
        if not isinstance(meta.get(key), kind):
            _fail(folder, f"metadata.json lacks {key!r} (or it is not a {kind.__name__})")
    files = meta["files"]
    for name, digest in files.items():
        _check_name(folder, "file", name)
        if not isinstance(digest, str):
            _fail(folder, f"the SHA-256 of {name} in metadata.json is not a string")
    model_file = _check_name(folder, "model_file", meta.get("model_file"))
    for name in (model_file, "golden.npz"):
        if name not in files:
            _fail(folder, f"{name} is not in metadata.json's hash list; refusing to load a file that cannot be verified")
    if meta["spec"].get("mesh_rank"):
        _check_name(folder, "mesh_decoder", meta.get("mesh_decoder"))
    for name, digest in files.items():
        p = folder / name
        if p.is_symlink() or not p.exists():
            _fail(folder, f"{name} is missing" + (" (a symbolic link in its place)" if p.is_symlink() else ""))
        if sha256_path(p) != digest:
            _fail(folder, f"{name} does not match its SHA-256 (tampered or corrupt)")
    spec = meta["spec"]
    try:
        for key in ("mean", "std", "steps", "variances", "output_names"):
            spec[key]  # noqa: B018 - present
        spec["arch"]["min_sizes"]  # noqa: B018
    except (KeyError, TypeError) as e:
        _fail(folder, f"metadata.json's spec lacks {e}")
    try:
        with np.load(folder / "golden.npz", allow_pickle=False) as z:
            golden = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        _fail(folder, f"golden.npz is unreadable ({type(e).__name__}: {str(e)[:120]})")
    return folder, meta, golden


def mesh_decoder_of(folder: Path, meta: dict):
    """(mean, basis) for a bundle whose model has a low-rank mesh head (mesh_decoder.npz), else None."""
    if not meta["spec"].get("mesh_rank"):
        return None
    name = meta.get("mesh_decoder")
    if name not in meta["files"]:
        _fail(folder, "a low-rank mesh head but its mesh decoder file is not in the hash list")
    with np.load(folder / name, allow_pickle=False) as z:
        return z["mean"].astype(np.float32), z["basis"].astype(np.float32)


# --- decoding, as edge.anchors / edge.postprocess -------------------------------------------------

def priors(height, width, min_sizes, steps):
    out = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = math.ceil(height / step), math.ceil(width / step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / height, (np.arange(fw) + 0.5) * step / width, indexing="ij")
        a = np.empty((fh, fw, len(sizes), 4))
        a[..., 0], a[..., 1] = cx[..., None], cy[..., None]
        a[..., 2] = np.asarray(sizes, float) / width
        a[..., 3] = np.asarray(sizes, float) / height
        out.append(a.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def nms(boxes, scores, thr, max_keep):
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float64)
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    alive = np.ones(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(order[i])
        if len(keep) >= max_keep:
            break
        rest = np.nonzero(alive[i + 1:])[0] + i + 1
        if rest.size == 0:
            break
        lt = np.maximum(b[i, :2], b[rest, :2])
        rb = np.minimum(b[i, 2:], b[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        alive[rest[iou > thr]] = False
    return np.asarray(keep, dtype=np.int64)


class QuantizedOutput:
    """One integer output as the model wrote it (int8 / uint8), read as float32 = (q - zero_point) * scale where it
    is read: an integer index (the batch's image) gives that image's output, still integer; any other index
    dequantises only the elements it selects (decoding reads the face scores and the kept anchors' rows, not
    16,800 x 48 values a frame); np.asarray(output) dequantises it whole. shape and ndim are the array's."""

    def __init__(self, q, scale: float, zero_point: int):
        self.q, self.scale, self.zero_point = q, float(scale), int(zero_point)
        self.shape, self.ndim = q.shape, q.ndim

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return QuantizedOutput(self.q[index], self.scale, self.zero_point)
        return self._dequantize(self.q[index])

    def __array__(self, dtype=None, copy=None):
        v = self._dequantize(self.q)
        return v if dtype is None else v.astype(dtype, copy=False)

    def _dequantize(self, v):
        return ((v.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32, copy=False)


def first_image(outputs: dict) -> dict:
    """The first image of each (1, A, C) output, float32; integer outputs stay integer (`QuantizedOutput`)."""
    return {k: v[0] if isinstance(v, QuantizedOutput) else np.asarray(v, np.float32)[0] for k, v in outputs.items()}


def detect(outputs, pri, hw, variances, score_thr=0.5, nms_thr=0.4, top_k=5000, keep_top_k=750, mesh_decoder=None):
    """Raw outputs of one image (A, C) -> boxes (N, 4), scores (N,), landmarks (N, 5, 2) in input pixels,
    and the mesh (N, V, 3) of the kept faces when the model has one (else None); a low-rank mesh head's
    per-anchor code is decoded by mesh_decoder = (mean (3V,), basis (K, 3V))."""
    h, w = hw
    scores = np.asarray(outputs["conf"][:, 1], np.float32)
    idx = np.nonzero(scores > score_thr)[0]
    idx = idx[np.argsort(-scores[idx], kind="stable")][:top_k]
    p = pri[idx]
    loc = outputs["loc"][idx].astype(np.float32)
    centre = p[:, :2] + loc[:, :2] * variances[0] * p[:, 2:]
    size = p[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1) * np.array([w, h, w, h], np.float32)
    lm = outputs["landmarks"][idx].astype(np.float32).reshape(len(idx), outputs["landmarks"].shape[-1] // 2, 2)
    lms = (p[:, None, :2] + lm * variances[0] * p[:, None, 2:]) * np.array([w, h], np.float32)
    keep = nms(boxes, scores[idx], nms_thr, keep_top_k)
    mesh = None
    if "mesh" in outputs:
        p, raw = p[keep], outputs["mesh"][idx[keep]].astype(np.float32)
        if mesh_decoder is not None:
            raw = mesh_decoder[0] + raw @ mesh_decoder[1]
        raw = raw.reshape(len(p), -1, 3)
        xy = (p[:, None, :2] + raw[..., :2] * variances[0] * p[:, None, 2:]) * np.array([w, h], np.float32)
        mesh = np.concatenate([xy, raw[..., 2:] * variances[0] * p[:, None, 2:3] * w], axis=-1)
    return boxes[keep], scores[idx][keep], lms[keep], mesh


def iou_matrix(a, b):
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_match(ref_boxes, cand_boxes, thr):
    if len(ref_boxes) == 0 or len(cand_boxes) == 0:
        return []
    iou = iou_matrix(ref_boxes.astype(np.float64), cand_boxes.astype(np.float64))
    pairs = []
    used_r, used_c = set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        r, c = divmod(int(flat), iou.shape[1])
        if iou[r, c] < thr:
            break
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c, float(iou[r, c])))
    return pairs


# --- the check ----------------------------------------------------------------------------------

def takes_canvas(meta: dict) -> bool:
    """Whether the bundle's model takes the (1, H, W, 3) uint8 BGR canvas (a full-integer TFLite bundle)."""
    io = (meta.get("quantization") or {}).get("io") or {}
    return (io.get("input") or {}).get("format") == "bgr_pixels_nhwc"


def network_input(canvas: np.ndarray, spec: dict, takes_canvas: bool) -> np.ndarray:
    """The golden (S, S, 3) uint8 BGR canvas as the model's input: the canvas itself (batch 1) for a model that
    normalises inside, else (1, 3, S, S) float32 (pixel - mean) / std. The numpy mirror of the project's
    `edge.preprocess.normalise` (tests/test_device_suite.py proves them equal)."""
    if takes_canvas:
        return np.ascontiguousarray(canvas[None])
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(((canvas.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None])


def run_check(folder, runner) -> dict:
    """Run `runner` (NCHW float32, or the uint8 canvas where `takes_canvas` -> dict of outputs) on the golden canvases; compare with the golden
    detections under the bundle's gates. Returns the summary with "passed" and "failed"."""
    folder, meta, g = load_bundle(folder)
    spec, gates = meta["spec"], meta["gates"]
    size = g["canvases"].shape[1]
    pri = priors(size, size, spec["arch"]["min_sizes"], spec["steps"])
    decoder = mesh_decoder_of(folder, meta)
    mesh_offsets = np.concatenate([[0], np.cumsum(g["det_count"])]) if "det_mesh" in g else None
    ref_n = cand_n = 0
    ious, serr, nme, mesh_nme, worst_abs = [], [], [], [], {}
    start = 0
    canvas_input = takes_canvas(meta)
    for i, canvas in enumerate(g["canvases"]):
        x = network_input(canvas, spec, canvas_input)
        out = {k: np.asarray(v, np.float32)[0] for k, v in runner(x).items()}  # parity reads them whole
        for name in spec["output_names"]:
            d = float(np.abs(out[name][g["anchor_idx"][i]] - g[f"ref_{name}"][i]).max())
            worst_abs[name] = max(worst_abs.get(name, 0.0), d)
        boxes, scores, lms, mesh = detect(out, pri, (size, size), spec["variances"], gates["score_threshold"], mesh_decoder=decoder)
        n = int(g["det_count"][i])
        rb, rs, rl = g["det_boxes"][start:start + n], g["det_scores"][start:start + n], g["det_landmarks"][start:start + n]
        start += n
        pairs = greedy_match(rb, boxes, gates["match_iou"])
        ref_n += n
        cand_n += len(boxes)
        for r, c, v in pairs:
            ious.append(v)
            serr.append(abs(float(rs[r]) - float(scores[c])))
            norm = math.sqrt(max(rb[r, 2] - rb[r, 0], 1e-6) * max(rb[r, 3] - rb[r, 1], 1e-6))
            nme.append(float(np.linalg.norm(rl[r] - lms[c], axis=-1).mean() / norm))
            if mesh is not None and mesh_offsets is not None:
                rm = g["det_mesh"][mesh_offsets[i] + r]
                mesh_nme.append(float(np.linalg.norm(rm[:, :2] - mesh[c][:, :2], axis=-1).mean() / norm))
    s = {
        "target": meta["target"], "precision": meta["precision"], "images": int(len(g["canvases"])),
        "ref_faces": ref_n, "cand_faces": cand_n, "missed_faces": ref_n - len(ious), "extra_faces": cand_n - len(ious),
        "recall": len(ious) / ref_n if ref_n else 1.0, "precision_vs_ref": len(ious) / cand_n if cand_n else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else None, "min_iou": float(np.min(ious)) if ious else None,
        "score_mae": float(np.mean(serr)) if serr else None, "landmark_nme": float(np.mean(nme)) if nme else None,
        "mesh_nme": float(np.mean(mesh_nme)) if mesh_nme else None,
        "max_abs_on_golden_anchors": worst_abs,
    }
    failed = []
    for key, bound, sign in (("recall", "recall_min", 1), ("precision_vs_ref", "precision_min", 1), ("mean_iou", "mean_iou_min", 1),
                             ("min_iou", "min_iou_min", 1), ("score_mae", "score_mae_max", -1), ("landmark_nme", "landmark_nme_max", -1),
                             ("mesh_nme", "mesh_nme_max", -1)):
        v = s[key]
        if v is not None and bound in gates and ((sign > 0 and v < gates[bound]) or (sign < 0 and v > gates[bound])):
            failed.append(f"{key} {v:.4f} {'<' if sign > 0 else '>'} {gates[bound]}")
    if ref_n == 0:
        failed.append("the golden set has no reference faces")
    s["failed"] = failed
    s["passed"] = not failed
    return s


def check_on_device(bundle, target: str, make_runner) -> dict:
    """The device suites' one test: the bundle is for `target`, `make_runner(model_path, output_names)`
    -> (run, runtime name) builds the runtime, and the bundle passes its gates against golden.npz."""
    folder, meta, _ = load_bundle(bundle)
    if meta["target"] != target:
        raise BundleCheckError(f"this suite runs {target} bundles, got {meta['target']}")
    model = folder / meta["model_file"]  # a plain name in the hash list, verified by load_bundle
    try:
        run, runtime = make_runner(model, meta["spec"]["output_names"])
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - any runtime's own error on a model it cannot read, named with the file
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        needs = (meta.get("quantization") or {}).get("runtime_needs")  # what the converter knows this form needs
        _fail(folder, f"the runtime cannot load {meta['model_file']} ({type(e).__name__}: {msg[:160]})"
              + (f"; this bundle needs {needs}" if needs else ""))
    s = run_check(folder, run)
    print(f"\nruntime: {runtime}\n" + json.dumps(s, indent=1))
    return s
