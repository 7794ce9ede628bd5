"""`image_url` values of a chat request → decoded RGB images, with an offline server's rules.

Contract: `resolve_image_url(url, label, settings)` returns a `PIL.Image.Image` (RGB, fully decoded) or
raises `APIError` 400 naming `label` (e.g. `messages[0].content[1].image_url`):
- `data:image/{png,jpeg,webp,gif};base64,...` → strict base64 → `image.decode_image_bytes` with the
  settings' byte and pixel limits and only the PNG/JPEG/WebP/GIF decoders (so a decompression bomb,
  a truncated file or non-image bytes are refused by the same checks as files on the CLI);
- `http://` / `https://` and every other scheme are refused: an offline tool fetches nothing;
- `file://PATH` and plain paths only with `settings.allow_local_files` = DIR: relative paths are taken
  inside DIR, `..` components are refused, the real path (symlinks resolved) must lie inside DIR's real
  path, and `image.load_image` then refuses anything but a regular file (FIFOs, devices, directories)
  without blocking.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..errors import ImageError
from ..image import decode_image_bytes, load_image
from .errors import invalid_request
from .settings import ServerSettings

# Media types a data: URI may declare, and the Pillow decoders that may then open its bytes.
DATA_MEDIA_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(;[\w.+-]+=[\w.+-]+)*);base64,", re.ASCII)


def resolve_image_url(url: str, label: str, settings: ServerSettings) -> Image.Image:
    if url.startswith("data:"):
        return _decode_data_uri(url, label, settings)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        raise invalid_request(
            f"{label}: remote image URLs are not fetched (this server works offline); "
            "send the image as a base64 data: URI",
            param=label,
            code="invalid_image_url",
        )
    if scheme and scheme != "file":
        raise invalid_request(
            f"{label}: unsupported image URL scheme {scheme!r}; send a base64 data: URI",
            param=label,
            code="invalid_image_url",
        )
    path = unquote(urlsplit(url).path) if scheme == "file" else url
    return _load_local(path, label, settings)


def _decode_data_uri(url: str, label: str, settings: ServerSettings) -> Image.Image:
    match = _DATA_URI.match(url)
    if match is None:
        raise invalid_request(
            f"{label}: a data: URI must look like data:image/png;base64,<data>",
            param=label,
            code="invalid_image",
        )
    media_type = match.group("type").lower()
    if media_type not in DATA_MEDIA_TYPES:
        raise invalid_request(
            f"{label}: unsupported image type {media_type!r}; send PNG, JPEG, WebP or GIF",
            param=label,
            code="invalid_image",
        )
    payload = url[match.end() :]
    # 4 base64 characters carry 3 bytes: refuse before decoding what could not fit the limit.
    if len(payload) // 4 * 3 > settings.max_image_bytes + 3:
        raise invalid_request(
            f"{label}: the image is larger than the limit of {settings.max_image_bytes} bytes",
            param=label,
            code="invalid_image",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"{label}: invalid base64 data", param=label, code="invalid_image") from None
    return _decode(
        lambda: decode_image_bytes(
            data,
            label=label,
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_image_bytes,
            formats=ALLOWED_FORMATS,
        ),
        label,
    )


def _load_local(path_text: str, label: str, settings: ServerSettings) -> Image.Image:
    root = settings.allow_local_files
    if root is None:
        raise invalid_request(
            f"{label}: local files are not served (start the server with --allow-local-files DIR); "
            "send the image as a base64 data: URI",
            param=label,
            code="invalid_image_url",
        )
    if not path_text or "\x00" in path_text:
        raise invalid_request(f"{label}: empty or invalid file path", param=label, code="invalid_image_url")
    candidate = Path(path_text)
    if ".." in candidate.parts:
        raise invalid_request(
            f"{label}: '..' is not allowed in file paths", param=label, code="invalid_image_url"
        )
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(candidate if candidate.is_absolute() else real_root / candidate))
    if real != real_root and real_root not in real.parents:
        raise invalid_request(
            f"{label}: the file is outside the directory allowed by --allow-local-files",
            param=label,
            code="invalid_image_url",
        )
    return _decode(
        lambda: load_image(
            real, max_pixels=settings.max_image_pixels, max_file_bytes=settings.max_image_bytes
        ),
        label,
    )


def _decode(load: Callable[[], Image.Image], label: str) -> Image.Image:
    try:
        return load()
    except ImageError as err:
        raise invalid_request(str(err), param=label, code="invalid_image") from None


__all__ = ["ALLOWED_FORMATS", "DATA_MEDIA_TYPES", "resolve_image_url"]
