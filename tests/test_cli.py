import json

from edge.commands import cli
from edge.samples import grace_hopper_path


def test_detect_json_and_drawing(tmp_path, capsys):
    out_json, out_png = tmp_path / "d.json", tmp_path / "d.png"
    assert cli.main(["detect", str(grace_hopper_path()), "--json", str(out_json), "--draw", str(out_png)]) == 0
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"image", "model", "faces"} and "default" in doc["model"]
    assert len(doc["faces"]) == 1
    face = doc["faces"][0]
    x1, y1, x2, y2 = face["box"]
    assert 150 < x1 < x2 < 400 and 50 < y1 < y2 < 400 and face["score"] > 0.99
    assert len(face["landmarks"]) == 5 and all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face["landmarks"])
    assert out_png.stat().st_size > 10_000
    assert "1 faces" in capsys.readouterr().out


def test_detect_several_images_draws_into_folder(tmp_path, shared):
    imgs = [str(grace_hopper_path()), str(shared / "images" / "street.jpg")]
    assert cli.main(["detect", *imgs, "--draw", str(tmp_path / "draw"), "--json", str(tmp_path / "all.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "draw").iterdir()) == ["grace_hopper.png", "street.png"]
    assert len(json.loads((tmp_path / "all.json").read_text())) == 2


def test_bad_options_are_usage_errors(capsys):
    import pytest

    for argv in (["detect", "x.jpg", "--input-size", "100"], ["detect", "x.jpg", "--score", "2"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2


def test_weights_list(capsys):
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "face_detector_1mb" in out and "sha256" in out
