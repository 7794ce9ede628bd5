"""KV-prefix reuse: how much of a new prompt a decoder's KV cache already holds (torch-free).

Contract: every position of a stitched prompt has a key — a text position's key is its token id, an
image-embedding row's key is a 16-byte blake2b digest of the row's float32 bytes (so the same image sent
again matches the cache although embeddings are arrays, and a different image never does).
- `row_digests(rows)` keys the rows of an (n, hidden) array (numpy, or anything with `.numpy()`/torch).
- `position_keys(plan, image_embeds)` keys every position of a `StitchPlan` in order.
- `common_prefix(a, b)` is the length of the longest common prefix of two key sequences.
- `PrefixCache` mirrors what one KV-cache sequence holds: `keys`, `len()`, `reusable(keys)` = how many
  leading positions to keep for a new prompt (the common prefix, but at least the last position is always
  recomputed, because its logits are needed), `keep(n)` (drop everything after position n), `extend(keys)`,
  `clear()`. Every decoder that reuses KV (llama.cpp, GPTQ, the engine's slots) keeps one per sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .stitching import StitchPlan

PositionKey = int | bytes  # a text token id, or the digest of one image-embedding row

__all__ = ["PositionKey", "PrefixCache", "common_prefix", "position_keys", "row_digests"]


def _host_float32(rows: Any) -> np.ndarray:
    if hasattr(rows, "detach"):  # torch, imported by the caller only
        rows = rows.detach().float().cpu().numpy()
    elif hasattr(rows, "numpy") and not isinstance(rows, np.ndarray):  # an ONNX Runtime OrtValue
        rows = rows.numpy()
    return np.ascontiguousarray(np.asarray(rows, dtype=np.float32))


def row_digests(rows: Any) -> list[bytes]:
    """A content key per embedding row."""
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in _host_float32(rows)]


def position_keys(plan: StitchPlan, image_embeds: Sequence[Any]) -> list[PositionKey]:
    """One key per position of the stitched sequence, in order."""
    from .stitching import plan_segments

    keys: list[PositionKey] = []
    for segment in plan_segments(plan, image_embeds):
        keys.extend(segment if isinstance(segment, list) else row_digests(segment))
    return keys


def common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """The keys of what one KV-cache sequence holds (see the module docstring)."""

    def __init__(self) -> None:
        self.keys: list[PositionKey] = []

    def __len__(self) -> int:
        return len(self.keys)

    def reusable(self, keys: Sequence[PositionKey]) -> int:
        """Leading positions of `keys` that can stay in the cache (never all of them: logits are needed)."""
        return max(0, min(common_prefix(self.keys, keys), len(keys) - 1))

    def keep(self, n: int) -> None:
        del self.keys[max(n, 0) :]

    def extend(self, keys: Iterable[PositionKey]) -> None:
        self.keys.extend(keys)

    def clear(self) -> None:
        self.keys.clear()
