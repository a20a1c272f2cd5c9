"""Intel: an OpenVINO IR bundle on the OpenVINO CPU plugin (f32 inference precision pinned)."""
import edgecheck
import runtimes


def test_parity_against_golden(bundle):
    s = edgecheck.check_on_device(bundle, "openvino", runtimes.openvino)
    assert s["passed"], s["failed"]
