"""Streams, face IDs and the Python API: `edge stream` on generated clips, the tracker, `edge.api.Detector`."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge.api import Detector, Face
from edge.commands.cli import main
from edge.image_io import load_image
from edge.postprocess import box_iou
from edge.samples import grace_hopper_path, moving_faces
from edge.stream import write_video
from edge.track import Tracker

cv2 = pytest.importorskip("cv2")
ROOT = Path(__file__).resolve().parents[1]


def pan_zoom(picture: np.ndarray, frames: int, size=(720, 1280)):
    """A clip that pans and zooms over one picture: yield (frame, (x0, y0, scale)), where a frame pixel p shows the
    picture at (x0, y0) + p / scale, so that every detection maps back to the picture's own coordinates."""
    h, w = size
    ph, pw = picture.shape[:2]
    base = min(w / pw, h / ph)
    for t in range(frames):
        scale = base * (1.0 + 0.3 * t / max(frames - 1, 1))  # zoom in by 30 % over the clip
        vw, vh = w / scale, h / scale
        x0 = (pw - vw) * (0.5 + 0.5 * np.sin(np.pi * t / frames - np.pi / 2))  # a pan from left to right
        y0 = (ph - vh) * 0.5
        m = np.array([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]], np.float32)
        yield cv2.warpAffine(picture, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), (x0, y0, scale)


def id_persistence(records: list[dict], views: list[tuple[float, float, float]]) -> tuple[int, int]:
    """(pairs of consecutive frames in which a face is found in both and keeps its ID, all such pairs): faces are
    matched across the two frames in the picture's own coordinates (IoU >= 0.5)."""
    kept = pairs = 0
    for (a, va), (b, vb) in zip(zip(records, views), zip(records[1:], views[1:])):
        def picture_boxes(rec, v):
            x0, y0, s = v
            return np.array([[x0 + f["box"][0] / s, y0 + f["box"][1] / s, x0 + f["box"][2] / s, y0 + f["box"][3] / s]
                             for f in rec["faces"]]).reshape(-1, 4)
        ba, bb = picture_boxes(a, va), picture_boxes(b, vb)
        if not len(ba) or not len(bb):
            continue
        iou = box_iou(ba, bb)
        for i in range(len(ba)):
            j = int(iou[i].argmax())
            if iou[i, j] >= 0.5 and iou[:, j].argmax() == i:
                pairs += 1
                kept += a["faces"][i].get("id", -1) == b["faces"][j].get("id", -2) != -1
    return kept, pairs


@pytest.fixture(scope="module")
def shared_clip(shared, tmp_path_factory):
    """60 frames panning and zooming over the shared group photograph."""
    out = tmp_path_factory.mktemp("clip") / "group_pan.mp4"
    frames, views = zip(*pan_zoom(load_image(shared / "images" / "group.jpg"), 60))
    assert write_video(out, frames, 25.0) == 60
    return out, list(views)


