"""Quantisation-aware training with PT2E: one fake-quantised program (int8 per-channel weights, int8
per-tensor activations) trained by distillation from the FP32 model, then converted for TFLite
(litert-torch), OpenVINO (`ov.convert_model` of the converted program keeps u8 convolutions), ONNX
(exported, then rewritten to int8 weights: converters.onnx_target.qdq_from_pt2e) and CoreML (weights
folded). Modules named in float_modules stay float in the program (quant.ptq.pt2e_quantizer).

prepare -> train, calling step() after every optimiser step -> finalize, and report(). Batch norms are
frozen (running statistics fixed: batches here are small, and batch-norm training at batch 1 ruins the
model).

Activation ranges: `calibrate(images)` sets them as PTQ does (histogram observers over real, un-augmented
images, fake quantisation off) and freezes them for training; weight ranges keep following the weights.
`learn_ranges()` then makes each activation scale a parameter trained with the weights (LSQ: the
gradient of torch's learnable fake-quantise op; zero points stay where calibration put them), and
`finalize()` / `write_back()` return the learnt ranges to the program's ordinary fake-quantisers, so
checkpoints and converters see the same structure either way.
Without it the moving-average min/max observers run on the training batches for `observe_steps` steps and
are then frozen; measured on the 30 %-pruned model, that lost to PTQ (OpenVINO 63.83 / 53.70 / 23.72 against
66.04 / 55.26 / 24.53 WIDER AP), together with a weight-scale floor that made the trained simulation differ
from the converted model (see quant.ptq.WEIGHT_SCALE_EPS; weights now use the plain fake-quantiser).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import torch
from torch import nn

from edge.errors import ConfigError, WeightsError
from edge.model import TupleOutputs, integer_graph_form
from edge.weights.load import load_weights
from quant.config import QuantConfig
from quant.ptq import (
    CanvasInput,
    full_integer_quantizer,
    module_path,
    pt2e_quantizer,
    quantization_config,
    quantized_program,
)


@contextmanager
def _module_patterns():
    """litert-torch 0.10's conv-BN annotator (QAT only) exports a bare function with torch.export, which
    torch 2.13 refuses (it takes modules); wrap such patterns in a module while preparing."""
    import litert_torch.quantize.pt2e_quantizer_utils as utils  # optional: tflite extra

    orig = utils._get_aten_graph_module_for_pattern

    def wrapped(pattern, example_inputs, is_cuda=False, **kwargs):
        if not isinstance(pattern, nn.Module):
            fn = pattern

            class Pattern(nn.Module):
                def forward(self, *args):
                    return fn(*args)

            pattern = Pattern()
        return orig(pattern, example_inputs, is_cuda, **kwargs)

    utils._get_aten_graph_module_for_pattern = wrapped
    try:
        yield
    finally:
        utils._get_aten_graph_module_for_pattern = orig


def fold_batch_norm_scales(model: nn.Module) -> int:
    """Move each batch norm's scale into the convolution before it, leaving the batch norm an exact bias add
    (weight 1, mean 0, var 1 - eps). The function is unchanged; what changes is that the weights QAT fake-
    quantises are the weights the converters quantise (a batch norm with scale s folded after training would
    rescale them, and their int8 grid, per channel). -> number of pairs folded."""
    n = 0
    with torch.no_grad():
        for seq in model.modules():
            kids = list(seq.children())
            for conv, bn in zip(kids, kids[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.track_running_stats:
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                    if conv.bias is not None:
                        conv.bias.mul_(scale)
                    bn.bias.copy_(bn.bias - bn.running_mean * scale)
                    bn.weight.fill_(1.0)
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0 - bn.eps)
                    n += 1
    return n


class Named(nn.Module):
    """The quantised models return a tuple; training code wants the model's named outputs."""

    def __init__(self, gm: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.gm, self.names = gm, names

    def forward(self, x):
        return dict(zip(self.names, self.gm(x)))


class NamedOutputs(Named):
    """Named outputs of an exported program. canvas (mean, std): the program takes the BGR canvas (B, H, W, 3)
    (a full-integer program); the normalised (B, 3, H, W) tensor training code hands over is turned back into it."""

    def __init__(self, gm: nn.Module, names: tuple[str, ...], canvas: tuple | None = None):
        super().__init__(gm, names)
        self.canvas = canvas

    def forward(self, x):
        return dict(zip(self.names, self.gm(program_input(x, self.canvas))))

    def train(self, mode: bool = True):
        """Exported programs refuse train()/eval(); batch norms stay frozen and fake quantisation on."""
        self.training = mode
        return self


def canvas_of(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a spec, shaped to turn a normalised (B, 3, H, W) tensor back into pixels."""
    return tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (spec.mean, spec.std))


def program_input(x: torch.Tensor, canvas: tuple | None) -> torch.Tensor:
    """The normalised (B, 3, H, W) tensor as the program's input: itself, or (canvas: `canvas_of(spec)`) the
    (B, H, W, 3) BGR canvas a full-integer program takes."""
    if canvas is None:
        return x
    mean, std = (c.to(x.device) for c in canvas)
    return (x * std + mean).permute(0, 2, 3, 1)


def _set_range(fq, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Give an activation fake-quantiser the affine range (scale, zero point), both where it quantises and
    where convert_pt2e reads it (the inner observer's min/max: the range whose parameters are exactly these,
    zero point inside [qmin, qmax])."""
    fq.scale.resize_(scale.shape).copy_(scale)
    fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
    inner = fq.activation_post_process
    zp = zero_point.to(scale.dtype)
    inner.min_val.resize_(scale.shape).copy_((fq.quant_min - zp) * scale)
    inner.max_val.resize_(scale.shape).copy_((fq.quant_max - zp) * scale)


class LearnedRange(nn.Module):
    """Stands in for one per-tensor activation fake-quantiser while training: its scale is a parameter
    (LSQ, Esser et al., ICLR 2020), its zero point fixed; the wrapped quantiser keeps its switches."""

    MIN_SCALE = 1e-8

    def __init__(self, fq: nn.Module):
        super().__init__()
        self.fq = fq
        self.scale = nn.Parameter(fq.scale.detach().clone().float().reshape(1))
        self.register_buffer("zero_point", fq.zero_point.detach().clone().float().reshape(1))

    def forward(self, x):
        if not int(self.fq.fake_quant_enabled[0]):
            return x
        # grad_factor 1: AdamW normalises the step; LSQ's 1/sqrt(n * qmax) matters to SGD only
        return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, self.fq.quant_min,
                                                                self.fq.quant_max, 1.0)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.scale.clamp_(min=self.MIN_SCALE)

    def write_back(self) -> nn.Module:
        """-> the wrapped quantiser, holding the learnt range."""
        self.clamp_()
        _set_range(self.fq, self.scale.detach().clone().reshape(self.fq.scale.shape),
                   self.zero_point.round().to(self.fq.zero_point.dtype).reshape(self.fq.zero_point.shape))
        return self.fq


def unquantize_leaky_inputs(gm) -> int:
    """In a prepared QAT program, take out the activation fake-quantiser between each convolution (with its batch
    norm) and the LeakyReLU that alone reads it, so the program trains what a runtime that fuses convolution and
    activation computes: one rounding, after the LeakyReLU (`quant.ptq.drop_requantize_before_leaky` does the same to
    a converted program). -> the number taken out."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or "leaky_relu" not in str(node.target):
            continue
        fq = node.args[0]
        if not (isinstance(fq, torch.fx.Node) and fq.op == "call_module" and len(fq.users) == 1):
            continue
        mod = gm.get_submodule(fq.target)
        if not hasattr(mod, "fake_quant_enabled") or "FixedQParams" in type(mod).__name__:
            continue
        src = fq.args[0]
        if not (isinstance(src, torch.fx.Node) and len(src.users) == 1):
            continue
        node.replace_input_with(fq, src)
        gm.graph.erase_node(fq)
        gm.delete_submodule(fq.target)
        n += 1
    gm.graph.lint()
    gm.recompile()
    return n


class QATQuantizer:
    backend = "pt2e"

    def __init__(self, model, config: QuantConfig | None = None, size: int = 640, observe_steps: int = 50, float_modules=(),
                 full_integer: bool = False, relu_split=(), fused_leaky: bool = False):
        self.model, self.config, self.size, self.observe_steps = model, config or QuantConfig(), size, observe_steps
        self.float_modules = tuple(float_modules)  # left float in the program (quant.ptq.pt2e_quantizer)
        if full_integer and self.float_modules:
            raise ValueError("a full-integer program has no float modules")
        # float-input only: each convolution runs into its LeakyReLU unrounded, as OpenVINO and Core ML compute it
        self.fused_leaky = fused_leaky
        if fused_leaky and full_integer:
            raise ValueError("XNNPACK rounds each convolution's output before its LeakyReLU: the full-integer program "
                             "has no fused LeakyReLU")
        self.leaky_inputs_unquantized = 0
        # full-integer only: LeakyReLU convolutions as two with fused ReLUs (edge.model.LeakyAsReLUs), trained as two
        self.relu_split = tuple(relu_split)
        if self.relu_split and not full_integer:
            raise ValueError("split LeakyReLUs are for the full-integer program")
        # full_integer: the program of TFLite's full-integer graph (quant.ptq.full_integer_quantizer), canvas in
        self.full_integer = full_integer
        self.prefix = "model.model." if full_integer else "model."  # the float model's parameters inside the program
        self.canvas = canvas_of(model.spec) if full_integer else None
        self.steps, self.gm, self.quantizer = 0, None, None

    def prepare(self) -> NamedOutputs:
        """-> the fake-quantised model (named outputs), ready to train."""
        from torchao.quantization.pt2e import move_exported_model_to_eval  # optional: tflite/train extra
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e  # optional: tflite/train extra

        g = self.config.global_config
        if g is None or g.activation_bits is None:
            raise ValueError("QAT here is int8 weights and activations (global_config with activation_bits=8)")
        self.folded = fold_batch_norm_scales(self.model)
        bn_scales = {f"{self.prefix}{n}.weight" for n, m in self.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        batch = torch.export.Dim("batch", min=1, max=256)
        if self.full_integer:
            if g.weight_granularity != "per_channel":
                raise ValueError("the full-integer program has per-channel weights")
            net = CanvasInput(integer_graph_form(self.model.eval()), self.model.spec.mean, self.model.spec.std, self.size,
                              self.relu_split).eval()
            x = torch.zeros(2, self.size, self.size, 3)
            self.quantizer = full_integer_quantizer(qat=True)
        else:
            net, x = TupleOutputs(self.model.eval()), torch.zeros(2, 3, self.size, self.size)
            self.quantizer = pt2e_quantizer(self.float_modules, qat=True, per_channel=g.weight_granularity == "per_channel")
        gm = torch.export.export(net, (x,), dynamic_shapes={"x": {0: batch}}).module()
        with _module_patterns():
            gm = prepare_qat_pt2e(gm, self.quantizer)
        if self.fused_leaky:
            self.leaky_inputs_unquantized = unquantize_leaky_inputs(gm)
        self.gm = move_exported_model_to_eval(gm)  # batch norms frozen; fake quantisation stays on
        self.gm.training = False
        for name, prm in self.gm.named_parameters():  # batch-norm scales stay 1: the weights keep their int8 grid
            if name in bn_scales:
                prm.requires_grad = False
        return NamedOutputs(self.gm, self.model.spec.output_names, self.canvas)

    def _fake_quantizers(self):
        """-> (activation, weight) fake-quantise modules. Weights are quantised symmetric (per channel by
        default), activations per-tensor affine: the quantizer's config tells them apart. Fixed ranges (the
        full-integer program's pixel input and softmax output) are neither: nothing sets or learns them."""
        acts, weights = [], []
        for m in self.gm.modules():
            if "FixedQParams" in type(m).__name__:
                continue
            if hasattr(m, "fake_quant_enabled") and hasattr(m, "qscheme"):
                (acts if m.qscheme == torch.per_tensor_affine else weights).append(m)
        return acts, weights

    def calibrate(self, tensors) -> int:
        """Activation ranges from PTQ's histogram observers over `tensors` ((1, 3, H, W) float32 arrays: real
        images, letterboxed, not augmented), float forward passes as in PTQ; the ranges are then frozen for
        training. -> number of activation quantizers set."""
        if self.gm is None:
            raise RuntimeError("call prepare() first")
        ctr = quantization_config().output_activation.observer_or_fake_quant_ctr
        acts, weights = self._fake_quantizers()
        observers, hooks = [], []
        for fq in acts:
            obs = ctr(dtype=fq.dtype, qscheme=fq.qscheme, quant_min=fq.quant_min, quant_max=fq.quant_max)
            observers.append(obs)
            hooks.append(fq.register_forward_pre_hook(lambda mod, args, obs=obs: obs(args[0].detach())))
        for fq in acts + weights:  # float forward passes, as PTQ observes; weight observers record the weights' ranges
            fq.disable_fake_quant()
            if fq in acts:
                fq.disable_observer()
            else:
                fq.enable_observer()
        n = 0
        try:
            with torch.no_grad():
                for t in tensors:
                    self.gm(program_input(torch.from_numpy(t), self.canvas))
                    n += 1
        finally:
            for h in hooks:
                h.remove()
        if not n:
            raise ValueError("calibrate() needs at least one image")
        names = {id(self.gm.get_submodule(n.target)): n for n in self.gm.graph.nodes if n.op == "call_module"}
        for fq, obs in zip(acts, observers):
            lo, hi = float(obs.min_val), float(obs.max_val)
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                node = names.get(id(fq))
                src = node.args[0] if node is not None and node.args else None
                path = module_path(src) if isinstance(src, torch.fx.Node) else []
                raise ConfigError(f"calibration left the activation range of {(path[-1] if path else '') or getattr(node, 'name', '?')} "
                                  f"degenerate ([{lo:g}, {hi:g}]): calibrate on real pictures that exercise the whole model")
            _set_range(fq, *obs.calculate_qparams())
            fq.enable_fake_quant()  # observer stays off: the range is the calibrated one
        for fq in weights:
            fq.enable_fake_quant()
        self.calibrated = n
        return len(acts)

    def learn_ranges(self) -> list[nn.Parameter]:
        """After calibrate(): every activation scale becomes a trainable parameter of the program (the
        optimiser must be built after this call). -> the new parameters."""
        if not getattr(self, "calibrated", 0):
            raise RuntimeError("learn_ranges() starts from calibrated ranges: call calibrate() first")
        acts = set(map(id, self._fake_quantizers()[0]))
        self.learned, by_module = {}, {}
        for name, mod in list(self.gm._modules.items()):  # a quantiser shared by two names gets one wrapper
            if id(mod) in acts:
                self.learned[name] = by_module.setdefault(id(mod), LearnedRange(mod))
                setattr(self.gm, name, self.learned[name])
        return [m.scale for m in by_module.values()]

    def write_back(self) -> int:
        """Put the learnt ranges into the program's own fake-quantisers (and those back in the program).
        -> number of ranges written."""
        learned = getattr(self, "learned", {})
        for name, wrapper in learned.items():
            setattr(self.gm, name, wrapper.write_back())
        self.learned = {}
        self.ranges_learnt = getattr(self, "ranges_learnt", False) or bool(learned)
        return len(learned)

    def step(self, n: int | None = None) -> None:
        """Call after each optimiser step (n: the step count, when resuming): the observers' ranges are frozen
        once observe_steps steps are done."""
        from torchao.quantization.pt2e import disable_observer  # optional: tflite/train extra

        self.steps = self.steps + 1 if n is None else n
        for wrapper in getattr(self, "learned", {}).values():
            wrapper.clamp_()
        if getattr(self, "calibrated", 0):  # activation ranges fixed by calibrate(); weight ranges follow the weights
            return
        if self.steps >= self.observe_steps:
            self.gm.apply(disable_observer)

    def float_state(self, model) -> dict[str, torch.Tensor]:
        """The trained float weights as a state_dict of `model` (the program holds its own copies; `model` is the one
        the program was prepared from, its batch norms scale-folded)."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        n = len(self.prefix)
        trained = {k: v.detach().clone() for k, v in self.gm.state_dict().items()}
        for k, v in trained.items():
            if k.startswith(self.prefix) and k[n:] in state:
                state[k[n:]] = v
        if self.full_integer:
            self._unfold_program_convs(model, trained, state)
        return state

    def _unfold_program_convs(self, model, trained: dict, state: dict) -> None:
        """The full-integer program's convolutions that are not the model's as they are, back to convolution + batch
        norm (an exact bias add): the first one takes the pixels (`quant.ptq.CanvasInput`: weight W / std, bias
        -sum(W * mean / std)); a split one (`edge.model.LeakyAsReLUs`) is the convolution and its batch norm in one
        (`pos`; its negative twin `neg` trains apart and is not part of the float model)."""
        spec = model.spec
        mean, std = (torch.tensor([float(v) for v in t]).view(1, 3, 1, 1) for t in (spec.mean, spec.std))
        first = model.body.stage1[0][0]
        for name, seq in model.named_modules():
            if not isinstance(seq, nn.Sequential):
                continue
            for i, (conv, bn) in enumerate(zip(seq, list(seq)[1:])):
                if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                    continue
                at, bn_at = f"{self.prefix}{name}.{i}", f"{name}.{i + 1}"
                if f"{at}.pos.weight" in trained:
                    w, b = trained[f"{at}.pos.weight"], trained[f"{at}.pos.bias"]
                elif conv is first:
                    w, b = trained[f"{at}.weight"], trained[f"{at}.bias"] + trained[f"{self.prefix}{bn_at}.bias"]
                else:
                    continue
                if conv is first:
                    b = b + (w * mean).sum((1, 2, 3))
                    w = w * std
                state[f"{name}.{i}.weight"] = w
                state[f"{bn_at}.weight"], state[f"{bn_at}.bias"] = torch.ones_like(b), b
                state[f"{bn_at}.running_mean"] = torch.zeros_like(b)
                state[f"{bn_at}.running_var"] = torch.full_like(b, 1.0 - bn.eps)

    def finalize(self, fold_quantize: bool = False):
        """-> the converted program with quantize/dequantize pairs: weights not folded for litert-torch,
        `ov.convert_model` and the ONNX export; folded to int8 constants for coremltools."""

        self.write_back()
        return quantized_program(self.gm, fold_quantize=fold_quantize)

    def report(self) -> dict:
        fq = sum(1 for m in self.gm.modules() if type(m).__name__.endswith("FakeQuantize")) if self.gm is not None else 0
        return {"method": "qat", "steps": self.steps, "calibration_images": getattr(self, "calibrated", 0), "batch_norms_folded": getattr(self, "folded", 0), "observe_steps": self.observe_steps, "fake_quantizers": fq,
                "float_modules": list(self.float_modules), "relu_split": list(self.relu_split),
                "graph": "full-integer" if self.full_integer else "float input (NCHW)" + (", fused LeakyReLU" if self.fused_leaky else ""),
                "leaky_relu_inputs_unquantized": self.leaky_inputs_unquantized,
                "activation_ranges": "learnt" if getattr(self, "learned", None) or getattr(self, "ranges_learnt", False) else "frozen",
                "weights": self.config.global_config.weight_granularity if self.config.global_config else None}


class NNCFQATQuantizer:
    """Quantisation-aware training for OpenVINO with NNCF's own fake quantisers: `nncf.quantize` of the torch
    model (the MIXED preset edge-convert's PTQ uses: symmetric per-channel int8 weights, asymmetric u8
    activations, quantisers only where OpenVINO runs int8 kernels, fast bias correction) is the starting point,
    so QAT starts exactly where PTQ ends; training then moves the weights and the quantisers' ranges
    (learnable in NNCF). `ov.convert_model` of the trained model gives FakeQuantize ops that the CPU plugin
    runs as u8 convolutions. OpenVINO only: TFLite takes the PT2E program (QATQuantizer).

    prepare(tensors) -> train (batch norms frozen by the loop) -> finalize() -> torch module for ov.convert_model.
    """

    backend = "nncf"

    def __init__(self, model, size: int = 640):
        self.model, self.size, self.steps, self.net, self.calibrated = model, size, 0, None, 0

    def prepare(self, tensors=None, config: dict | None = None) -> nn.Module:
        """tensors: calibration inputs ((1, 3, H, W) float32 arrays) for a new model; config: nncf.torch.get_config
        of a trained one, to rebuild it (then load its state). -> the fake-quantised model (named outputs)."""
        import nncf  # optional: openvino extra

        wrapped = TupleOutputs(self.model.eval())
        if config is not None:
            self.quantized = nncf.torch.load_from_config(wrapped, config)
        else:
            data = [torch.from_numpy(t) for t in tensors]
            if not data:
                raise ValueError("NNCF QAT needs calibration images")
            self.quantized = nncf.quantize(wrapped, nncf.Dataset(data), subset_size=len(data),
                                           preset=nncf.QuantizationPreset.MIXED)
            self.calibrated = len(data)
        self.net = Named(self.quantized, self.model.spec.output_names)
        return self.net

    def config(self) -> dict:
        import nncf  # optional: openvino extra

        return nncf.torch.get_config(self.quantized)

    def step(self, n: int | None = None) -> None:
        self.steps = self.steps + 1 if n is None else n

    def float_state(self, model) -> dict[str, torch.Tensor]:
        """The trained float weights (the quantised model wraps `model` in place)."""
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def finalize(self) -> nn.Module:
        """-> the fake-quantised torch module (tuple outputs, eval mode) for `ov.convert_model`."""
        return self.quantized.eval()

    def report(self) -> dict:
        fq = sum(1 for m in self.quantized.modules() if type(m).__name__.endswith("Quantizer")) if self.net is not None else 0
        return {"method": "qat", "backend": "nncf", "steps": self.steps, "calibration_images": self.calibrated,
                "preset": "MIXED", "fake_quantizers": fq, "weights": "per_channel"}


def load_qat(path, size: int):
    """A QAT checkpoint (`edge compress --qat-steps`) -> (quantizer prepared at `size` with the trained
    ranges and weights, float model): QATQuantizer (PT2E) or NNCFQATQuantizer, as the checkpoint says.
    The fake-quantised model is rebuilt from the float model and its state loaded: per-tensor ranges do
    not depend on the input size."""

    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or not isinstance(ck.get("qat_state"), dict):
        raise WeightsError(f"{path} is not a QAT checkpoint (no qat_state)")
    model, _ = load_weights(path)
    model.spec = model.spec.with_input_size(size)
    if "nncf_config" in ck:
        try:
            config = json.loads(ck["nncf_config"])
        except (TypeError, ValueError):
            raise WeightsError(f"{path}: its nncf_config is not JSON") from None
        q = NNCFQATQuantizer(model, size=size)
        try:
            q.prepare(config=config)
            q.quantized.load_state_dict(ck["qat_state"])
        except Exception as e:  # nncf raises its own types for a config that does not fit
            raise WeightsError(f"{path}: its NNCF QAT state does not fit the model ({str(e)[:200]})") from None
    else:
        trained = ck.get("retinaface_edge", {}).get("qat", {})
        graph = ck.get("retinaface_edge", {}).get("train", {}).get("qat_graph")
        full = graph == "full-integer"
        q = QATQuantizer(model, size=size, observe_steps=0, float_modules=trained.get("float_modules") or (),
                         full_integer=full, relu_split=(trained.get("relu_split") or ()) if full else (),
                         fused_leaky=graph == "fused-leaky")
        if q.full_integer and "gm.norm.weight" in ck["qat_state"]:
            raise WeightsError(f"{path}: a full-integer QAT checkpoint of the earlier program (a normalising convolution "
                               "before the model; the program now folds it into the first convolution): train it again "
                               "with edge compress --qat-graph full-integer")
        net = q.prepare()
        try:
            net.load_state_dict(ck["qat_state"])
        except RuntimeError as e:
            raise WeightsError(f"{path}: its QAT state does not fit the model ({str(e)[:200]})") from None
    trained = ck.get("retinaface_edge", {}).get("qat", {})  # what the training run reported, for the bundle's metadata
    q.steps = int(trained.get("steps", 0))
    q.calibrated = int(trained.get("calibration_images", 0))
    return q, model
