"""The mesh topology, the teacher's crop geometry, the 68-point correspondence and the low-rank head."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from converters.api import convert
from edge.anchors import decode_points, priors
from edge.bundle import load_bundle_runner, read_metadata
from edge.commands.cli import main
from edge.contract import ModelSpec
from edge.draw import draw_detections
from edge.errors import BundleError, ConfigError
from edge.evaluate.aflw import load_labels as load_aflw
from edge.evaluate.aflw import nme_per_face
from edge.evaluate.teacher import MeshTeacher, crop_transform, roi_for_face, warp_crop
from edge.image_io import load_image
from edge.mesh import MESH68, MESH_VERTICES, mesh_edges, mesh_to_68, mirror_vertices
from edge.model import RetinaFace
from edge.pipeline import Pipeline
from edge.postprocess import Detections, decode_detections
from edge.runners import TorchRunner
from edge.train.augment import FLIP_ORDER, flip
from edge.train.labels import read_labels
from edge.train.mesh_head import MeshSample, load_labels, mesh_loss, save_labels, with_mesh_head
from edge.train.mesh_rows import AnchorRows, anchor_cells, head_at, train_on_rows
from edge.weights.load import load_weights, read_mesh_head
from edge.weights.registry import REGISTRY


def test_topology():
    e = mesh_edges()
    assert e.ndim == 2 and e.shape[1] == 2 and len(e) > 1000
    assert e.min() >= 0 and e.max() < MESH_VERTICES and (e[:, 0] < e[:, 1]).all()
    assert len(np.unique(e)) == MESH_VERTICES  # every vertex is on an edge
    assert len(MESH68) == 68 and MESH68.min() >= 0 and MESH68.max() < MESH_VERTICES
    m = np.random.default_rng(0).normal(size=(2, MESH_VERTICES, 3))
    np.testing.assert_array_equal(mesh_to_68(m)[1, 8], m[1, MESH68[8]])
    with pytest.raises(ValueError):
        mesh_to_68(m[:, :10])


def test_crop_geometry():
    centre, side = np.array([100.0, 50.0]), 96.0
    for angle in (0.0, 0.3, -1.2):
        m = crop_transform(centre, side, angle, 192)
        np.testing.assert_allclose(m[:, :2] @ [96, 96] + m[:, 2], centre, atol=1e-9)
        # one crop pixel to the right is half an image pixel along the rotated x axis
        d = (m[:, :2] @ [97, 96] + m[:, 2]) - centre
        np.testing.assert_allclose(d, 0.5 * np.array([math.cos(angle), math.sin(angle)]), atol=1e-9)
    # an unrotated crop at scale 1 reproduces the image
    img = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    m = crop_transform(np.array([32.0, 32.0]), 32.0, 0.0, 32)
    np.testing.assert_allclose(warp_crop(img, m, 32), img[16:48, 16:48].astype(np.float32), atol=1e-4)
    # eye points swapped (a profile): the crop is not turned upside down
    _, _, a = roi_for_face(np.array([0, 0, 10, 10.0]), np.array([[8, 5], [2, 5.2], [5, 6], [3, 8], [7, 8.0]]))
    assert -math.pi / 2 < a <= math.pi / 2


@pytest.mark.shared
def test_teacher_on_a_frontal_face(shared):
    """The teacher's mesh68 on a frontal AFLW2000-3D face is within 6 % NME of the ground truth."""

    lab = load_aflw(shared / "aflw2000_3d")
    model, _ = load_weights("default")
    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(None))
    img = load_image(shared / "aflw2000_3d/images" / f"{lab['names'][5]}.jpg")
    det = pipe(img)
    j = int(np.argmax(det.scores))
    mesh, flag = MeshTeacher()(img, det.boxes[j], det.landmarks[j])
    assert mesh.shape == (MESH_VERTICES, 3) and flag > 0.9
    assert nme_per_face(mesh_to_68(mesh)[:, :2].astype(np.float64), lab["pts"][5], 68) < 0.06
    # a wrong correspondence (a shifted index list) is far worse
    assert nme_per_face(mesh[np.roll(MESH68, 5), :2].astype(np.float64), lab["pts"][5], 68) > 0.1


