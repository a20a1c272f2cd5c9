"""Training: label formats, augmentation, matching and the multi-task loss, the loop (exact resume,
DDP with two gloo processes) and an over-fitting run on real images."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.anchors import decode_boxes, decode_points, priors
from edge.commands.cli import main
from edge.contract import ARCHS, ModelSpec
from edge.errors import ConfigError
from edge.pipeline import Pipeline
from edge.postprocess import decode_at, decode_detections
from edge.runners import TorchRunner
from edge.train.augment import AugmentConfig, augment, flip, random_crop
from edge.train.data import DetectionDataset, collate
from edge.train.detector import detector_step, evaluate_on_samples, init_variant, reinit_heads
from edge.train.labels import LabelError, parse_bbx_gt, parse_retinaface, read_labels
from edge.train.loop import TrainConfig, train
from edge.train.multibox import LossConfig, box_iou, encode, encode_points, match, multibox_loss, point_form
from edge.weights.load import load_weights

ROOT = Path(__file__).resolve().parents[1]

RETINA = """# a/one.jpg
10 20 30 40 15.0 30.0 0.0 30.0 30.0 0.0 22.0 40.0 0.0 16.0 50.0 0.0 28.0 50.0 0.0 0.9
100 100 20 20 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0
5 5 0 10 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1 -1
# b/empty.jpg
"""

BBX = """a/one.jpg
3
10 20 30 40 0 0 0 0 0 0
100 100 20 20 0 0 0 1 0 0
1 1 5 5 1 0 0 0 0 0
b/empty.jpg
0
0 0 0 0 0 0 0 0 0 0
c/last.jpg
1
7 8 9 10 0 0 0 0 0 0
"""


def test_retinaface_labels():
    s = parse_retinaface(RETINA)
    assert [x.path for x in s] == ["a/one.jpg", "b/empty.jpg"]
    one = s[0]
    assert len(one) == 2  # the zero-width face is dropped
    np.testing.assert_allclose(one.boxes[0], [10, 20, 40, 60])
    np.testing.assert_allclose(one.landmarks[0, 0], [15, 30])
    np.testing.assert_allclose(one.landmarks[0, 4], [28, 50])
    assert one.has_landmarks.tolist() == [True, False]
    assert len(s[1]) == 0


def test_bbx_gt_labels():
    s = parse_bbx_gt(BBX)
    assert [x.path for x in s] == ["a/one.jpg", "b/empty.jpg", "c/last.jpg"]
    assert len(s[0]) == 2  # the "invalid" face is dropped
    np.testing.assert_allclose(s[0].boxes, [[10, 20, 40, 60], [1, 1, 6, 6]])
    assert not s[0].has_landmarks.any()
    assert len(s[1]) == 0 and len(s[2]) == 1


@pytest.mark.parametrize("text, msg", [
    ("a.jpg\nthree\n", "face count"),
    ("a.jpg\n2\n1 2 3 4\n", "file ends"),
    ("a.jpg\n1\n1 2 x 4\n", "expected numbers"),
    ("10 20 30 40\n# a.jpg\n", "face count of '10 20 30 40'"),
    ("# a.jpg\n10 20\n", "at least x y w h"),
])
def test_bad_labels(tmp_path, text, msg):
    f = tmp_path / "labels.txt"
    f.write_text(text)
    with pytest.raises(LabelError, match=msg):
        read_labels(f)
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "missing.txt")
    with pytest.raises(LabelError, match="before any"):
        parse_retinaface("10 20 30 40\n# a.jpg\n")


def test_match_and_encode():
    pri = torch.from_numpy(priors(64, 64, [[16, 32], [64, 128], [256, 512]], [8, 16, 32]))
    pf = point_form(pri)
    cfg = LossConfig()
    # a box equal to anchor 10, and a tiny box whose best IoU is below pos_iou but above min_best_iou
    tiny = torch.tensor([[0.30, 0.30, 0.30 + 0.25 * 0.55, 0.30 + 0.25 * 0.55]])
    boxes = torch.cat([pf[10:11], tiny])
    labels, idx = match(boxes, pri, cfg)
    assert labels[10] == 1 and idx[10] == 0

    best = box_iou(tiny, pf).max(dim=1)
    assert best.values.item() < cfg.pos_iou
    assert labels[best.indices.item()] == 1 and idx[best.indices.item()] == 1  # forced match
    # encode is the inverse of the project's numpy decode
    loc = encode(boxes[idx], pri, (0.1, 0.2))
    dec = decode_boxes(loc.numpy(), pri.numpy())
    pos = labels == 1
    np.testing.assert_allclose(dec[pos.numpy()], boxes[idx][pos].numpy(), atol=1e-5)
    # ignore band
    lab2, _ = match(boxes, pri, LossConfig(pos_iou=0.5, neg_iou=0.3))
    assert (lab2 == -1).any()
    with pytest.raises(ValueError):
        LossConfig(pos_iou=0.3, neg_iou=0.5)


def _targets(boxes, lmk=None):
    n = len(boxes)
    return {"boxes": boxes, "landmarks": torch.zeros(n, 10) if lmk is None else lmk,
            "has_landmarks": torch.zeros(n, dtype=torch.bool) if lmk is None else torch.ones(n, dtype=torch.bool)}


def test_loss_zero_at_targets_and_hard_negatives():
    pri = torch.from_numpy(priors(128, 128, [[16, 32], [64, 128], [256, 512]], [8, 16, 32]))
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.35], [0.5, 0.4, 0.9, 0.95]])
    lmk = torch.rand(2, 10) * 0.2 + boxes[:, :2].repeat(1, 5)
    t = _targets(boxes, lmk)
    labels, idx = match(boxes, pri, LossConfig())
    a = pri.shape[0]
    conf = torch.full((1, a, 2), 0.5)
    out = {"loc": encode(boxes[idx], pri, (0.1, 0.2))[None], "conf": conf,
           "landmarks": encode_points(lmk[idx], pri, (0.1, 0.2))[None]}
    loss, parts = multibox_loss(out, [t], pri)
    assert parts["box"] < 1e-6 and parts["landmarks"] < 1e-6
    n_pos = int((labels == 1).sum())
    assert parts["positives"] == n_pos and parts["negatives"] == 3 * n_pos
    # with every score at 0.5, the classification term is ln 2 per counted anchor
    assert parts["cls"] == pytest.approx(4 * n_pos * np.log(2) / n_pos, rel=1e-5)
    # box-only faces: the landmark term is masked out
    _, parts = multibox_loss(out, [_targets(boxes)], pri)
    assert parts["landmarks"] == 0.0
    # an image without faces: background only, no NaN
    loss, parts = multibox_loss(out, [_targets(torch.zeros(0, 4))], pri)
    assert torch.isfinite(loss) and parts["positives"] == 0


def test_flip_swaps_sides():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255
    boxes = np.array([[2.0, 1.0, 8.0, 9.0]], np.float32)
    lmk = np.array([[[3, 3], [7, 3], [5, 5], [3, 7], [7, 7]]], np.float32)
    f_img, f_boxes, f_lmk = flip(img, boxes, lmk, 20)
    assert f_img[:, 15:].min() == 255 and f_img[:, :15].max() == 0
    np.testing.assert_allclose(f_boxes, [[12, 1, 18, 9]])
    # the left eye stays on the image's left: the flipped right eye
    np.testing.assert_allclose(f_lmk[0, 0], [13, 3])
    np.testing.assert_allclose(f_lmk[0, 1], [17, 3])
    np.testing.assert_allclose(f_lmk[0, 3], [13, 7])
    assert f_lmk[0, 0, 0] < f_lmk[0, 1, 0]


def test_crop_keeps_faces_and_resizes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    boxes = np.array([[50, 60, 110, 130], [300, 200, 340, 250]], np.float32)
    lmk = np.repeat(((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None], 5, axis=1)
    has = np.ones(2, bool)
    cfg = AugmentConfig()
    for seed in range(20):
        r = np.random.default_rng(seed)
        crop, b, lm, h, _ = random_crop(img, boxes, lmk, has, 160, r, cfg)
        assert crop.shape[0] == crop.shape[1] and len(b) >= 1
        assert (b >= 0).all() and (b <= crop.shape[0]).all()
        out, b2, lm2, _, _, _ = augment(img, boxes, lmk, has, 160, np.random.default_rng(seed), cfg, (104, 117, 123))
        assert out.shape == (160, 160, 3) and out.dtype == np.float32
        # a landmark at the face centre stays inside its box through crop, flip and resize
        assert ((lm2[:, 2] >= b2[:, :2] - 1e-3) & (lm2[:, 2] <= b2[:, 2:] + 1e-3)).all()


def _six_images(shared, n=6):
    s = read_labels(shared / "widerface/val/label_bbx_gt.txt")
    c = [x for x in s if 1 <= len(x) <= 4 and (x.boxes[:, 2:] - x.boxes[:, :2]).min() >= 40]
    import random

    random.Random(1).shuffle(c)
    return c[:n]


def write_retinaface_labels(path, samples, model) -> None:
    """RetinaFace-format labels: ground-truth boxes and the default model's landmarks of the matching detection."""

    root = Path(__file__).resolve().parents[2] / "shared/widerface/val/images"
    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(None))
    lines = []
    for s in samples:
        det = pipe(root / s.path)
        iou = box_iou(torch.from_numpy(s.boxes), torch.from_numpy(det.boxes.astype(np.float32))).numpy()
        lines.append(f"# {s.path}")
        for i, b in enumerate(s.boxes):
            j = int(iou[i].argmax()) if iou.shape[1] else -1
            pts = det.landmarks[j] if j >= 0 and iou[i, j] > 0.5 else None
            lm = " ".join(f"{x:.1f} {y:.1f} 0.0" for x, y in pts) if pts is not None else " ".join(["-1"] * 15)
            lines.append(f"{b[0]:.0f} {b[1]:.0f} {b[2] - b[0]:.0f} {b[3] - b[1]:.0f} {lm} 1.0")
    Path(path).write_text("\n".join(lines) + "\n")


