"""Converters: bundles for every target, checked against the FP32 PyTorch model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from converters.api import convert
from converters.bundle import load_bundle_runner, read_metadata
from edge.errors import BundleError, ConfigError
from edge.image_io import load_image
from edge.parity import detection_agreement
from edge.pipeline import Pipeline
from edge.runners import TorchRunner
from edge.samples import grace_hopper

pytestmark = pytest.mark.convert
ROOT = Path(__file__).resolve().parents[1]


def _real_images(shared):
    return [load_image(shared / "images" / n) for n in ("group.jpg", "crowd.jpg", "street.jpg")] + [grace_hopper()]


@pytest.mark.parametrize("target", ["onnx", "tflite", "openvino"])
def test_fp32_bundles_reproduce_pytorch(bundles, default_model, shared, target):
    model, _ = default_model
    runner, spec, _ = load_bundle_runner(bundles(target, "fp32"))
    ref = TorchRunner(model)
    pipe = Pipeline(runner, spec)
    worst = {}
    for im in _real_images(shared):
        x = pipe.preprocess(im).tensor
        a, b = ref(x), runner(x)
        for k in spec.output_names:
            worst[k] = max(worst.get(k, 0.0), float(np.abs(a[k] - b[k]).max()))
    assert all(v < 1e-3 for v in worst.values()), worst


@pytest.mark.parametrize("target", ["tflite", "openvino"])
def test_int8_recall_of_fp32_faces_on_group(bundles, default_model, group_image, target):
    model, _ = default_model
    bundle = bundles(target, "int8")
    runner, spec, _ = load_bundle_runner(bundle)
    ref = Pipeline(TorchRunner(model), spec)(group_image)
    cand = Pipeline(runner, spec)(group_image)
    agree = detection_agreement(ref, cand)
    print(f"{target} int8: recall {agree['recall']:.3f} of {len(ref)} FP32 faces, precision {agree['precision']:.3f}")
    assert agree["recall"] >= 0.95, agree["recall"]
    meta = read_metadata(bundle)[1]
    assert meta["calibration"]["count"] == 32 and "built-in" in meta["calibration"]["source"]
    if target == "tflite":
        size = (bundle / "model.tflite").stat().st_size
        assert size <= 0.65e6, size  # the detector ~0.6 MB, the mesh head's three 1x1 convolutions ~20 KB
        ops = meta["quantization"]["ops"]
        assert ops.get("CONV_2D:int8", 0) >= 40 and ops.get("DEPTHWISE_CONV_2D:int8", 0) == 13
    else:
        assert meta["quantization"]["conv_weight_types"].get("i8", 0) == 59  # 43 convs + 13 group convs + 3 mesh


@pytest.mark.parametrize("precision", ["fp16", "int8w", "int8"])
def test_coreml_structure(bundles, precision):
    bundle = bundles("coreml", precision)
    meta = read_metadata(bundle)[1]
    q = meta["quantization"]
    assert q["inputs"] == {"input": [1, 3, 640, 640]}
    assert q["outputs"] == {"loc": [1, 16800, 4], "conf": [1, 16800, 2], "landmarks": [1, 16800, 10], "mesh": [1, 16800, 32]}
    assert q["ops"].get("conv", 0) == 59  # 56 of the detector, 3 of the mesh head
    if precision == "fp16":
        assert q["int8_weight_tensors"] == 0
    else:
        assert q["int8_weight_tensors"] >= 59
    if precision == "int8":
        assert q["ops"].get("quantize", 0) + q["ops"].get("dequantize", 0) > 0
    if sys.platform != "darwin":  # run by the numpy MIL interpreter, and said so
        assert meta["parity"]["passed"] is True and "interpreted MIL, not the Core ML runtime" in meta["parity"]["runner"]


def test_format_metadata_slots(bundles):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(bundles("onnx", "fp32") / "model.onnx")).metadata_props}
    assert props["retinaface_edge.precision"] == "fp32" and json.loads(props["retinaface_edge.spec"])["input_size"] == 640
    from converters.tflite_target import read_metadata as tfl_meta

    assert tfl_meta(bundles("tflite", "fp32") / "model.tflite")["retinaface_edge.precision"] == "fp32"
    import openvino as ov

    m = ov.Core().read_model(str(bundles("openvino", "fp32") / "model.xml"))
    assert m.get_rt_info(["retinaface_edge", "precision"]).astype(str) == "fp32"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_normalises_the_uint8_canvas_inside_the_model(bundles, shared, precision):
    """The pipeline hands OpenVINO the uint8 canvas (its pre-processing converts, subtracts the mean and reorders):
    the outputs are bit-identical to the numpy-normalised tensor, padded canvases included; a resized image (float
    pixels) and a spec with a fractional mean keep the tensor."""
    import openvino as ov

    from edge.contract import ModelSpec
    from edge.pipeline import run_prepared
    from edge.preprocess import prepare

    bundle = bundles("openvino", precision)
    runner, spec, _ = load_bundle_runner(bundle)
    group = load_image(shared / "images" / "group.jpg")
    pictures = [group[:640, :640], group[:300, :640], group[:640, :416], group]  # full, padded below, padded right, resized
    for im in pictures:
        prep = prepare(im, spec)
        assert prep.has_canvas == (max(im.shape[:2]) == 640)
        a, b = runner(prep.tensor), run_prepared(runner, prep)
        for k in spec.output_names:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} {im.shape}")
    assert runner._image_request is not None  # the canvas path did run
    padded = prepare(group[:300, :640], spec)
    assert padded.canvas.dtype == np.uint8 and np.all(padded.canvas[300:] == np.array(spec.mean, np.uint8))
    assert not prepare(group[:640, :640], ModelSpec(mean=(104.5, 117.0, 123.0))).has_canvas
    with pytest.raises(ValueError, match="uint8 BGR canvas"):
        runner.run_image(prep.tensor)
    # the class softmax is a sigmoid of the logit difference in the saved model: probabilities still sum to 1
    meta = read_metadata(bundle)[1]
    assert meta["quantization"]["softmax_as_sigmoid"] == 1
    ops = {op.get_type_name() for op in ov.Core().read_model(str(bundle / "model.xml")).get_ordered_ops()}
    assert "Softmax" not in ops and "Sigmoid" in ops
    np.testing.assert_allclose(b["conf"].sum(-1), 1.0, atol=1e-6)


def test_unsupported_combinations_refused_before_work(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="onnx does not offer int8w"):
        convert("onnx", "int8w", out=out)
    with pytest.raises(ConfigError, match="unknown target"):
        convert("tensorrt", "fp32", out=out)
    with pytest.raises(ConfigError, match="--calib is only used for int8"):
        convert("onnx", "fp32", calib=str(tmp_path), out=out)
    with pytest.raises(ConfigError, match="multiple of 32"):
        convert("onnx", "fp32", input_size=100, out=out)
    with pytest.raises(ConfigError, match="float-modules applies"):
        convert("onnx", "int8", float_modules=["body.stage1"], out=out)
    with pytest.raises(ConfigError, match="float-modules applies"):
        convert("tflite", "fp16", float_modules=["body.stage1"], out=out)
    with pytest.raises(ConfigError, match="no module named 'body.stage9'"):
        convert("tflite", "int8", float_modules=["body.stage9"], out=out)
    assert not out.exists()


def test_int8_with_float_modules(bundles, tmp_path):
    """--float-modules body.stage1: the named layers stay float in the TFLite program (a dequantize before them, a
    quantize after), the rest int8; the bundle says so, and every output tensor is closer to FP32 than the
    all-int8 bundle's (the high-resolution layers are where int8 loses most)."""
    pytest.importorskip("litert_torch")
    from converters.bundle import read_metadata

    res = convert("tflite", "int8", float_modules=["body.stage1"], out=tmp_path / "b", progress=False)
    q = read_metadata(res.bundle)[1]["quantization"]
    ops = q["ops"]
    assert q["float_modules"] == ["body.stage1"] and res.parity["passed"]
    all_int8 = read_metadata(bundles("tflite", "int8"))[1]["parity"]["tensors"]
    for name, t in res.parity["tensors"].items():
        assert t["snr_db"] > all_int8[name]["snr_db"], name
    # body.stage1: 6 full convolutions and 5 depthwise ones; the other 40 + 8 stay int8
    assert ops["CONV_2D:float32"] == 6 and ops["DEPTHWISE_CONV_2D:float32"] == 5
    assert ops["CONV_2D:int8"] == 40 and ops["DEPTHWISE_CONV_2D:int8"] == 8


