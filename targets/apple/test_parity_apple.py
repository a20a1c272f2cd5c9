"""macOS / iOS: a CoreML bundle on the Core ML runtime (macOS only)."""
import json
import platform

import pytest

import edgecheck
import runtimes


@pytest.mark.skipif(platform.system() != "Darwin", reason="the Core ML runtime exists only on macOS")
def test_parity_against_golden(bundle):
    _, meta, _ = edgecheck.load_bundle(bundle)
    assert meta["target"] == "coreml", f"this suite runs CoreML bundles, got {meta['target']}"
    run, runtime = runtimes.coreml(bundle / meta["model_file"], meta["spec"]["output_names"])
    s = edgecheck.run_check(bundle, run)
    print(f"\nruntime: {runtime}\n" + json.dumps(s, indent=1))
    assert s["passed"], s["failed"]
