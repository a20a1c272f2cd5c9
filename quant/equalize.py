"""Cross-layer equalisation (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019) for the MobileNet-0.25 backbone.

Before post-training quantisation, consecutive convolutions (pointwise -> depthwise and
depthwise -> pointwise inside the backbone chain) exchange a positive per-channel scale s_i:
layer 1's output channel i is divided by s_i, layer 2's input channel i multiplied by it. With
positively homogeneous activations in between (ReLU, LeakyReLU) the network's function is
unchanged, while s_i = sqrt(r1_i * r2_i) / r2_i (r = per-channel weight range) equalises the
channels' ranges, so one per-tensor activation scale fits all channels of the intermediate map.
Batch norms are folded first (each becomes an identity holding the bias).

With per-channel weight quantisation, weight ranges are not what limits the int8 program: its activations are
quantised per tensor, so a channel whose values stay a fraction of the map's largest channel gets a few of its 256
levels. Given calibration inputs, `equalize(..., activations=)` then exchanges scales by *activation* range: layer
1's output channel i is multiplied by s_i = (R / r_i)^p (r_i its observed maximum, R the map's, s_i in [1, 64],
no channel's negative side beyond the map's), layer 2's input channel i divided by it. Into a depthwise convolution
(p = 1) this is free: both layers' weights are quantised per channel i, so the scale passes through their int8
grids unchanged. Into a pointwise convolution it shrinks input columns of weights quantised per output row, so p =
0.5 shares the error between the activation and those weights.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from edge.model import RetinaFace


def fold_batchnorm(model: RetinaFace) -> RetinaFace:
    """Copy of the model with every conv+BN folded: conv weight scaled, BN left as identity + bias."""
    m = copy.deepcopy(model).eval()
    mods = dict(m.named_modules())
    for name, mod in mods.items():
        if not isinstance(mod, nn.Sequential):
            continue
        items = list(mod)
        for i in range(len(items) - 1):
            conv, bn = items[i], items[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.bias is None:
                with torch.no_grad():
                    std = torch.sqrt(bn.running_var + bn.eps)
                    g = bn.weight / std
                    conv.weight.mul_(g.view(-1, 1, 1, 1))
                    bias = bn.bias - bn.running_mean * g
                    bn.weight.fill_(1.0)
                    bn.bias.copy_(bias)
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - bn.eps)
    return m


def _chain(model: RetinaFace) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]]:
    """The backbone's (conv, bn, activation) units in order: stage1.0, then dw, pw of each conv_dw block."""
    units = []
    for stage in (model.body.stage1, model.body.stage2, model.body.stage3):
        for block in stage:
            units.append((block[0], block[1], block[2]))  # conv_bn, or conv_dw's depthwise at 0..2
            if len(block) == 6:  # conv_dw's pointwise at 3..5
                units.append((block[3], block[4], block[5]))
    return units


def _taps(model: RetinaFace) -> list[nn.Conv2d]:
    """The units whose outputs feed more than one consumer (the FPN taps the stride 8 and 16 maps, and with the
    P2-P6 pyramid the stride-4 one), so their channels cannot be rescaled by one successor alone."""
    body = model.body
    taps = [body.stage1[5][3], body.stage2[5][3]]
    return [body.stage1[3][3], *taps] if getattr(model, "p2p6", False) else taps


