"""Pre-processing in numpy only: resize, letterbox or pad, normalise, NCHW.

Two modes, from `ModelSpec.input_size`:
  int S: aspect-preserving resize so the long side is S, placed top-left on an S x S canvas;
  None ("native"): the image at its own size, padded bottom/right to a multiple of 32.
Padding holds the mean colour, i.e. zeros after normalisation.

This is the one pre-processing path: detection (`prepare`), golden outputs and calibration (`letterbox_uint8`,
`normalise`) and training (`letterbox_float`) share the geometry (`fit`) and the normalisation. The device code
(`targets/common/edgecheck.py`) keeps a numpy mirror of it; `tests/test_device_suite.py` proves them equal.

The resize is numpy; where OpenCV is importable its float32 INTER_LINEAR resize is used instead: the same
taps (half-pixel centres, no antialiasing, edge pixels repeated), measured equal to the numpy result and
about 7x faster (720x1280 -> 360x640: 0.5 ms against 3.6 ms), which was most of the end-to-end time of
an int8 model. `RETINAFACE_EDGE_NUMPY_RESIZE=1` forces the numpy path.
"""
from __future__ import annotations

import os

import numpy as np

try:
    import cv2 as _cv2
except ImportError:  # numpy only (a device without OpenCV): same numbers, slower
    _cv2 = None

from edge.contract import ModelSpec


class Prepared:
    """One image made ready for the network.

    scale: input px per original px; pad: (x, y) offset of the image on the canvas; image_hw: original (H, W).
    Two views of the same input, each built on first use:
      tensor: (1, 3, H, W) float32, (pixel - mean) / std, zeros where padded: what every runner takes;
      canvas: (H, W, 3) uint8 BGR before normalisation, the pad holding the mean colour, for runners that
        normalise inside the model (OpenVINO's pre-processing), which then skip the float tensor and the
        channel reorder. Without padding it is the image itself. Only where it is exact (`has_canvas`): the
        image was not resized (a resize gives float32 pixels) and the mean colour is whole numbers. Then both
        views give the network the same values: integer pixels minus the mean are exact in float32, and the
        mean colour minus the mean is 0.
    """

    def __init__(self, tensor: np.ndarray | None, scale: float, pad: tuple[float, float], image_hw: tuple[int, int],
                 *, resized: np.ndarray | None = None, canvas_hw: tuple[int, int] | None = None, mean=None, std=None):
        if tensor is None and resized is None:
            raise ValueError("Prepared needs a tensor or the resized image")
        self._tensor = tensor
        self._canvas = None
        self._pixel_canvas = None
        self._resized = resized
        self._canvas_hw = canvas_hw if canvas_hw is not None else tuple(tensor.shape[2:4])
        self._mean = mean
        self._std = std
        self.scale = scale
        self.pad = pad
        self.image_hw = image_hw

    @property
    def input_hw(self) -> tuple[int, int]:
        return self._canvas_hw

    @property
    def tensor(self) -> np.ndarray:
        if self._tensor is None:
            self._tensor = _normalised(self._resized, self._canvas_hw, self._mean, self._std)
        return self._tensor

    @property
    def has_image(self) -> bool:
        """Whether the resized image is kept (not only a tensor): what `pixel_canvas` is made from."""
        return self._resized is not None

    @property
    def has_canvas(self) -> bool:
        return (self._resized is not None and self._resized.dtype == np.uint8
                and all(float(m).is_integer() and 0 <= m <= 255 for m in self._mean))

    @property
    def pixel_canvas(self) -> np.ndarray:
        """(H, W, 3) uint8 BGR canvas for a model whose input is integer pixels (a full-integer TFLite graph): the
        exact `canvas` where there is one, else the resized image rounded to the nearest integer pixel (what a
        uint8 resize gives) on the mean colour."""
        if self.has_canvas:
            return self.canvas
        if self._resized is None:
            raise ValueError("no image behind this input (given as a tensor)")
        if self._pixel_canvas is None:  # built once (pre-processing builds it; inference then reads it)
            rounded = np.clip(np.rint(self._resized), 0, 255).astype(np.uint8)
            self._pixel_canvas = _canvas(rounded, self._canvas_hw, np.clip(np.rint(np.asarray(self._mean, np.float64)), 0, 255))
        return self._pixel_canvas

    @property
    def canvas(self) -> np.ndarray:
        if self._canvas is None:
            if not self.has_canvas:
                raise ValueError("no exact uint8 canvas for this input (given as a tensor, resized, or a fractional mean)")
            self._canvas = _canvas(self._resized, self._canvas_hw, self._mean)
        return self._canvas


