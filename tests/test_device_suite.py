"""The on-device suites: their numpy decoding agrees with the project's, and the Raspberry Pi suite
runs (and can fail) in a bookworm-like environment: Python 3.11, numpy < 2, tflite-runtime 2.14, no torch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.bundle import write_metadata
from edge.bundle import load_bundle_runner, read_metadata
from edge.pipeline import Pipeline, PostConfig
from edge.postprocess import box_iou
from edge.preprocess import letterbox_uint8, normalise, prepare
from edge.runners import TorchRunner
from edge.samples import moving_faces
from edge.stream import write_video

ROOT = Path(__file__).resolve().parents[1]
RPI_VENV = ROOT / ".venv-rpi"
sys.path.insert(0, str(ROOT / "targets" / "common"))
import edgecheck  # noqa: E402


def test_device_normalisation_mirrors_the_project(default_model, group_image):
    """The device code's numpy pre-processing gives the network the same numbers as the project's, bit for bit."""
    spec = default_model[0].spec
    canvas = letterbox_uint8(group_image, 640, spec.mean)
    ours = prepare(canvas, spec.with_input_size(640))
    device = edgecheck.network_input(canvas, {"mean": list(spec.mean), "std": list(spec.std)}, takes_canvas=False)
    assert device.dtype == ours.tensor.dtype and np.array_equal(device, ours.tensor)
    assert np.array_equal(device, normalise(canvas, spec.mean, (1.0, 2.0, 4.0)) * np.array([1, 2, 4], np.float32)[None, :, None, None])
    assert np.array_equal(edgecheck.network_input(canvas, {}, takes_canvas=True)[0], ours.canvas)


def test_device_decoding_matches_project(default_model, group_image):
    model, _ = default_model
    pipe = Pipeline(TorchRunner(model), model.spec, PostConfig(score_threshold=0.3))
    prep = pipe.preprocess(group_image)
    out = pipe.runner(prep.tensor)
    ours = pipe.postprocess(out, prep)
    pri = edgecheck.priors(640, 640, model.spec.arch.min_sizes, model.spec.steps)
    np.testing.assert_array_equal(pri, pipe.priors_for((640, 640)))
    b, s, l, m = edgecheck.detect({k: v[0] for k, v in out.items()}, pri, (640, 640), model.spec.variances, 0.3,
                                  mesh_decoder=pipe.mesh_decoder)
    np.testing.assert_array_equal(s, ours.scores)
    assert m is not None and ours.mesh is not None and m.shape == ours.mesh.shape  # the default model has a mesh
    np.testing.assert_allclose(m[..., :2] / prep.scale, ours.mesh[..., :2], atol=1e-2)
    h, w = prep.image_hw
    mine = b / prep.scale  # the device check stays in input pixels; ours is rescaled to the image and clipped
    mine[:, 0::2] = mine[:, 0::2].clip(0, w)
    mine[:, 1::2] = mine[:, 1::2].clip(0, h)
    np.testing.assert_allclose(mine, ours.boxes, atol=1e-3)
    pairs = edgecheck.greedy_match(b, b[::-1].copy(), 0.5)
    assert len(pairs) == len(b) and all(v == 1.0 for *_, v in pairs)


def test_device_decoding_reads_int8_outputs_where_it_needs_them(default_model, group_image):
    """An int8 model's outputs reach the device decoder as written (`edgecheck.QuantizedOutput`): the same faces as
    the outputs dequantised whole, integer until an element is read; np.asarray dequantises whole."""
    model, _ = default_model
    pipe = Pipeline(TorchRunner(model), model.spec, PostConfig(score_threshold=0.3))
    prep = pipe.preprocess(group_image)
    q = {}
    for k, v in pipe.runner(prep.tensor).items():
        scale, zp = (1 / 256, -128) if k == "conf" else (float(np.abs(v).max()) / 127, 0)
        q[k] = edgecheck.QuantizedOutput(np.clip(np.round(v / scale) + zp, -128, 127).astype(np.int8), scale, zp)
    whole = {k: np.asarray(v, np.float32)[0] for k, v in q.items()}
    one = edgecheck.first_image(q)
    assert all(isinstance(v, edgecheck.QuantizedOutput) and v.q.dtype == np.int8 and v.shape == whole[k].shape for k, v in one.items())
    args = (edgecheck.priors(640, 640, model.spec.arch.min_sizes, model.spec.steps), (640, 640), model.spec.variances, 0.3)
    lazy, full = edgecheck.detect(one, *args, mesh_decoder=pipe.mesh_decoder), edgecheck.detect(whole, *args, mesh_decoder=pipe.mesh_decoder)
    assert len(lazy[0]) > 50
    for a, b in zip(lazy, full):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(one["loc"][[7, 2]], (q["loc"].q[0, [7, 2]].astype(np.float32) - 0) * q["loc"].scale)
    assert edgecheck.first_image({"x": np.ones((1, 2, 3), np.float16)})["x"].dtype == np.float32


@pytest.fixture(scope="module")
def rpi_python():
    """The bookworm-like environment, created once in .venv-rpi from targets/rpi/requirements-bookworm.txt."""
    py = RPI_VENV / "bin" / "python"
    stamp = RPI_VENV / ".installed"
    req = ROOT / "targets" / "rpi" / "requirements-bookworm.txt"
    if not stamp.is_file() or stamp.read_text() != req.read_text():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(RPI_VENV)], check=True)
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(req)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"could not build the bookworm-like environment: {r.stderr[-500:]}")
        stamp.write_text(req.read_text())
    v = subprocess.run([str(py), "-c", "import numpy, tflite_runtime, sys; print(sys.version_info[:2], numpy.__version__); import torch"],
                       capture_output=True, text=True)
    assert "(3, 11) 1.26" in v.stdout and "No module named 'torch'" in v.stderr
    return py


def _run_suite(py, tmp_path, bundle):
    device_copy = tmp_path / "device"
    if not device_copy.exists():
        shutil.copytree(ROOT / "targets", device_copy / "targets", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(py), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "targets/rpi", "--bundle", str(bundle)],
                          cwd=device_copy, env=env, capture_output=True, text=True, timeout=600)


def test_rpi_suite_passes_and_can_fail(rpi_python, bundles, tmp_path):
    src = bundles("tflite", "int8")
    r = _run_suite(rpi_python, tmp_path, src)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "runtime: tflite-runtime" in r.stdout and '"passed": true' in r.stdout
    # tflite-runtime 2.14's wheel delegates no int8 op to XNNPACK: the suite says so (the bundle runs in builtin kernels)
    assert "XNNPACK partitions: 0" in r.stdout
    assert '"missed_faces": ' in r.stdout and '"extra_faces": ' in r.stdout  # as edge parity counts them

    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    data = bytearray((tampered / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(data))
    r = _run_suite(rpi_python, tmp_path, tampered)
    assert r.returncode != 0 and "does not match its SHA-256" in r.stdout

    # a golden set that no longer describes the model (hashes re-made): only the comparison can catch it
    shifted = tmp_path / "shifted"
    shutil.copytree(src, shifted)
    with np.load(shifted / "golden.npz") as z:
        g = {k: z[k] for k in z.files}
    g["det_boxes"] = g["det_boxes"] + 12.0
    np.savez_compressed(shifted / "golden.npz", **g)
    _, meta = read_metadata(shifted, verify=False)
    meta.pop("files")
    write_metadata(shifted, meta)
    r = _run_suite(rpi_python, tmp_path, shifted)
    assert r.returncode != 0 and "mean_iou" in r.stdout


def _tampered_metadata(src, root, case):
    """A copy of `src` whose metadata was edited as an attacker would (hashes left as they are unless said)."""
    d = root / case
    shutil.copytree(src, d)
    meta = json.loads((d / "metadata.json").read_text())
    if case == "model_outside":  # a tampered model beside the bundle, named by a relative path
        outside = root / "outside"
        outside.mkdir(exist_ok=True)
        data = bytearray((d / "model.tflite").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (outside / "model.tflite").write_bytes(bytes(data))
        meta["model_file"] = "../outside/model.tflite"
    elif case == "model_absolute":
        meta["model_file"] = str((root / "outside" / "model.tflite").resolve())
    elif case == "model_not_hashed":  # the model dropped from the hash list, then one byte flipped
        meta["files"].pop(meta["model_file"])
        data = bytearray((d / "model.tflite").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / "model.tflite").write_bytes(bytes(data))
    elif case == "golden_not_hashed":
        meta["files"].pop("golden.npz")
    elif case == "metadata_array":
        meta = [meta]
    elif case == "files_not_object":
        meta["files"] = ["model.tflite"]
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


TAMPER_CASES = {
    "model_outside": "model_file '../outside/model.tflite' is not a plain file name inside the bundle",
    "model_absolute": "is not a plain file name inside the bundle",
    "model_not_hashed": "model.tflite is not in metadata.json's hash list",
    "golden_not_hashed": "golden.npz is not in metadata.json's hash list",
    "metadata_array": "metadata.json holds a JSON list, not an object",
    "files_not_object": "metadata.json lacks 'files'",
}


@pytest.mark.parametrize("case", sorted(TAMPER_CASES))
def test_device_loader_refuses_tampered_metadata(bundles, tmp_path, case):
    """In-process, every case: the suite's loader refuses the bundle before any runtime sees a file."""
    if case == "model_absolute":
        _tampered_metadata(bundles("tflite", "int8"), tmp_path, "model_outside")
    d = _tampered_metadata(bundles("tflite", "int8"), tmp_path, case)
    with pytest.raises(edgecheck.BundleCheckError, match=TAMPER_CASES[case].replace("(", r"\(").replace(")", r"\)")):
        edgecheck.check_on_device(d, "tflite", lambda *a: pytest.fail("the runtime was reached"))


