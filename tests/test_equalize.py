"""Cross-layer equalisation before int8: by weight range, then by activation range (quant.equalize)."""
import numpy as np
import pytest
import torch

from calib_data.build import load_calibration
from edge.contract import ARCHS, ModelSpec
from edge.image_io import load_image
from edge.model import RetinaFace
from edge.preprocess import prepare
from edge.weights.load import load_weights
from quant.equalize import _chain, equalize
from quant.ptq import pt2e_calibrated, quantized_program


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def _maxima(m, cs, spec) -> dict:
    """Each backbone unit's per-channel output maxima over the calibration inputs."""
    highs = {}

    def keep(k):
        return lambda _m, _i, o: highs.__setitem__(k, torch.maximum(highs.get(k, o.amax((0, 2, 3))), o.amax((0, 2, 3))))

    hooks = [a.register_forward_hook(keep(k)) for k, (_c, _b, a) in enumerate(_chain(m))]
    with torch.no_grad():
        for t in cs.tensors(spec):
            m.eval()(torch.from_numpy(t))
    for h in hooks:
        h.remove()
    return highs


def test_activation_equalisation_keeps_the_function_evens_the_channels_and_brings_int8_closer(shared):
    """Given calibration inputs, the channels of each equalised map are scaled up towards its largest (the
    successor's weights scaled down by as much): the FP32 function is unchanged, the channels' maxima spread
    less, and the full-integer int8 program computes outputs closer to the FP32 model's than with weight
    equalisation alone."""
    model, _ = load_weights("default")
    spec = model.spec.with_input_size(160)
    model.spec = spec
    cs = load_calibration(None, 160, 4, spec.mean, False)
    by_weights, rep_w = equalize(model)
    both, rep = equalize(model, activations=cs.tensors(spec))
    assert "activations" not in rep_w
    act = rep["activations"]
    assert act["pairs"] == rep["pairs"] > 20
    assert act["spread_after"] < act["spread_before"] / 2, act

    x = torch.from_numpy(next(iter(cs.tensors(spec))))
    with torch.no_grad():
        ref, got = model.eval()(x), both.eval()(x)
    for k in ref:
        assert torch.allclose(ref[k], got[k], rtol=1e-3, atol=1e-3 * float(ref[k].abs().max())), k

    # every map: each channel's scale moved it up, never past the map's maximum over the calibration inputs
    after, before = _maxima(both, cs, spec), _maxima(by_weights, cs, spec)
    assert all(float(after[k].max()) <= float(before[k].max()) * 1.001 for k in after)

    canvas = prepare(load_image(shared / "images" / "group.jpg"), spec).pixel_canvas[None].astype(np.float32)
    outs = {}
    for name, m in (("weights", by_weights), ("both", both)):
        m.spec = spec
        gm, _ = pt2e_calibrated(m, spec, cs, False, full_integer=True)
        with torch.no_grad():
            outs[name] = [t.numpy() for t in quantized_program(gm, fold_quantize=False)(torch.from_numpy(canvas))]
    with torch.no_grad():
        fp32 = model.eval()(torch.from_numpy(prepare(load_image(shared / "images" / "group.jpg"), spec).tensor))
    gain = {k: _snr_db(fp32[k].numpy(), outs["both"][i]) - _snr_db(fp32[k].numpy(), outs["weights"][i])
            for i, k in enumerate(spec.output_names[:3])}  # measured: loc +0.6 dB, conf +0.1, landmarks +0.6
    assert gain["loc"] > 0.3 and gain["landmarks"] > 0.3 and gain["conf"] > -0.5, gain


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_equalisation_keeps_every_architecture_s_function(arch):
    """Weight and activation equalisation rescale only channels with one consumer: the FPN's taps (with the P2-P6
    pyramid also the stride-4 map) are left alone, so every architecture computes what it did."""
    torch.manual_seed(0)
    model = RetinaFace(ModelSpec(arch=ARCHS[arch], input_size=160)).eval()
    for mod in model.modules():  # batch norms far from identity, so a wrong scale shows
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.weight.data.uniform_(0.2, 3.0)
    x = torch.randn(2, 3, 160, 160)
    for activations in (None, [x[:1].numpy(), x[1:].numpy()]):
        eq, rep = equalize(model, activations=activations)
        assert rep["pairs"] > 20
        with torch.no_grad():
            ref, got = model(x), eq(x)
        for k in ref:
            assert float((ref[k] - got[k]).abs().max()) < 1e-4 * float(ref[k].abs().max()), (arch, k)
