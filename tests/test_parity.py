"""The parity harness: JSON contract, gates, report, and that it can fail."""
import json
import shutil

import numpy as np
import pytest

import edge.evaluate.parity
from converters import cli as ccli
from converters.bundle import write_metadata
from edge.bundle import read_metadata
from edge.commands import cli
from edge.evaluate.parity import ImageParity, ParityReport, check_gates, detection_agreement, load_gates
from edge.postprocess import decode_at, decode_detections, rescale

pytestmark = pytest.mark.convert

KEYS = {"passed", "target", "precision", "reference_device", "images", "recall", "precision_vs_ref", "mean_iou", "min_iou",
        "score_mae", "landmark_nme", "mesh_nme", "tensors", "missed_faces", "extra_faces"}


@pytest.mark.parametrize("target", ["onnx", "tflite", "openvino"])
def test_fp32_bundles_pass_with_recall_1(bundles, shared, tmp_path, target):
    out = tmp_path / "p.json"
    rc = cli.main(["parity", str(bundles(target, "fp32")), "--images", str(shared / "images"), "--json", str(out), "--quiet"])
    s = json.loads(out.read_text())
    assert rc == 0 and KEYS <= set(s)
    assert s["missed_faces"] == s["extra_faces"] == 0 and s["ref_faces"] == s["cand_faces"] > 0
    assert s["passed"] and s["recall"] == 1.0 and s["mean_iou"] > 0.9999 and s["mesh_nme"] < 1e-4  # the default has a mesh
    assert s["images"] == 3 and s["reference_device"] == "cpu" and s["tensors"]["loc"]["max_abs"] < 1e-3


def test_parity_against_another_model(bundles, tmp_path, capsys):
    """--against: the reference is any FP32 model by name or path (here the registry's default, which this bundle
    was converted from: recall 1), named in the summary; with --weights as well it is a ConfigError."""
    out = tmp_path / "p.json"
    rc = cli.main(["parity", str(bundles("onnx", "fp32")), "--against", "default", "--json", str(out), "--quiet"])
    s = json.loads(out.read_text())
    assert rc == 0 and s["against"].startswith("default [") and s["recall"] == 1.0
    assert "not the bundle's own weights" in capsys.readouterr().out
    assert cli.main(["parity", str(bundles("onnx", "fp32")), "--against", "default", "--weights", "default", "--quiet"]) == 2


def test_report_written(bundles, tmp_path, capsys):
    rc = cli.main(["parity", str(bundles("tflite", "int8")), "--report", str(tmp_path / "rep"), "--json",
                   str(tmp_path / "p.json"), "--quiet"])
    assert rc == 0
    rep = tmp_path / "rep"
    md = (rep / "report.md").read_text()
    s = json.loads((tmp_path / "p.json").read_text())
    matched = round(s["recall"] * s["ref_faces"])
    assert (s["missed_faces"], s["extra_faces"]) == (s["ref_faces"] - matched, s["cand_faces"] - matched)
    assert f"| reference faces missed / candidate faces extra | {s['missed_faces']} / {s['extra_faces']} | |" in md
    # the mean IoU split by anchor: the two parts weigh back to the whole; the report gives both
    n_sw, same, sw = s["anchor_switches"], s["mean_iou_same_anchor"], s["mean_iou_switched"]
    assert 0 < n_sw < matched and abs(((matched - n_sw) * same + n_sw * sw) / matched - s["mean_iou"]) < 1e-9
    assert f"reference's anchor {same:.4f}, of the switched ones {sw:.4f}" in md
    assert "PASSED" in md and "| recall |" in md and "errors.png" in md and "worst_faces.png" in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "errors.png" in pngs and sum(p.startswith("worst_") and p != "worst_faces.png" for p in pngs) == 3
    from PIL import Image

    grid = Image.open(rep / "worst_faces.png")  # reference and candidate crops side by side, one row per face
    assert grid.width == 2 * 224 + 3 * 6 and grid.height > 224


def _one_face_outputs(scores, mesh_codes, pri):
    """Raw outputs of one image where anchors 0 and 1 both see the same face (the same box, landmarks at the
    priors' centres) with the given scores and per-anchor mesh vertices (V=4, raw codes)."""
    a = len(pri)
    conf = np.zeros((a, 2), np.float32)
    conf[:, 0] = 1.0
    conf[:2, 1], conf[:2, 0] = scores, 1 - np.asarray(scores)
    loc = np.zeros((a, 4), np.float32)
    loc[1, :2] = (pri[0, :2] - pri[1, :2]) / (0.1 * pri[1, 2:])  # anchor 1 decodes to anchor 0's box
    loc[1, 2:] = np.log(pri[0, 2:] / pri[1, 2:]) / 0.2
    return {"loc": loc, "conf": conf, "landmarks": np.zeros((a, 10), np.float32), "mesh": np.asarray(mesh_codes, np.float32)}


