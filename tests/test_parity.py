"""The parity harness: JSON contract, gates, report, and that it can fail."""
import json
import shutil

import numpy as np
import pytest

from converters.bundle import read_metadata, write_metadata
from edge import cli
from edge.parity import check_gates, load_gates

pytestmark = pytest.mark.convert

KEYS = {"passed", "target", "precision", "reference_device", "images", "recall", "precision_vs_ref", "mean_iou", "min_iou",
        "score_mae", "landmark_nme", "mesh_nme", "tensors"}


@pytest.mark.parametrize("target", ["onnx", "tflite", "openvino"])
def test_fp32_bundles_pass_with_recall_1(bundles, shared, tmp_path, target):
    out = tmp_path / "p.json"
    rc = cli.main(["parity", str(bundles(target, "fp32")), "--images", str(shared / "images"), "--json", str(out), "--quiet"])
    s = json.loads(out.read_text())
    assert rc == 0 and KEYS <= set(s)
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
    rc = cli.main(["parity", str(bundles("tflite", "int8")), "--report", str(tmp_path / "rep"), "--quiet"])
    assert rc == 0
    rep = tmp_path / "rep"
    md = (rep / "report.md").read_text()
    assert "PASSED" in md and "| recall |" in md and "errors.png" in md
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert "errors.png" in pngs and sum(p.startswith("worst_") for p in pngs) == 3


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
    assert load_gates("onnx", "fp32")["recall_min"] == 1.0


def test_convert_exits_1_and_marks_bundle_when_gate_fails(tmp_path, monkeypatch, capsys):
    import edge.parity
    from converters import cli as ccli

    real = edge.parity.load_gates

    def impossible(target, precision):
        g = real(target, precision)
        g["recall_min"] = 1.01
        return g

    monkeypatch.setattr(edge.parity, "load_gates", impossible)
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
