"""Calibration sets: deterministic choice, compact round trip, refusals."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calib_data.build import build_from_folder, default_set, load_calibration, pick
from edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_set_is_deterministic_and_letterboxed():
    a, b = default_set(320, 6), default_set(320, 6)
    assert a.images.shape == (6, 320, 320, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    assert "public-domain" in a.source and a.summary()["count"] == 6


def test_folder_pick_is_deterministic_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = sorted(tmp_path.iterdir())
    assert pick(paths, 3) == pick(list(reversed(paths)), 3)
    cs = build_from_folder(tmp_path, n=7, size=64, progress=False)
    assert len(cs) == 6 and cs.images.shape[1:] == (64, 64, 3)


def test_flat_pictures_are_skipped_and_an_all_flat_set_refused(tmp_path, capsys):
    """One-colour pictures (all black, grey, a colour) give calibration nothing: each is skipped and named; a folder
    of nothing else is refused before any conversion work."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, colour in enumerate(((0, 0, 0), (128, 128, 128), (10, 200, 30))):
        Image.fromarray(np.full((48, 64, 3), colour, np.uint8)).save(flat / f"flat{i}.png")
    with pytest.raises(ConfigError, match="every chosen image is flat"):
        build_from_folder(flat, n=8, size=64, progress=False)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(flat / "real.png")
    cs = build_from_folder(flat, n=8, size=64, progress=False)
    err = capsys.readouterr().err
    assert cs.names == ("real.png",) and all(f"flat{i}.png: flat" in err for i in range(3))


def test_cli_builds_a_set_that_loads_back(tmp_path):
    out = tmp_path / "set.npz"
    r = subprocess.run([sys.executable, "-m", "calib_data.build", "--n", "3", "--size", "320", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, r.stderr
    cs = load_calibration(out, 320)
    assert len(cs) == 3 and "built set" in cs.source
    with pytest.raises(ConfigError, match="built at 320x320"):
        load_calibration(out, 640)
    with pytest.raises(ConfigError, match="expected a folder of images or a .npz"):
        load_calibration(tmp_path / "nothing.txt", 640)
    with pytest.raises(ConfigError, match="no images found"):
        load_calibration(tmp_path / "empty", 640) if (tmp_path / "empty").mkdir() is None else None
