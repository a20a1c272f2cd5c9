"""Pruning, pruned checkpoints, and `edge compress` writing atomically (SIGKILL never leaves half a file)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from calib_data.build import load_calibration
from converters.api import convert
from edge.bundle import read_metadata
from edge.commands.cli import main
from edge.commands.compress import parse_module_ratios
from edge.contract import ModelSpec
from edge.errors import ConfigError, WeightsError
from edge.image_io import load_image
from edge.model import RetinaFace
from edge.preprocess import prepare
from edge.runners.openvino import OpenVINORunner
from edge.runners.tflite import TFLiteRunner
from edge.weights.load import load_weights, save_shipped
from edge.weights.registry import REGISTRY, WeightsEntry
from quant.config import PruneConfig, PruneOpConfig, check_module_names
from quant.distill import band_loss, distill_loss, face_logit
from quant.divergence import leaky_divergence
from quant.divergence import main as divergence_main
from quant.features import FeatureTaps, feature_loss, feature_widths
from quant.prune import Pruner, compress, stage_config
from quant.ptq import pt2e_calibrated
from quant.qat import LearnedRange, QATQuantizer, fold_batch_norm_scales, load_qat

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("torch_pruning")


def test_prune_keeps_contract_and_rounds_channels(default_model):
    model, _ = default_model
    pruned, rep = compress(model, PruneConfig.uniform(0.3), size=320)
    assert rep["gmacs_after"] < 0.5 * rep["gmacs_before"] and rep["params_after"] < rep["params_before"]
    x = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        a, b = model(x), pruned(x)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}  # heads untouched
    for m in pruned.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels not in (4, 8, 20):  # heads: 2 anchors x 2/4/10
            assert m.out_channels % 8 == 0, m


def test_pruned_checkpoint_round_trip(default_model, tmp_path):
    model, info = default_model
    pruned, rep = compress(model, PruneConfig.uniform(0.5), size=320)
    p = tmp_path / "p.pth"
    torch.save({"state_dict": pruned.state_dict(), "retinaface_edge": {"format": 1, "kind": "pruned", "arch": info.arch.name, "prune": rep}}, p)
    loaded, li = load_weights(p)
    assert li.from_checkpoint and "configuration from the checkpoint" in li.describe()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        a, b = pruned.eval()(x), loaded(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_pruned_registry_entry(default_model, tmp_path, monkeypatch):
    """A registry entry with `file`: the float16 .npz written by save_shipped loads by name (widths from the file),
    with or without its mesh head, and is refused when its SHA-256 does not match."""

    model, info = default_model
    pruned, _ = compress(model, PruneConfig.uniform(0.3), size=160)
    f = tmp_path / "p.npz"
    sha = save_shipped(pruned, f)
    entry = WeightsEntry(name="test-pruned", arch=info.arch, source="test", license="MIT", sha256=sha,
                         params=sum(p.numel() for p in pruned.parameters()), file=str(f), kind="pruned")
    monkeypatch.setitem(REGISTRY, "test-pruned", entry)
    loaded, li = load_weights("test-pruned")
    assert li.known and li.kind == "pruned" and li.params == entry.params
    x = torch.randn(1, 3, 160, 160) * 50
    with torch.no_grad():
        a, b = pruned.eval()(x), loaded(x)
        c = load_weights("test-pruned", mesh=False)[0](x)
    for k in a:  # float16 storage
        assert torch.allclose(a[k], b[k], atol=0.05 * float(a[k].abs().max()) + 1e-3), k
    assert "mesh" in a and "mesh" not in c and torch.equal(c["conf"], b["conf"])
    f.write_bytes(f.read_bytes()[:-1] + b"x")
    with pytest.raises(WeightsError, match="SHA-256"):
        load_weights("test-pruned")


def test_compress_cli_kill_and_resume(shared, tmp_path):
    """Tiny settings (two stages of 3 steps, 320 px): SIGKILL at any point leaves final.pth absent or whole, and
    --resume finishes the run: stage 2 narrower than stage 1, both narrower than the teacher."""
    import json

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edge.cli", "compress", "--images", str(shared / "images"), "--prune", "0.3", "--stages", "2",
           "--iters", "6", "--batch", "1", "--size", "320", "--val", "1", "--save-every", "1", "--warmup", "1",
           "--threads", "1", "--out", str(out), "--quiet"]
    for delay in (3.0, 6.0, 9.0):
        p = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.time()
        while time.time() - t < delay and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (out / "final.pth").exists():
            load_weights(out / "final.pth")  # complete, or this raises
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    teacher, _ = load_weights("default")
    s1, _ = load_weights(out / "stage1" / "final.pth")
    model, info = load_weights(out / "final.pth")
    n = [sum(p.numel() for p in m.parameters()) for m in (teacher, s1, model)]
    assert n[0] > n[1] > n[2] and info.from_checkpoint and model.spec.mesh_rank == teacher.spec.mesh_rank
    x = torch.zeros(1, 3, 320, 320)
    with torch.no_grad():
        assert {k: v.shape for k, v in teacher(x).items()} == {k: v.shape for k, v in model(x).items()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gmacs"][1] < 0.75 * summary["gmacs"][0] and "teacher-face recall" in r.stdout
    assert (out / "heldout.txt").read_text().count("\n") == 1
    assert not list(out.glob(".final.pth.partial-*"))


def test_compress_ddp_two_cpu_processes(shared, tmp_path):
    """`edge compress` under torchrun: two gloo processes prune alike, train on their halves, end with the same weights."""
    import json
    import os

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((shared / "widerface/val/images/12--Group").glob("*.jpg"))[:6]:
        (images / p.name).symlink_to(p)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "edge.cli", "compress", "--images", str(images), "--prune", "0.3", "--iters", "3",
                        "--batch", "1", "--size", "160", "--val", "1", "--threads", "1", "--warmup", "1",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    a, b = summary["param_checksums"]
    assert a == b


def test_compress_config_resolution(default_model):
    """Most specific wins: module name (longest prefix) > module type > global; None leaves a module alone."""
    from torch import nn

    model, _ = default_model
    cfg = PruneConfig(global_config=PruneOpConfig(0.5), module_type_configs={"Conv2d": PruneOpConfig(0.25)},
                      module_name_configs={**PruneConfig().module_name_configs, "body.stage3": PruneOpConfig(0.0),
                                           "body.stage3.0": None})
    conv = nn.Conv2d(1, 1, 1)
    assert cfg.config_for("fpn.output1.0", conv).ratio == 0.25
    assert cfg.config_for("fpn.output1.0", nn.BatchNorm2d(1)).ratio == 0.5
    assert cfg.config_for("body.stage3.1.0", conv).ratio == 0.0 and cfg.config_for("body.stage3.0.3", conv) is None
    assert cfg.config_for("ClassHead.0.conv1x1", conv) is None
    with pytest.raises(ConfigError, match="bodyy"):
        PruneConfig(module_name_configs={"bodyy": PruneOpConfig(0.1)}).resolve(model, (nn.Conv2d,))
    with pytest.raises(ConfigError):
        PruneOpConfig(1.5)
    import copy

    p = Pruner(copy.deepcopy(model), PruneConfig.uniform(0.3, stages=2), size=160)
    p.prepare()
    r1, r2 = p.step(), p.step()
    assert r1["gmacs"] > r2["gmacs"] and p.report()["stages_done"] == 2
    with pytest.raises(RuntimeError):
        p.step()
    widths = {n: m.out_channels for n, m in p.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["ClassHead.0.conv1x1"] == 4 and all(w % 8 == 0 for n, w in widths.items() if "Head" not in n)


@pytest.mark.qat
def test_qat_run_converts_for_every_target(shared, tmp_path):
    """edge compress --qat-steps: the QAT checkpoint loads as float weights, its observers froze after
    --observe-steps, and edge-convert builds int8 TFLite, OpenVINO, ONNX QDQ and CoreML W8A8 bundles from the
    trained program. The ONNX graph carries int8 weights and int32 biases, so onnxruntime fuses every
    convolution into QLinearConv, and computes what the fake-quantised torch model computes."""
    import onnx
    import onnxruntime as ort

    out = tmp_path / "run"
    assert main(["compress", "--images", str(shared / "images"), "--prune", "0.3", "--iters", "1", "--qat-steps", "3",
                 "--observe-steps", "2", "--batch", "1", "--size", "160", "--val", "1", "--warmup", "1", "--threads", "1",
                 "--out", str(out), "--quiet"]) == 0
    ck = torch.load(out / "qat.pth", weights_only=True)
    observers = [v for k, v in ck["qat_state"].items() if k.endswith("observer_enabled")]
    assert len(observers) > 100 and all(int(v) == 0 for v in observers)
    model, info = load_weights(out / "qat.pth")
    assert info.kind == "qat" and sum(p.numel() for p in model.parameters()) < 300_000
    bundles = {}
    for target in ("tflite", "openvino", "onnx", "coreml"):
        res = convert(target, "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / target, progress=False)
        meta = read_metadata(res.bundle)[1]
        q = meta["quantization"]
        assert "QAT" in q["route"] and meta["calibration"] is None and res.parity["recall"] is not None, target
        assert q["qat"]["steps"] == 3, target
        bundles[target] = res.bundle
        if target == "tflite":
            # the QAT program still converts to the hybrid graph (NCHW float input): convolutions int8, not full-integer
            assert q["ops"].get("CONV_2D:int8->int8", 0) >= 40 and q["ops"].get("DEPTHWISE_CONV_2D:int8->int8", 0) == 13
            assert q["full_integer"] is False
        elif target == "openvino":
            assert q["conv_weight_types"].get("i8", 0) == 59
            assert q["leaky_relu_inputs_unquantized"] == 38  # OpenVINO fuses convolution and LeakyReLU: one rounding
        elif target == "onnx":
            assert q["ops"]["int8_conv_weights"] == 59 and q["rewritten"] == {"weights": 59, "biases": 59, "activations": q["rewritten"]["activations"]}
            assert "Clip" not in q["ops"]["nodes"]  # the weight clips were folded into the int8 initializers
        else:
            assert q["int8_weight_tensors"] >= 50 and q["leaky_relu_inputs_unquantized"] == 38

    x = np.random.default_rng(1).uniform(-120, 130, (1, 3, 160, 160)).astype(np.float32)
    rows = leaky_divergence(out / "qat.pth", bundles["tflite"] / "model.tflite", x)
    # every LeakyReLU of the backbone (27) found in the TFLite model by its int8 parameters; the first layer's
    # int8 output is the simulation's up to rounding
    assert len(rows) >= 27 and rows[0]["name"].startswith("body.stage1.0") and rows[0]["off"] < 0.2
    assert all(np.isfinite(r["rel_rms"]) and 0 <= r["off"] <= 1 for r in rows)
    image = str(shared / "images" / "group.jpg")
    assert divergence_main([str(out / "qat.pth"), str(bundles["tflite"]), "--image", image, "--json", str(tmp_path / "d.json")]) == 0
    import json

    assert len(json.loads((tmp_path / "d.json").read_text())["layers"]) == len(rows)
    assert divergence_main([str(out / "qat.pth"), str(bundles["onnx"]), "--image", image]) == 2  # not a TFLite bundle
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(bundles["onnx"] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 59 and "Conv" not in fused
    qat, model = load_qat(out / "qat.pth", 160)
    x = np.random.default_rng(0).uniform(-120, 130, (1, 3, 160, 160)).astype(np.float32)
    with torch.no_grad():
        sim = dict(zip(model.spec.output_names, (t.numpy() for t in qat.finalize()(torch.from_numpy(x)))))
    got = dict(zip(model.spec.output_names, session.run(None, {"input": x})))
    # the same quantised arithmetic; int8 rounding at a few grid points may differ (one step of a late layer)
    assert np.median(np.abs(got["loc"] - sim["loc"])) < 0.02 and np.abs(got["conf"] - sim["conf"]).max() < 0.1


@pytest.mark.qat
def test_qat_full_integer_program_converts_to_the_full_integer_graph(shared, tmp_path, capsys):
    """--qat-graph full-integer trains the program of TFLite's full-integer graph (canvas in, every op int8): it
    converts with no float compute op, the trained simulation is what the TFLite model computes (on a real
    picture: loc within two int8 steps in the median), and another target or a shape the program cannot have is refused
    before any work. --prune 0: QAT of the model itself, no pruning stage and no final.pth. Trained with --relu-split
    body.stage1 (stage 1's LeakyReLU convolutions as two with fused ReLUs and a SUB), which the checkpoint carries to
    the conversion; edge-convert --relu-split with a QAT checkpoint is refused (the program is converted as trained)."""

    base = ["compress", "--images", str(shared / "images"), "--prune", "0", "--batch", "1", "--size", "160",
            "--val", "1", "--warmup", "1", "--threads", "1", "--calib-count", "2", "--quiet"]
    for bad, says in ((["--qat-graph", "full-integer"], "--qat-steps"),
                      (["--qat-graph", "full-integer", "--qat-steps", "2", "--float-modules", "body.stage1"], "no float modules"),
                      (["--qat-graph", "full-integer", "--qat-steps", "2", "--qat-backend", "nncf"], "pt2e"),
                      (["--qat-steps", "2", "--relu-split", "body.stage1"], "--qat-graph full-integer"),
                      (["--qat-graph", "full-integer", "--qat-steps", "2", "--relu-split", "fpn.merge9"], "no module")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert main([*base, "--out", str(tmp_path / "none")]) == 2 and "nothing to prune" in capsys.readouterr().err
    # in a fresh process, as a user runs it: building the quantizer starts TensorFlow, whose notices are held back
    r = subprocess.run([sys.executable, "-c", "import sys; from edge.commands.cli import main; sys.exit(main(sys.argv[1:]))",
                        *base, "--qat-steps", "2", "--qat-graph", "full-integer", "--relu-split", "body.stage1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for noise in ("absl::InitializeLog", "oneDNN", "FutureWarning"):
        assert noise not in r.stdout + r.stderr, (noise, r.stderr[-3000:])
    assert (out / "qat.pth").is_file() and not (out / "final.pth").exists() and not list(out.glob("stage*"))
    # as a user runs it: a fresh process, whose only output is our steps (rebuilding the program imports
    # TensorFlow, whose notices are held back as in every conversion)
    r = subprocess.run([sys.executable, "-m", "converters.cli", "--target", "tflite", "--precision", "int8", "--weights",
                        str(out / "qat.pth"), "--input-size", "160", "--out", str(tmp_path / "tfl"), "--no-parity-gate"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for noise in ("[START]", "[DONE]", "absl::InitializeLog", "oneDNN", "FutureWarning", "XNNPACK delegate"):
        assert noise not in r.stdout + r.stderr, (noise, r.stderr[-3000:])
    bundle = tmp_path / "tfl"
    q = read_metadata(bundle)[1]["quantization"]
    assert q["full_integer"] is True and q["float_compute_ops"] == {} and q["qat"]["graph"] == "full-integer"
    assert q["xnnpack"]["partitions"] == 1  # the trained program converts to the one-partition graph too
    assert q["ops"]["QUANTIZE:uint8->int8"] == 1 and q["ops"]["CONV_2D:int8->int8"] == 52 and q["qat"]["steps"] == 2
    assert q["ops"]["SUB:int8->int8"] == 11 and q["relu_split"] == ["body.stage1"] == q["qat"]["relu_split"]
    with pytest.raises(ConfigError, match="full-integer"):
        convert("onnx", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "onnx", progress=False)
    assert not (tmp_path / "onnx").exists()
    with pytest.raises(ConfigError, match="as it was trained"):
        convert("tflite", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "again", progress=False,
                relu_split=["body.stage1"])
    assert not (tmp_path / "again").exists()
    qat, model = load_qat(out / "qat.pth", 160)
    assert qat.full_integer and qat.relu_split == ("body.stage1",)
    # a checkpoint of the earlier program (a normalising convolution before the model) is refused, naming why
    ck = torch.load(out / "qat.pth", map_location="cpu", weights_only=True)
    ck["qat_state"]["gm.norm.weight"] = torch.ones(3, 1, 1, 1)
    torch.save(ck, tmp_path / "earlier.pth")
    with pytest.raises(WeightsError, match="earlier program"):
        load_qat(tmp_path / "earlier.pth", 160)

    canvas = prepare(load_image(shared / "images" / "group.jpg"), model.spec).pixel_canvas[None]
    with torch.no_grad():
        sim = dict(zip(model.spec.output_names, (t.numpy() for t in qat.finalize()(torch.from_numpy(canvas.astype(np.float32))))))
    got = TFLiteRunner(bundle / "model.tflite", model.spec.output_names).run_image(canvas)
    # the same int8 arithmetic: outputs agree up to a few rounding steps
    step = q["io"]["outputs"]["loc"]["scale"]
    assert np.median(np.abs(got["loc"] - sim["loc"])) <= 2.01 * step and np.abs(got["conf"] - sim["conf"]).max() < 0.1


@pytest.mark.qat
def test_qat_fused_leaky_program_trains_what_openvino_and_coreml_run(shared, tmp_path, capsys, default_model):
    """--qat-graph fused-leaky: the float-input program without the fake-quantiser between each convolution and its
    LeakyReLU (38 of them), as OpenVINO and Core ML run int8 (one rounding, after the activation). It converts for
    those two, whose metadata count the 38 unrounded inputs, and OpenVINO computes what the trained program does; tflite
    and onnx round there and are refused before any work, as are the shapes the option cannot have."""
    import copy

    model, _ = default_model
    plain, fused = (QATQuantizer(copy.deepcopy(model), size=160, fused_leaky=f) for f in (False, True))
    plain.prepare()
    fused.prepare()
    assert fused.leaky_inputs_unquantized == 38 and plain.leaky_inputs_unquantized == 0
    assert len(fused._fake_quantizers()[0]) == len(plain._fake_quantizers()[0]) - 38
    leaky = [n for n in fused.gm.graph.nodes if "leaky_relu" in str(n.target)]
    assert len(leaky) == 38 and all(n.args[0].op == "call_function" for n in leaky)  # the batch norm's output itself
    with pytest.raises(ValueError, match="full-integer"):
        QATQuantizer(copy.deepcopy(model), size=160, full_integer=True, fused_leaky=True)

    base = ["compress", "--images", str(shared / "images"), "--prune", "0", "--batch", "1", "--size", "160",
            "--val", "1", "--warmup", "1", "--threads", "1", "--calib-count", "2", "--quiet"]
    for bad, says in ((["--qat-graph", "fused-leaky"], "--qat-steps"),
                      (["--qat-graph", "fused-leaky", "--qat-steps", "2", "--qat-backend", "nncf"],
                       "--qat-graph fused-leaky shapes the pt2e QAT program")):
        assert main([*base, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    assert main([*base, "--qat-steps", "2", "--qat-graph", "fused-leaky", "--out", str(out)]) == 0
    assert "openvino or coreml" in capsys.readouterr().err
    for target in ("tflite", "onnx"):
        with pytest.raises(ConfigError, match="fused-leaky"):
            convert(target, "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / target, progress=False)
        assert not (tmp_path / target).exists()
    # Core ML: the trained program, which has no quantiser before a LeakyReLU left to drop
    res = convert("coreml", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "coreml", progress=False)
    meta = read_metadata(res.bundle)[1]
    q = meta["quantization"]
    assert q["leaky_relu_inputs_unquantized"] == 38 == q["qat"]["leaky_relu_inputs_unquantized"] and meta["calibration"] is None
    assert q["qat"]["graph"] == "float input (NCHW), fused LeakyReLU" and q["qat"]["steps"] == 2 and "QAT" in q["route"]
    # OpenVINO: NNCF's PTQ of the trained weights (its own graph: 59 int8 convolutions), the training recorded
    res = convert("openvino", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "openvino", progress=False,
                  calib=str(shared / "images"), calib_count=2)
    meta = read_metadata(res.bundle)[1]
    q = meta["quantization"]
    assert "nncf.quantize" in q["route"] and "fused-leaky" in q["route"] and q["qat"]["leaky_relu_inputs_unquantized"] == 38
    assert q["conv_weight_types"].get("i8", 0) == 59 and meta["calibration"]["count"] == 2
    qat, model160 = load_qat(out / "qat.pth", 160)
    assert qat.fused_leaky and qat.leaky_inputs_unquantized == 38
    # the trained model, quantised: int8 rounding apart (2 calibration pictures at 160), it computes what that model does
    x = prepare(load_image(shared / "images" / "group.jpg"), model160.spec).tensor
    got = OpenVINORunner(res.bundle / "model.xml", model160.spec.output_names, threads=1)(x)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model160.eval()(torch.from_numpy(x)).items()}
    assert np.median(np.abs(got["loc"] - ref["loc"])) < 0.15 and np.abs(got["conf"] - ref["conf"]).max() < 0.3


def test_qat_folds_batch_norm_scales_without_changing_the_function():
    """Before QAT the batch norms' scales move into the convolutions (what QAT fake-quantises is then what the
    converters quantise); the model computes the same thing."""
    import copy

    torch.manual_seed(0)
    model = RetinaFace(ModelSpec()).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    folded = copy.deepcopy(model)
    assert fold_batch_norm_scales(folded) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)
    bns = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.running_mean == 0) for m in bns)


def test_stage_config_per_module_ratios_and_cli_checks(default_model):
    """--prune-module NAME=RATIO: the longest matching name sets a layer's final ratio (body=0 keeps the backbone);
    the stage's share of it follows progress; typos and bad ratios are ConfigErrors before any work."""
    import copy

    model, _ = default_model
    student = copy.deepcopy(model)
    for p in student.parameters():
        p.requires_grad = True
    overrides = parse_module_ratios(["body=0", "fpn=0.5", "fpn.merge1=0.25"])
    assert overrides == {"body": 0.0, "fpn": 0.5, "fpn.merge1": 0.25}
    half = stage_config(model, student, 0.3, overrides=overrides, progress=0.5)
    names = set(half.module_name_configs)
    assert not any(n.startswith("body.") for n in names) and "fpn.output1.0" in names and "ssh1.conv3X3.0" in names
    pr = Pruner(student, stage_config(model, student, 0.3, overrides=overrides), 320)
    pr.prepare()
    pr.step()
    w = {n: m.out_channels for n, m in student.named_modules() if isinstance(m, nn.Conv2d)}
    ref = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(w[n] == ref[n] for n in ref if n.startswith("body."))  # backbone untouched
    assert w["ssh1.conv3X3.0"] == 24  # 32 at the global 0.3 -> 22.4 -> 24
    for bad in (["fpn"], ["fpn=1.0"], ["=0.5"], ["fpn=x"]):
        with pytest.raises(ConfigError, match="NAME=RATIO"):
            parse_module_ratios(bad)
    with pytest.raises(ConfigError, match="no module named 'bodyy'"):
        check_module_names(model, ["body", "fpn.merge1", "bodyy"])


