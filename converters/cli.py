"""`edge-convert`: until the converters land, say what is coming and exit non-zero."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    print(
        "edge-convert: the converters (onnx, tflite, coreml, openvino at fp32/fp16/int8) are not built yet; "
        "use `edge detect` with --weights for now.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
