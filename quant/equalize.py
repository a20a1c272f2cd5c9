"""Cross-layer equalisation (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019) for the MobileNet-0.25 backbone.

Before post-training quantisation, consecutive convolutions (pointwise -> depthwise and
depthwise -> pointwise inside the backbone chain) exchange a positive per-channel scale s_i:
layer 1's output channel i is divided by s_i, layer 2's input channel i multiplied by it. With
positively homogeneous activations in between (ReLU, LeakyReLU) the network's function is
unchanged, while s_i = sqrt(r1_i * r2_i) / r2_i (r = per-channel weight range) equalises the
channels' ranges, so one per-tensor activation scale fits all channels of the intermediate map.
Batch norms are folded first (each becomes an identity holding the bias).
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


def _chain(model: RetinaFace) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The backbone's (conv, bn) units in order: stage1.0, then dw, pw of each conv_dw block."""
    units = []
    for stage in (model.body.stage1, model.body.stage2, model.body.stage3):
        for block in stage:
            if len(block) == 3:  # conv_bn
                units.append((block[0], block[1]))
            else:  # conv_dw: dw at 0/1, pw at 3/4
                units.append((block[0], block[1]))
                units.append((block[3], block[4]))
    return units


# Outputs of these units feed more than one consumer (the FPN taps stride 8 and 16 maps), so
# their channels cannot be rescaled by one successor alone.
_TAPS = {("stage1", 5, 3), ("stage2", 5, 3)}


def equalize(model: RetinaFace, iterations: int = 4) -> tuple[RetinaFace, dict]:
    """Fold batch norms, then equalise consecutive backbone layers. Returns (new model, report)."""
    m = fold_batchnorm(model)
    units = _chain(m)
    tap_convs = {id(getattr(m.body, s)[b][c]) for s, b, c in _TAPS}
    pairs = [(units[k], units[k + 1]) for k in range(len(units) - 1) if id(units[k][0]) not in tap_convs]
    before = _spread(pairs)
    for _ in range(iterations):
        for (c1, b1), (c2, _b2) in pairs:
            with torch.no_grad():
                r1 = c1.weight.abs().flatten(1).amax(1)
                if c2.groups == c2.in_channels and c2.groups > 1:  # depthwise: input channel i is filter i
                    r2 = c2.weight.abs().flatten(1).amax(1)
                else:
                    r2 = c2.weight.abs().transpose(0, 1).flatten(1).amax(1)
                s = torch.sqrt(r1 * r2).clamp_min(1e-8) / r2.clamp_min(1e-8)
                s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s))
                c1.weight.div_(s.view(-1, 1, 1, 1))
                b1.bias.div_(s)
                if c2.groups == c2.in_channels and c2.groups > 1:
                    c2.weight.mul_(s.view(-1, 1, 1, 1))
                else:
                    c2.weight.mul_(s.view(1, -1, 1, 1))
    return m, {"pairs": len(pairs), "range_spread_before": before, "range_spread_after": _spread(pairs)}


def _spread(pairs) -> float:
    """Mean over layer-1s of max/min per-channel weight range (1 = perfectly equalised)."""
    vals = []
    for (c1, _), _ in pairs:
        r = c1.weight.detach().abs().flatten(1).amax(1)
        r = r[r > 0]
        vals.append(float(r.max() / r.min()))
    return sum(vals) / len(vals)
