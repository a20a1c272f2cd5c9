"""The one table of targets. Each entry is a module with CAPABILITIES, convert() and load_runner()."""
from __future__ import annotations

import importlib

from edge.errors import ConfigError

TARGET_MODULES = {
    "onnx": "converters.onnx_target",
    "tflite": "converters.tflite_target",
    "openvino": "converters.openvino_target",
    "coreml": "converters.coreml_target",
}


def target_module(name: str):
    if name not in TARGET_MODULES:
        raise ConfigError(f"unknown target {name!r}; choose from {', '.join(TARGET_MODULES)}")
    return importlib.import_module(TARGET_MODULES[name])


def capabilities(name: str):
    return target_module(name).CAPABILITIES