def test_low_rank_head_decode_and_checkpoint(tmp_path):
    spec = ModelSpec(mesh_vertices=MESH_VERTICES, mesh_rank=16, input_size=64)
    model = RetinaFace(spec).eval()
    with torch.no_grad():
        model.mesh_mean.normal_()
        model.mesh_basis.normal_()
    out = model(torch.zeros(1, 3, 64, 64))
    assert out["mesh"].shape[-1] == 16
    runner = TorchRunner(model)
    mean, basis = runner.mesh_decoder
    a = out["mesh"].shape[1]
    pri = priors(64, 64, spec.arch.min_sizes, spec.steps)
    conf = np.zeros((a, 2), np.float32)
    conf[:, 0] = 1
    conf[3] = (0, 1)
    o = {"loc": np.zeros((a, 4), np.float32), "conf": conf, "landmarks": np.zeros((a, 10), np.float32),
         "mesh": out["mesh"][0].detach().numpy()}
    det = decode_detections(o, pri, (64, 64), mesh_decoder=(mean, basis))
    raw = (mean + o["mesh"][3] @ basis).reshape(MESH_VERTICES, 3)
    np.testing.assert_allclose(det.mesh[0, :, :2], decode_points(raw[:, :2].reshape(1, -1), pri[3:4])[0] * 64, rtol=1e-4, atol=1e-4)
    # the checkpoint says what head it has; load_weights rebuilds it
    torch.save({"state_dict": model.state_dict(), "retinaface_edge": {"format": 1, "kind": "mesh", "arch": spec.arch.name,
                                                                      "mesh": {"vertices": MESH_VERTICES, "rank": 16}}},
               tmp_path / "m.pth")
    m2, _ = load_weights(tmp_path / "m.pth")
    assert m2.spec.mesh_rank == 16 and torch.equal(m2.mesh_basis, model.mesh_basis)


def test_mesh_loss():
    edges = torch.tensor([[0, 1], [1, 2], [0, 2]])
    t = torch.randn(4, 9)
    loss, parts = mesh_loss(t.clone(), t, edges, 1.0)
    assert loss.item() == 0.0
    shifted, _ = mesh_loss(t + 1.0, t, edges, 1.0)  # a translation: vertex term only
    scaled, p2 = mesh_loss(t * 2, t, edges, 1.0)
    assert p2["edge"] > 0 and shifted.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.shared
