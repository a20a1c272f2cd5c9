"""OpenVINO IR: ov.convert_model from the PyTorch model; fp16 by compressing weights at save;
int8 with NNCF post-training quantisation (per-channel int8 weights, asymmetric u8 activations,
the MIXED preset) on the calibration set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from converters.base import Capabilities, ConvertOptions, Converted, step
from edge.contract import ModelSpec
from edge.model import TupleOutputs

CAPABILITIES = Capabilities(
    target="openvino",
    suffix=".xml",
    routes={
        "fp32": "ov.convert_model(torch model)",
        "fp16": "ov.convert_model, saved with compress_to_fp16 (fp16 weights)",
        "int8": "ov.convert_model, then nncf.quantize (MIXED preset: symmetric per-channel weights, asymmetric activations)",
    },
    convert_requires=("openvino", "nncf"),
    run_requires=("openvino",),
    extra="openvino",
    int8_equalize=False,
)


def _to_ov(model, spec, size: int):
    import openvino as ov

    x = torch.zeros(1, 3, size, size)
    return _named(ov.convert_model(TupleOutputs(model).eval(), example_input=x, input=[1, 3, size, size]), spec)


def _named(m, spec):
    m.inputs[0].get_tensor().set_names({"input"})
    m.set_friendly_name("retinaface_edge")
    for out, name in zip(m.outputs, spec.output_names):
        out.get_tensor().set_names({name})
    return m


def convert(model, spec, opts: ConvertOptions, workdir: Path, calib, meta_min: dict[str, str]) -> Converted:
    import openvino as ov

    quant: dict = {"route": CAPABILITIES.routes[opts.precision]}
    if opts.precision == "int8" and opts.qat is not None:
        x = torch.zeros(1, 3, opts.input_size, opts.input_size)
        if opts.qat.backend == "nncf":  # NNCF's fake quantisers become FakeQuantize ops: u8 convolutions on the CPU plugin
            step(opts.progress, "ov.convert_model of the NNCF QAT model")
            with torch.no_grad():
                m = _named(ov.convert_model(opts.qat.finalize(), example_input=x, input=[1, 3, opts.input_size, opts.input_size]), spec)
            quant.update({"route": "NNCF QAT (edge compress --qat-backend nncf) -> ov.convert_model",
                          "activations": "u8 per-tensor asymmetric (NNCF MIXED preset, ranges trained)"})
        else:  # the converted PT2E program (quantize/dequantize pairs): OpenVINO fuses them into u8 convolutions
            step(opts.progress, "ov.convert_model of the QAT program")
            m = _named(ov.convert_model(torch.export.export(opts.qat.finalize(), (x,))), spec)
            quant.update({"route": "PT2E QAT (edge compress --qat-steps) -> ov.convert_model",
                          "activations": "int8 per-tensor (ranges learnt in QAT)"})
        quant.update({"weights": "int8 per-channel symmetric", "qat": opts.qat.report()})
    else:
        step(opts.progress, "ov.convert_model")
        m = _to_ov(model, spec, opts.input_size)
    if opts.precision == "int8" and opts.qat is None:
        import nncf

        step(opts.progress, f"nncf.quantize on {len(calib)} calibration images")
        data = list(calib.tensors(spec))
        # MIXED (asymmetric activations) suits the LeakyReLU maps: on group.jpg recall of FP32 faces
        # 0.988 vs 0.940 with PERFORMANCE (symmetric), and equalising first lowers it (0.976)
        m = nncf.quantize(m, nncf.Dataset(data), subset_size=len(data), preset=nncf.QuantizationPreset.MIXED)
        quant.update({"weights": "int8 per-channel symmetric", "activations": "u8 per-tensor asymmetric (NNCF MIXED preset)"})
    replaced = two_class_sigmoid(m)
    if replaced:
        quant["softmax_as_sigmoid"] = replaced
    for k, v in meta_min.items():
        m.set_rt_info(v, ["retinaface_edge", k.split(".", 1)[1]])
    ov.save_model(m, str(workdir / "model.xml"), compress_to_fp16=opts.precision == "fp16")
    quant.update(op_summary(workdir / "model.xml"))
    return Converted("model.xml", quant, "OpenVINO rt_info 'retinaface_edge'", extra_files=["model.bin"])


def two_class_sigmoid(m) -> int:
    """Every softmax over a last axis of 2 (the class scores) becomes a sigmoid of the logit difference:
    softmax(l0, l1) = (sigmoid(l0 - l1), sigmoid(l1 - l0)), equal to float rounding (conf within 6e-8 measured).
    The plugin's softmax over 16,800 pairs took ~11 % of an int8 inference (per-layer profile, merge1_50 at
    640x640); the element-wise sigmoid is ~0.1 ms cheaper there. Returns how many were replaced."""
    import openvino.opset13 as ops

    count = 0
    for node in m.get_ordered_ops():
        if node.get_type_name() != "Softmax":
            continue
        shape = node.get_output_partial_shape(0)
        rank = shape.rank.get_length() if shape.rank.is_static else 0
        axis = int(node.get_attributes().get("axis", 1))
        if rank == 0 or axis not in (-1, rank - 1) or not shape[rank - 1].is_static or shape[rank - 1].get_length() != 2:
            continue
        x = node.input_value(0)
        one, minus = np.array([1], np.int64), np.array([-1], np.int64)
        l0 = ops.slice(x, np.array([0], np.int64), one, one, minus)
        l1 = ops.slice(x, one, np.array([2], np.int64), one, minus)
        d = ops.subtract(l1, l0)
        s = ops.sigmoid(ops.concat([ops.negative(d), d], -1))
        s.set_friendly_name(node.get_friendly_name())
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(s.output(0))
        count += 1
    if count:
        m.validate_nodes_and_infer_types()
    return count


def op_summary(path: Path) -> dict:
    import openvino as ov

    m = ov.Core().read_model(str(path))
    counts: dict[str, int] = {}
    for op in m.get_ordered_ops():
        t = op.get_type_name()
        if t in ("Constant", "Parameter", "Result"):
            continue
        counts[t] = counts.get(t, 0) + 1
    consts: dict[str, int] = {}
    for op in m.get_ordered_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 4:  # conv 4-D, group conv 5-D
            et = op.get_output_element_type(0).get_type_name()
            consts[et] = consts.get(et, 0) + 1
    return {"ops": dict(sorted(counts.items())), "conv_weight_types": consts}


class OpenVINORunner:
    """An OpenVINO IR on the CPU plugin. `__call__` takes the (1, 3, H, W) float32 tensor; `run_image` takes the
    (1, H, W, 3) uint8 BGR canvas and leaves the conversion to float, the mean subtraction, the division by std
    and the NHWC -> NCHW reorder to OpenVINO's pre-processing, compiled into a second model on first use: the
    same float32 values reach the network without the numpy normalisation and the plugin's own reorder of the
    input (outputs bit-identical to `__call__` on the normalised tensor, fp32 and int8 bundles). Not offered
    for float32 pixels (a resized image): the int8 model's input quantiser, folded with the mean there,
    rounds some values differently (loc up to 0.27 apart measured)."""

    def __init__(self, path: str | Path, output_names, threads: int | None = None, name: str = "openvino",
                 mean=None, std=None):
        import openvino as ov

        self.core = ov.Core()
        self.path = str(path)
        # The CPU plugin picks bf16 by itself on CPUs that report BF16 (this one does), which moves
        # box offsets by up to ~0.9; pin f32 so an fp32 bundle computes in fp32 (int8 layers stay int8).
        self.config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = self.core.compile_model(self.path, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.output_names = list(output_names)
        self.name = name
        default = ModelSpec()
        self.mean = default.mean if mean is None else mean
        self.std = default.std if std is None else std
        self._image_request = None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # shared input and outputs, then one copy of each output (the request reuses its buffers): the default
        # infer() copies the 4.9 MB input and every output once more (0.4-0.5 ms of a 3.5 ms int8 inference)
        return self._infer(self.request, np.ascontiguousarray(x, dtype=np.float32))

    def run_image(self, canvas: np.ndarray) -> dict[str, np.ndarray]:
        if canvas.ndim != 4 or canvas.shape[-1] != 3 or canvas.dtype != np.uint8:
            raise ValueError(f"run_image takes a (1, H, W, 3) uint8 BGR canvas, got {canvas.dtype} {canvas.shape}")
        if self._image_request is None:
            self._image_request = self._image_model().create_infer_request()
        return self._infer(self._image_request, np.ascontiguousarray(canvas))

    def _infer(self, request, x: np.ndarray) -> dict[str, np.ndarray]:
        res = request.infer({0: x}, share_inputs=True, share_outputs=True)
        return {n: np.array(res[n], dtype=np.float32) for n in self.output_names}

    def _image_model(self):
        import openvino as ov
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(self.core.read_model(self.path))
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
        steps.mean([float(m) for m in self.mean])
        if any(float(s) != 1.0 for s in self.std):
            steps.scale([float(s) for s in self.std])
        return self.core.compile_model(ppp.build(), "CPU", self.config)


def load_runner(bundle_dir: Path, meta: dict, threads: int | None = None):
    spec = ModelSpec.from_dict(meta["spec"])
    return OpenVINORunner(bundle_dir / meta["model_file"], spec.output_names, threads, name=f"openvino-{meta['precision']}",
                          mean=spec.mean, std=spec.std)
