"""The OpenVINO runner (compiled on CPU; uint8 canvases where the model normalises inside)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.contract import ModelSpec


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
        import openvino as ov  # optional: openvino extra

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
        import openvino as ov  # optional: openvino extra
        from openvino.preprocess import PrePostProcessor  # optional: openvino extra

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