def test_train_mesh_end_to_end(shared, tmp_path, capsys):
    """edge train mesh: pseudo-labels from the teacher, a few steps, a checkpoint that loads with its head."""
    import json

    images = tmp_path / "images"
    images.mkdir()
    src = sorted((shared / "widerface/val/images/12--Group").glob("*.jpg"))[:10]
    for p in src:
        (images / p.name).symlink_to(p)
    out = tmp_path / "run"
    assert main(["train", "mesh", "--images", str(images), "--rank", "8", "--iters", "3", "--batch", "2", "--size", "320",
                 "--val", "2", "--out", str(out), "--quiet"]) == 0
    labels = load_labels(out / "pseudo_labels.npz")
    assert labels and all(s.meshes.shape[1:] == (MESH_VERTICES, 3) for s in labels)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["pca"]["explained_variance"] > 0.5
    model, _ = load_weights(out / "final.pth")
    assert model.spec.mesh_rank == 8 and model.spec.mesh_vertices == MESH_VERTICES
    # the detector trainer adds the mesh loss where faces have a mesh pseudo-label (joint training)

    wanted = {f"12--Group/{p.name}": p.name for p in src}
    lines = []
    for smp in read_labels(shared / "widerface/val/label_bbx_gt.txt"):
        if smp.path in wanted:
            lines += [wanted[smp.path], str(len(smp))] + [f"{b[0]} {b[1]} {b[2] - b[0]} {b[3] - b[1]} 0 0 0 0 0 0" for b in smp.boxes]
    (tmp_path / "bbx.txt").write_text("\n".join(lines) + "\n")
    joint = tmp_path / "joint"
    assert main(["train", "detector", "--data", str(images), "--labels", str(tmp_path / "bbx.txt"), "--weights",
                 str(out / "final.pth"), "--mesh-labels", str(out / "pseudo_labels.npz"), "--size", "320", "--iters", "4",
                 "--batch", "5", "--out", str(joint), "--quiet"]) == 0
    import csv

    rows = list(csv.DictReader(open(joint / "log.csv")))
    assert any(float(r["mesh_vertex"]) > 0 for r in rows)
    assert load_weights(joint / "final.pth")[0].spec.mesh_rank == 8
    # the bundle carries the decoder: its parity reports the mesh, on the host and in the device check
    import sys

    # the head trained on cached anchor rows, with a tower and every anchor where NMS can keep the face
    rows_run = tmp_path / "rows"
    assert main(["train", "mesh", "--images", str(images), "--labels", str(out / "pseudo_labels.npz"), "--rank", "8",
                 "--tower", "1", "--views", "1", "--every-anchor", "--iters", "5", "--batch", "16", "--size", "320",
                 "--val", "2", "--out", str(rows_run), "--quiet"]) == 0
    summary = json.loads((rows_run / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["rows"]["rows"] > summary["rows"]["faces"] > 0
    assert summary["rows"]["extra_rows"] >= 0
    tower_model, _ = load_weights(rows_run / "final.pth")
    assert tower_model.spec.mesh_tower == 1 and tower_model.spec.mesh_rank == 8
    capsys.readouterr()
    assert main(["train", "mesh", "--images", str(images), "--labels", str(out / "pseudo_labels.npz"), "--every-anchor",
                 "--iters", "2", "--out", str(tmp_path / "x"), "--quiet"]) != 0
    assert "--every-anchor trains on cached anchor rows: give --views too" in capsys.readouterr().err
    res = convert("onnx", weights=str(rows_run / "final.pth"), input_size=320, out=tmp_path / "bundle", progress=False)
    _, meta = read_metadata(res.bundle)
    assert meta["mesh_decoder"] == "mesh_decoder.npz" and "mesh_decoder.npz" in meta["files"]
    assert res.parity["passed"] and res.parity["mesh_nme"] is not None and res.parity["mesh_nme"] < 1e-3
    runner, spec, _ = load_bundle_runner(res.bundle)
    assert runner.mesh_decoder[1].shape == (8, 3 * MESH_VERTICES)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets" / "common"))
    import edgecheck

    dev = edgecheck.run_check(res.bundle, runner)
    assert dev["passed"] and dev["mesh_nme"] is not None and dev["mesh_nme"] < 1e-3, dev
    (res.bundle / "mesh_decoder.npz").unlink()
    with pytest.raises(BundleError, match="mesh_decoder.npz"):
        load_bundle_runner(res.bundle)


def test_json_and_drawing_carry_the_mesh():
    rng = np.random.default_rng(0)
    mesh = rng.uniform(10, 50, (1, MESH_VERTICES, 3)).astype(np.float32)
    det = Detections(np.array([[10, 10, 50, 50]], np.float32), np.array([0.9], np.float32),
                     rng.uniform(10, 50, (1, 5, 2)).astype(np.float32), mesh)
    face = det.to_json()[0]
    assert len(face["mesh"]) == MESH_VERTICES and len(face["mesh68"]) == 68
    np.testing.assert_allclose(face["mesh68"], mesh[0, MESH68], atol=0.01)
    img = draw_detections(np.zeros((64, 64, 3), np.uint8), [(det, (0, 255, 0))], scores=False)
    assert np.asarray(img)[..., 1].astype(bool).sum() > 200  # mesh edges drawn, not just points


def _shipped_mean_face() -> np.ndarray:
    return read_mesh_head(REGISTRY["default"].mesh)["mesh_mean"].numpy().reshape(MESH_VERTICES, 3).astype(np.float64)


def test_mirror_pairs_come_from_the_mesh_itself():
    """The left/right vertex pairs derived from a mean face: an involution that keeps >= 99 % of the tessellation's
    edges and gives MediaPipe's documented pairs (eye corners 33/263 and 133/362, mouth corners 61/291, face sides
    234/454, brows 70/300 and 105/334, eyelids 159/386 and 145/374) with the midline (nose tip 1 and 4, forehead 10,
    lips 13 and 14, chin 152) on itself; the mirrored mean face lies on the mean face."""
    mean = _shipped_mean_face()
    m = mirror_vertices(mean, mesh_edges())
    assert np.array_equal(m[m], np.arange(MESH_VERTICES))
    for a, b in ((33, 263), (133, 362), (61, 291), (234, 454), (70, 300), (105, 334), (159, 386), (145, 374)):
        assert m[a] == b and m[b] == a
    for v in (1, 4, 10, 13, 14, 152):
        assert m[v] == v
    # the face mirrored (x about the plane of the pairs' midpoints) and re-indexed is the face again
    p = mean - mean.mean(0)
    d = p - p[m]
    normal = np.linalg.svd(d[np.linalg.norm(d, axis=1) > 1e-9], full_matrices=False)[2][0]
    offset = (((p + p[m]) / 2) @ normal).mean()
    mirrored = (p - 2 * np.outer(p @ normal - offset, normal))[m]
    assert np.linalg.norm(mirrored - p, axis=1).mean() < 0.05 * np.ptp(p, axis=0).max()
    with pytest.raises(ValueError, match="edges"):  # a wrong pairing is refused by the topology check
        mirror_vertices(np.random.default_rng(0).normal(size=(MESH_VERTICES, 3)), mesh_edges())


def test_flip_moves_each_point_to_its_mirror():
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 100, size=(2, 5 + MESH_VERTICES, 2)).astype(np.float32)
    mirror = mirror_vertices(_shipped_mean_face())
    order = np.concatenate([FLIP_ORDER, 5 + mirror])
    img = np.zeros((100, 100, 3), np.uint8)
    _, _, out = flip(img, np.array([[10.0, 10, 50, 50], [40, 40, 90, 90]]), pts, 100, order)
    assert np.allclose(out[:, 5 + 33, 0], 100 - pts[:, 5 + 263, 0]) and np.allclose(out[:, 5 + 33, 1], pts[:, 5 + 263, 1])
    assert np.allclose(out[:, 0], np.stack([100 - pts[:, 1, 0], pts[:, 1, 1]], -1))  # right eye <- left eye


@pytest.mark.parametrize("tower", [0, 1, 2])
def test_head_on_a_patch_is_the_head_on_the_map(tower):
    """Training on cached rows runs the head on the patch under an anchor: that must be the whole model's output
    there, at the map's borders too (where a deeper tower must see zeros off the map, not its own values)."""
    torch.manual_seed(tower)
    base = RetinaFace(ModelSpec(input_size=320)).eval()
    model = with_mesh_head(base, 8, tower).eval()
    for h in model.MeshHead:
        torch.nn.init.normal_(h.conv1x1.weight, std=0.1)
    x = torch.randn(1, 3, 320, 320) * 50
    level, row, col, slot = (torch.from_numpy(v) for v in anchor_cells(model.spec, 320))
    picks = [0, 1, 41, 799, 1600, 1640, 2000, 2100, 2198, 2199]  # corners, edges and middles of the three levels
    k = 2 * tower + 1
    with torch.no_grad():
        full = model(x)["mesh"][0]
        feats = model.features(x)
        got = []
        for i in picks:
            f = feats[level[i]][0]
            patch = torch.nn.functional.pad(f, (tower,) * 4).unfold(1, k, 1).unfold(2, k, 1)[:, row[i], col[i]]
            on_map = torch.nn.functional.pad(torch.ones(1, *f.shape[1:], dtype=torch.bool), (tower,) * 4)
            inside = on_map.unfold(1, k, 1).unfold(2, k, 1)[:, row[i], col[i]]
            got.append(head_at(model.MeshHead[level[i]], patch[None], inside[None], 8, slot[i:i + 1]))
    np.testing.assert_allclose(torch.cat(got).numpy(), full[picks].numpy(), atol=1e-5)


def test_training_on_rows_fits_a_known_head():
    """Rows whose targets a hidden head of the same form produced: training recovers them (the error falls 5x)."""
    torch.manual_seed(0)
    teacher = with_mesh_head(RetinaFace(ModelSpec(input_size=320)), 8, 1)
    student = with_mesh_head(RetinaFace(ModelSpec(input_size=320)), 8, 1)
    with torch.no_grad():
        teacher.mesh_basis.normal_(std=0.05)
        student.mesh_basis.copy_(teacher.mesh_basis)
        for h in teacher.MeshHead:
            torch.nn.init.normal_(h.conv1x1.weight, std=0.05)
    n = 768
    level, slot = torch.randint(0, 3, (n,)), torch.randint(0, 2, (n,))
    patches, inside = torch.randn(n, 64, 3, 3), torch.ones(n, 1, 3, 3, dtype=torch.bool)
    with torch.no_grad():
        codes = torch.stack([head_at(teacher.MeshHead[int(lv)], p[None], q[None], 8, s[None])[0]
                             for lv, p, q, s in zip(level, patches, inside, slot)])
        targets = teacher.mesh_mean + codes @ teacher.mesh_basis
    rows = AnchorRows(patches.half(), level, slot, targets.half(), inside)

    def error():
        with torch.no_grad():
            got = torch.stack([head_at(student.MeshHead[int(lv)], p[None], q[None], 8, s[None])[0]
                               for lv, p, q, s in zip(level, patches.half().float(), inside, slot)])
            return float((student.mesh_mean + got @ student.mesh_basis - targets.half().float()).abs().mean())

    before = error()
    train_on_rows(student, rows, steps=300, batch=64, lr=3e-3, basis_lr_scale=0.0, edge_weight=0.0,
                  edges=torch.from_numpy(mesh_edges()), warmup=10, progress=False)
    assert error() < 0.2 * before


def test_mesh_labels_of_another_topology_are_refused(tmp_path):
    s = MeshSample("a.jpg", np.zeros((1, 4), np.float32), np.zeros((1, 5, 2), np.float32), np.zeros((1, 68, 3), np.float32))
    save_labels([s], tmp_path / "l.npz", {})
    with pytest.raises(ConfigError, match=r"shape \(68, 3\).*\(468, 3\)"):
        load_labels(tmp_path / "l.npz")
