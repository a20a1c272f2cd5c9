"""Feature-map distillation: the student's intermediate feature maps (outputs of named modules, e.g. the
backbone stages that feed the FPN) are pulled towards the FP32 teacher's, on top of the output distillation
of quant.distill. Widths must match (a module the pruning leaves whole, e.g. `body` with --prune-module
body=0); pruned modules have no one-to-one channel correspondence with the teacher's.

FeatureTaps records the named modules' outputs on every forward pass: forward hooks on an nn.Module; on a
torch.export / PT2E program (a GraphModule, where the modules are flattened into one graph) a recording
node after the module's last node, placed after its fake-quantiser if one follows, so the student is
compared by the value its next layer reads. close() removes them and leaves the program as it was.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from edge.errors import ConfigError
from quant.ptq import module_path


class _Tap(nn.Module):
    """Records its input under `name` and returns it unchanged (no state: the program's state_dict is unchanged)."""

    def __init__(self, store: dict, name: str):
        super().__init__()
        self.store, self.name = store, name

    def forward(self, x):
        self.store[self.name] = x
        return x


def _graph_output_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node that computes module `name`'s output in an exported program: its last node in graph order,
    or the fake-quantiser that reads it."""

    last = None
    for node in gm.graph.nodes:
        if name in module_path(node):
            last = node
    if last is None:
        raise KeyError(name)
    users = list(last.users)
    if len(users) == 1 and users[0].op == "call_module" and str(users[0].target).startswith("activation_post_process"):
        return users[0]
    return last


class FeatureTaps:
    def __init__(self, model: nn.Module, names):
        self.names, self.values, self._hooks, self._nodes = tuple(names), {}, [], []
        self.model = model
        if isinstance(model, fx.GraphModule):
            for i, name in enumerate(self.names):
                node = _graph_output_node(model, name)
                target = f"_feature_tap_{i}"
                model.add_submodule(target, _Tap(self.values, name))
                with model.graph.inserting_after(node):
                    tap = model.graph.call_module(target, (node,))
                node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
                self._nodes.append((tap, target))
            model.recompile()
        else:
            for name in self.names:
                mod = model.get_submodule(name)
                self._hooks.append(mod.register_forward_hook(lambda m, a, out, name=name: self.values.__setitem__(name, out)))

    def pop(self) -> dict[str, torch.Tensor]:
        """-> the feature maps of the last forward pass, by module name (and forgets them)."""
        out, missing = dict(self.values), [n for n in self.names if n not in self.values]
        if missing:
            raise RuntimeError(f"no forward pass recorded {missing}")
        self.values.clear()
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._nodes:
            for tap, target in self._nodes:
                tap.replace_all_uses_with(tap.args[0])
                self.model.graph.erase_node(tap)
                delattr(self.model, target)
            self.model.recompile()
        self._hooks, self._nodes = [], []
        self.values.clear()


def feature_widths(model: nn.Module, names, size: int = 64) -> dict[str, tuple[int, ...]]:
    """-> the shape (batch 1, `size` square input) of each named module's output."""
    taps = FeatureTaps(model, names)
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        model.train(was)
        return {k: tuple(v.shape) for k, v in taps.pop().items()}
    finally:
        taps.close()


def student_taps(model: nn.Module, names, teacher_widths: dict, program: nn.Module | None = None) -> FeatureTaps:
    """Taps on the student (`program`: its QAT program, else the float model itself), once its maps have the
    teacher's shapes (teacher_widths: feature_widths of the teacher); ConfigError naming the first that differs."""

    widths = feature_widths(model, names)
    for name in names:
        if widths[name] != teacher_widths[name]:
            raise ConfigError(f"--distill-features {name}: the student's output is {widths[name][1:]} and the teacher's "
                              f"{teacher_widths[name][1:]}; feature maps are compared only where pruning leaves the widths")
    return FeatureTaps(program if program is not None else model, names)


def feature_loss(s: dict, t: dict) -> tuple[torch.Tensor, dict]:
    """Sum over the named maps of the mean squared difference relative to the teacher map's mean square (so
    each map weighs the same whatever its scale). -> (loss, {"feat": value, "feat_<name>": value})."""
    total, parts = None, {}
    for name, tv in t.items():
        sv = s[name]
        rel = (sv - tv).pow(2).mean() / tv.pow(2).mean().clamp_min(1e-12)
        total = rel if total is None else total + rel
        parts[f"feat_{name}"] = rel.item()
    parts["feat"] = total.item()
    return total, parts
