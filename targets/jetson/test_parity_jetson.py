"""Jetson: an ONNX bundle on onnxruntime (TensorRT / CUDA providers when present, else CPU)."""
import json

import edgecheck
import runtimes


def test_parity_against_golden(bundle):
    _, meta, _ = edgecheck.load_bundle(bundle)
    assert meta["target"] == "onnx", f"this suite runs ONNX bundles, got {meta['target']}"
    run, runtime = runtimes.onnxruntime(bundle / meta["model_file"], meta["spec"]["output_names"])
    s = edgecheck.run_check(bundle, run)
    print(f"\nruntime: {runtime}\n" + json.dumps(s, indent=1))
    assert s["passed"], s["failed"]
