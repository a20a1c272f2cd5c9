"""What every target module shares: capabilities, options and the conversion result."""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

from edge.bundle import PRECISIONS
from edge.errors import ConfigError

PRECISION_DOC = {
    "fp32": "float32 weights and compute",
    "fp16": "float16 weights (compute as the runtime chooses)",
    "int8": "int8 weights per channel and int8 activations (calibrated)",
    "int8-mixed": "int8 weights per channel, int16 activations where they pay and int8 elsewhere (calibrated; 16x8 NPUs)",
    "int8w": "int8 weights per channel, float compute (no calibration)",
}


@dataclass(frozen=True)
class Capabilities:
    """One target's record in the registry.

    routes: precision -> one line saying how it is produced (precisions not listed are refused).
    convert_requires: Python modules needed to convert; run_requires: alternatives, any one of
    which runs the bundle; runs_here: None when this host can run it, else the reason it cannot.
    """

    target: str
    suffix: str
    routes: dict[str, str]
    convert_requires: tuple[str, ...]
    run_requires: tuple[str, ...]
    extra: str
    runs_here: Callable[[], str | None] = lambda: None
    int8_equalize: bool = True  # cross-layer equalisation before int8 PTQ (measured per target)
    not_byte_identical: str | None = None  # why two conversions of the same weights differ in bytes (None: they do not)

    def check(self, precision: str) -> None:
        """Refuse an unsupported request before any work, with the reason."""
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
        if precision not in self.routes:
            raise ConfigError(
                f"{self.target} does not offer {precision} ({PRECISION_DOC[precision]}); it offers {', '.join(self.routes)}"
            )
        missing = [m for m in self.convert_requires if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"{self.target} conversion needs {', '.join(missing)}: pip install 'retinaface-edge[{self.extra}]'"
            )


@dataclass
class ConvertOptions:
    target: str
    precision: str = "fp32"
    input_size: int = 640
    calib: str | None = None  # folder of images, a built .npz, or None for the built-in set
    calib_count: int = 32
    progress: bool = True
    qat: object = None  # int8 from a QAT checkpoint: its prepared quant.qat.QATQuantizer (no calibration)
    float_modules: tuple = ()  # PT2E int8 (tflite, coreml): model modules left float (quant.ptq.pt2e_quantizer)
    relu_split: tuple = ()  # TFLite int8: modules whose LeakyReLU convolutions are split (quant.ptq.relu_split_modules)
    input_dtype: str = "uint8"  # TFLite full-integer int8: the canvas as uint8 (a QUANTIZE first) or int8 (pixel - 128)


@dataclass
class Converted:
    """What a target's convert() wrote into the work folder."""

    model_file: str  # file or folder name inside the bundle
    quantization: dict = field(default_factory=dict)
    format_metadata: str = ""  # where the minimal metadata copy went
    extra_files: list[str] = field(default_factory=list)


def announce(progress: bool, msg: str) -> None:
    if progress:
        print(f"  - {msg}", file=sys.stderr, flush=True)


def tool_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def minimal_metadata(meta: dict) -> dict[str, str]:
    """The small copy of the metadata stored in the format's own slot (all values strings)."""

    spec = meta["spec"]
    return {
        "retinaface_edge.format_version": str(meta["format_version"]),
        "retinaface_edge.precision": meta["precision"],
        "retinaface_edge.input": f"{spec['layout']} {spec['channel_order']} mean {spec['mean']} std {spec['std']}",
        "retinaface_edge.spec": json.dumps(spec, separators=(",", ":")),
        "retinaface_edge.weights_sha256": meta["weights"]["sha256"],
    }


def model_path(workdir: Path, name: str) -> Path:
    return workdir / name
