"""The bad-input corpus: every case gets the exact typed error through the API and, through the
CLI, exit code 2 with a one-line `error: ...` and no traceback. Inputs are generated here."""
import json
import pickle
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from edge.bundle import load_bundle_runner
from edge.commands import cli
from edge.errors import BundleError, ConfigError, ImageError, WeightsError
from edge.image_io import MAX_PIXELS, load_image
from edge.pipeline import Pipeline
from edge.runners import TorchRunner
from edge.samples import grace_hopper_path
from edge.weights.load import load_weights


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _png_chunk(b"IEND", b"")


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.fixture(scope="module")
def jpeg_bytes():
    import io

    buf = io.BytesIO()
    Image.open(grace_hopper_path()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGE_CASES = {
    "truncated.jpg": (lambda j: j[: len(j) // 3], "truncated or corrupt"),
    "zero_bytes.jpg": (lambda j: b"", "empty file"),
    "text.jpg": (lambda j: b"hello, not an image\n" * 10, "not a readable image"),
    "html.jpg": (lambda j: b"<!doctype html><html><body>404</body></html>", "not a readable image"),
    "header_only.png": (lambda j: b"\x89PNG\r\n\x1a\n", "truncated or corrupt|not a readable image"),
    "jpeg_garbage_body.jpg": (lambda j: j[:600] + bytes(range(256)) * 40, "truncated or corrupt"),
    "png_bomb.png": (lambda j: forged_png(50_000, 50_000), "exceeds the limit"),
    "png_wide_bomb.png": (lambda j: forged_png(2_000_000, 40), "exceeds the limit"),
    "png_zero_width.png": (lambda j: forged_png(0, 10), "truncated or corrupt|not a readable image|zero size"),
    "png_bad_data.png": (lambda j: forged_png(64, 64), "truncated or corrupt"),
    "riff_not_webp.jpg": (lambda j: b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 64, "not a readable image|truncated or corrupt"),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_bad_image_files(tmp_path, jpeg_bytes, capsys, name):
    make, match = IMAGE_CASES[name]
    p = tmp_path / name
    p.write_bytes(make(jpeg_bytes))
    with pytest.raises(ImageError, match=match):
        load_image(p)
    assert cli.main(["detect", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [l for l in err.splitlines() if l.startswith("error: ")] != []


def test_path_cases(tmp_path, capsys):
    for path, match in ((tmp_path, "is a folder"), (tmp_path / "absent.jpg", "no such file")):
        with pytest.raises(ImageError, match=match):
            load_image(path)
        assert cli.main(["detect", str(path)]) == 2
        assert match in capsys.readouterr().err


ARRAY_CASES = [
    ("nan", np.full((8, 8, 3), np.nan, np.float32), "NaN or Inf"),
    ("inf", np.full((8, 8, 3), -np.inf, np.float64), "NaN or Inf"),
    ("int64", np.zeros((8, 8, 3), np.int64), "unsupported dtype int64"),
    ("bool", np.zeros((8, 8, 3), bool), "unsupported dtype bool"),
    ("complex", np.zeros((8, 8, 3), np.complex64), "unsupported dtype complex64"),
    ("rank4", np.zeros((1, 8, 8, 3), np.uint8), "rank"),
    ("rank1", np.zeros(8, np.uint8), "rank"),
    ("rank0", np.array(3, np.uint8), "rank"),
    ("zero_rows", np.zeros((0, 8, 3), np.uint8), "empty array"),
    ("zero_channels", np.zeros((8, 8, 0), np.uint8), "empty array"),
    ("five_channels", np.zeros((8, 8, 5), np.uint8), "channels"),
    ("float_range", np.full((8, 8, 3), 256.0, np.float32), r"\[0, 255\]"),
    ("negative", np.full((8, 8, 3), -1.0, np.float32), r"\[0, 255\]"),
    ("list", [[0, 1], [2, 3]], "numpy array"),
    ("huge", np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (MAX_PIXELS, 2, 3), (0, 0, 0)), "exceeds the limit"),
]


@pytest.mark.parametrize("name,arr,match", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_bad_arrays_through_the_pipeline(default_model, name, arr, match):
    model, _ = default_model
    with pytest.raises(ImageError, match=match):
        Pipeline(TorchRunner(model), model.spec)(arr)


def _ckpt_cases(tmp_path, shared):
    good = (shared / "weights" / "mobilenet0.25_Final.pth").read_bytes()
    cases = {}
    p = tmp_path / "plain_pickle.pth"
    p.write_bytes(pickle.dumps({"body.stage1.0.0.weight": _Payload()}))
    cases["plain_pickle.pth"] = (p, None, WeightsError, "pickled code")
    p = tmp_path / "zip_pickle.pth"
    torch.save({"w": torch.zeros(1), "evil": _Payload()}, p)
    cases["zip_pickle.pth"] = (p, None, WeightsError, "pickled code")
    p = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, p)
    cases["resnet.pth"] = (p, None, WeightsError, "not a RetinaFace-MobileNet-0.25 checkpoint")
    p = tmp_path / "truncated.pth"
    p.write_bytes(good[: len(good) // 2])
    cases["truncated.pth"] = (p, None, WeightsError, "truncated or not a PyTorch file")
    p = tmp_path / "empty.pth"
    p.write_bytes(b"")
    cases["empty.pth"] = (p, None, WeightsError, "empty")
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], p)
    cases["list.pth"] = (p, None, WeightsError, "does not hold a state_dict")
    d = tmp_path / "ckpt_folder"
    d.mkdir()
    cases["ckpt_folder"] = (d, None, WeightsError, "is a folder")
    cases["arch_unknown"] = (shared / "weights" / "mobilenet0.25_Final.pth", "resnet50", ConfigError, "unknown --arch")
    cases["arch_conflict"] = (shared / "weights" / "mobilenet0.25_Final.pth", "pytorch_retinaface", ConfigError, "uses face_detector_1mb")
    return cases


CKPT_NAMES = ["plain_pickle.pth", "zip_pickle.pth", "resnet.pth", "truncated.pth", "empty.pth", "list.pth", "ckpt_folder", "arch_unknown", "arch_conflict"]


@pytest.mark.parametrize("name", CKPT_NAMES)
def test_bad_checkpoints(tmp_path, shared, capsys, name):
    path, arch, exc, match = _ckpt_cases(tmp_path, shared)[name]
    with pytest.raises(exc, match=match):
        load_weights(path, arch=arch)
    argv = ["detect", str(grace_hopper_path()), "--weights", str(path)] + (["--arch", arch] if arch else [])
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "pickled code ran" not in captured.out and "Traceback" not in captured.err and match.split()[0] in captured.err


BUNDLE_CASES = {
    "model_missing": (lambda d, m: (d / "model.onnx").unlink(), "model.onnx is missing"),
    "model_tampered": (lambda d, m: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:-10] + b"0123456789"), "does not match its SHA-256"),
    "golden_tampered": (lambda d, m: (d / "golden.npz").write_bytes(b"x"), "golden.npz does not match"),
    "newer_format": (lambda d, m: m.update(format_version=2), "newer than this toolkit"),
    "no_format": (lambda d, m: m.pop("format_version"), "no integer format_version"),
    "wrong_target": (lambda d, m: m.update(target="tensorrt"), "unknown target"),
    "traversal_model": (lambda d, m: m.update(model_file="../../../etc/passwd"), "unsafe file name"),
    "traversal_files": (lambda d, m: m["files"].update({"../x": "0"}), "unsafe file name"),
    "absolute_name": (lambda d, m: m.update(model_file="/etc/passwd"), "unsafe file name"),
    "model_not_listed": (lambda d, m: m.update(model_file="other.onnx"), "not in the file list"),
    "bad_spec": (lambda d, m: m.update(spec={"arch": 3}), "spec is invalid"),
}


@pytest.mark.parametrize("name", sorted(BUNDLE_CASES))
def test_bad_bundles(bundles, tmp_path, capsys, name):
    edit, match = BUNDLE_CASES[name]
    d = tmp_path / name
    shutil.copytree(bundles("onnx", "fp32"), d)
    meta = json.loads((d / "metadata.json").read_text())
    edit(d, meta)
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=match):
        load_bundle_runner(d)
    assert cli.main(["detect", str(grace_hopper_path()), "--bundle", str(d)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: bundle" in err


def test_bundle_metadata_not_json_and_not_folder(bundles, tmp_path, capsys):
    d = tmp_path / "garbled"
    shutil.copytree(bundles("onnx", "fp32"), d)
    (d / "metadata.json").write_text("{not json")
    for path, match in ((d, "not valid JSON"), (d / "model.onnx", "not a folder")):
        with pytest.raises(BundleError, match=match):
            load_bundle_runner(path)
        assert cli.main(["detect", str(grace_hopper_path()), "--bundle", str(path)]) == 2
        assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["detect", "IMG", "--input-size", "33"], ["detect", "IMG", "--nms", "-1"], ["detect"], ["eval", "widerface", "--images", "x"],
])
def test_usage_errors_exit_2(argv, capsys):
    argv = [str(grace_hopper_path()) if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_whole_process_prints_no_traceback(tmp_path):
    cases = [tmp_path / "t.jpg", tmp_path / "p.pth"]
    cases[0].write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    cases[1].write_bytes(pickle.dumps(_Payload()))
    for argv in (["detect", str(cases[0])], ["detect", str(grace_hopper_path()), "--weights", str(cases[1])]):
        r = subprocess.run([sys.executable, "-m", "edge.cli", *argv], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: ")
        assert "pickled code ran" not in r.stdout
