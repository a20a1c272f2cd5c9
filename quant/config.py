"""Compression configs in the coremltools shape: one op config for the whole model, overridden per module
type, overridden again per module name; the most specific wins. A `None` override leaves those modules
alone (the heads, whose output widths the anchors fix, are left alone by default).

    cfg = PruneConfig(global_config=PruneOpConfig(ratio=0.3),
                      module_type_configs={"Conv2d": PruneOpConfig(ratio=0.3)},
                      module_name_configs={"body.stage1": PruneOpConfig(ratio=0.1), "ClassHead": None})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from torch import nn

from edge.errors import ConfigError

HEADS = ("ClassHead", "BboxHead", "LandmarkHead", "MeshHead", "ClassHead2", "BboxHead2", "LandmarkHead2")
IMPORTANCES = ("magnitude", "taylor")


@dataclass(frozen=True)
class PruneOpConfig:
    """ratio: fraction of a layer's output channels removed; importance: L1 magnitude of the weights, or
    first-order Taylor (|weight x gradient|, needs a loss backpropagated before each pruning step)."""

    ratio: float = 0.3
    importance: str = "magnitude"

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"pruning ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")


@dataclass(frozen=True)
class QuantOpConfig:
    """int8 weights per output channel (per-tensor collapses the depthwise convolutions: measured recall
    0.005) and int8 per-tensor activations; activation_bits None quantises weights only."""

    weight_granularity: str = "per_channel"
    activation_bits: int | None = 8

    def __post_init__(self):
        if self.weight_granularity not in ("per_channel", "per_tensor"):
            raise ConfigError(f"weight_granularity must be per_channel or per_tensor, got {self.weight_granularity!r}")
        if self.activation_bits not in (8, None):
            raise ConfigError(f"activation_bits must be 8 or None, got {self.activation_bits!r}")


T = TypeVar("T")


def check_module_names(model: nn.Module, names) -> None:
    """Every name must be a module of the model (exact; a prefix of others' names): a typo would otherwise
    silently prune at the global ratio, or freeze nothing. -> ConfigError naming them."""
    have = {n for n, _ in model.named_modules() if n}
    unknown = [n for n in names if n not in have]
    if unknown:
        tops = sorted({n.split(".")[0] for n in have})
        raise ConfigError(f"no module named {', '.join(map(repr, unknown))} in the model (top-level modules: {', '.join(tops)})")


@dataclass
class ModuleConfigs(Generic[T]):
    """global_config < module_type_configs (class name) < module_name_configs (exact name or dotted prefix;
    the longest match wins). A value of None means: leave the module alone."""

    global_config: T | None = None
    module_type_configs: dict[str, T | None] = field(default_factory=dict)
    module_name_configs: dict[str, T | None] = field(default_factory=dict)

    def config_for(self, name: str, module: nn.Module) -> T | None:
        hits = [p for p in self.module_name_configs if name == p or name.startswith(p + ".")]
        if hits:
            return self.module_name_configs[max(hits, key=len)]
        kind = type(module).__name__
        if kind in self.module_type_configs:
            return self.module_type_configs[kind]
        return self.global_config

    def resolve(self, model: nn.Module, kinds: tuple[type, ...]) -> dict[str, T | None]:
        """name -> config for every module of the given kinds; unknown names in the overrides are an error
        (a typo would otherwise silently prune at the global ratio)."""
        check_module_names(model, [p for p in self.module_name_configs if p not in HEADS])
        return {n: self.config_for(n, m) for n, m in model.named_modules() if isinstance(m, kinds)}


@dataclass
class PruneConfig(ModuleConfigs[PruneOpConfig]):
    """Structured channel pruning. round_to: channel counts stay multiples of it (odd counts run slower than
    the unpruned model); stages: iterative pruning, the ratio reached in this many steps (fine-tune between)."""

    global_config: PruneOpConfig | None = field(default_factory=PruneOpConfig)
    module_name_configs: dict[str, PruneOpConfig | None] = field(default_factory=lambda: {h: None for h in HEADS})
    round_to: int = 8
    stages: int = 1

    def __post_init__(self):
        if self.round_to < 1 or self.stages < 1:
            raise ConfigError("round_to and stages must be positive")

    @classmethod
    def uniform(cls, ratio: float, importance: str = "magnitude", stages: int = 1) -> "PruneConfig":
        return cls(global_config=PruneOpConfig(ratio, importance), stages=stages)

    def importance(self) -> str:
        kinds = {c.importance for c in [self.global_config, *self.module_type_configs.values(), *self.module_name_configs.values()]
                 if c is not None}
        if len(kinds) > 1:
            raise ConfigError("one importance criterion per pruning run (torch-pruning ranks all groups together)")
        return kinds.pop() if kinds else "magnitude"


@dataclass
class QuantConfig(ModuleConfigs[QuantOpConfig]):
    global_config: QuantOpConfig | None = field(default_factory=QuantOpConfig)
