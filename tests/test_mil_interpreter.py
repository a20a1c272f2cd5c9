"""The numpy MIL interpreter: op by op against PyTorch on random inputs, then whole programs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converters.bundle import write_metadata
from edge.bundle import load_bundle_runner, read_metadata
from edge.commands import cli
from edge.image_io import load_image
from edge.pipeline import Pipeline
from edge.runners import TorchRunner
from edge.runners.mil_interpreter import MILInterpreter, UnsupportedOp, import_coremltools
from edge.samples import grace_hopper_path

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

RNG = np.random.default_rng(0)


def run(prog, **inputs):
    out = MILInterpreter(prog)(inputs)
    return list(out.values())[0]


@pytest.mark.parametrize("cfg", [
    dict(c=8, o=16, k=3, s=1, p=1, d=1, g=1),
    dict(c=8, o=16, k=3, s=2, p=1, d=1, g=1),
    dict(c=16, o=16, k=3, s=2, p=1, d=1, g=16),  # depthwise, stride 2
    dict(c=16, o=16, k=3, s=1, p=2, d=2, g=16),  # depthwise, dilated
    dict(c=8, o=12, k=3, s=1, p=1, d=1, g=4),  # grouped
    dict(c=6, o=4, k=1, s=1, p=0, d=1, g=1),  # pointwise
    dict(c=3, o=5, k=5, s=3, p=2, d=1, g=1),
])
def test_conv_matches_torch(cfg):
    x = RNG.standard_normal((1, cfg["c"], 13, 17)).astype(np.float32)
    w = RNG.standard_normal((cfg["o"], cfg["c"] // cfg["g"], cfg["k"], cfg["k"])).astype(np.float32)
    b = RNG.standard_normal(cfg["o"]).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.conv(x=x_in, weight=w, bias=b, strides=[cfg["s"]] * 2, pad_type="custom", pad=[cfg["p"]] * 4,
                       dilations=[cfg["d"]] * 2, groups=cfg["g"])

    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), cfg["s"], cfg["p"], cfg["d"], cfg["g"]).numpy()
    np.testing.assert_allclose(run(prog, x_in=x), ref, atol=1e-4, rtol=1e-4)


def test_conv_same_padding():
    x = RNG.standard_normal((1, 4, 9, 10)).astype(np.float32)
    w = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.conv(x=x_in, weight=w, pad_type="same", strides=[2, 2])

    ref = F.conv2d(F.pad(torch.from_numpy(x), (0, 1, 1, 1)), torch.from_numpy(w), stride=2).numpy()  # TF "same": extra pad at the end
    np.testing.assert_allclose(run(prog, x_in=x), ref, atol=1e-4)


ELEMENTWISE = [
    ("relu", lambda x: mb.relu(x=x), lambda t: F.relu(t)),
    ("leaky_relu", lambda x: mb.leaky_relu(x=x, alpha=0.1), lambda t: F.leaky_relu(t, 0.1)),
    ("sigmoid", lambda x: mb.sigmoid(x=x), torch.sigmoid),
    ("add", lambda x: mb.add(x=x, y=np.float32(0.5)), lambda t: t + 0.5),
    ("mul", lambda x: mb.mul(x=x, y=x), lambda t: t * t),
    ("softmax", lambda x: mb.softmax(x=x, axis=-1), lambda t: F.softmax(t, -1)),
    ("transpose", lambda x: mb.transpose(x=x, perm=[0, 2, 3, 1]), lambda t: t.permute(0, 2, 3, 1)),
    ("reshape", lambda x: mb.reshape(x=x, shape=[1, -1, 2]), lambda t: t.reshape(1, -1, 2)),
    ("concat", lambda x: mb.concat(values=[x, x], axis=1), lambda t: torch.cat([t, t], 1)),
    ("upsample", lambda x: mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=2),
     lambda t: F.interpolate(t, scale_factor=2, mode="nearest")),
]


@pytest.mark.parametrize("name,build,torch_fn", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_ops_match_torch(name, build, torch_fn):
    x = RNG.standard_normal((1, 4, 6, 8)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return build(x_in)

    np.testing.assert_allclose(run(prog, x_in=x), torch_fn(torch.from_numpy(x)).numpy(), atol=1e-6)


def test_fp16_program_rounds_like_fp16():
    x = RNG.standard_normal((1, 4, 6, 8)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp16)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.mul(x=x_in, y=np.float16(3.0))

    out = run(prog, x_in=x)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (x.astype(np.float16).astype(np.float32) * 3).astype(np.float16))


def test_quantize_dequantize_and_constexpr_match_torch():
    x = (RNG.standard_normal((1, 4, 5, 5)) * 3).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        q = mb.quantize(input=x_in, scale=np.float32(0.05), zero_point=np.int8(3), output_dtype="int8")
        return mb.dequantize(input=q, scale=np.float32(0.05), zero_point=np.int8(3))

    ref = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), 0.05, 3, -128, 127).numpy()
    np.testing.assert_allclose(run(prog, x_in=x), ref, atol=1e-6)

    qw = RNG.integers(-127, 127, (6, 4, 3, 3)).astype(np.int8)
    scale = RNG.uniform(0.001, 0.01, 6).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog2(x_in):
        w = mb.constexpr_affine_dequantize(quantized_data=qw, zero_point=np.zeros(6, np.int8), scale=scale, axis=0)
        return mb.conv(x=x_in, weight=w)

    w_ref = torch.from_numpy(qw.astype(np.float32) * scale[:, None, None, None])
    np.testing.assert_allclose(run(prog2, x_in=x), F.conv2d(torch.from_numpy(x), w_ref).numpy(), atol=1e-4)


def test_unknown_op_is_named():
    x = RNG.standard_normal((1, 4)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x_in):
        return mb.erf(x=x_in)

    with pytest.raises(UnsupportedOp, match="'erf'"):
        run(prog, x_in=x)


@pytest.mark.convert
def test_fp32_program_matches_pytorch(bundles, default_model, shared):
    runner, spec, desc = load_bundle_runner(bundles("coreml", "fp32"))
    assert "interpreted MIL, not the Core ML runtime" in desc or sys_is_mac()
    model, _ = default_model
    ref = TorchRunner(model)
    pipe = Pipeline(ref, spec)
    for name in ("group.jpg", "street.jpg"):
        x = pipe.preprocess(load_image(shared / "images" / name)).tensor
        a, b = ref(x), runner(x)
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-3


def sys_is_mac():
    import platform

    return platform.system() == "Darwin"


@pytest.mark.convert
def test_coreml_bundles_pass_parity_and_a_broken_one_fails(bundles, tmp_path):
    """fp16 and int8 pass their gates when interpreted; one conv weight negated in the weight file fails."""
    import json
    import shutil

    for precision in ("fp16", "int8w", "int8"):
        out = tmp_path / f"{precision}.json"
        assert cli.main(["parity", str(bundles("coreml", precision)), "--json", str(out), "--quiet"]) == 0, precision
        assert json.loads(out.read_text())["passed"]
    d = tmp_path / "broken"
    shutil.copytree(bundles("coreml", "fp16"), d)
    # negate the largest fp16 conv weight in weight.bin: its blob header (sentinel, dtype, size, data offset)
    # is found from the offset the program records
    import struct

    pkg = d / "model.mlpackage"
    spec = import_coremltools().utils.load_spec(str(pkg))
    ops = list(spec.mlProgram.functions["main"].block_specializations.values())[0].operations
    blobs = [op.attributes["val"].blobFileValue for op in ops if op.type == "const" and op.attributes["val"].HasField("blobFileValue")]
    wfile = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(wfile.read_bytes())
    best = max(blobs, key=lambda b: struct.unpack_from("<Q", data, b.offset + 8)[0])
    sentinel, _, size, start = struct.unpack_from("<IIQQ", data, best.offset)
    assert sentinel == 0xDEADBEEF
    arr = np.frombuffer(bytes(data[start:start + size]), np.float16).copy()
    data[start:start + size] = (-arr).tobytes()
    wfile.write_bytes(bytes(data))
    _, meta = read_metadata(d, verify=False)
    meta.pop("files")
    write_metadata(d, meta)
    out = tmp_path / "broken.json"
    assert cli.main(["parity", str(d), "--json", str(out), "--quiet"]) == 1
    assert not json.loads(out.read_text())["passed"]


@pytest.mark.convert
def test_damaged_weight_file_is_a_bundle_error(bundles, tmp_path, capsys):
    import shutil

    d = tmp_path / "damaged"
    shutil.copytree(bundles("coreml", "fp16"), d)
    wfile = d / "model.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    wfile.write_bytes(b"\x00" * 256 + wfile.read_bytes()[256:])
    _, meta = read_metadata(d, verify=False)
    meta.pop("files")
    write_metadata(d, meta)
    assert cli.main(["detect", str(grace_hopper_path()), "--bundle", str(d)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the mlprogram" in err and "Traceback" not in err