@pytest.mark.shared
def test_overfit_from_random_heads(shared, tmp_path, default_model):
    """On six real images the loss falls steadily and the AP on them rises above 0.9 from random heads."""
    default_model = default_model[0]

    labels = tmp_path / "label.txt"
    write_retinaface_labels(labels, _six_images(shared), default_model)
    samples = read_labels(labels)
    assert sum(s.has_landmarks.sum() for s in samples) >= 8
    root = shared / "widerface/val/images"
    import copy

    m = copy.deepcopy(default_model)
    reinit_heads(m)
    before = evaluate_on_samples(m, samples, root, 320)["ap"]
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "train", "detector", "--data", str(root), "--labels", str(labels),
                        "--reinit-heads", "--no-augment", "--size", "320", "--iters", "150", "--batch", "6",
                        "--optimizer", "adamw", "--lr", "3e-3", "--warmup", "10", "--out", str(out),
                        "--val-labels", str(labels), "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import csv

    rows = list(csv.DictReader(open(out / "log.csv")))
    loss = np.array([float(x["loss"]) for x in rows])
    lmk = np.array([float(x["landmarks"]) for x in rows])
    windows = loss.reshape(6, 25).mean(axis=1)
    assert (np.diff(windows) < 0).all(), windows  # steadily: every 25-step window below the one before
    assert windows[-1] < 0.05 * windows[0]
    assert lmk[-25:].mean() < 0.1 * lmk[:25].mean()
    after = json.loads((out / "summary.json").read_text())["val"]["ap"]
    assert before < 0.3 and after > 0.9, (before, after)
    # the run's weights load back through --weights

    m2, info = load_weights(out / "final.pth")
    assert info.arch.name == default_model.spec.arch.name
    assert evaluate_on_samples(m2, samples, root, 320)["ap"] == pytest.approx(after, abs=1e-6)


