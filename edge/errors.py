"""Typed errors. Every failure a user can cause maps to one of these; the CLI prints the
message on one line and exits with code 2 (see `edge.cli`)."""


class EdgeError(Exception):
    """Base class of every error this toolkit raises on bad input."""


class ImageError(EdgeError):
    """An image file or array that cannot be used (unreadable, truncated, empty, unsupported mode,
    too many pixels, NaN/Inf values, wrong rank or dtype)."""


class WeightsError(EdgeError):
    """A checkpoint that cannot be loaded safely or does not fit the architecture."""


class ConfigError(EdgeError):
    """An option or combination of options that is not supported."""


class BundleError(EdgeError):
    """A bundle folder that is missing files, tampered with or of another format version."""


class OutputError(EdgeError):
    """An output path that cannot be written, or whose writing would replace something that is not ours."""


class ImageWarning(UserWarning):
    """An image that loads but not whole (e.g. only the first frame of an animation or a multi-page TIFF)."""


class ConversionError(EdgeError):
    """A conversion that finished but whose result breaks a promise of its route (e.g. float ops left in an
    int8 graph that is meant to be full-integer)."""
