"""Raspberry Pi: a TFLite bundle on tflite-runtime (or ai-edge-litert) against its golden outputs."""
import edgecheck
import runtimes


def test_parity_against_golden(bundle):
    s = edgecheck.check_on_device(bundle, "tflite", runtimes.tflite)
    assert s["passed"], s["failed"]
