"""Structured pruning with torch-pruning, in the coremltools shape: a config dataclass (global ratio,
per-module-name overrides, most specific wins) and a post-training `compress` step; the recovery is
`quant.distill`. Heads keep their output channels (the anchors' fixed widths); channel counts are
rounded to multiples of 8 (odd counts run slower than the unpruned model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from edge.model import RetinaFace, TupleOutputs


@dataclass
class PruneConfig:
    """ratio: fraction of channels removed globally; per_name: module-name prefix -> ratio (longest prefix wins)."""

    ratio: float = 0.3
    round_to: int = 8
    importance: str = "magnitude"  # L1 magnitude of the weights
    per_name: dict[str, float] = field(default_factory=dict)

    def ratio_for(self, name: str) -> float:
        best = max((p for p in self.per_name if name.startswith(p)), key=len, default=None)
        return self.per_name[best] if best is not None else self.ratio


def protected_layers(model: RetinaFace) -> list[nn.Module]:
    """The head convolutions: their output widths are fixed by the anchors and the contract."""
    heads = [model.ClassHead, model.BboxHead, model.LandmarkHead] + ([model.MeshHead] if hasattr(model, "MeshHead") else [])
    return [h.conv1x1 for hs in heads for h in hs]


def compress(model: RetinaFace, config: PruneConfig, size: int = 640) -> tuple[RetinaFace, dict]:
    """Prune a copy of `model`. Returns (pruned model, report with MACs and parameters before/after)."""
    import copy

    import torch_pruning as tp

    if not 0.0 <= config.ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {config.ratio}")
    m = copy.deepcopy(model).eval()
    x = torch.zeros(1, 3, size, size)
    wrapped = TupleOutputs(m)
    before = tp.utils.count_ops_and_params(wrapped, x)
    per_layer = {mod: config.ratio_for(name.removeprefix("model.")) for name, mod in wrapped.named_modules()
                 if isinstance(mod, nn.Conv2d) and any(name.removeprefix("model.").startswith(p) for p in config.per_name)}
    pruner = tp.pruner.MagnitudePruner(
        wrapped, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=config.ratio,
        pruning_ratio_dict=per_layer or None, ignored_layers=protected_layers(m), round_to=config.round_to,
    )
    pruner.step()
    after = tp.utils.count_ops_and_params(wrapped, x)
    return m, {"gmacs_before": before[0] / 1e9, "gmacs_after": after[0] / 1e9, "params_before": int(before[1]),
               "params_after": int(after[1]), "ratio": config.ratio, "round_to": config.round_to, "per_name": config.per_name}


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
