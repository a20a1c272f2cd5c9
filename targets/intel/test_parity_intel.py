"""Intel: an OpenVINO IR bundle on the OpenVINO CPU plugin (f32 inference precision pinned)."""
import json

import edgecheck
import runtimes


def test_parity_against_golden(bundle):
    _, meta, _ = edgecheck.load_bundle(bundle)
    assert meta["target"] == "openvino", f"this suite runs OpenVINO bundles, got {meta['target']}"
    run, runtime = runtimes.openvino(bundle / meta["model_file"], meta["spec"]["output_names"])
    s = edgecheck.run_check(bundle, run)
    print(f"\nruntime: {runtime}\n" + json.dumps(s, indent=1))
    assert s["passed"], s["failed"]