def _loop_setup(shared, tmp_path, model):
    samples = _six_images(shared)
    ds = DetectionDataset(samples, shared / "widerface/val/images", model.spec, 160, seed=3)
    pri = torch.from_numpy(priors(160, 160, model.spec.arch.min_sizes, model.spec.steps))
    return ds, collate, detector_step(pri, LossConfig())


@pytest.mark.shared
def test_resume_is_exact(shared, tmp_path, default_model):
    """A run killed after its step-4 checkpoint and resumed ends with the same weights as an uninterrupted run."""
    default_model = default_model[0]
    import copy

    ds, collate, step = _loop_setup(shared, tmp_path, default_model)
    meta = {"format": 1, "kind": "trained", "arch": default_model.spec.arch.name}

    def cfg(out):
        return TrainConfig(out=str(out), iters=8, batch=2, lr=1e-3, warmup=2, save_every=4, progress=False)

    full = copy.deepcopy(default_model)
    train(full, ds, collate, step, cfg(tmp_path / "full"), meta=meta)

    calls = {"n": 0}

    def dying(model, batch, device):
        calls["n"] += 1
        if calls["n"] == 6:  # the process dies during step 6, after the step-4 checkpoint
            raise KeyboardInterrupt
        return step(model, batch, device)

    part = copy.deepcopy(default_model)
    with pytest.raises(KeyboardInterrupt):
        train(part, ds, collate, dying, cfg(tmp_path / "part"), meta=meta)
    assert torch.load(tmp_path / "part/last.pth", weights_only=True)["step"] == 4
    resumed = copy.deepcopy(default_model)
    train(resumed, ds, collate, step, cfg(tmp_path / "part"), meta=meta, resume=tmp_path / "part/last.pth")
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    import csv

    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "part/log.csv"))]
    assert steps == list(range(1, 9))  # step 5 of the dead run was dropped from the log


