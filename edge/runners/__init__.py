"""Runners: callables taking the (B, 3, H, W) float32 input and returning the named raw outputs
as numpy arrays (a mapping: a TFLite int8 model's come as written, `edge.postprocess.QuantizedOutputs`,
float32 wherever read). Any runtime is just another runner; the pipeline does not care which."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Protocol

import numpy as np
import onnxruntime as ort
import torch

Outputs = Mapping[str, np.ndarray]


class Runner(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> Outputs: ...


class TorchRunner:
    """The FP32 PyTorch model (reference). device: "cpu" or "cuda" (TF32 disabled on CUDA)."""

    def __init__(self, model, device: str = "cpu"):
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.torch = torch
        self.device = device
        self.model = model.eval().to(device)
        self.name = f"pytorch-fp32-{device}"
        if getattr(model, "mesh_basis", None) is not None:
            self.mesh_decoder = (model.mesh_mean.detach().cpu().numpy().astype(np.float32),
                                 model.mesh_basis.detach().cpu().numpy().astype(np.float32))

    def __call__(self, x: np.ndarray) -> Outputs:
        with self.torch.inference_mode():
            out = self.model(self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return {k: v.float().cpu().numpy() for k, v in out.items()}


class OnnxRunner:
    """onnxruntime on the CPU. `model` is a path or the serialised bytes."""

    def __init__(self, model, threads: int | None = None, name: str = "onnxruntime"):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.name = name

    def __call__(self, x: np.ndarray) -> Outputs:
        res = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.output_names, res))


def as_runner(fn: Callable[[np.ndarray], Outputs], name: str) -> Runner:
    fn.name = name  # type: ignore[attr-defined]
    return fn  # type: ignore[return-value]
