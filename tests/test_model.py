import copy
import dataclasses

import numpy as np
import pytest
import torch

from edge.anchors import priors
from edge.contract import FACE_DETECTOR_1MB, PYTORCH_RETINAFACE, ModelSpec
from edge.model import LeakyAsReLUs, RetinaFace, TupleOutputs, integer_graph_form, leaky_as_relus_form, pixel_input_form
from quant.ptq import relu_split_by_range


@pytest.mark.parametrize("hw", [(640, 640), (96, 160), (928, 1600)])
def test_outputs_named_and_shaped_by_contract(hw):
    spec = ModelSpec()
    model = RetinaFace(spec).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, *hw))
    assert tuple(out) == spec.output_names == ("loc", "conf", "landmarks")
    assert {k: tuple(v.shape) for k, v in out.items()} == spec.output_shapes(*hw, batch=2)
    assert len(priors(*hw, spec.arch.min_sizes, spec.steps)) == spec.num_anchors(*hw)
    # conf is a probability pair per anchor
    np.testing.assert_allclose(out["conf"].sum(-1).numpy(), 1.0, atol=1e-6)


def test_640_anchor_count_matches_reference():
    # (80*80 + 40*40 + 20*20) cells x 2 anchors
    assert ModelSpec().num_anchors(640, 640) == 16800


def test_mesh_head_slots_in_without_changing_other_outputs():
    spec = ModelSpec(mesh_vertices=468)
    model = RetinaFace(spec).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert tuple(out) == ("loc", "conf", "landmarks", "mesh")
    assert out["mesh"].shape == (1, spec.num_anchors(64, 64), 3 * 468)
    plain = RetinaFace(ModelSpec()).state_dict()
    assert set(plain) < set(model.state_dict())


def test_activation_is_configuration():
    relu = RetinaFace(ModelSpec(arch=FACE_DETECTOR_1MB))
    leaky = RetinaFace(ModelSpec(arch=PYTORCH_RETINAFACE))
    assert any(isinstance(m, torch.nn.ReLU) for m in relu.body.modules())
    assert not any(isinstance(m, torch.nn.LeakyReLU) for m in relu.modules())
    slopes = {m.negative_slope for m in leaky.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.1}


def test_spec_round_trips_through_dict():
    spec = ModelSpec(arch=FACE_DETECTOR_1MB, input_size=None, mesh_vertices=468)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.input_size = 320  # type: ignore[misc]


def test_tuple_wrapper_keeps_contract_order():
    model = RetinaFace(ModelSpec()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        d = model(x)
        t = TupleOutputs(model)(x)
    for a, name in zip(t, ModelSpec().output_names):
        assert torch.equal(a, d[name])


def test_pixel_input_form_takes_the_pixels_padded_with_the_mean_colour():
    """The normalisation folded into the first convolution: on the pixels with a mean-colour row and column on the
    top and left, the model's outputs on the normalised input (also with a per-channel std, and from the
    explicit-padding form). weight_grid=127 puts the folded weights on their int8 grid and folds the mean through
    the rounded weights: then it is the model with those rounded weights. Anything but a 3x3 stride-2 first
    convolution of 3 channels is refused; the model is left as it was."""
    torch.manual_seed(0)
    model = RetinaFace(ModelSpec(mesh_vertices=68)).eval()
    before = model.body.stage1[0][0].weight.clone()
    pixels = torch.randint(0, 256, (1, 3, 160, 160)).float()
    for mean, std in (((104.0, 117.0, 123.0), (1.0, 1.0, 1.0)), ((103.5, 116.3, 123.7), (57.4, 57.1, 58.4))):
        m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        padded = m.expand(1, 3, 161, 161).clone()
        padded[:, :, 1:, 1:] = pixels
        with torch.no_grad():
            ref = model((pixels - m) / sd)
            for form in (model, integer_graph_form(model, explicit_padding=True)):
                got = pixel_input_form(form, mean, std)(padded)
                for k in ref:
                    torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=2e-4)
            snapped = pixel_input_form(model, mean, std, weight_grid=127)
            w = snapped.body.stage1[0][0].weight
            step = w.abs().amax((1, 2, 3), keepdim=True) / 127
            torch.testing.assert_close(w / step, torch.round(w / step), rtol=0, atol=1e-4)
            assert 0 < (w - model.body.stage1[0][0].weight / sd).abs().max() <= step.max() / 2 + 1e-6
            rounded = copy.deepcopy(model)
            rounded.body.stage1[0][0].weight.copy_(w * sd)
            ref2, got2 = rounded((pixels - m) / sd), snapped(padded)
            for k in ref2:
                torch.testing.assert_close(got2[k], ref2[k], rtol=1e-4, atol=2e-4)
    assert torch.equal(model.body.stage1[0][0].weight, before) and model.body.stage1[0][0].padding == (1, 1)
    odd = copy.deepcopy(model)
    odd.body.stage1[0][0].stride = (1, 1)
    with pytest.raises(ValueError, match="3x3, stride-2"):
        pixel_input_form(odd, (104, 117, 123), (1, 1, 1))


