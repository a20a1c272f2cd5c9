"""Jetson: an ONNX bundle on onnxruntime (TensorRT / CUDA providers when present, else CPU)."""
import edgecheck
import runtimes


def test_parity_against_golden(bundle):
    s = edgecheck.check_on_device(bundle, "onnx", runtimes.onnxruntime)
    assert s["passed"], s["failed"]
