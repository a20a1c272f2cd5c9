"""Bad images and arrays: typed errors with one-line messages; convertible modes converted."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edge.commands import cli
from edge.errors import ImageError
from edge.image_io import MAX_PIXELS, check_image_array, load_image
from edge.samples import grace_hopper_path


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(grace_hopper_path()).convert("RGB")


def _bad_files(tmp_path, photo):
    jpg = tmp_path / "ok.jpg"
    photo.save(jpg, quality=90)
    data = jpg.read_bytes()
    files = {
        "truncated.jpg": data[: len(data) // 3],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "header_only.png": b"\x89PNG\r\n\x1a\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("case,match", [
    ("truncated.jpg", "truncated or corrupt"),
    ("empty.jpg", "empty file"),
    ("text.jpg", "not a readable image"),
    ("header_only.png", "truncated or corrupt|not a readable image"),
])
def test_unreadable_files(tmp_path, photo, case, match):
    files = _bad_files(tmp_path, photo)
    with pytest.raises(ImageError, match=match) as e:
        load_image(files[case])
    assert "\n" not in str(e.value) and case in str(e.value)


def test_missing_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_decompression_bomb_refused(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 100
    p = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(p)  # a few KB on disk, > MAX_PIXELS declared
    assert p.stat().st_size < 200_000
    with pytest.raises(ImageError, match="exceeds the limit"):
        load_image(p)


@pytest.mark.parametrize("mode", ["L", "I;16", "CMYK", "RGBA", "P", "LA", "1", "I"])
def test_convertible_modes_become_bgr(tmp_path, photo, mode):
    rgb = photo.resize((128, 150))
    if mode == "I;16":
        a = (np.asarray(rgb.convert("L"), np.uint16) * 257)
        img = Image.fromarray(a)
        assert img.mode == "I;16"
    elif mode == "I":
        img = Image.fromarray(np.asarray(rgb.convert("L"), np.int32) * 257, "I")
    else:
        img = rgb.convert(mode)
    ext = {"CMYK": "jpg", "L": "jpg"}.get(mode, "png")
    if mode == "I":
        ext = "tif"
    p = tmp_path / f"img_{mode.replace(';', '_')}.{ext}"
    img.save(p)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (150, 128, 3)
    gray = np.asarray(rgb.convert("L"), np.float32)
    # every conversion keeps the picture: its luminance stays close to the source's
    lum = out[..., 2] * 0.299 + out[..., 1] * 0.587 + out[..., 0] * 0.114
    if mode == "1":  # dithered bilevel: only black and white, and as bright on average
        assert set(np.unique(out).tolist()) <= {0, 255}
        assert abs(lum.mean() - gray.mean()) < 12
    else:
        assert np.abs(lum - gray).mean() < 12


def test_rgba_channel_order_is_bgr(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red
    a[..., 3] = 255
    p = tmp_path / "red.png"
    Image.fromarray(a, "RGBA").save(p)
    out = load_image(p)
    assert out[0, 0].tolist() == [0, 0, 200]


@pytest.mark.parametrize("arr,match", [
    (np.full((10, 10, 3), np.nan, np.float32), "NaN or Inf"),
    (np.full((10, 10, 3), np.inf, np.float64), "NaN or Inf"),
    (np.zeros((10, 10, 3), np.int64), "unsupported dtype int64"),
    (np.zeros((10, 10, 3), bool), "unsupported dtype bool"),
    (np.zeros((2, 10, 10, 3), np.uint8), "rank"),
    (np.zeros(10, np.uint8), "rank"),
    (np.zeros((0, 10, 3), np.uint8), "empty array"),
    (np.zeros((10, 10, 5), np.uint8), "channels"),
    (np.full((4, 4, 3), 300.0, np.float32), r"\[0, 255\]"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        check_image_array(arr)


def test_good_arrays_normalised():
    assert check_image_array(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert check_image_array(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
    assert check_image_array(np.full((5, 6, 3), 254.6, np.float32))[0, 0, 0] == 255


def test_cli_bad_image_exit_2_one_line(tmp_path, photo, capsys):
    files = _bad_files(tmp_path, photo)
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        assert cli.main(["detect", str(files[name])]) == 2
        err = capsys.readouterr().err
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in err


def test_cli_bad_checkpoint_exit_2(tmp_path, capsys):
    p = tmp_path / "x.pth"
    p.write_bytes(b"garbage" * 10)
    assert cli.main(["detect", str(grace_hopper_path()), "--weights", str(p)]) == 2
    assert "error: x.pth is a text file, not a PyTorch checkpoint" in capsys.readouterr().err


def test_cli_subprocess_has_no_traceback(tmp_path, photo):
    files = _bad_files(tmp_path, photo)
    r = subprocess.run([sys.executable, "-m", "edge.cli", "detect", str(files["truncated.jpg"])], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: truncated.jpg")