def test_leaky_as_relus_form_computes_the_same_function():
    """LeakyReLU(a) as relu(conv) - relu(-a conv), the batch norm folded into both convolutions: the same outputs to float
    rounding (batch norms with real statistics), on the model and after `pixel_input_form` (whose first convolution
    has a bias); every conv -> BN -> LeakyReLU under the named modules is split (stage 1: the first convolution and
    the depthwise and pointwise layers of its five blocks), nothing else; the model is left as it was."""
    torch.manual_seed(0)
    model = RetinaFace(ModelSpec(mesh_vertices=68)).eval()
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(1, 3, 160, 160) * 50
    pixels = torch.randint(0, 256, (1, 3, 161, 161)).float()
    mean, std = (104.0, 117.0, 123.0), (1.0, 1.0, 1.0)
    with torch.no_grad():
        ref = model(x)
        split = leaky_as_relus_form(model, ("body.stage1",))
        got = split(x)
        pix_ref = pixel_input_form(model, mean, std)(pixels)
        pix_got = leaky_as_relus_form(pixel_input_form(model, mean, std), ("body.stage1",))(pixels)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pix_got[k], pix_ref[k], rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, LeakyAsReLUs) for m in split.modules()) == 11
    assert not any(isinstance(m, LeakyAsReLUs) for n, m in split.named_modules() if not n.startswith("body.stage1."))
    assert not any(isinstance(m, LeakyAsReLUs) for m in model.modules())
    assert all(isinstance(m, torch.nn.LeakyReLU) for m in (model.body.stage1[0][2], model.body.stage1[1][5]))


def test_relu_split_by_range_picks_the_layers_with_the_widest_negative_side():
    """`--relu-split auto`: exactly the LeakyReLU convolutions whose conv -> BN output (measured here at the batch norms)
    reaches further below zero than 1.5 times above it; the model's outputs and its in-place activations are left as
    they were. One layer is pushed negative (its batch-norm bias) so that it must be among them."""
    torch.manual_seed(0)
    model = RetinaFace(ModelSpec(mesh_vertices=68)).eval()
    with torch.no_grad():
        model.body.stage1[2][4].bias.fill_(-3.0)  # stage1.2's pointwise output
    x = [torch.randn(1, 3, 96, 96) * 50 for _ in range(2)]
    with torch.no_grad():
        before = model(x[0])
    lo, hi = {}, {}

    def observe(name):
        def hook(_m, _i, out):
            lo[name] = min(lo.get(name, 0.0), float(out.min()))
            hi[name] = max(hi.get(name, 0.0), float(out.max()))
        return hook

    handles = [seq[i + 1].register_forward_hook(observe(f"{n}.{i}")) for n, seq in model.named_modules()
               if isinstance(seq, torch.nn.Sequential) for i in range(len(seq) - 2)
               if isinstance(seq[i + 2], torch.nn.LeakyReLU)]
    with torch.no_grad():
        for t in x:
            model(t)
    for h in handles:
        h.remove()
    got = relu_split_by_range(model, x)
    assert set(got) == {n for n in lo if -lo[n] > 1.5 * hi[n]} and "body.stage1.2.3" in got
    assert 0 < len(got) < len(lo)
    with torch.no_grad():
        after = model(x[0])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.inplace for m in model.modules() if isinstance(m, torch.nn.LeakyReLU))


def test_integer_graph_form_computes_the_same_function():
    """The form converted to full-integer TFLite: the same outputs bit for bit (upsampling by copies, ReLU per SSH
    branch); with explicit padding (int16 graphs) each strided 3x3 convolution of the backbone pads in a module of
    its own (5 of them) and the outputs agree to float rounding. The model itself is left as it was."""
    torch.manual_seed(0)
    model = RetinaFace(ModelSpec(mesh_vertices=68)).eval()
    x = torch.randn(1, 3, 160, 160) * 50
    with torch.no_grad():
        ref = model(x)
        same = integer_graph_form(model)(x)
        padded_model = integer_graph_form(model, explicit_padding=True)
        padded = padded_model(x)
    for k in ref:
        assert torch.equal(ref[k], same[k])
        torch.testing.assert_close(padded[k], ref[k], rtol=1e-4, atol=1e-4)
    pads = [m for m in padded_model.body.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert len(pads) == 5 and not any(isinstance(m, torch.nn.ZeroPad2d) for m in model.modules())
    assert all(c.padding == (1, 1) for c in model.body.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3))
