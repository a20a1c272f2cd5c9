"""The one table of targets. Each entry is a module with CAPABILITIES and convert(); the runner that loads
its bundles is in `edge.runners` (`edge.bundle.RUNNERS`)."""
from __future__ import annotations

from converters import coreml_target, onnx_target, openvino_target, tflite_target
from edge.errors import ConfigError

TARGET_MODULES = {"onnx": onnx_target, "tflite": tflite_target, "openvino": openvino_target, "coreml": coreml_target}


def target_module(name: str):
    if name not in TARGET_MODULES:
        raise ConfigError(f"unknown target {name!r}; choose from {', '.join(TARGET_MODULES)}")
    return TARGET_MODULES[name]


def capabilities(name: str):
    return target_module(name).CAPABILITIES
