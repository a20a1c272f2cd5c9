"""Reliability, round two: nothing of the user's is deleted or replaced, outputs are checked before any
work, one bad image does not lose the others, and every failure says what happened (exit 2, one line).
The device suite's half of this lives in test_device_suite.py."""
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from converters import cli as convert_cli
from converters.bundle import atomic_folder, check_destination, write_metadata
from edge import image_io, outputs
from edge.atomic import atomic_file
from edge.bundle import load_bundle_runner, read_metadata
from edge.commands import cli
from edge.errors import BundleError, ImageError, ImageWarning, OutputError, WeightsError
from edge.image_io import load_image
from edge.outputs import current_umask, distinct_names
from edge.samples import grace_hopper_path
from edge.weights.load import load_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(grace_hopper_path()).convert("RGB").resize((256, 320))


def _last_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    return lines[-1] if lines else ""


# --- 4, 5: edge-convert never deletes or hides what is not one of its bundles ---------------------

def test_convert_refuses_a_users_folder_and_file(tmp_path, capsys):
    user = tmp_path / "thesis_folder"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("chapter 1")
    (user / "sub" / "data.csv").write_text("a,b\n1,2\n")
    assert convert_cli.main(["--target", "onnx", "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert "not a retinaface-edge bundle" in _last_error(err) and "edge-convert: onnx" not in err  # refused before any work
    assert (user / "thesis.txt").read_text() == "chapter 1" and (user / "sub" / "data.csv").read_text() == "a,b\n1,2\n"

    f = tmp_path / "existing_file.txt"
    f.write_text("keep me")
    assert convert_cli.main(["--target", "onnx", "--out", str(f), "--quiet"]) == 2
    assert "exists and is not a folder" in _last_error(capsys.readouterr().err)
    assert f.is_file() and f.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing_file.txt", "thesis_folder"]  # nothing hidden beside them

    link = tmp_path / "link"
    link.symlink_to(user)
    with pytest.raises(OutputError, match="symbolic link"):
        check_destination(link)
    # --target all: --out is the parent, every bundle's place is checked before the first conversion
    (tmp_path / "all" / "retinaface-tflite-fp32-640").mkdir(parents=True)
    (tmp_path / "all" / "retinaface-tflite-fp32-640" / "notes.md").write_text("mine")
    assert convert_cli.main(["--target", "all", "--out", str(tmp_path / "all"), "--quiet"]) == 2
    assert "not a retinaface-edge bundle" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["retinaface-tflite-fp32-640"]


def test_convert_replaces_only_its_own_bundle(bundles, tmp_path, capsys):
    dest = tmp_path / "b"
    shutil.copytree(bundles("onnx", "fp32"), dest)
    (dest / "stale.txt").write_text("left by the old bundle")
    assert check_destination(dest) == "bundle"
    assert convert_cli.main(["--target", "onnx", "--out", str(dest), "--quiet"]) == 0
    assert "holds a bundle written by retinaface-edge; it will be replaced" in capsys.readouterr().err
    read_metadata(dest)
    assert not (dest / "stale.txt").exists() and not list(tmp_path.glob(".b.*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_destination(empty) == "empty folder" and check_destination(tmp_path / "new" / "deeper") == "new"


def test_atomic_folder_rechecks_before_the_rename(tmp_path):
    """A folder of the user's that appears at the destination during the work is not replaced either."""
    dest = tmp_path / "late"
    with pytest.raises(OutputError, match="not a retinaface-edge bundle"):
        with atomic_folder(dest) as tmp:
            (tmp / "x").write_text("bundle part")
            dest.mkdir()
            (dest / "user.txt").write_text("arrived meanwhile")
    assert (dest / "user.txt").read_text() == "arrived meanwhile" and not list(tmp_path.glob(".late.partial-*"))


# --- 6, 7, 15: edge detect goes on past a bad image; names never collide; frames are counted ----------

def test_detect_goes_on_past_a_bad_image(tmp_path, photo, capsys):
    photo.save(tmp_path / "good.webp")
    photo.save(tmp_path / "a.jpg", quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    photo.save(tmp_path / "good.bmp")
    imgs = [str(tmp_path / n) for n in ("good.webp", "truncated.jpg", "good.bmp")]
    out, draw = tmp_path / "o.json", tmp_path / "D"
    assert cli.main(["detect", *imgs, "--json", str(out), "--draw", str(draw)]) == 2
    cap = capsys.readouterr()
    assert "good.webp: 1 faces" in cap.out and "good.bmp: 1 faces" in cap.out
    errors = [line for line in cap.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "truncated.jpg: truncated or corrupt" in errors[0] and "1 of 3 images failed" in errors[1]
    res = json.loads(out.read_text())
    assert [Path(r["image"]).name for r in res] == ["good.webp", "truncated.jpg", "good.bmp"]
    assert len(res[0]["faces"]) == 1 and len(res[2]["faces"]) == 1 and "truncated or corrupt" in res[1]["error"]
    assert sorted(p.name for p in draw.iterdir()) == ["good_bmp.png", "good_webp.png"]


def test_drawn_names_never_collide(tmp_path, photo, capsys):
    (tmp_path / "img").mkdir()
    photo.save(tmp_path / "img" / "photo.webp")
    photo.save(tmp_path / "img" / "photo.bmp")
    d = tmp_path / "D"
    assert cli.main(["detect", str(tmp_path / "img" / "photo.webp"), str(tmp_path / "img" / "photo.bmp"), "--draw", str(d)]) == 0
    files = sorted(d.iterdir())
    assert [p.name for p in files] == ["photo_bmp.png", "photo_webp.png"]
    assert files[0].read_bytes() != b"" and Image.open(files[0]).size == photo.size
    # the rules behind it: stems, then extensions, then folders, then a counter; never an input image
    assert distinct_names(["a/x.jpg", "b/y.jpg"], ".png") == ["x.png", "y.png"]
    assert distinct_names(["a/x.jpg", "b/x.jpg"], ".png") == ["a_x_jpg.png", "b_x_jpg.png"]
    assert distinct_names(["x.jpg", "x.jpg", "x_2.jpg"], ".png") == ["x_jpg.png", "x_jpg_2.png", "x_2.png"]
    names = distinct_names(["p/q/a.png", "p/q/a.png", "r/a.png"], ".png")
    assert len(set(names)) == 3
    photo.save(tmp_path / "img" / "self.png")
    assert cli.main(["detect", str(tmp_path / "img" / "self.png"), str(tmp_path / "img" / "photo.bmp"), "--draw", str(tmp_path / "img")]) == 2
    assert "would overwrite the input image" in _last_error(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["gif", "tiff"])
def test_multi_frame_images_say_only_the_first_frame_is_used(tmp_path, photo, capsys, kind):
    frames = [photo, photo.rotate(15), photo.rotate(30)]
    p = tmp_path / f"many.{'gif' if kind == 'gif' else 'tif'}"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    with pytest.warns(ImageWarning, match="3 frames.*only the first is used"):
        img = load_image(p)
    assert img.shape == (320, 256, 3)
    with Image.open(grace_hopper_path()) as one:  # a single frame says nothing
        assert getattr(one, "n_frames", 1) == 1
    out = tmp_path / "o.json"
    assert cli.main(["detect", str(p), "--json", str(out)]) == 0
    assert f"warning: {p.name}: holds 3 frames" in capsys.readouterr().err
    assert "only the first is used" in json.loads(out.read_text())["warnings"][0]


# --- 8: every output path is checked before any work --------------------------------------------------

def _detect_case(tmp_path, kind):
    img = str(grace_hopper_path())
    if kind == "json_missing_folder":
        return ["detect", img, "--json", str(tmp_path / "nope" / "o.json")], "does not exist"
    if kind == "json_proc":
        return ["detect", img, "--json", "/proc/o.json"], "cannot write in /proc"
    if kind == "json_onto_folder":
        return ["detect", img, "--json", str(tmp_path)], "is an existing folder"
    if kind == "draw_no_extension":
        return ["detect", img, "--draw", str(tmp_path / "overlay")], "needs an image extension"
    if kind == "draw_missing_folder":
        return ["detect", img, "--draw", str(tmp_path / "nope" / "o.png")], "does not exist"
    if kind == "draw_folder_parent_missing":
        return ["detect", img, img, "--draw", str(tmp_path / "nope" / "D")], "does not exist"
    if kind == "json_under_a_file":
        (tmp_path / "f").write_text("x")
        return ["detect", img, "--json", str(tmp_path / "f" / "o.json")], "is not a folder|not a directory"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["json_missing_folder", "json_proc", "json_onto_folder", "draw_no_extension", "draw_missing_folder",
                                  "draw_folder_parent_missing", "json_under_a_file"])
def test_detect_outputs_checked_before_work(tmp_path, capsys, kind):
    argv, match = _detect_case(tmp_path, kind)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    import re

    assert re.search(match, _last_error(err)) and _last_error(err).startswith("error: --")
    assert "model:" not in err  # refused before the model was loaded


@pytest.mark.parametrize("argv,match", [
    (["parity", "BUNDLE", "--json", "/proc/p.json"], "cannot write in /proc"),
    (["parity", "BUNDLE", "--report", "FILE"], "exists and is not a folder"),
    (["parity", "BUNDLE", "--report", "MISSING/r"], "does not exist"),
    (["eval", "aflw2000", "--data", "TMP", "--json", "TMP"], "is an existing folder"),
    (["eval", "widerface", "--images", "TMP", "--gt", "TMP", "--plot", "TMP/pr.txt"], "needs an image extension"),
    (["soak", "BUNDLE", "--json", "MISSING/s.json"], "does not exist"),
    (["bench", "--torch", "--report", "/proc/r"], "cannot write in /proc"),
])
def test_other_commands_check_outputs_first(tmp_path, capsys, argv, match):
    (tmp_path / "file").write_text("x")
    subs = {"BUNDLE": str(tmp_path / "no_bundle_needed"), "FILE": str(tmp_path / "file")}
    argv = [subs.get(a, a).replace("TMP", str(tmp_path)).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    assert cli.main(argv) == 2
    assert match in _last_error(capsys.readouterr().err)  # the bundle was never opened: the output was refused first


def test_read_only_folder_refused(tmp_path, monkeypatch):
    """Root writes through permission bits, so a read-only file system is simulated at the probe: the one
    place that decides whether a folder takes files."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot write in .*read-only file system"):
        outputs.check_output_file(tmp_path / "o.json", "--json")
    with pytest.raises(OutputError, match="read-only file system"):
        check_destination(tmp_path / "bundle")


def test_convert_out_checked_before_work(tmp_path, capsys):
    assert convert_cli.main(["--target", "onnx", "--out", "/proc/retinaface"]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot write in /proc" in _last_error(err) and "edge-convert: onnx" not in err
    deep = tmp_path / "a" / "b" / "c"
    assert check_destination(deep) == "new"  # missing parents are still created


# --- 9, 11: file names that are not UTF-8; absurd input sizes --------------------------------------------

def test_non_utf8_file_name(tmp_path, photo):
    name = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not UTF-8
    photo.save(tmp_path / name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = tmp_path / "o.json"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "detect", name, "--json", str(out), "--draw", str(tmp_path / "d.png")],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "caf\\xe9.png: 1 faces" in r.stdout
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res["image"] == "caf\\xe9.png" and len(res["faces"]) == 1


@pytest.mark.parametrize("prog,argv", [("edge.cli", ["detect", "IMG", "--input-size", "320000"]),
                                       ("converters.cli", ["--target", "onnx", "--input-size", "320000"]),
                                       ("edge.cli", ["bench", "--torch", "--image-size", "99999x640"])])
def test_input_size_is_bounded(prog, argv):
    argv = [str(grace_hopper_path()) if a == "IMG" else a for a in argv]
    r = subprocess.run([sys.executable, "-m", prog, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "larger than the limit of 4096" in r.stderr and "Traceback" not in r.stderr


# --- 10: a corrupt model whose hash matches ---------------------------------------------------------

@pytest.mark.parametrize("target,precision", [("tflite", "int8"), ("onnx", "fp32")])
def test_corrupt_model_with_matching_hash(bundles, tmp_path, capsys, target, precision):
    d = tmp_path / "rehashed"
    shutil.copytree(bundles(target, precision), d)
    _, meta = read_metadata(d)
    (d / meta["model_file"]).write_bytes(b"\x00garbage, not a model\x00" * 100)
    write_metadata(d, {k: v for k, v in meta.items() if k != "files"})  # re-hashed: the hash check passes
    with pytest.raises(BundleError, match=f"{meta['model_file']} is not a model {target} can load"):
        load_bundle_runner(d)
    assert cli.main(["detect", str(grace_hopper_path()), "--bundle", str(d)]) == 2
    assert f"error: bundle rehashed: {meta['model_file']} is not a model" in _last_error(capsys.readouterr().err)
    assert cli.main(["parity", str(d), "--quiet"]) == 2
    assert "is not a model" in _last_error(capsys.readouterr().err)


# --- 12, 13: weights that are not what they claim ---------------------------------------------------

def _state(default_model):
    return {k: v.clone() for k, v in default_model[0].state_dict().items() if not k.startswith(("MeshHead", "mesh_"))}


def test_nan_and_integer_checkpoints_refused(default_model, tmp_path, capsys):
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in _state(default_model).items()}
    torch.save(nan, tmp_path / "nan.pth")
    one_nan = _state(default_model)
    one_nan["body.stage1.0.0.weight"][0, 0, 0, 0] = float("inf")
    torch.save(one_nan, tmp_path / "one_inf.pth")
    ints = {k: v.to(torch.int64) for k, v in _state(default_model).items()}
    torch.save(ints, tmp_path / "int64.pth")
    for name, match in (("nan.pth", "NaN or Inf"), ("one_inf.pth", "NaN or Inf values in 1 tensors .body.stage1.0.0.weight"),
                        ("int64.pth", "non-floating-point weight tensors")):
        with pytest.raises(WeightsError, match=match):
            load_weights(tmp_path / name)
        assert cli.main(["detect", str(grace_hopper_path()), "--weights", str(tmp_path / name)]) == 2
        assert match.split(" ")[0] in _last_error(capsys.readouterr().err)
    torch.save(_state(default_model), tmp_path / "fine.pth")  # the same tensors, finite and float, load
    load_weights(tmp_path / "fine.pth")


def test_non_checkpoints_say_what_they_are(shared, tmp_path, capsys):
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    npz = tmp_path / "w.npz"
    np.savez(npz, a=np.zeros(3))
    cases = [(shared / "peers/yunet/face_detection_yunet_2026may.onnx", "is an ONNX model"), (rnd, "of unknown format"),
             (text, "is a text file"), (npz, "is a NumPy .npz archive")]
    for path, match in cases:
        with pytest.raises(WeightsError, match=match) as e:
            load_weights(path)
        assert "pickled code" not in str(e.value) and "not a PyTorch checkpoint" in str(e.value)
        assert cli.main(["detect", str(grace_hopper_path()), "--weights", str(path)]) == 2
        assert match in _last_error(capsys.readouterr().err)


# --- 14: image files that cannot be read say why -----------------------------------------------------

def test_unreadable_paths_say_what_happened(tmp_path, photo, monkeypatch):
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    with pytest.raises(ImageError, match="symbolic link loop"):
        load_image(loop)
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="broken symbolic link"):
        load_image(broken)
    fifo = tmp_path / "stdin_like"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="a pipe, not an image file"):
        load_image(fifo)  # refused from its type, without opening it (which would block)
    with pytest.raises(ImageError, match="a device"):
        load_image("/dev/null")
    ok = tmp_path / "ok.png"
    photo.save(ok)

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(image_io, "open", denied, raising=False)  # root reads through mode 000: deny at the open
    with pytest.raises(ImageError, match="permission denied") as e:
        load_image(ok)
    assert "corrupt" not in str(e.value)


# --- 16, 17: SIGTERM cleans up; new bundles and files get the user's normal mode -----------------------

def test_sigterm_during_convert_leaves_nothing(tmp_path):
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "converters.cli", "--target", "onnx", "--out", str(out), "--quiet"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".b.partial-*")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".b.partial-*")), "the conversion never started its partial folder"
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143 and "terminated: no bundle was written" in err, err
    assert list(tmp_path.iterdir()) == []


def test_new_outputs_get_the_users_mode(tmp_path):
    old = os.umask(0o022)
    try:
        dest = tmp_path / "bundle"
        with atomic_folder(dest) as tmp:
            (tmp / "model.bin").write_bytes(b"x")
        assert stat.S_IMODE(dest.stat().st_mode) == 0o755  # not the 0700 of a temporary folder
        with atomic_file(tmp_path / "o.json") as tmp:
            Path(tmp).write_text("{}")
        assert stat.S_IMODE((tmp_path / "o.json").stat().st_mode) == 0o644  # not mkstemp's 0600
        os.umask(0o027)
        assert current_umask() == 0o027
        with atomic_folder(tmp_path / "group") as tmp:
            pass
        assert stat.S_IMODE((tmp_path / "group").stat().st_mode) == 0o750
    finally:
        os.umask(old)