def test_cli_list_and_refusal(capsys):
    from converters import cli

    assert cli.main(["--list"]) == 0
    assert "tflite" in capsys.readouterr().out
    assert cli.main(["--target", "onnx", "--precision", "int8w"]) == 2
    assert "error: onnx does not offer int8w" in capsys.readouterr().err


def test_detect_with_bundle(bundles, capsys):
    from edge import cli

    from edge.samples import grace_hopper_path

    assert cli.main(["detect", str(grace_hopper_path()), "--bundle", str(bundles("onnx", "fp32"))]) == 0
    assert "1 faces" in capsys.readouterr().out


def test_tampered_and_broken_bundles(bundles, tmp_path):
    import shutil

    src = bundles("onnx", "fp32")

    def copy(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = copy("tampered")
    with open(d / "model.onnx", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        load_bundle_runner(d)
    d = copy("missing")
    (d / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        load_bundle_runner(d)
    for name, edit, match in (
        ("newer", lambda m: m.update(format_version=99), "newer than this toolkit"),
        ("target", lambda m: m.update(target="tensorrt"), "unknown target"),
        ("traversal", lambda m: m.update(model_file="../../etc/passwd"), "unsafe file name"),
    ):
        d = copy(name)
        meta = json.loads((d / "metadata.json").read_text())
        edit(meta)
        (d / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=match):
            load_bundle_runner(d)
    d = copy("nometa")
    (d / "metadata.json").unlink()
    with pytest.raises(BundleError, match="metadata.json is missing"):
        load_bundle_runner(d)


def test_killed_convert_leaves_no_half_bundle(tmp_path):
    """SIGKILL edge-convert at several points: --out is absent or a complete, verified bundle."""
    out = tmp_path / "killed"
    env = dict(os.environ)
    seen_partial = False
    for delay in (1.0, 4.0, 7.0, 9.0, 11.0):
        p = subprocess.Popen([sys.executable, "-m", "converters.cli", "--target", "onnx", "--out", str(out), "--quiet"],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        seen_partial |= any(tmp_path.glob(".killed.partial-*"))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            read_metadata(out)  # complete and verified, or this raises
    r = subprocess.run([sys.executable, "-m", "converters.cli", "--target", "onnx", "--out", str(out), "--quiet"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    read_metadata(out)
    assert seen_partial, "the kills never caught a conversion in progress"
    assert not list(tmp_path.glob(".killed.partial-*")), "stale partial folders were not cleaned"


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_conversion_is_byte_identical(tmp_path, target):
    """Two edge-convert runs on the same weights give the same bytes. (Within one process OpenVINO
    numbers auto-generated node names from a process-wide counter, so each run is its own process.)"""
    metas = []
    for k in range(2):
        r = subprocess.run([sys.executable, "-m", "converters.cli", "--target", target, "--out", str(tmp_path / f"b{k}"), "--quiet"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        metas.append(read_metadata(tmp_path / f"b{k}")[1])
    assert metas[0]["reproducibility"] == {"byte_identical": True}
    assert metas[0]["files"] == metas[1]["files"]


def test_coreml_says_why_it_is_not_byte_identical(bundles):
    meta = read_metadata(bundles("coreml", "fp16"))[1]
    assert meta["reproducibility"]["byte_identical"] is False and "Manifest.json" in meta["reproducibility"]["why"]
