"""Structured pruning with torch-pruning, in the coremltools shape: `PruneConfig` (quant.config: global,
per module type, per module name), a `Pruner` with prepare / step / finalize / report for iterative
pruning with fine-tuning between the stages (`edge compress`), and `compress` for all at once. Heads keep
their output channels (the anchors' fixed widths); channel counts are rounded to multiples of 8 (odd
counts run slower than the unpruned model).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from edge.model import RetinaFace, TupleOutputs
from quant.config import HEADS, ModuleConfigs, PruneConfig, PruneOpConfig


class Pruner:
    """prepare -> step (once per stage, fine-tuning in between) -> finalize, and report().

    The dependency graph of torch-pruning keeps coupled layers consistent (a depthwise conv and the conv
    feeding it lose the same channels); layers configured None (the heads, by default) keep their outputs."""

    def __init__(self, model: RetinaFace, config: PruneConfig | None = None, size: int = 640):
        self.model, self.config, self.size = model, config or PruneConfig(), size
        self.stage, self._pruner, self._before, self.history = 0, None, None, []

    def prepare(self) -> RetinaFace:
        import torch_pruning as tp  # optional: train extra

        cfg = self.config
        m = self.model.eval()
        x = torch.zeros(1, 3, self.size, self.size)
        self._wrapped = TupleOutputs(m)
        per = cfg.resolve(m, (nn.Conv2d,))
        ignored = [m.get_submodule(n) for n, c in per.items() if c is None]
        ignored += [mod for hs in (getattr(m, h, None) for h in HEADS) if hs is not None for mod in hs.modules()
                    if isinstance(mod, nn.Conv2d) and mod not in ignored]  # head outputs are fixed by the contract
        g = cfg.global_config.ratio if cfg.global_config else 0.0
        ratios = {m.get_submodule(n): c.ratio for n, c in per.items() if c is not None and c.ratio != g}
        importance = (tp.importance.GroupTaylorImportance() if cfg.importance() == "taylor"
                      else tp.importance.MagnitudeImportance(p=1))
        self._before = tp.utils.count_ops_and_params(self._wrapped, x)
        with warnings.catch_warnings():
            # mesh_mean / mesh_basis decode after NMS, outside the graph: torch-pruning notices them, leaves them be
            warnings.filterwarnings("ignore", message=".*unwrapped parameters.*|.*last non-singleton dimension.*")
            self._pruner = tp.pruner.MetaPruner(
                self._wrapped, example_inputs=x, importance=importance, pruning_ratio=g, pruning_ratio_dict=ratios or None,
                ignored_layers=ignored, round_to=cfg.round_to, iterative_steps=cfg.stages)
        return m

    def step(self, backward=None) -> dict:
        """One pruning stage. backward: for Taylor importance, a callable that backpropagates a loss through
        the model (gradients are read, then cleared)."""
        import torch_pruning as tp  # optional: train extra

        if self._pruner is None:
            raise RuntimeError("call prepare() first")
        if self.stage >= self.config.stages:
            raise RuntimeError(f"all {self.config.stages} pruning stages are done")
        if self.config.importance() == "taylor":
            if backward is None:
                raise ValueError("Taylor importance needs a backward callable")
            self.model.zero_grad()
            backward(self.model)
        self._pruner.step()
        self.model.zero_grad(set_to_none=True)
        self.stage += 1
        macs, params = tp.utils.count_ops_and_params(self._wrapped, torch.zeros(1, 3, self.size, self.size))
        row = {"stage": self.stage, "gmacs": macs / 1e9, "params": int(params)}
        self.history.append(row)
        return row

    def finalize(self) -> RetinaFace:
        while self.stage < self.config.stages:
            self.step()
        return self.model.eval()

    def report(self) -> dict:
        cfg = self.config
        widths = {n: m.out_channels for n, m in self.model.named_modules() if isinstance(m, nn.Conv2d)}
        return {"gmacs_before": self._before[0] / 1e9, "params_before": int(self._before[1]),
                "gmacs_after": self.history[-1]["gmacs"] if self.history else self._before[0] / 1e9,
                "params_after": self.history[-1]["params"] if self.history else int(self._before[1]),
                "ratio": cfg.global_config.ratio if cfg.global_config else 0.0, "importance": cfg.importance(),
                "round_to": cfg.round_to, "stages": cfg.stages, "stages_done": self.stage, "history": self.history,
                "overrides": {k: (v.ratio if v else None) for k, v in cfg.module_name_configs.items() if k not in HEADS},
                "conv_widths": widths}


def stage_config(reference: RetinaFace, current: RetinaFace, ratio: float, importance: str = "magnitude",
                 round_to: int = 8, overrides: dict[str, float] | None = None, progress: float = 1.0) -> PruneConfig:
    """Iterative pruning: per-layer ratios that take `current` to `progress` x the final ratio of the
    `reference` model's widths (each rounded to a multiple of round_to). The final ratio of a layer is
    `ratio`, or that of the longest matching name (exact or dotted prefix) in `overrides` ({"body": 0.0,
    "fpn": 0.5}). Ratios relative to the current widths would round away on narrow layers at small
    per-stage steps (15 % of 64 channels rounds back to 64)."""
    heads = PruneConfig().module_name_configs
    finals = ModuleConfigs(global_config=ratio, module_name_configs=dict(overrides or {}))  # longest name wins
    ref = {n: m.out_channels for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)}
    per = {}
    for n, m in current.named_modules():
        if not isinstance(m, nn.Conv2d) or n.split(".")[0] in heads or n not in ref:
            continue
        final = finals.config_for(n, m)
        target = max(round_to, int(round(ref[n] * (1.0 - final * progress) / round_to)) * round_to)
        if target < m.out_channels:
            per[n] = PruneOpConfig(1.0 - target / m.out_channels, importance)
    return PruneConfig(global_config=PruneOpConfig(0.0, importance), module_name_configs={**heads, **per}, round_to=round_to)


def compress(model: RetinaFace, config: PruneConfig | float, size: int = 640) -> tuple[RetinaFace, dict]:
    """Post-training pruning of a copy of `model` (all stages at once). -> (pruned model, report)."""

    if not isinstance(config, PruneConfig):
        config = PruneConfig.uniform(float(config))
    p = Pruner(copy.deepcopy(model), config, size)
    p.prepare()
    pruned = p.finalize()
    return pruned, p.report()


