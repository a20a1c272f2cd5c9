"""Image loading and validation. Returns BGR uint8 (H, W, 3) arrays, the contract's channel order.

Bad files raise `ImageError` with one line naming the problem, never a decoder traceback.
"""
from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edge.errors import ImageError, ImageWarning
from edge.outputs import IMAGE_SUFFIXES, display

# Decompression-bomb guard: images declaring more pixels than this are refused before decoding.
MAX_PIXELS = 64_000_000


def _to_rgb(img, name: str):
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: floating-point image holds NaN or Inf")
        a = np.clip(a * (255.0 if a.max(initial=0) <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # composite over black would darken faces at soft edges; over white is the usual viewer choice
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    raise ImageError(f"{name}: unsupported image mode {mode!r}")


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file -> BGR uint8 (H, W, 3). Applies EXIF orientation; converts grayscale,
    16-bit, palette, CMYK and alpha images to 8-bit BGR."""

    path = Path(path)
    name = display(path.name)
    check_image_file(path)
    frames = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data": the pixels decide
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageError(f"{name}: image has zero size ({w}x{h})")
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {MAX_PIXELS:,}")
                frames = int(getattr(img, "n_frames", 1) or 1)
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: declared size exceeds the limit of {MAX_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{name}: truncated or corrupt image ({msg[:160]})") from None
    except Exception as e:  # noqa: BLE001 - decoders raise other types on malformed files
        # found by fuzzing: Pillow 13's TIFF plugin raises TypeError on a rational strip offset
        raise ImageError(f"{name}: corrupt image ({type(e).__name__} in the decoder: {str(e)[:120]})") from None
    if frames > 1:
        warnings.warn(f"{name}: holds {frames} frames (an animation or a multi-page file); only the first is used", ImageWarning,
                      stacklevel=2)
    arr = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(arr[..., ::-1])


def check_image_file(path: Path) -> None:
    """Say what is wrong with a path before any decoder sees it: missing, a broken or looping link, a folder,
    a pipe or device, unreadable, empty. Raises ImageError naming the file."""
    shown = display(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError(f"{shown}: a broken symbolic link (its target {display(os.readlink(path))} does not exist)") from None
        raise ImageError(f"{shown}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{shown}: a symbolic link loop (the link resolves to itself)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ImageError(f"{shown}: permission denied (a folder on the way cannot be entered)") from None
        raise ImageError(f"{shown}: cannot be read ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{shown}: is a folder, not an image")
    if stat.S_ISFIFO(st.st_mode):
        raise ImageError(f"{shown}: a pipe, not an image file (save the stream to a file and pass that)")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        raise ImageError(f"{shown}: a device, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{shown}: not a regular file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise ImageError(f"{shown}: permission denied (the file is not readable by this user)") from None
    except OSError as e:
        raise ImageError(f"{shown}: cannot be opened ({e.strerror or type(e).__name__})") from None
    if st.st_size == 0:
        raise ImageError(f"{display(path.name)}: empty file (0 bytes)")


def check_image_array(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an in-memory image -> BGR uint8 (H, W, 3).

    Accepts uint8 (H, W), (H, W, 1), (H, W, 3) (taken as BGR) or (H, W, 4) (BGRA, alpha dropped),
    and float arrays with finite values in [0, 255]. Anything else raises ImageError.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3):
        raise ImageError(f"{name}: expected rank 2 (H, W) or 3 (H, W, C), got shape {image.shape}")
    if image.size == 0 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"{name}: empty array of shape {image.shape}")
    if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected 1, 3 or 4 channels, got {image.shape[2]} (shape {image.shape})")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {image.shape[1]}x{image.shape[0]} exceeds the limit of {MAX_PIXELS:,} pixels")
    if image.dtype == np.uint8:
        a = image
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageError(f"{name}: array holds NaN or Inf")
        if image.min() < 0 or image.max() > 255:
            raise ImageError(f"{name}: float values must lie in [0, 255], got [{image.min():.3g}, {image.max():.3g}]")
        a = (image + 0.5).astype(np.uint8)
    else:
        raise ImageError(f"{name}: unsupported dtype {image.dtype} (use uint8, or float in [0, 255])")
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a)



def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively, by suffix), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
