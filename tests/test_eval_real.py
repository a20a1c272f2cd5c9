"""Small real evaluations with pinned results (the full runs are in the issue notes)."""
import json

import numpy as np
import pytest

from edge.commands import cli
from edge.evaluate import aflw as eval_aflw
from edge.pipeline import Pipeline
from edge.runners import TorchRunner
from edge.weights.load import load_weights


def test_widerface_40_images_pinned(shared, tmp_path):
    out = tmp_path / "wf.json"
    rc = cli.main(["eval", "widerface", "--images", str(shared / "widerface/val"), "--gt", str(shared / "widerface/ground_truth"),
                   "--weights", str(shared / "weights/mobilenet0.25_Final.pth"), "--limit", "40", "--quiet",
                   "--json", str(out), "--plot", str(tmp_path / "pr.png"), "--save-txt", str(tmp_path / "txt")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["images"] == 40 and r["input_size"] == 640
    # pinned from the first run of this evaluator (shared checkpoint, 640 letterbox, score 0.02, NMS 0.4, 750 boxes)
    assert (round(100 * r["easy"], 2), round(100 * r["medium"], 2), round(100 * r["hard"], 2)) == pytest.approx((86.16, 84.15, 56.31), abs=0.02)
    assert (tmp_path / "pr.png").stat().st_size > 5000
    txt = sorted((tmp_path / "txt").glob("*/*.txt"))
    assert len(txt) == 40
    lines = txt[0].read_text().splitlines()
    assert int(lines[1]) == len(lines) - 2 and len(lines[2].split()) == 5


def test_aflw2000_five_points(shared, tmp_path):
    model, _ = load_weights("default", mesh=False)  # the detector alone: its 5 landmarks
    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(None))
    r = eval_aflw.evaluate(pipe, shared / "aflw2000_3d", limit=60, progress=False)
    assert r["points"] == 5 and r["images"] == 60 and "5 landmarks" in r["compared"]
    assert r["miss_rate"] < 0.05
    assert 0.01 < r["nme_0_30"] < 0.05 and 0.01 < r["nme_mean"] < 0.10
    # the default model with its mesh head is measured on 68 points (its AFLW2000-3D 0-30 band: 4.87 %)
    model, _ = load_weights("default")
    r = eval_aflw.evaluate(Pipeline(TorchRunner(model), model.spec.with_input_size(None)), shared / "aflw2000_3d", limit=60,
                           progress=False)
    assert r["points"] == 68 and "mesh68" in r["compared"] and 0.03 < r["nme_0_30"] < 0.12


def test_aflw_landmark_order_matches_68_semantics(shared):
    """Swapping the eyes (and mouth corners) of the ground truth must make the error much larger:
    proof that the 68 -> 5 correspondence has the right sides."""

    model, _ = load_weights("default")
    pipe = Pipeline(TorchRunner(model), model.spec.with_input_size(None))
    lab = eval_aflw.load_labels(shared / "aflw2000_3d")
    right, swapped = [], []
    for i in range(10):
        det = pipe(shared / "aflw2000_3d/images" / f"{lab['names'][i]}.jpg")
        gt5 = eval_aflw.five_from_68(lab["pts"][i])
        p = det.landmarks[0]
        right.append(np.linalg.norm(p - gt5, axis=1).mean())
        swapped.append(np.linalg.norm(p - gt5[[1, 0, 2, 4, 3]], axis=1).mean())
    assert np.mean(right) * 2 < np.mean(swapped)
