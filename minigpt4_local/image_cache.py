"""Image-embedding cache: a second question about the same picture skips the vision encoder (torch-free).

Contract:
- `image_key(image, vision_identity) -> bytes`: a 16-byte blake2b digest of the decoded pixels (mode,
  size and pixel bytes of a PIL image, or dtype/shape/bytes of an array) and the vision model's identity
  string, so two files with the same pixels share an entry and two encoders never do.
- `vision_identity(encoder)`: a bundle's ONNX graph is named by its sha256 (the same graph in two
  processes gives the same key); any other encoder by its class and object id.
- `EmbeddingCache(max_bytes)`: thread-safe LRU of key -> embedding array, bounded by the arrays' bytes
  (`max_bytes` 0 disables it: `get` always misses, `put` keeps nothing; an array larger than the whole
  budget is not kept). `get` counts hits and misses; `stats()` -> {"entries", "bytes", "hits", "misses"}.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["EmbeddingCache", "image_key", "nbytes", "vision_identity"]


def vision_identity(encoder: Any) -> str:
    bundle, part = getattr(encoder, "bundle", None), getattr(encoder, "part", None)
    if bundle is not None and isinstance(part, dict):
        sha = bundle.files().get(part.get("file", ""), {}).get("sha256")
        if sha:
            return f"onnx:{sha}"
    return f"{type(encoder).__module__}.{type(encoder).__name__}:{id(encoder)}"


def image_key(image: Any, identity: str) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(identity.encode())
    if isinstance(image, np.ndarray):
        digest.update(f"array:{image.dtype}:{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    else:  # PIL: the decoded pixels, not the file (re-encoding or renaming does not matter)
        digest.update(f"pil:{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
    return digest.digest()


def nbytes(array: Any) -> int:
    """Bytes an embedding occupies (numpy, or torch without importing it)."""
    if hasattr(array, "nbytes"):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())


class EmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[bytes, Any] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Any | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self._misses += 1
                return None
            self._items.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: bytes, value: Any) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= nbytes(old)
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= nbytes(evicted)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "hits": self._hits,
                "misses": self._misses,
            }
