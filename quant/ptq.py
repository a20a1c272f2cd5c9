"""Post-training quantisation with PT2E, shared by the TFLite and CoreML int8 routes.

Per-channel symmetric int8 weights (per-tensor collapses the depthwise convolutions of this
network), int8 per-tensor activations from histogram observers over the calibration set.
"""
from __future__ import annotations

import torch

from edge.model import TupleOutputs


# litert-torch's configs floor every scale at 2**-12. The first convolution sees raw pixels (mean subtracted,
# not divided): its weights are ~1e-3, per-channel scales ~1e-5, so that floor left 1 to 20 int8 levels per
# channel (measured on the default model). Weight scales get a float32-safe floor instead; activations keep it.
WEIGHT_SCALE_EPS = 2.0 ** -24


def quantization_config(per_channel: bool = True, qat: bool = False):
    """litert-torch's symmetric int8 config (per-channel weights, per-tensor activations), weight scale floor lowered."""
    import dataclasses

    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    cfg = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    w = cfg.weight
    ctr = w.observer_or_fake_quant_ctr.p  # the observer (or fake-quantize) class and its arguments
    kwargs = {**ctr.keywords, "eps": WEIGHT_SCALE_EPS}
    if qat:  # the fused fake-quantize op floors scales at 2**-14 on its own: the plain one asks its observer
        from torchao.quantization.pt2e.fake_quantize import FakeQuantize

        ctr = FakeQuantize.with_args(**kwargs)
    else:
        ctr = ctr.func.with_args(**kwargs)
    return dataclasses.replace(cfg, weight=dataclasses.replace(w, observer_or_fake_quant_ctr=ctr))


def module_path(node) -> list[str]:
    """The model-relative names of the modules a node of an exported TupleOutputs(model) graph belongs to."""
    names = []
    for n, _ in (node.meta.get("nn_module_stack") or {}).values():
        n = n[len("L['self']."):] if n.startswith("L['self'].") else n
        names.append(n[len("model."):] if n.startswith("model.") else n)
    return names


def pt2e_quantizer(float_modules=(), qat: bool = False, per_channel: bool = True):
    """litert-torch's PT2E quantizer with our config; the modules named in float_modules (model-relative names,
    e.g. "body.stage1", with everything under them) are left unannotated, so they stay float: the converters
    put a dequantize before them and a quantize after. (litert-torch 0.10 refuses set_module_name(name, None).)"""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    float_modules = tuple(float_modules)

    class Quantizer(PT2EQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            if float_modules:
                for node in model.graph.nodes:
                    if any(p == f or p.startswith(f + ".") for p in module_path(node) for f in float_modules):
                        node.meta.pop("quantization_annotation", None)
            return model

    return Quantizer().set_global(quantization_config(per_channel, qat=qat))


def pt2e_calibrated(model, spec, calib, progress: bool = True, float_modules=()):
    """-> (prepared-and-observed GraphModule, quantizer). Finish with `converted` (fold_quantize=False
    for litert-torch, True for coremltools). float_modules stay float (see pt2e_quantizer)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from tqdm import tqdm

    size = spec.input_size
    x = torch.zeros(1, 3, size, size)
    gm = torch.export.export(TupleOutputs(model).eval(), (x,)).module()
    quantizer = pt2e_quantizer(float_modules)
    gm = prepare_pt2e(gm, quantizer)
    with torch.no_grad():
        for t in tqdm(list(calib.tensors(spec)), desc="calibrating", unit="img", disable=not progress):
            gm(torch.from_numpy(t))
    return gm, quantizer


def converted(gm, fold_quantize: bool):
    """convert_pt2e, then put the graph in eval mode (exported graphs carry no .eval(); torchao's helper does it)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    gm = move_exported_model_to_eval(convert_pt2e(gm, fold_quantize=fold_quantize))
    # torch 2.13's exported modules refuse .eval(); the ops are now in eval form, so record it for
    # litert-torch 0.10, which reads .training and otherwise warns "converted in training mode"
    gm.training = False
    return gm
