"""Image loading and preprocessing (torch-free: numpy + Pillow only).

Contract:
- `load_image(path)` returns a fully decoded RGB `PIL.Image.Image` with its EXIF orientation applied
  (animated files: the first frame). Every bad input (missing, a directory, a FIFO/device/socket,
  empty, not an image, truncated, too many pixels, too many bytes, unreadable) raises
  `minigpt4_local.errors.ImageError` with one line naming the path and the problem; it never hangs
  (the path is `stat`-ed and opened non-blocking before anything reads it) and never decodes a
  half image (Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` is left at its default, False).
- `decode_image_bytes(data, label=...)` is the same decoder for an encoded image already in memory (an
  HTTP upload, a webdataset member, a Parquet cell): the same size, pixel-count (decompression bomb) and
  truncation checks, the same RGB result; `formats` limits which Pillow decoders may open it; errors name
  `label` instead of a path. `check_encoded_size(label, size, limit)` is its size check alone (for a
  reader that knows the size before it reads the bytes).
- `preprocess(images, image_size)` does what the original does (docs/numerics.md §2): `.convert("RGB")`,
  PIL bicubic resize (antialiased) to (S, S), /255, `(x - mean) / std`, all in float32 like
  torchvision's `ToTensor` + `Normalize`. It returns a C-contiguous float32 array (B, 3, S, S).
- `expand_image_inputs(inputs)` turns files, folders (non-recursive) and glob patterns into a list
  of paths; `is_image_path(path)` is the extension test used for folders and globs.
"""

from __future__ import annotations

import glob
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from .config import CLIP_MEAN, CLIP_STD
from .errors import ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_encoded_size",
    "decode_image_bytes",
    "expand_image_inputs",
    "is_image_path",
    "load_and_preprocess",
    "load_image",
    "preprocess",
]

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 200 * 2**20

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# os.stat file kinds that are not regular files, named for the error message.
_FILE_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)

# O_NONBLOCK makes opening a FIFO that appeared after the stat() return at once instead of waiting
# for a writer; it has no effect on regular files. Windows has neither flag nor FIFOs.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _fail(path: str | os.PathLike, problem: str) -> ImageError:
    return ImageError(f"cannot load image {os.fspath(path)}: {problem}")


# ---------------------------------------------------------------------------------------------
# Colour modes Pillow cannot turn into RGB faithfully with a plain .convert("RGB").
# Pillow clips 16/32-bit integer and float pixels to 0..255 instead of scaling them, which turns a
# 16-bit mid-gray into white, so these go through numpy.
# ---------------------------------------------------------------------------------------------


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """(H, W) float in [0, 255] -> RGB image."""
    gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(gray8, mode="L").convert("RGB")


def _scale_to_8bit(values: np.ndarray, ranges: Sequence[float]) -> np.ndarray:
    """Map (H, W) values to [0, 255] using the first nominal range [0, top] that holds them all.

    Mode I and F carry no bit depth, so the range is inferred; values outside every nominal range
    (negative, or above the last top) are min-max stretched.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo >= 0:
        for top in ranges:
            if hi <= top:
                return values * (255.0 / top)
    span = hi - lo
    return (values - lo) * (255.0 / span) if span > 0 else np.zeros_like(values)


def _from_uint16(im: Image.Image) -> Image.Image:
    # 0..65535 -> 0..255 exactly (65535 / 257 == 255).
    return _gray_to_rgb(np.asarray(im).astype(np.float64) / 257.0)


def _from_int32(im: Image.Image) -> Image.Image:
    return _gray_to_rgb(_scale_to_8bit(np.asarray(im), (255.0, 65535.0)))


def _from_float32(im: Image.Image) -> Image.Image:
    return _gray_to_rgb(_scale_to_8bit(np.asarray(im), (1.0, 255.0, 65535.0)))


_WIDE_MODE_TO_RGB: dict[str, Callable[[Image.Image], Image.Image]] = {
    "I;16": _from_uint16,
    "I;16L": _from_uint16,
    "I;16B": _from_uint16,
    "I;16N": _from_uint16,
    "I": _from_int32,
    "F": _from_float32,
}


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Alpha is dropped (not composited), exactly like the original's
    plain `.convert("RGB")`; wide integer/float modes are scaled, not clipped."""
    if im.mode == "RGB":
        return im
    convert = _WIDE_MODE_TO_RGB.get(im.mode)
    if convert is not None:
        return convert(im)
    with warnings.catch_warnings():
        # Pillow advises RGBA for palette images with byte transparency; dropping alpha is intended.
        warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
        return im.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def check_encoded_size(path: str | os.PathLike, size: int, max_file_bytes: int) -> None:
    """ImageError unless an encoded image of `size` bytes is non-empty and within `max_file_bytes`."""
    if size == 0:
        raise _fail(path, "the file is empty")
    if size > max_file_bytes:
        raise _fail(path, f"the file is {size} bytes, more than the limit of {max_file_bytes} bytes")