@pytest.mark.qat
def test_qat_calibration_sets_activation_ranges_as_ptq_does(default_model):
    """QATQuantizer.calibrate: histogram ranges over real images (the input quantiser gets exactly PTQ's range),
    activation observers then stay off through training steps, weight fake-quantisation on."""
    import copy

    model, _ = default_model
    m = copy.deepcopy(model)
    m.spec = m.spec.with_input_size(160)
    cs = load_calibration(None, 160, 4, m.spec.mean, progress=False)
    q = QATQuantizer(m, size=160)
    q.prepare()
    acts, weights = q._fake_quantizers()
    assert q.calibrate(cs.tensors(m.spec)) == len(acts) > 100 and len(weights) == 59
    q.step()
    assert all(int(f.observer_enabled) == 0 and int(f.fake_quant_enabled) == 1 for f in acts)
    assert all(int(f.fake_quant_enabled) == 1 and torch.isfinite(f.scale).all() for f in weights)
    assert all(float(f.scale) > 0 for f in acts)
    gm, _ = pt2e_calibrated(copy.deepcopy(model), m.spec, cs, progress=False)
    first = lambda g: next(g.get_submodule(n.target) for n in g.graph.nodes  # noqa: E731
                           if n.op == "call_module" and n.args and n.args[0].op == "placeholder")
    ptq_scale, _ = first(gm).calculate_qparams()
    assert torch.allclose(first(q.gm).scale, ptq_scale)
    for f in acts:  # what convert_pt2e reads: the inner observer's range gives the same parameters
        scale, zp = f.calculate_qparams()
        assert torch.allclose(scale, f.scale) and torch.equal(zp.int(), f.zero_point.int())


