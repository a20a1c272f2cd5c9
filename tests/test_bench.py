"""edge bench, the peers and the device benchmark scripts (tiny run counts: the numbers are not checked, the plumbing is)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.commands import cli
from edge.commands.args import peer_pipeline
from edge.commands.bench import _distinct_tails
from edge.evaluate.parity import detection_agreement
from edge.evaluate.peers import BlazeFacePipeline, YuNetPipeline
from edge.samples import grace_hopper, scene

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.convert


def test_bench_table_json_and_report(bundles, shared, tmp_path, capsys):
    yunet = shared / "peers/yunet/face_detection_yunet_2026may.onnx"
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"easy": 0.9, "medium": 0.85, "hard": 0.6}))
    rc = cli.main(["bench", str(bundles("onnx", "fp32")), str(bundles("tflite", "int8")), "--torch", "--peers", f"yunet:{yunet},blazeface:short_range",
                   "--threads", "1", "--runs", "3", "--warmup", "1", "--image-size", "640x640", "--quiet", "--json", str(tmp_path / "b.json"),
                   "--report", str(tmp_path / "rep"), "--accuracy", f"onnx fp32={acc}"])
    assert rc == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    names = [r["name"] for r in rows]
    assert names[:3] == ["onnx fp32", "tflite int8", "pytorch fp32 (eager)"] and any("YuNet" in n for n in names) and any("BlazeFace" in n for n in names)
    for r in rows:
        assert r["ms"]["e2e"]["median"] >= r["ms"]["infer"]["median"] > 0 and r["runs"] == 3 and r["image_hw"] == [640, 640]
    ours = rows[0]
    # 0.99 GMACs at 640. The floor is an estimate from a timing, so no bound on the ratio (a loaded machine moves it):
    # only that it is the arithmetic it claims to be
    assert 0.9 < ours["gmacs"] < 1.1 and ours["floor_is_estimate"] and ours["peak_gmacs_per_s"] > 0
    assert ours["floor_ms"] == pytest.approx(ours["gmacs"] / ours["peak_gmacs_per_s"] * 1e3)
    assert ours["infer_over_floor"] == pytest.approx(ours["ms"]["infer"]["median"] / ours["floor_ms"])
    md = (tmp_path / "rep" / "bench.md").read_text()
    assert "infer / floor (estimate)" in md and "An estimate" in md
    assert "| onnx fp32 | 1 | 640x640 |" in md and "60.00" in md and (tmp_path / "rep" / "latency_vs_ap.png").is_file()


def test_bench_rows_of_same_named_bundles_stay_apart():
    """Rows are keyed by name: bundles with one folder name in different runs (or one bundle twice) get distinct tags."""

    assert _distinct_tails([Path("/r/run1/b_int8"), Path("/r/run2/b_int8")]) == ["run1/b_int8", "run2/b_int8"]
    assert _distinct_tails([Path("/r/x/b"), Path("/r/x/b")]) == ["x/b #1", "x/b #2"]
    assert _distinct_tails([Path("/a"), Path("/b")]) == ["a", "b"]


@pytest.mark.parametrize("text", ["640", "0x640", "axb", "16x16"])
def test_bench_image_size_is_checked(text, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--torch", "--image-size", text])
    assert "image-size" in capsys.readouterr().err


def test_device_bench_scripts_run_here_and_merge(bundles, tmp_path):
    rpi, jet = tmp_path / "rpi.json", tmp_path / "jetson.json"
    for script, bundle, out in (("targets/rpi/bench_tflite.py", bundles("tflite", "int8"), rpi), ("targets/jetson/bench_onnx.py", bundles("onnx", "fp32"), jet)):
        r = subprocess.run([sys.executable, script, str(bundle), "--runs", "3", "--warmup", "1", "--json", str(out)] + (["--threads", "1"] if "rpi" in script else []),
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert cli.main(["bench", "--merge", str(rpi), "--merge", str(jet), "--report", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "bench.md").read_text()
    assert "tflite int8 [ai-edge-litert; XNNPACK partitions: 1, " in md  # the full-integer graph: one partition
    assert "onnx fp32 [onnxruntime (CPUExecutionProvider)" in md


def test_yunet_peer_detects_the_portrait(shared):
    for pipe in (YuNetPipeline(shared / "peers/yunet/face_detection_yunet_2026may.onnx"), BlazeFacePipeline("short_range"), BlazeFacePipeline("full_range")):
        det = pipe(grace_hopper())
        assert len(det) == 1
        x1, y1, x2, y2 = det.boxes[0]
        assert 140 < x1 < 220 and 330 < x2 < 400 and 100 < y1 < 160 and 300 < y2 < 360


def test_yunet_decoder_agrees_with_opencv(shared):
    """Our numpy decoding of YuNet's raw outputs against OpenCV's own FaceDetectorYN."""
    pytest.importorskip("cv2")

    path = shared / "peers/yunet/face_detection_yunet_2026may.onnx"
    ours, _ = peer_pipeline(f"yunet:{path}", 640)
    cv, _ = peer_pipeline(f"yunet-cv:{path}", 640)
    for im in (grace_hopper(), scene(3)):
        a, b = ours(im), cv(im)
        ag = detection_agreement(a, b)
        assert len(a) > 0 and ag["recall"] == 1.0 and ag["precision"] == 1.0 and min(ag["iou"]) > 0.995