def _axis_weights(src: int, dst: int):
    """Bilinear taps with half-pixel centres (OpenCV INTER_LINEAR's convention, no antialiasing)."""
    x = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    x = np.clip(x, 0, src - 1)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    f = (x - i0).astype(np.float32)
    return i0, i1, f


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8/float -> (height, width, C) float32, bilinear."""
    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    if _cv2 is not None and image.ndim == 3 and image.shape[2] <= 4 and not os.environ.get("RETINAFACE_EDGE_NUMPY_RESIZE"):
        out = _cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (width, height), interpolation=_cv2.INTER_LINEAR)
        return out.reshape(height, width, image.shape[2])
    return resize_numpy(image, height, width)


def resize_numpy(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """resize_bilinear without OpenCV."""
    y0, y1, fy = _axis_weights(image.shape[0], height)
    x0, x1, fx = _axis_weights(image.shape[1], width)
    # gather the needed rows before converting to float: a downscale touches only 2 * height rows
    top = image[y0].astype(np.float32)
    rows = top + (image[y1].astype(np.float32) - top) * fy[:, None, None]
    left = rows[:, x0]
    return left + (rows[:, x1] - left) * fx[None, :, None]


def _planes(image: np.ndarray):
    """(H, W, 3) -> its three channel planes. OpenCV's split copies them out contiguously, which makes the
    subtraction after it about twice as fast as reading every third value (640 x 640: 0.23 against 0.42 ms
    for split and subtraction together); the values are the same."""
    if _cv2 is not None and image.ndim == 3 and image.shape[2] == 3 and image.dtype in (np.uint8, np.float32):
        return _cv2.split(image)
    return [image[..., c] for c in range(image.shape[2])]


def round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def fit(h: int, w: int, size: int) -> tuple[float, int, int]:
    """The letterbox geometry: (scale, new h, new w) with the long side at `size` (every path uses this)."""
    scale = size / max(h, w)
    return scale, max(1, round(h * scale)), max(1, round(w * scale))


def normalise(canvas: np.ndarray, mean, std) -> np.ndarray:
    """(H, W, 3) BGR canvas (uint8 or float32) -> (1, 3, H, W) float32 (pixel - mean) / std."""
    return _normalised(canvas, canvas.shape[:2], mean, std)


def _normalised(resized: np.ndarray, canvas_hw: tuple[int, int], mean, std) -> np.ndarray:
    """(h, w, 3) image -> (1, 3, H, W) float32 (pixel - mean) / std, placed top-left, zeros around it."""
    nh, nw = resized.shape[:2]
    ch, cw = canvas_hw
    # padding (if any) must be zeros; without padding every value is written below
    tensor = np.zeros((1, 3, ch, cw), np.float32) if (nh, nw) != (ch, cw) else np.empty((1, 3, ch, cw), np.float32)
    for c, plane in enumerate(_planes(resized)):  # written plane by plane: no HWC -> CHW copy
        np.subtract(plane, np.float32(mean[c]), out=tensor[0, c, :nh, :nw])
        if std[c] != 1.0:
            tensor[0, c, :nh, :nw] /= np.float32(std[c])
    return tensor


def fill_colour(out: np.ndarray, colour) -> np.ndarray:
    """Fill an (H, W, C) array with one colour a whole row at a time: numpy's broadcast of a C-vector over the last
    axis is ~100x slower (640x640x3 uint8: 1.8 against 0.02 ms here), which was most of a resized frame's canvas."""
    out.reshape(out.shape[0], -1)[:] = np.tile(np.asarray(colour, out.dtype), out.shape[1])
    return out


def _canvas(resized: np.ndarray, canvas_hw: tuple[int, int], mean) -> np.ndarray:
    """(h, w, 3) uint8 image -> (H, W, 3) uint8 placed top-left on the mean colour; the image itself when it fills the canvas."""
    nh, nw = resized.shape[:2]
    if (nh, nw) == tuple(canvas_hw):
        return np.ascontiguousarray(resized)
    out = fill_colour(np.empty((*canvas_hw, 3), np.uint8), mean)
    out[:nh, :nw] = resized
    return out


def prepare(image_bgr: np.ndarray, spec: ModelSpec) -> Prepared:
    """BGR uint8 (H, W, 3) -> Prepared network input following `spec` (tensor and canvas built on first use)."""
    h, w = image_bgr.shape[:2]
    if spec.input_size is None:
        scale = 1.0
        nh, nw = h, w
        ch, cw = round_up(h, spec.pad_multiple), round_up(w, spec.pad_multiple)
        resized = image_bgr  # converted to float32 by the subtraction (exact for uint8)
    else:
        size = spec.input_size
        if size % spec.pad_multiple:
            raise ValueError(f"input size {size} is not a multiple of {spec.pad_multiple}")
        scale, nh, nw = fit(h, w, size)
        ch = cw = size
        # already the right size: no float copy, the subtraction converts (exact for uint8)
        resized = image_bgr if (nh, nw) == (h, w) else resize_bilinear(image_bgr, nh, nw)
    return Prepared(None, scale, (0.0, 0.0), (h, w), resized=resized, canvas_hw=(ch, cw), mean=spec.mean, std=spec.std)


def letterbox_uint8(image_bgr: np.ndarray, size: int, mean) -> np.ndarray:
    """BGR uint8 (H, W, 3) -> (size, size, 3) uint8: long side to `size`, top-left, padded with the mean colour."""
    _, nh, nw = fit(*image_bgr.shape[:2], size)
    canvas = fill_colour(np.empty((size, size, 3), np.uint8), np.round(np.asarray(mean)))
    canvas[:nh, :nw] = np.clip(resize_bilinear(image_bgr, nh, nw) + 0.5, 0, 255).astype(np.uint8)
    return canvas


def letterbox_float(image_bgr: np.ndarray, size: int, mean) -> tuple[np.ndarray, float]:
    """BGR (H, W, 3) -> ((size, size, 3) float32 letterboxed canvas, scale): the resized pixels unrounded (training)."""
    scale, nh, nw = fit(*image_bgr.shape[:2], size)
    x = fill_colour(np.empty((size, size, 3), np.float32), mean)
    x[:nh, :nw] = resize_bilinear(image_bgr, nh, nw)
    return x, scale