@pytest.mark.qat
def test_qat_learnt_ranges_train_and_write_back(default_model):
    """learn_ranges(): the calibrated activation scales become parameters that get gradients and move with the
    optimiser; write_back() returns them to the program's own quantisers (a quantiser reached by two names
    gets one parameter), and the program computes the same with either, as does the converted program."""
    import copy

    model, _ = default_model
    m = copy.deepcopy(model)
    m.spec = m.spec.with_input_size(160)
    cs = load_calibration(None, 160, 2, m.spec.mean, progress=False)
    q = QATQuantizer(m, size=160)
    net = q.prepare()
    with pytest.raises(RuntimeError, match="calibrate"):
        q.learn_ranges()
    q.calibrate(cs.tensors(m.spec))
    scales = q.learn_ranges()
    assert len(scales) == len(q._fake_quantizers()[0]) and all(isinstance(s, torch.nn.Parameter) for s in scales)
    before = torch.cat([s.detach().clone() for s in scales])
    x = torch.from_numpy(next(iter(cs.tensors(m.spec))))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    for _ in range(2):
        loss = sum(v.pow(2).mean() for v in net(x).values())
        opt.zero_grad()
        loss.backward()
        assert sum(int(s.grad is not None and bool(s.grad.abs().sum() > 0)) for s in scales) > len(scales) // 2
        opt.step()
        q.step()
    learnt = torch.cat([s.detach().clone() for s in scales])
    assert (learnt != before).sum() > len(scales) // 2 and (learnt > 0).all()
    from torchao.quantization.pt2e import disable_observer

    q.gm.apply(disable_observer)  # weight ranges otherwise move with every forward pass
    with torch.no_grad():
        sim = net(x)
    assert q.write_back() >= len(scales) and not any(isinstance(mod, LearnedRange) for mod in q.gm.modules())
    assert sorted(float(f.scale) for f in q._fake_quantizers()[0]) == pytest.approx(sorted(learnt.tolist()), rel=1e-6)
    with torch.no_grad():
        plain = net(x)
        conv = dict(zip(m.spec.output_names, q.finalize()(x)))
    for k in sim:
        assert torch.allclose(sim[k], plain[k], atol=1e-5), k
        # the converted program rounds in quantize/dequantize ops, the simulation in fake-quantisers: a value on a
        # rounding tie can land a step or two apart (measured: 43 of 4,200 loc values by 0.035, 0.7 % of the landmark
        # values by up to 0.067; each under 2 % of the output's span); a wrong
        # conversion moves most values
        off = (sim[k] - conv[k]).abs()
        span = float(sim[k].max() - sim[k].min())
        assert float((off > 1e-5).float().mean()) < 0.02 and float(off.max()) < 0.02 * span, (k, float(off.max()), span)
    assert q.report()["activation_ranges"] == "learnt"