def equalize(model: RetinaFace, iterations: int = 4, activations=None) -> tuple[RetinaFace, dict]:
    """Fold batch norms, then equalise consecutive backbone layers by weight range; given `activations` (the model's
    calibration inputs, NCHW batches), then by activation range (`_equalize_activations`). Returns (new model,
    report)."""
    m = fold_batchnorm(model)
    units = _chain(m)
    tap_convs = {id(c) for c in _taps(m)}
    pairs = [(units[k], units[k + 1]) for k in range(len(units) - 1) if id(units[k][0]) not in tap_convs]
    before = _spread(pairs)
    for _ in range(iterations):
        for (c1, b1, _a1), (c2, _b2, _a2) in pairs:
            with torch.no_grad():
                r1 = c1.weight.abs().flatten(1).amax(1)
                if _is_depthwise(c2):  # input channel i is filter i
                    r2 = c2.weight.abs().flatten(1).amax(1)
                else:
                    r2 = c2.weight.abs().transpose(0, 1).flatten(1).amax(1)
                s = torch.sqrt(r1 * r2).clamp_min(1e-8) / r2.clamp_min(1e-8)
                s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))
                c1.weight.div_(s.view(-1, 1, 1, 1))
                b1.bias.div_(s)
                if _is_depthwise(c2):
                    c2.weight.mul_(s.view(-1, 1, 1, 1))
                else:
                    c2.weight.mul_(s.view(1, -1, 1, 1))
    report = {"pairs": len(pairs), "range_spread_before": before, "range_spread_after": _spread(pairs)}
    if activations is not None:
        report["activations"] = _equalize_activations(m, pairs, activations)
    return m, report


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels and conv.groups > 1


def _equalize_activations(m: RetinaFace, pairs, activations, depthwise_power: float = 1.0, pointwise_power: float = 0.5,
                         max_scale: float = 64.0) -> dict:
    """In place on a batch-norm-folded model: for each pair, scale layer 1's output channels up towards the largest
    channel's observed maximum over `activations` and layer 2's input channels down by as much (see the module
    text). -> {"pairs", "spread_before", "spread_after"}: the mean max/min ratio of the channels' maxima (channels
    that reach a thousandth of the map's maximum)."""
    highs: dict[int, torch.Tensor] = {}
    lows: dict[int, torch.Tensor] = {}

    def observe(k):
        def hook(_mod, _inp, out):
            hi, lo = out.detach().amax((0, 2, 3)), out.detach().amin((0, 2, 3))
            highs[k] = torch.maximum(highs[k], hi) if k in highs else hi
            lows[k] = torch.minimum(lows[k], lo) if k in lows else lo
        return hook

    run_hooked(m, activations, [a1.register_forward_hook(observe(k)) for k, ((_c1, _b1, a1), _) in enumerate(pairs)])
    spread_before, spread_after = [], []
    for k, ((c1, b1, _a1), (c2, _b2, _a2)) in enumerate(pairs):
        hi, lo = highs[k].clamp_min(1e-12), lows[k]
        power = depthwise_power if _is_depthwise(c2) else pointwise_power
        s = (hi.max() / hi).clamp(1.0, max_scale) ** power
        # a channel's negative side (LeakyReLU) must stay inside the map's: s * lo_i >= min lo
        s = torch.where(lo < 0, torch.minimum(s, (lo.min() / lo.clamp_max(-1e-12)).clamp_min(1.0)), s)
        spread_before.append(_live_spread(hi))
        spread_after.append(_live_spread(hi * s))
        with torch.no_grad():
            c1.weight.mul_(s.view(-1, 1, 1, 1))
            b1.bias.mul_(s)
            c2.weight.div_(s.view(-1, 1, 1, 1) if _is_depthwise(c2) else s.view(1, -1, 1, 1))
    return {"pairs": len(pairs), "spread_before": sum(spread_before) / len(pairs),
            "spread_after": sum(spread_after) / len(pairs)}


def run_hooked(model: nn.Module, tensors, handles) -> None:
    """Run `model` (eval, no grad) on each of `tensors` for the forward hooks it carries; remove `handles` after."""
    try:
        with torch.no_grad():
            model.eval()
            for x in tensors:
                model(torch.as_tensor(x))
    finally:
        for h in handles:
            h.remove()


def _live_spread(highs: torch.Tensor) -> float:
    live = highs[highs > 1e-3 * highs.max()]
    return float(live.max() / live.min())


def _spread(pairs) -> float:
    """Mean over layer-1s of max/min per-channel weight range (1 = perfectly equalised)."""
    vals = []
    for (c1, _, _), _ in pairs:
        r = c1.weight.detach().abs().flatten(1).amax(1)
        r = r[r > 0]
        vals.append(float(r.max() / r.min()))
    return sum(vals) / len(vals)
