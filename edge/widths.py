"""Pruned widths: a model reshaped to the channel counts of a pruned checkpoint, so that the checkpoint loads into it."""
from __future__ import annotations

import torch
from torch import nn

from edge.model import RetinaFace


def shrink_to(model: RetinaFace, state: dict[str, torch.Tensor]) -> RetinaFace:
    """Resize every conv and batch norm of `model` to the shapes in `state` (a pruned checkpoint), in place."""
    for name, mod in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(mod, nn.Conv2d) and f"{name}.weight" in state:
            w = state[f"{name}.weight"]
            out_ch, in_per_group = w.shape[0], w.shape[1]
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            groups = out_ch if depthwise else 1
            new = nn.Conv2d(in_per_group * groups, out_ch, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                            bias=mod.bias is not None)
            setattr(parent, attr, new)
        elif isinstance(mod, nn.BatchNorm2d) and f"{name}.weight" in state:
            setattr(parent, attr, nn.BatchNorm2d(state[f"{name}.weight"].shape[0], eps=mod.eps, momentum=mod.momentum))
    return model