@pytest.mark.qat
def test_compress_qat_learnt_ranges_run(shared, tmp_path):
    """edge compress --qat-ranges learnt --float-modules body.stage1: the run records both and writes a checkpoint of
    the ordinary layout (the learnt ranges written back), which loads with its float modules and converts (the
    training of the scales itself: test_qat_learnt_ranges_train_and_write_back)."""

    out = tmp_path / "run"
    assert main(["compress", "--images", str(shared / "images"), "--prune", "0.3", "--iters", "1", "--qat-steps", "2",
                 "--qat-ranges", "learnt", "--float-modules", "body.stage1", "--calib-count", "2", "--batch", "1",
                 "--size", "160", "--val", "1", "--warmup", "1", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    ck = torch.load(out / "qat.pth", weights_only=True)
    meta = ck["retinaface_edge"]
    assert meta["qat"]["activation_ranges"] == "learnt" and meta["train"]["qat_ranges"] == "learnt"
    assert meta["qat"]["float_modules"] == ["body.stage1"]
    q, _ = load_qat(out / "qat.pth", 160)
    assert not any(isinstance(m, LearnedRange) for m in q.gm.modules()) and q.report()["steps"] == 2
    assert q.float_modules == ("body.stage1",)
    res = convert("tflite", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "tfl", progress=False)
    ops = read_metadata(res.bundle)[1]["quantization"]["ops"]
    assert ops["CONV_2D:float32->float32"] == 6 and ops["DEPTHWISE_CONV_2D:float32->float32"] == 5  # body.stage1 stayed float
    res = convert("onnx", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "onnx", progress=False)
    rewritten = read_metadata(res.bundle)[1]["quantization"]["rewritten"]
    assert rewritten["weights"] == rewritten["biases"] == 59 - 11 and res.parity["recall"] is not None


@pytest.mark.qat
def test_feature_taps_on_model_and_qat_program(default_model):
    """FeatureTaps: on the float model, the named module's output; on the PT2E program, the value the next layer
    reads (after the stage's fake-quantiser), with gradients to the program's weights; close() gives back the
    same graph and outputs. feature_loss is 0 for identical maps and positive otherwise."""
    import copy

    model, _ = default_model
    m = copy.deepcopy(model).eval()
    m.spec = m.spec.with_input_size(160)
    names = ("body.stage1", "body.stage3")
    assert feature_widths(m, names) == {"body.stage1": (1, 64, 8, 8), "body.stage3": (1, 256, 2, 2)}
    x = torch.from_numpy(np.random.default_rng(0).uniform(-120, 130, (2, 3, 160, 160)).astype(np.float32))
    taps = FeatureTaps(m, names)
    with torch.no_grad():
        m(x)
    ref = taps.pop()
    assert torch.equal(ref["body.stage1"], m.body.stage1(x))
    taps.close()
    assert not m.body.stage1._forward_hooks
    q = QATQuantizer(copy.deepcopy(m), size=160, observe_steps=0)
    net = q.prepare()
    with torch.no_grad():
        before, n_nodes = net(x), len(q.gm.graph.nodes)
    taps = FeatureTaps(q.gm, names)
    assert len(q.gm.graph.nodes) == n_nodes + 2
    out = net(x)
    got = taps.pop()
    with pytest.raises(RuntimeError, match="no forward pass"):
        taps.pop()
    fq = next(u for u in q.gm.graph.nodes if u.op == "call_module" and u.target == "_feature_tap_0").args[0]
    assert fq.op == "call_module" and str(fq.target).startswith("activation_post_process")
    step = float(q.gm.get_submodule(fq.target).scale)  # the tapped map is on the stage output's int8 grid
    grid = got["body.stage1"].detach() / step
    assert torch.allclose(grid, grid.round(), atol=1e-3)
    loss, parts = feature_loss(got, ref)
    assert float(loss) > 0 and set(parts) == {"feat", "feat_body.stage1", "feat_body.stage3"}
    assert parts["feat_body.stage1"] < 0.05  # int8 noise, relative to the float stage's output
    loss.backward()
    assert q.gm.get_parameter("model.body.stage1.0.0.weight").grad.abs().sum() > 0
    assert float(feature_loss(ref, ref)[0]) == 0
    taps.close()
    assert len(q.gm.graph.nodes) == n_nodes and not hasattr(q.gm, "_feature_tap_0")
    with torch.no_grad():
        after = net(x)
    assert all(torch.allclose(before[k], after[k], atol=1e-5) and torch.allclose(before[k], out[k], atol=1e-5) for k in before)


def test_feature_taps_on_the_full_integer_program(default_model):
    """The full-integer QAT program (canvas in, the model two levels down) is tapped by the same model-relative names:
    the tapped stage output is the float stage's to within int8 noise, on the stage's int8 grid."""
    import copy

    model, _ = default_model
    m = copy.deepcopy(model).eval()
    m.spec = m.spec.with_input_size(160)
    cs = load_calibration(None, 160, 2, m.spec.mean, progress=False)
    x = torch.from_numpy(next(iter(cs.tensors(m.spec))))
    with torch.no_grad():
        ref = m.body.stage1(x)
    q = QATQuantizer(copy.deepcopy(m), size=160, full_integer=True)
    net = q.prepare()
    q.calibrate(cs.tensors(m.spec))
    taps = FeatureTaps(q.gm, ("body.stage1",))
    with torch.no_grad():
        net(x)
    got = taps.pop()["body.stage1"]
    taps.close()
    assert got.shape == ref.shape
    loss, _ = feature_loss({"s": got}, {"s": ref})
    assert 0 < float(loss) < 0.2


def test_full_integer_program_float_state_is_the_model(default_model):
    """The float weights a full-integer QAT checkpoint stores are the program's, back in the model's own form: the
    first convolution takes normalised input again (the program's takes the pixels, mean and std folded in; a std
    other than 1 here) and a split convolution (--relu-split: conv and batch norm in one, with a negative twin) is
    conv + batch norm. Untrained, that float model computes what the model does (its first convolution's weights on
    their int8 grid, as the program holds them)."""
    import copy
    import dataclasses

    model, _ = default_model
    m = copy.deepcopy(model).eval()
    m.spec = dataclasses.replace(m.spec.with_input_size(160), std=(57.4, 57.1, 58.4))
    x = torch.from_numpy(next(iter(load_calibration(None, 160, 1, m.spec.mean, progress=False).tensors(m.spec)))) / 57.0
    for split in ((), ("body.stage1",)):
        q = QATQuantizer(copy.deepcopy(m), size=160, full_integer=True, relu_split=split)
        q.prepare()
        back = copy.deepcopy(m)
        back.load_state_dict(q.float_state(q.model))
        with torch.no_grad():
            ref, got = m(x), back(x)
        for k in ref:
            scale = float(ref[k].abs().max())
            assert float((got[k] - ref[k]).abs().max()) < 0.02 * scale, (split, k)
        w = back.body.stage1[0][0].weight / torch.tensor(m.spec.std).view(1, 3, 1, 1)
        step = w.abs().amax((1, 2, 3), keepdim=True) / 127
        assert torch.allclose(w / step, (w / step).round(), atol=1e-3)


@pytest.mark.qat
def test_compress_distill_features_run(shared, tmp_path, capsys):
    """--distill-features: the feature-map loss joins the pruning and the QAT losses (logged per map), the run records
    it, and the QAT checkpoint keeps the ordinary layout (no taps). Pruning that changes a named module's width is
    refused, naming the module."""
    import csv

    out = tmp_path / "run"
    common = ["compress", "--images", str(shared / "images"), "--iters", "2", "--calib-count", "2", "--batch", "1",
              "--size", "160", "--val", "1", "--warmup", "1", "--threads", "1", "--quiet"]
    assert main([*common, "--prune", "0", "--prune-module", "fpn=0.5", "--qat-steps", "2", "--distill-features",
                 "body.stage2,body.stage3", "--feature-weight", "5", "--out", str(out)]) == 0
    for log in (out / "stage1" / "log.csv", out / "qat" / "log.csv"):
        rows = list(csv.DictReader(log.open()))
        assert rows and all(float(r["feat_body.stage2"]) >= 0 and "feat_body.stage3" in r for r in rows), log
    qat_rows = list(csv.DictReader((out / "qat" / "log.csv").open()))
    assert float(qat_rows[0]["feat_body.stage3"]) > 0  # int8 activations: the program's maps differ from the teacher's
    ck = torch.load(out / "qat.pth", weights_only=True)
    meta = ck["retinaface_edge"]
    assert meta["train"]["distill_features"] == ["body.stage2", "body.stage3"]
    # QAT starts from the equalised backbone, as edge-convert's PTQ quantises it
    assert meta["train"]["equalize"] and meta["qat"]["cross_layer_equalization"]["pairs"] > 20
    assert not any("_feature_tap" in k for k in ck["qat_state"])
    q, _ = load_qat(out / "qat.pth", 160)
    assert not any(n.op == "call_module" and "_feature_tap" in str(n.target) for n in q.gm.graph.nodes)
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main([*common, "--prune", "0.3", "--distill-features", "body.stage2", "--out", str(bad)]) == 2
    assert "--distill-features body.stage2" in capsys.readouterr().err and not (bad / "final.pth").exists()


@pytest.mark.qat
def test_nncf_qat_run_converts_for_openvino_only(shared, tmp_path):
    """--qat-backend nncf: the checkpoint rebuilds NNCF's quantised model (config as JSON, no pickle), the trained
    model converts to an OpenVINO bundle whose convolutions run int8 and whose outputs are those of the
    fake-quantised torch model; TFLite is refused with a ConfigError naming the backend."""
    import json

    out = tmp_path / "run"
    assert main(["compress", "--images", str(shared / "images"), "--prune", "0.3", "--iters", "1", "--qat-steps", "2",
                 "--qat-backend", "nncf", "--calib-count", "2", "--batch", "1", "--size", "160", "--val", "1", "--warmup", "1",
                 "--threads", "1", "--out", str(out), "--quiet"]) == 0
    ck = torch.load(out / "qat.pth", weights_only=True)
    assert isinstance(json.loads(ck["nncf_config"]), dict) and ck["retinaface_edge"]["qat"]["backend"] == "nncf"
    res = convert("openvino", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "ov", progress=False)
    q = read_metadata(res.bundle)[1]["quantization"]
    assert "NNCF QAT" in q["route"] and q["conv_weight_types"].get("i8", 0) == 59
    qat, model = load_qat(out / "qat.pth", 160)

    x = np.random.default_rng(0).uniform(-120, 130, (1, 3, 160, 160)).astype(np.float32)
    with torch.no_grad():
        sim = dict(zip(model.spec.output_names, (t.numpy() for t in qat.finalize()(torch.from_numpy(x)))))
    got = OpenVINORunner(res.bundle / "model.xml", model.spec.output_names, threads=1)(x)
    # the same quantised arithmetic; int8 rounding at a few grid points may differ (one step of a late layer)
    assert np.median(np.abs(got["loc"] - sim["loc"])) < 0.02 and np.abs(got["conf"] - sim["conf"]).max() < 0.1
    with pytest.raises(ConfigError, match="nncf"):
        convert("tflite", "int8", weights=str(out / "qat.pth"), input_size=160, out=tmp_path / "tfl", progress=False)


@pytest.mark.parametrize("extra, match", [(["--qat-steps", "2", "--qat-epochs", "1"], "not both"),
                                          (["--qat-steps", "-1"], "negative"),
                                          (["--qat-steps", "2", "--qat-backend", "nncf", "--observe-steps", "5"], "observe-steps"),
                                          (["--qat-steps", "2", "--qat-backend", "nncf", "--qat-ranges", "learnt"], "learnt"),
                                          (["--qat-steps", "2", "--observe-steps", "5", "--qat-ranges", "learnt"], "learnt"),
                                          (["--qat-steps", "2", "--qat-backend", "nncf", "--float-modules", "body"], "float-modules"),
                                          (["--qat-steps", "2", "--float-modules", "body.stage9"], "body.stage9"),
                                          (["--float-modules", "body.stage1"], "give --qat-steps"),
                                          (["--distill-features", "body.stage9"], "body.stage9"),
                                          (["--distill-features", "body.stage1", "--feature-weight", "0"], "positive"),
                                          (["--band-weight", "-1"], "band-weight"),
                                          (["--qat-steps", "2", "--qat-backend", "nncf", "--distill-features", "body"], "nncf")])
def test_compress_qat_options_are_checked_before_any_work(shared, tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert main(["compress", "--images", str(shared / "images"), "--prune", "0.3", "--iters", "1", "--size", "160",
                 "--val", "1", "--out", str(out), "--quiet", *extra]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_band_loss_weighs_only_the_anchors_a_threshold_decides():
    t = torch.tensor([[0.01, 0.05, 0.45, 0.55, 0.95, 0.99]])
    s = t.clone()
    s[0, 0] = 0.4  # the student puts a background anchor near the threshold: in the band through the student
    s[0, 2] = 0.60  # a face near the threshold flipped
    s[0, 5] = 0.70  # far from the band on the teacher's side, and in it on the student's
    s[0, 1] = 0.02  # out of the band on both sides: not counted
    s.requires_grad_(True)
    loss, n = band_loss(s, t)
    assert n == 4  # anchors 2, 3 (teacher's probability in the band), 0, 5 (the student's); 1 and 4 out on both sides
    want = sum((face_logit(s[0, i]) - face_logit(t[0, i])) ** 2 for i in (0, 2, 3, 5)) / 4
    assert torch.isclose(loss, want)
    loss.backward()
    assert s.grad[0, 1] == 0 and s.grad[0, 4] == 0 and s.grad[0, 2] > 0  # too high a face logit is pushed down
    # added to the distillation loss only when weighted; none in the band costs nothing
    conf = lambda p: torch.stack([1 - p, p], -1)  # noqa: E731
    out = {"conf": conf(s.detach()), "loc": torch.zeros(1, 6, 4), "landmarks": torch.zeros(1, 6, 10)}
    ref = {"conf": conf(t), "loc": torch.zeros(1, 6, 4), "landmarks": torch.zeros(1, 6, 10)}
    plain, parts = distill_loss(out, ref)
    banded, bparts = distill_loss(out, ref, band_weight=3.0)
    assert "band" not in parts and bparts["band_anchors"] == 4
    assert torch.isclose(banded - plain, 3.0 * want.detach())
    far = torch.tensor([[0.01, 0.99]])
    none, n = band_loss(far.clone(), far)
    assert n == 0 and float(none) == 0.0