def test_rpi_suite_refuses_tampered_bundles(rpi_python, bundles, tmp_path):
    """The same cases through the real device suite in the bookworm-like environment: each run fails, saying why."""
    src = bundles("tflite", "int8")
    root = tmp_path / "bundles"
    root.mkdir()
    for case in ("model_outside", "model_absolute", "model_not_hashed", "metadata_array"):
        d = _tampered_metadata(src, root, case)
        r = _run_suite(rpi_python, tmp_path, d)
        assert r.returncode != 0, f"{case}: the suite passed a tampered bundle"
        assert TAMPER_CASES[case] in r.stdout and "AttributeError" not in r.stdout, (case, r.stdout[-2000:])


def test_rpi_stream_script_runs_a_clip(rpi_python, bundles, tmp_path):
    """targets/rpi/stream.py in the bookworm-like environment (numpy 1.26, tflite-runtime, OpenCV, no torch) on a
    generated clip: a JSON line per frame, the same faces as the project's own pipeline, and its FPS."""
    bundle = bundles("tflite", "int8")
    frames = [f for f, _ in moving_faces(20, size=(360, 640))]
    clip = tmp_path / "clip.avi"
    assert write_video(clip, frames, 25.0) == 20
    device_copy = tmp_path / "device"
    shutil.copytree(ROOT / "targets", device_copy / "targets", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out, summary = tmp_path / "faces.jsonl", tmp_path / "summary.json"
    r = subprocess.run([str(rpi_python), "targets/rpi/stream.py", str(bundle), str(clip), "--jsonl", str(out), "--json",
                        str(summary), "--threads", "2"], cwd=device_copy, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    s = json.loads(summary.read_text())
    assert len(records) == 20 == s["frames"] and s["fps"] > 0 and s["runtime"].startswith("tflite-runtime")
    assert "fps" in r.stdout
    runner, spec, _ = load_bundle_runner(bundle)  # the same bundle on this host's runtime (ai-edge-litert)
    pipe = Pipeline(runner, spec)
    ious = []
    for rec, frame in zip(records, frames):
        ours = pipe(frame)
        assert len(rec["faces"]) == len(ours)
        if len(ours):
            ious += box_iou(np.array([f["box"] for f in rec["faces"]]), ours.boxes).max(axis=1).tolist()
    # two TFLite runtimes (tflite-runtime 2.14 there, ai-edge-litert here) round int8 kernels a little differently
    assert len(ious) >= 60 and min(ious) > 0.8 and np.mean(ious) > 0.95


def test_device_letterbox_mirrors_the_project(group_image):
    """targets/common/devstream.letterbox (OpenCV's resize, or its numpy fallback) gives the project's
    letterbox_uint8 canvas bit for bit, and the same scale."""
    import devstream  # targets/common, on sys.path above

    cv2 = pytest.importorskip("cv2")
    for size in (640, 320):
        ours = letterbox_uint8(group_image, size, (104, 117, 123))
        with_cv2, scale = devstream.letterbox(group_image, size, (104, 117, 123), cv2)
        assert np.array_equal(with_cv2, ours) and scale == size / max(group_image.shape[:2])
        numpy_only, _ = devstream.letterbox(group_image, size, (104, 117, 123), None)
        assert np.abs(numpy_only.astype(int) - ours.astype(int)).max() <= 1  # float32 taps in another order: +-1 at .5