def test_stream_writes_every_frame_and_keeps_face_ids(shared_clip, tmp_path, capsys):
    clip, views = shared_clip
    jsonl, video = tmp_path / "faces.jsonl", tmp_path / "faces.mp4"
    assert main(["stream", str(clip), "--jsonl", str(jsonl), "--draw", str(video), "--quiet"]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 60 and [r["frame"] for r in records] == list(range(60))
    assert all(abs(r["time"] - i / 25.0) < 0.05 for i, r in enumerate(records))
    cap = cv2.VideoCapture(str(video))
    n, shape = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, shape = n + 1, frame.shape
    assert n == 60 and shape == (720, 1280, 3)
    assert sum(len(r["faces"]) for r in records) > 60 * 5  # a crowd: many faces a frame
    kept, pairs = id_persistence(records, views)
    assert pairs > 300 and kept / pairs >= 0.95, f"IDs kept in {kept} of {pairs} consecutive-frame pairs"
    assert "60 frames" in capsys.readouterr().err


def test_built_in_clip_keeps_every_id(tmp_path):
    """The demo's clip (built-in portrait, four heads moving and scaling): four IDs, none ever switches."""
    frames, heads = zip(*moving_faces(40))
    clip = tmp_path / "clip.avi"
    write_video(clip, frames, 25.0)
    det = Detector.from_weights("default")
    seen = {}
    for f in det.stream(clip):
        for face in f.faces:
            cx, cy = (face.box[:2] + face.box[2:]) / 2
            head = [i for i, (x1, y1, x2, y2) in enumerate(heads[f.index]) if x1 <= cx <= x2 and y1 <= cy <= y2]
            assert len(head) == 1 and face.track_id is not None
            assert seen.setdefault(head[0], face.track_id) == face.track_id
    assert len(seen) == 4 and len(set(seen.values())) == 4


def test_tracker_keeps_ids_through_a_low_score_frame_and_ends_lost_tracks():
    trk = Tracker()
    a, b = np.array([10.0, 10, 60, 70]), np.array([200.0, 40, 260, 110])
    first = trk.update(np.stack([a, b]), np.array([0.9, 0.95]))
    assert sorted(first.tolist()) == [1, 2]
    for k in range(1, 6):  # both move 4 px a frame; b's score dips below the detector threshold at frame 3
        step = np.array([4.0 * k, 0, 4.0 * k, 0])
        ids = trk.update(np.stack([a + step, b + step]), np.array([0.9, 0.3 if k == 3 else 0.95]))
        assert ids.tolist() == first.tolist()
    for _ in range(trk.config.max_lost + 1):  # both leave: their tracks end, new faces get new IDs
        trk.update(np.zeros((0, 4)), np.zeros(0))
    assert trk.tracks == [] and trk.update(a[None], np.array([0.9])).tolist() == [3]
    assert trk.update(a[None] + 500, np.array([0.3])).tolist() == [-1]  # a weak face far from any track starts none


def test_python_api_takes_paths_pil_and_arrays():
    det = Detector.from_weights("default")
    path = grace_hopper_path()
    bgr = load_image(path)
    faces = det.detect(path)
    assert len(faces) == 1 and isinstance(faces[0], Face) and faces[0].score > 0.9 and faces[0].mesh.shape == (468, 3)
    for other in (det.detect(bgr), det.detect(Image.open(path)), det.detect(np.ascontiguousarray(bgr[..., ::-1]), rgb=True)):
        assert len(other) == 1 and np.allclose(other[0].box, faces[0].box, atol=1e-3)
    d = faces[0].to_dict()
    assert set(d) == {"box", "score", "landmarks", "mesh"} and json.loads(json.dumps(d)) == d


def test_readme_api_example_runs_as_written(tmp_path):
    """The Python example in the README, run as it is (its paths made by the test)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### Python API\n.*?```python\n(.*?)```", readme, re.S)
    assert block, "README has no Python API example"
    frames = (f for f, _ in moving_faces(8, size=(360, 640)))
    write_video(tmp_path / "clip.mp4", frames, 25.0)
    Image.open(grace_hopper_path()).save(tmp_path / "photo.jpg")
    r = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "face" in r.stdout


@pytest.mark.parametrize("source,message", [("missing.mp4", "no such file"), ("99", "camera 99: no camera"),
                                            ("rtsp://127.0.0.1:9/none", "cannot connect"), ("notes.txt", "not a video")])
def test_bad_sources_are_one_line_errors(tmp_path, source, message):
    (tmp_path / "notes.txt").write_text("not a video")
    r = subprocess.run([sys.executable, "-m", "edge.cli", "stream", source, "--quiet"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in r.stderr, r.stderr[-800:]


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    frames = (f for f, _ in moving_faces(3, size=(180, 320)))
    clip = tmp_path / "c.avi"
    write_video(clip, frames, 25.0)
    (tmp_path / "folder.mp4").mkdir()
    for argv, message in ((["--draw", str(tmp_path / "folder.mp4")], "existing folder"),
                          (["--draw", str(tmp_path / "out.gif")], "video extension"),
                          (["--draw", str(tmp_path / "missing" / "out.mp4")], ""),
                          (["--jsonl", str(clip)], "is the source")):
        r = subprocess.run([sys.executable, "-m", "edge.cli", "stream", str(clip), "--quiet", *argv], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2 and "error:" in r.stderr and message in r.stderr and "model:" not in r.stderr, r.stderr[-500:]
    assert clip.stat().st_size > 0 and not (tmp_path / "out.gif").exists()


def test_a_corrupt_frame_is_skipped_with_a_warning(tmp_path):
    """An MJPG clip with one frame's JPEG data broken in the middle: that frame is skipped, the others all come."""
    frames = [f for f, _ in moving_faces(12, size=(180, 320))]
    clip = tmp_path / "c.avi"
    write_video(clip, frames, 25.0)
    data = bytearray(clip.read_bytes())
    movi = data.index(b"movi")
    chunks = [m.start() for m in re.finditer(rb"00dc", bytes(data[movi:data.index(b"idx1")]))]
    assert len(chunks) == 12
    k = movi + chunks[6] + 8
    data[k:k + 3000] = bytes(3000)  # frame 6's JPEG data gone: the decoder fails on it
    clip.write_bytes(bytes(data))
    jsonl = tmp_path / "c.jsonl"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "stream", str(clip), "--jsonl", str(jsonl), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert "warning:" in r.stderr and "could not be decoded" in r.stderr
    assert len(jsonl.read_text().splitlines()) == 11


def test_ctrl_c_leaves_complete_outputs(tmp_path):
    """SIGINT in the middle of a stream: exit 130, every JSON line whole, the video finalised with as many frames."""
    clip = tmp_path / "long.avi"
    write_video(clip, (f for f, _ in moving_faces(400, size=(180, 320))), 25.0)
    jsonl, video = tmp_path / "out.jsonl", tmp_path / "out.mp4"
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive shell
    # inherits it ignored, and Python then installs no KeyboardInterrupt for it
    p = subprocess.Popen([sys.executable, "-m", "edge.cli", "stream", str(clip), "--jsonl", str(jsonl), "--draw", str(video),
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # until frames are being written
        partial = list(tmp_path.glob(".out.jsonl.partial-*"))
        if partial and partial[0].stat().st_size > 2000:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the stream ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-800:]
    lines = jsonl.read_text().splitlines()
    assert 0 < len(lines) < 400 and all(json.loads(line)["frame"] == i for i, line in enumerate(lines))
    cap = cv2.VideoCapture(str(video))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == len(lines)
    assert not list(tmp_path.glob(".out*partial*"))
