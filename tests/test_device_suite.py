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

from converters.bundle import read_metadata, write_metadata

ROOT = Path(__file__).resolve().parents[1]
RPI_VENV = ROOT / ".venv-rpi"
sys.path.insert(0, str(ROOT / "targets" / "common"))
import edgecheck  # noqa: E402


def test_device_decoding_matches_project(default_model, group_image):
    from edge.pipeline import Pipeline, PostConfig
    from edge.runners import TorchRunner

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