@pytest.mark.shared
def test_ddp_two_cpu_processes(shared, tmp_path):
    """`edge train detector` under torchrun: two gloo processes, each its own share of the images, same weights at the end."""
    labels = tmp_path / "six.txt"
    lines = []
    for s in _six_images(shared):
        lines += [s.path, str(len(s))] + [f"{b[0]:.0f} {b[1]:.0f} {b[2] - b[0]:.0f} {b[3] - b[1]:.0f} 0 0 0 0 0 0" for b in s.boxes]
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "edge.cli", "train", "detector", "--data", str(shared / "widerface/val/images"),
                        "--labels", str(labels), "--size", "160", "--iters", "6", "--batch", "2", "--threads", "1",
                        "--lr", "1e-3", "--warmup", "1",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    a, b = summary["param_checksums"]
    assert a == b
    # and the weights moved: the processes trained, and agreed

    base, _ = load_weights("default")
    trained, _ = load_weights(out / "final.pth")
    moved = max((x - y).abs().max().item() for x, y in zip(base.state_dict().values(), trained.state_dict().values())
                if x.is_floating_point())
    assert moved > 1e-5


def test_bad_training_input(tmp_path):
    assert main(["train", "detector", "--data", str(tmp_path / "nope"), "--labels", "x", "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "img").mkdir()
    (tmp_path / "l.txt").write_text("# missing.jpg\n1 1 10 10\n")
    assert main(["train", "detector", "--data", str(tmp_path / "img"), "--labels", str(tmp_path / "l.txt"),
                 "--out", str(tmp_path / "o"), "--weights", "none"]) == 2
    with pytest.raises(ConfigError):
        TrainConfig(out="x", optimizer="rmsprop")


@pytest.mark.parametrize("name", ["pytorch_retinaface_p2p6", "pytorch_retinaface_cascade"])
def test_paper_variants(name, default_model):
    """The P2-P6 pyramid and the two-stage cascade: contract round trip, output shapes, weight transfer, loss."""

    arch = ARCHS[name]
    spec = ModelSpec(arch=arch)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    model, new = init_variant(default_model[0], arch)
    src = default_model[0].state_dict()
    kept = [k for k in model.state_dict() if k not in new]
    assert all(torch.equal(model.state_dict()[k], src[k]) for k in kept)
    assert any(k.startswith("body.") for k in kept) and any(k.startswith("ssh1.") for k in kept)
    x = torch.zeros(2, 3, 128, 128)
    out = model(x)
    assert tuple(out) == spec.output_names
    for k, v in out.items():
        assert tuple(v.shape) == spec.output_shapes(128, 128, 2)[k]
    if arch.cascade:
        assert all(k.startswith(("ClassHead2", "BboxHead2", "LandmarkHead2")) for k in new)
        torch.testing.assert_close(model.state_dict()["BboxHead2.1.conv1x1.weight"], src["BboxHead.1.conv1x1.weight"])
    else:
        assert spec.pad_multiple == 64 and spec.steps == (4, 8, 16, 32, 64)
        assert any(k.startswith(("ssh0", "ssh4", "fpn.output0", "fpn.output4")) for k in new)
    pri = torch.from_numpy(priors(128, 128, arch.min_sizes, arch.steps))
    step = detector_step(pri, LossConfig(), cascade=arch.cascade)
    t = _targets(torch.tensor([[0.2, 0.2, 0.5, 0.55]]))
    loss, parts = step(model, (x, [t, t]), torch.device("cpu"))
    assert torch.isfinite(loss) and parts["positives"] > 0
    if arch.cascade:
        assert "cls2" in parts and parts["positives2"] > 0


def test_cascade_decode_uses_first_stage_boxes():
    pri = priors(64, 64, [[16, 32], [64, 128], [256, 512]], [8, 16, 32])
    a = len(pri)
    rng = np.random.default_rng(0)
    loc, loc2 = rng.normal(0, 0.5, (a, 4)).astype(np.float32), rng.normal(0, 0.5, (a, 4)).astype(np.float32)
    lm2 = rng.normal(0, 0.5, (a, 10)).astype(np.float32)
    conf2 = np.zeros((a, 2), np.float32)
    conf2[:, 0] = 1
    conf2[7] = (0.1, 0.9)
    outs = {"loc": loc, "conf": np.full((a, 2), 0.5, np.float32), "landmarks": np.zeros((a, 10), np.float32),
            "loc2": loc2, "conf2": conf2, "landmarks2": lm2}
    det = decode_detections(outs, pri, (64, 64), score_threshold=0.5)
    assert len(det) == 1 and det.scores[0] == pytest.approx(0.9)
    b1 = decode_boxes(loc[7:8], pri[7:8])
    p1 = np.concatenate([(b1[:, :2] + b1[:, 2:]) / 2, b1[:, 2:] - b1[:, :2]], axis=1)
    np.testing.assert_allclose(det.boxes, decode_boxes(loc2[7:8], p1) * 64, rtol=1e-5)
    np.testing.assert_allclose(det.landmarks, decode_points(lm2[7:8], p1) * 64, rtol=1e-5)

    at = decode_at(outs, pri, det.anchors, (64, 64))  # the raw outputs at the kept anchor: the same face
    np.testing.assert_allclose(at.boxes, det.boxes, rtol=1e-6)
