"""Raspberry Pi: a TFLite bundle on tflite-runtime (or ai-edge-litert) against its golden outputs."""
import json

import pytest

import edgecheck
import runtimes


def test_bundle_is_intact(bundle):
    folder, meta, golden = edgecheck.load_bundle(bundle)
    assert meta["target"] == "tflite", f"this suite runs TFLite bundles, got {meta['target']}"


def test_parity_against_golden(bundle):
    _, meta, _ = edgecheck.load_bundle(bundle)
    run, runtime = runtimes.tflite(bundle / meta["model_file"], meta["spec"]["output_names"])
    s = edgecheck.run_check(bundle, run)
    print(f"\nruntime: {runtime}\n" + json.dumps(s, indent=1))
    assert s["passed"], s["failed"]
