from pathlib import Path

import numpy as np
import pytest

from converters.api import convert
from edge.image_io import load_image
from edge.weights.load import load_weights

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "README.md").is_file():
        pytest.skip("../shared (real weights, images, benchmarks) is not beside the project")
    return SHARED


@pytest.fixture(scope="session")
def default_model():
    return load_weights("default")


@pytest.fixture(scope="session")
def shared_model(shared):
    return load_weights(shared / "weights" / "mobilenet0.25_Final.pth")


@pytest.fixture(scope="session")
def group_image(shared) -> np.ndarray:
    return load_image(shared / "images" / "group.jpg")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """Built once: (target, precision) -> bundle folder, converted lazily."""
    root = tmp_path_factory.mktemp("bundles")
    cache: dict = {}

    def get(target, precision):
        if (target, precision) not in cache:
            pytest.importorskip({"onnx": "onnxscript", "tflite": "litert_torch", "openvino": "openvino", "coreml": "coremltools"}[target])

            cache[target, precision] = convert(target, precision, out=root / f"{target}-{precision}", progress=False).bundle
        return cache[target, precision]

    return get