def _check_regular_file(path: str | os.PathLike, st: os.stat_result, max_file_bytes: int) -> None:
    for is_kind, kind in _FILE_KINDS:
        if is_kind(st.st_mode):
            raise _fail(path, f"it is {kind}, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, "it is not a regular file")
    check_encoded_size(path, st.st_size, max_file_bytes)


def _os_problem(err: OSError) -> str:
    problems = {PermissionError: "permission denied", FileNotFoundError: "no such file"}
    for kind, problem in problems.items():
        if isinstance(err, kind):
            return problem
    return err.strerror or str(err)


def _open_checked(path: str | os.PathLike, max_file_bytes: int) -> int:
    """stat() then open() without ever blocking; returns a file descriptor of a regular file."""
    try:
        _check_regular_file(path, os.stat(path), max_file_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        raise _fail(path, _os_problem(err)) from None
    except ValueError as err:  # e.g. an embedded NUL byte in the path
        raise _fail(path, str(err)) from None
    try:
        # The path may have been swapped between stat() and open(): check what was really opened.
        _check_regular_file(path, os.fstat(fd), max_file_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _decode(
    fh: BinaryIO, path: str | os.PathLike, max_pixels: int, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open, check the declared size, decode frame 0, apply EXIF orientation, convert to RGB."""
    with warnings.catch_warnings():
        # Our own max_pixels check below replaces Pillow's bomb warning; its hard error (twice
        # Image.MAX_IMAGE_PIXELS) still fires and is reported as a bomb.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(fh, formats=list(formats) if formats is not None else None)
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise _fail(
                path,
                f"it declares {width}x{height} = {width * height} pixels, more than the limit of "
                f"{max_pixels} (a decompression bomb or a very large image)",
            )
        im.load()  # raises on truncated data because LOAD_TRUNCATED_IMAGES is False
        return _to_rgb(ImageOps.exif_transpose(im))


def _decode_problem(err: Exception) -> str:
    problems: dict[type[BaseException], str] = {
        Image.DecompressionBombError: "it declares too many pixels (a decompression bomb)",
        Image.UnidentifiedImageError: "not an image file Pillow can read",
        MemoryError: "not enough memory to decode it",
    }
    for kind, problem in problems.items():
        if isinstance(err, kind):
            return problem
    detail = " ".join(str(err).split()) or type(err).__name__
    return f"corrupt or truncated image ({detail})"


def load_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Image.Image:
    """Load `path` as a fully decoded RGB image (EXIF orientation applied, first frame if animated).

    Alpha is dropped, not composited onto a background: the original MiniGPT-4 does a plain
    `.convert("RGB")`, which keeps the colour channels of transparent pixels. 16-bit grayscale is
    scaled to 8 bit (v / 257); 32-bit I and F modes are scaled from the smallest nominal range that
    holds their values (F: [0, 1], [0, 255], [0, 65535]; I: [0, 255], [0, 65535]), else min-max.
    Images whose header declares more than `max_pixels` pixels are rejected before decoding
    (Pillow's own hard limit, 2 * `Image.MAX_IMAGE_PIXELS`, also applies). Raises `ImageError`.
    """
    fd = _open_checked(path, max_file_bytes)
    with os.fdopen(fd, "rb") as fh:
        return _decode_checked(fh, path, max_pixels)


def _decode_checked(
    fh: BinaryIO, label: str | os.PathLike, max_pixels: int, formats: Sequence[str] | None = None
) -> Image.Image:
    try:
        return _decode(fh, label, max_pixels, formats)
    except ImageError:
        raise
    except Exception as err:  # untrusted input: any decoder failure is the file's fault
        raise _fail(label, _decode_problem(err)) from None


def decode_image_bytes(
    data: bytes | bytearray | memoryview,
    *,
    label: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    formats: Sequence[str] | None = None,
) -> Image.Image:
    """`load_image` for bytes in memory: the same checks and result; `label` names the input in errors.

    `formats` (Pillow format names such as "PNG", "JPEG") restricts the decoders tried; bytes of any
    other format are refused as not an image. Raises `ImageError`.
    """
    check_encoded_size(label, len(data), max_bytes)
    return _decode_checked(BytesIO(data), label, max_pixels, formats)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _normalise_one(image: Image.Image, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """PIL image -> (3, S, S) float32, the original's Resize(bicubic) + ToTensor + Normalize."""
    resized = _to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
    hwc = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3) in [0, 1]
    return ((hwc - mean) / std).transpose(2, 0, 1)  # (3, S, S)


def preprocess(
    images: Sequence[Image.Image],
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> np.ndarray:
    """Images -> normalised pixels, float32 (B, 3, S, S), C-contiguous, RGB channel order."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3)
    std32 = np.asarray(std, dtype=np.float32).reshape(3)
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)  # (B, 3, S, S)
    for i, image in enumerate(images):
        out[i] = _normalise_one(image, image_size, mean32, std32)
    return out


def load_and_preprocess(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> np.ndarray:
    """`load_image` each path, then `preprocess`: float32 (B, 3, S, S)."""
    images = [load_image(p, max_pixels=max_pixels, max_file_bytes=max_file_bytes) for p in paths]
    return preprocess(images, image_size, mean, std)


# ---------------------------------------------------------------------------------------------
# Input expansion (files, folders, globs)
# ---------------------------------------------------------------------------------------------


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in a known image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _folder_images(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise ImageError(f"cannot list image folder {folder}: {_os_problem(err)}") from None
    found = [p for p in entries if is_image_path(p) and p.is_file()]
    if not found:
        raise ImageError(f"image folder {folder} has no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return found


def _glob_images(pattern: str) -> list[Path]:
    found = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
    found = [p for p in found if is_image_path(p) and p.is_file()]
    if not found:
        raise ImageError(f"image pattern {pattern} matched no image files")
    return found


def _expand_one(text: str) -> list[Path]:
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_images(path)
    if path.exists() or path.is_symlink() or not _has_glob_magic(text):
        # An explicitly named file is taken as is, whatever its extension; load_image judges it.
        return [path]
    return _glob_images(str(path))


def expand_image_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, folders (their image files, sorted, non-recursive) and glob patterns (sorted) ->
    paths, in input order. A folder without images or a pattern matching none raises ImageError;
    a plain path that does not exist is returned as is (load_image reports it)."""
    return [p for item in inputs for p in _expand_one(os.fspath(item))]
