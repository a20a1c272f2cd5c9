"""Shared by the device suites: `pytest targets/<device> --bundle PATH` (or EDGE_BUNDLE=PATH)."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "common"))


def pytest_addoption(parser):
    parser.addoption("--bundle", default=os.environ.get("EDGE_BUNDLE"), help="bundle folder to check")


@pytest.fixture(scope="session")
def bundle(request):
    b = request.config.getoption("--bundle")
    if not b:
        pytest.fail("pass --bundle PATH (or set EDGE_BUNDLE)")
    return Path(b)
