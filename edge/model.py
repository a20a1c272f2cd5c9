"""RetinaFace with a MobileNet-0.25 backbone, a 3-level FPN, SSH context modules and per-level heads.

Module names follow Pytorch_Retinaface's, so its checkpoints load with a strict key check.
`forward` returns raw, separate, named tensors (see `edge.contract.ModelSpec`): no
concatenation of unlike heads, no NMS, no train/inference branching.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from edge.contract import ModelSpec


def _act(slope: float) -> nn.Module:
    return nn.ReLU(inplace=True) if slope == 0.0 else nn.LeakyReLU(slope, inplace=True)


def conv_bn(inp: int, oup: int, stride: int = 1, kernel: int = 3, slope: float = 0.0, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
    ]
    if act:
        layers.append(_act(slope))
    return nn.Sequential(*layers)


def conv_dw(inp: int, oup: int, stride: int, slope: float) -> nn.Sequential:
    """Depthwise 3x3 + BN + act, then pointwise 1x1 + BN + act (indices 0..5 as in the checkpoints)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        _act(slope),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        _act(slope),
    )


class MobileNetV1025(nn.Module):
    """MobileNetV1 at width 0.25; returns the stride 8, 16 and 32 feature maps (64, 128, 256 ch)."""

    def __init__(self, slope: float):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, slope=slope),
            conv_dw(8, 16, 1, slope),
            conv_dw(16, 32, 2, slope),
            conv_dw(32, 32, 1, slope),
            conv_dw(32, 64, 2, slope),
            conv_dw(64, 64, 1, slope),
        )
        self.stage2 = nn.Sequential(
            conv_dw(64, 128, 2, slope),
            *[conv_dw(128, 128, 1, slope) for _ in range(5)],
        )
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2, slope), conv_dw(256, 256, 1, slope))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        c5 = self.stage3(c4)
        return c3, c4, c5

    def forward_p2(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Also the stride-4 map (32 ch), for the P2-P6 pyramid."""
        c2 = self.stage1[:4](x)
        c3 = self.stage1[4:](c2)
        c4 = self.stage2(c3)
        return c2, c3, c4, self.stage3(c4)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of (B, C, H, W): the FPN's top-down path."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def upsample2x_by_copies(x: torch.Tensor) -> torch.Tensor:
    """The same values as `upsample2x`, bit for bit, made of concatenations and reshapes only. TFLite lowers
    `upsample2x` to RESIZE_NEAREST_NEIGHBOR, which XNNPACK does not delegate (it splits the graph into
    partitions); CONCATENATION and RESHAPE it runs, in float and int8 alike (one shared scale).

    Written in NHWC (a permute first and last) and 4-D throughout: litert-torch 0.10's layout pass fails on a
    5-D form, and on an NCHW reshape it keeps the FPN map NCHW, leaving the SSH convolutions that also read
    it in float."""
    n, c, h, w = x.shape
    z = x.permute(0, 2, 3, 1).reshape(n * h, w, 1, c)
    # never one tensor listed twice in a cat: PT2E's observer insertion mis-wires a repeated input (a clone instead)
    y = torch.cat([z, z.clone()], dim=2).reshape(n * h, 1, 2 * w, c)  # each pixel twice along the row
    return torch.cat([y, y.clone()], dim=1).reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)  # each row twice


class FPN(nn.Module):
    upsample = staticmethod(upsample2x)  # integer_graph_form() swaps in upsample2x_by_copies

    def __init__(self, in_channels: tuple[int, int, int], out: int, slope: float):
        super().__init__()
        self.output1 = conv_bn(in_channels[0], out, kernel=1, slope=slope)
        self.output2 = conv_bn(in_channels[1], out, kernel=1, slope=slope)
        self.output3 = conv_bn(in_channels[2], out, kernel=1, slope=slope)
        self.merge1 = conv_bn(out, out, slope=slope)
        self.merge2 = conv_bn(out, out, slope=slope)

    def forward(self, feats):
        o1 = self.output1(feats[0])
        o2 = self.output2(feats[1])
        o3 = self.output3(feats[2])
        # Inputs are multiples of 32, so every level is exactly twice the next one; a fixed
        # scale factor (not size=tensor.shape) keeps the graph static for every exporter.
        o2 = self.merge2(o2 + self.upsample(o3))
        o1 = self.merge1(o1 + self.upsample(o2))
        return o1, o2, o3


class FPN5(FPN):
    """The paper's P2-P6 pyramid: laterals on C2..C5 (P3-P5 keep the 3-level names, so those weights
    transfer), P6 from C5 by a stride-2 3x3 convolution, top-down merges down to P2."""

    def __init__(self, out: int, slope: float):
        super().__init__((64, 128, 256), out, slope)
        self.output0 = conv_bn(32, out, kernel=1, slope=slope)
        self.merge0 = conv_bn(out, out, slope=slope)
        self.output4 = conv_bn(256, out, stride=2, slope=slope)

    def forward(self, feats):
        o1, o2, o3 = super().forward(feats[1:])
        o0 = self.merge0(self.output0(feats[0]) + self.upsample(o1))
        return o0, o1, o2, o3, self.output4(feats[3])


class SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 and 7x7 receptive fields, concatenated, then ReLU.

    `relu_each_branch` applies the ReLU to each branch before the concatenation instead: the same values
    (ReLU is elementwise), but each ReLU then fuses into its convolution, where a ReLU after the
    concatenation stays a separate op that XNNPACK does not delegate in int8."""

    relu_each_branch = False

    def __init__(self, inp: int, out: int, slope: float):
        super().__init__()
        if out % 4:
            raise ValueError(f"SSH output channels must be a multiple of 4, got {out}")
        self.conv3X3 = conv_bn(inp, out // 2, act=False)
        self.conv5X5_1 = conv_bn(inp, out // 4, slope=slope)
        self.conv5X5_2 = conv_bn(out // 4, out // 4, act=False)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, slope=slope)
        self.conv7x7_3 = conv_bn(out // 4, out // 4, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.conv3X3(x)
        c5_1 = self.conv5X5_1(x)
        c5 = self.conv5X5_2(c5_1)
        c7 = self.conv7x7_3(self.conv7X7_2(c5_1))
        if self.relu_each_branch:
            return torch.cat([F.relu(c3), F.relu(c5), F.relu(c7)], dim=1)
        return F.relu(torch.cat([c3, c5, c7], dim=1))


class _Head(nn.Module):
    """1x1 conv producing `width` values per anchor; output (B, H*W*anchors, width) in NHWC order."""

    def __init__(self, inp: int, anchors: int, width: int):
        super().__init__()
        self.width = width
        self.conv1x1 = nn.Conv2d(inp, anchors * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1x1(x).permute(0, 2, 3, 1)
        return y.reshape(y.shape[0], -1, self.width)


class _TowerHead(_Head):
    """`_Head` behind `depth` depthwise-separable blocks (3x3 depthwise, activation, 1x1, activation; biases, no
    normalisation): more capacity where one 1x1 convolution underfits, at ~4.6 k MACs per cell and block for 64
    channels. The 1x1 output convolution keeps `_Head`'s name, `conv1x1`."""

    def __init__(self, inp: int, anchors: int, width: int, depth: int, slope: float):
        super().__init__(inp, anchors, width)
        blocks = []
        for _ in range(depth):
            blocks += [nn.Conv2d(inp, inp, 3, 1, 1, groups=inp), _act(slope), nn.Conv2d(inp, inp, 1), _act(slope)]
        self.tower = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.tower(x))


class RetinaFace(nn.Module):
    """RetinaFace-MobileNet-0.25.

    Input: (B, 3, H, W) float32, BGR minus mean (see `ModelSpec`), H and W multiples of 32.
    Output: dict name -> tensor in `spec.output_names` order; `conf` holds softmax probabilities.
    """

    def __init__(self, spec: ModelSpec | None = None):
        super().__init__()
        self.spec = spec or ModelSpec()
        slope = self.spec.arch.leaky_slope
        ch = self.spec.fpn_channels
        na = self.spec.arch.anchors_per_cell
        levels = len(self.spec.steps)
        self.p2p6 = levels == 5
        self.body = MobileNetV1025(slope)
        self.fpn = FPN5(ch, slope) if self.p2p6 else FPN((64, 128, 256), ch, slope)
        self.ssh1 = SSH(ch, ch, slope)
        self.ssh2 = SSH(ch, ch, slope)
        self.ssh3 = SSH(ch, ch, slope)
        if self.p2p6:
            self.ssh0 = SSH(ch, ch, slope)
            self.ssh4 = SSH(ch, ch, slope)
        self.ClassHead = nn.ModuleList(_Head(ch, na, 2) for _ in range(levels))
        self.BboxHead = nn.ModuleList(_Head(ch, na, 4) for _ in range(levels))
        self.LandmarkHead = nn.ModuleList(_Head(ch, na, 10) for _ in range(levels))
        if self.spec.arch.cascade:  # second stage, regressing from the first stage's boxes
            self.ClassHead2 = nn.ModuleList(_Head(ch, na, 2) for _ in range(levels))
            self.BboxHead2 = nn.ModuleList(_Head(ch, na, 4) for _ in range(levels))
            self.LandmarkHead2 = nn.ModuleList(_Head(ch, na, 10) for _ in range(levels))
        if self.spec.mesh_vertices:
            width, depth = self.spec.output_width("mesh"), self.spec.mesh_tower
            self.MeshHead = nn.ModuleList((_TowerHead(ch, na, width, depth, slope) if depth else _Head(ch, na, width))
                                          for _ in range(levels))
            if self.spec.mesh_rank:
                # the linear decoder of the low-rank code (not part of forward: applied to kept faces only,
                # in numpy): encoded vertices (3 * V,) = mesh_mean + code @ mesh_basis
                v3 = 3 * self.spec.mesh_vertices
                self.mesh_mean = nn.Parameter(torch.zeros(v3))
                self.mesh_basis = nn.Parameter(torch.zeros(self.spec.mesh_rank, v3))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-level maps every head reads (the SSH context modules' outputs), finest level first."""
        if self.p2p6:
            p = self.fpn(self.body.forward_p2(x))
            return (self.ssh0(p[0]), self.ssh1(p[1]), self.ssh2(p[2]), self.ssh3(p[3]), self.ssh4(p[4]))
        p = self.fpn(self.body(x))
        return (self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        out = {
            "loc": torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1),
            "conf": F.softmax(torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1), dim=-1),
            "landmarks": torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1),
        }
        if self.spec.arch.cascade:
            out["loc2"] = torch.cat([h(f) for h, f in zip(self.BboxHead2, feats)], dim=1)
            out["conf2"] = F.softmax(torch.cat([h(f) for h, f in zip(self.ClassHead2, feats)], dim=1), dim=-1)
            out["landmarks2"] = torch.cat([h(f) for h, f in zip(self.LandmarkHead2, feats)], dim=1)
        if self.spec.mesh_vertices:
            out["mesh"] = torch.cat([h(f) for h, f in zip(self.MeshHead, feats)], dim=1)
        return out


class TupleOutputs(nn.Module):
    """Wraps a model so that it returns a tuple in `spec.output_names` order (for exporters)."""

    def __init__(self, model: RetinaFace):
        super().__init__()
        self.model = model
        self.names = model.spec.output_names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(out[n] for n in self.names)


def integer_graph_form(model: RetinaFace, explicit_padding: bool = False) -> RetinaFace:
    """A copy of `model` computing the same function, bit for bit, in the form whose int8 TFLite graph XNNPACK
    runs as one partition: the FPN upsamples by copies (`upsample2x_by_copies`) and each SSH applies its ReLU
    per branch. Parameters are copied; the original is untouched.

    explicit_padding: every strided 3x3 convolution of the backbone pads in a module of its own (ZeroPad2d(1),
    then the convolution without padding: the same values). The graph then holds the PAD op itself, annotated
    like its input; with int16 activations litert-torch 0.10 gives the PAD it makes for a padded convolution the
    wrong element type and fails."""

    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, FPN):
            mod.upsample = upsample2x_by_copies
        elif isinstance(mod, SSH):
            mod.relu_each_branch = True
    if explicit_padding:
        for seq in [s for s in m.body.modules() if isinstance(s, nn.Sequential)]:
            for i, c in enumerate(list(seq)):
                if isinstance(c, nn.Conv2d) and c.stride == (2, 2) and c.padding == (1, 1):
                    c.padding = (0, 0)
                    seq[i] = nn.Sequential(nn.ZeroPad2d(1), c)
    return m


def pixel_input_form(model: RetinaFace, mean, std, weight_grid: int | None = None) -> RetinaFace:
    """A copy of `model` whose first convolution takes the BGR pixel values themselves (0..255), its input
    normalisation folded in: weight W / std per input channel, bias -sum(W * mean / std), no padding. Given the
    pixels padded with one row and one column of the mean colour on the top and left (which are zeros once
    normalised), it computes the model's function on the normalised input: the stride-2 3x3 convolution of an
    even-sized input reads no bottom or right padding. The original is untouched.

    This is what lets a full-integer graph take the uint8 canvas with no normalising op of its own (one pass over
    the full-resolution image fewer, and the pixels reach the first convolution exactly).

    weight_grid: put the folded weights on the symmetric per-output-channel grid of that many steps each side
    (127: int8) before the mean goes into the bias, so the bias subtracts what the rounded weights make of the mean.
    Folded from unrounded weights, each channel would carry the weights' rounding error times the mean colour
    (about 115 grey levels) as a constant offset, which a convolution on centred inputs never sees."""
    m = copy.deepcopy(model)
    seq = m.body.stage1[0]
    conv, padding = seq[0], None
    if isinstance(conv, nn.Sequential) and len(conv) == 2 and isinstance(conv[0], nn.ZeroPad2d):  # explicit_padding
        padding, conv = conv[0].padding, conv[1]
    if not (isinstance(conv, nn.Conv2d) and conv.in_channels == 3 and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
            and (conv.padding == (1, 1) if padding is None else conv.padding == (0, 0) and padding == (1, 1, 1, 1))
            and conv.groups == 1 and conv.dilation == (1, 1)):
        raise ValueError(f"pixel_input_form: the first convolution is not a 3x3, stride-2, padding-1 convolution of 3 channels ({conv})")
    mean_t = torch.tensor([float(v) for v in mean], dtype=conv.weight.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor([float(v) for v in std], dtype=conv.weight.dtype).view(1, 3, 1, 1)
    folded = nn.Conv2d(3, conv.out_channels, 3, 2, 0, bias=True)
    with torch.no_grad():
        w = conv.weight / std_t
        if weight_grid is not None:
            step = w.abs().amax((1, 2, 3), keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) / weight_grid
            w = torch.round(w / step) * step
        folded.weight.copy_(w)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        folded.bias.copy_(bias - (w * mean_t).sum((1, 2, 3)))
    seq[0] = folded
    return m


class LeakyAsReLUs(nn.Module):
    """conv -> BN -> LeakyReLU(a) as relu(conv_pos(x)) - relu(conv_neg(x)): conv_pos the convolution with the batch
    norm folded in, conv_neg the same times -a. The same function (LeakyReLU(a)(z) = relu(z) - relu(-a z) for a >= 0),
    in the form an int8 graph computes well: each convolution's ReLU fuses into it (one quantisation of its output,
    over its own side only), where a LeakyReLU reads a convolution output quantised over both sides, most of whose
    levels go to a negative tail that the LeakyReLU then shrinks by 1 / a."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, slope: float):
        super().__init__()
        with torch.no_grad():
            g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            w = conv.weight * g.view(-1, 1, 1, 1)
            b = bn.bias - bn.running_mean * g + (conv.bias * g if conv.bias is not None else 0.0)
        self.pos, self.neg = (self._conv(conv, k * w, k * b) for k in (1.0, -slope))

    @staticmethod
    def _conv(like: nn.Conv2d, w: torch.Tensor, b: torch.Tensor) -> nn.Conv2d:
        c = nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding, like.dilation,
                      like.groups, bias=True)
        with torch.no_grad():
            c.weight.copy_(w)
            c.bias.copy_(b)
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pos(x)) - F.relu(self.neg(x))


def leaky_as_relus_form(model: RetinaFace, modules: tuple[str, ...]) -> RetinaFace:
    """A copy of `model` in which every conv -> BN -> LeakyReLU (consecutive in one nn.Sequential) whose convolution
    is named in `modules` or lies under one (model-relative names: "body.stage1", "body.stage1.1.0") is a
    `LeakyAsReLUs` (its BN and LeakyReLU become identities): the same function. The original is untouched. Apply it
    last: other forms (`pixel_input_form`) expect the plain convolutions."""
    m = copy.deepcopy(model)
    for at, seq, i in leaky_convs(m):
        if any(at == p or at.startswith(p + ".") for p in modules):  # a module named, or one under it
            split = LeakyAsReLUs(seq[i], seq[i + 1], seq[i + 2].negative_slope)
            seq[i], seq[i + 1], seq[i + 2] = split, nn.Identity(), nn.Identity()
    return m


def leaky_convs(model: nn.Module) -> list[tuple[str, nn.Sequential, int]]:
    """Every conv -> BN -> LeakyReLU (consecutive in one nn.Sequential), in module order: (the convolution's
    model-relative name, its nn.Sequential, its index there)."""
    return [(f"{name}.{i}", seq, i) for name, seq in model.named_modules() if isinstance(seq, nn.Sequential)
            for i in range(len(seq) - 2)
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d)
            and isinstance(seq[i + 2], nn.LeakyReLU)]
