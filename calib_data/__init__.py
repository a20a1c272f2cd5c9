"""Calibration sets for post-training quantisation.

A calibration set is a stack of letterboxed BGR uint8 canvases at the contract's input size
(padding = mean colour), with a note of where each image came from. Sources:
- the built-in default: scenes composed from public-domain photographs shipped inside package
  wheels (see `edge.samples`: Grace Hopper's U.S. Navy portrait from matplotlib's wheel), at
  several scales, flipped and tone-shifted; nothing downloaded, nothing from ../shared;
- a folder of the user's images: N picked deterministically (by a hash of the file name);
- a built set (.npz) written by `python -m calib_data.build`.
"""
