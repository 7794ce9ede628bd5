"""Helpers that write odd, valid and bad image files for tests (numpy + Pillow only).

Contract: every `write_*` function writes one file at the given path and returns that path; none of
them decodes or allocates a full-size image, so the "bomb" files are cheap to make. Shared by the
image-loading tests and the CLI tests.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


def gradient_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with smooth gradients plus noise (exercises the resize filter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    noisy = base + rng.normal(0, 20, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), mode="RGB")


def write_image(path: Path, image: Image.Image, fmt: str | None = None, **save_kwargs) -> Path:
    image.save(path, format=fmt, **save_kwargs)
    return path


def write_exif_rotated_jpeg(path: Path, width: int, height: int, orientation: int = 6) -> Path:
    """A JPEG of stored size width x height whose EXIF says to rotate it (6 = 90° clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    gradient_rgb(width, height).save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return path


def write_gray16_png(path: Path, width: int, height: int, value: int) -> Path:
    """A 16-bit grayscale PNG (Pillow mode I;16) filled with `value` (0..65535)."""
    Image.fromarray(np.full((height, width), value, dtype=np.uint16)).save(path, format="PNG")
    return path


def write_animated_gif(path: Path, width: int, height: int, colors: list[tuple[int, int, int]]) -> Path:
    """An animated GIF with one solid frame per colour (frame 0 = colors[0])."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: Path, width: int, height: int) -> Path:
    """A real, valid 1-bit grayscale PNG of width x height, all black, streamed without a full buffer.

    A 20000 x 20000 image is ~50 MB raw but compresses to ~50 kB; nothing here holds it decoded.
    """
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = max(1, 4_000_000 // len(row))
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(_png_chunk(b"IHDR", ihdr))
        fh.write(_png_chunk(b"IDAT", b"".join(parts)))
        fh.write(_png_chunk(b"IEND", b""))
    return path


def write_truncated(path: Path, fmt: str = "PNG", keep: float = 0.6, size: int = 64) -> Path:
    """A noisy image in `fmt` cut to the first `keep` fraction of its bytes."""
    full = path.with_name(path.name + ".full")
    gradient_rgb(size, size, seed=1).save(full, format=fmt)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def write_text_file(path: Path, text: str = "this is not an image\n") -> Path:
    path.write_text(text)
    return path
