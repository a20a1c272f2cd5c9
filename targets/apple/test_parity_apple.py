"""macOS / iOS: a CoreML bundle on the Core ML runtime (macOS only)."""
import platform

import edgecheck
import pytest
import runtimes


@pytest.mark.skipif(platform.system() != "Darwin", reason="the Core ML runtime exists only on macOS")
def test_parity_against_golden(bundle):
    s = edgecheck.check_on_device(bundle, "coreml", runtimes.coreml)
    assert s["passed"], s["failed"]