def test_anchor_switch_is_counted_and_errors_are_measured_anchor_for_anchor():
    """Two anchors of one face with near-equal scores: the candidate keeps the other one (its score moved by
    0.01), whose mesh is different in both models. The plain pair error is large, the same-anchor error is 0
    (the candidate reproduces the reference at that anchor), and the switch is counted."""

    pri = np.array([[0.5, 0.5, 0.2, 0.2], [0.52, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]], np.float32)
    mesh = np.zeros((3, 12), np.float32)
    mesh[1] = 3.0  # anchor 1's mesh lies elsewhere
    ref_out = _one_face_outputs([0.80, 0.79], mesh, pri)
    cand_out = _one_face_outputs([0.79, 0.80], mesh, pri)
    ref = decode_detections(ref_out, pri, (100, 100))
    cand = decode_detections(cand_out, pri, (100, 100))
    assert ref.anchors.tolist() == [0] and cand.anchors.tolist() == [1]
    at = decode_at(ref_out, pri, cand.anchors, (100, 100))
    np.testing.assert_allclose(at.boxes, cand.boxes, atol=1e-4)
    a = detection_agreement(ref, cand, 0.5, at)
    assert a["matched"] == 1 and a["anchor_switches"] == 1 and a["switched"] == [True]
    assert a["mesh_nme"][0] > 0.1 and a["mesh_nme_at_anchor"][0] < 1e-5 and a["landmark_nme_at_anchor"][0] < 1e-5
    s = ParityReport("t", "int8", "cpu", "c", [ImageParity("x", a, {}, {})]).summary()
    assert s["anchor_switches"] == 1 and s["mesh_nme_max"] < 1e-5 and s["switched_mesh_nme_max"] > 0.1
    assert s["mean_iou_switched"] == s["mean_iou"] and s["mean_iou_same_anchor"] is None  # the one pair switched
    same = detection_agreement(ref, ref, 0.5, decode_at(ref_out, pri, ref.anchors, (100, 100)))
    assert same["anchor_switches"] == 0 and same["mesh_nme_at_anchor"][0] == 0


def test_decode_at_the_kept_anchors_gives_the_detections():
    rng = np.random.default_rng(0)
    pri = np.column_stack([rng.uniform(0.1, 0.9, (50, 2)), rng.uniform(0.05, 0.3, (50, 2))]).astype(np.float32)
    s = rng.uniform(0, 1, 50).astype(np.float32)
    out = {"loc": rng.normal(0, 1, (50, 4)).astype(np.float32), "conf": np.column_stack([1 - s, s]),
           "landmarks": rng.normal(0, 1, (50, 10)).astype(np.float32), "mesh": rng.normal(0, 1, (50, 9)).astype(np.float32)}
    det = decode_detections(out, pri, (64, 96))
    at = decode_at(out, pri, det.anchors, (64, 96))
    assert len(det) > 3 and (det.scores > 0.5).all()
    for f in ("boxes", "scores", "landmarks", "mesh"):
        np.testing.assert_array_equal(getattr(det, f), getattr(at, f))
    moved = rescale(det, 0.5, (2.0, 3.0), (200, 200))
    assert moved.anchors is det.anchors and det.take([1, 0]).anchors.tolist() == det.anchors[[1, 0]].tolist()


def test_broken_model_fails_parity(bundles, tmp_path):
    """An ONNX bundle with one convolution's weights altered (hashes updated, so only parity can catch it) fails."""
    import onnx
    from onnx import numpy_helper

    d = tmp_path / "broken"
    shutil.copytree(bundles("onnx", "fp32"), d)
    m = onnx.load(str(d / "model.onnx"))
    init = max((i for i in m.graph.initializer if len(i.dims) == 4), key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init).copy()
    w *= -1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(d / "model.onnx"))
    _, meta = read_metadata(d, verify=False)
    meta.pop("files")
    write_metadata(d, meta)
    out = tmp_path / "p.json"
    assert cli.main(["parity", str(d), "--json", str(out), "--quiet"]) == 1
    s = json.loads(out.read_text())
    assert not s["passed"] and s["failed"]


def test_check_gates_names_failures():
    g = load_gates("tflite", "int8")
    ok = {"ref_faces": 10, "recall": 0.97, "precision_vs_ref": 0.95, "mean_iou": 0.94, "min_iou": 0.8, "score_mae": 0.02, "landmark_nme": 0.02, "mesh_nme": None}
    assert check_gates(ok, g) == []
    bad = dict(ok, recall=0.9, landmark_nme=0.2)
    assert [f.split()[0] for f in check_gates(bad, g)] == ["recall", "landmark_nme"]
    worst = dict(ok, landmark_nme_p99=1.0, mesh_nme_p99=1.0)  # the mean passes, the worst faces do not
    assert [f.split()[0] for f in check_gates(worst, g)] == ["landmark_nme_p99", "mesh_nme_p99"]
    assert load_gates("onnx", "fp32")["recall_min"] == 1.0


def test_convert_exits_1_and_marks_bundle_when_gate_fails(tmp_path, monkeypatch, capsys):
    real = edge.evaluate.parity.load_gates

    def impossible(target, precision):
        g = real(target, precision)
        g["recall_min"] = 1.01
        return g

    monkeypatch.setattr(edge.evaluate.parity, "load_gates", impossible)
    out = tmp_path / "b"
    assert ccli.main(["--target", "onnx", "--out", str(out), "--quiet"]) == 1
    assert read_metadata(out)[1]["parity"]["passed"] is False
    assert "FAILED" in capsys.readouterr().out
    assert ccli.main(["--target", "onnx", "--out", str(out), "--quiet", "--no-parity-gate"]) == 0


def test_cuda_reference_falls_back_and_says_so(bundles, tmp_path):
    import torch

    out = tmp_path / "p.json"
    cli.main(["parity", str(bundles("onnx", "fp32")), "--reference-device", "cuda", "--json", str(out), "--quiet"])
    dev = json.loads(out.read_text())["reference_device"]
    assert dev.startswith("cuda") if torch.cuda.is_available() else dev == "cpu (CUDA asked for but not available)"
