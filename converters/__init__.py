"""Converters: one module per target (ONNX, TFLite, CoreML, OpenVINO IR), each producing a bundle."""
