"""Torch-free, streaming reader for (sharded) safetensors checkpoints.

Contract: `SafetensorsIndex(model_dir)` lists every tensor of an HF checkpoint directory
(`model.safetensors`, or the shards named by `model.safetensors.index.json`, or any `*.safetensors`)
from the file headers only. `shape(name)` / `dtype(name)` answer without reading data;
`load_f32(name)` memory-maps that one tensor and returns it as float32 (F32, F16 and BF16 sources).
At most one tensor is materialised at a time, so a 7B/13B checkpoint never needs to fit in RAM.

Why not `safetensors.safe_open(framework="np")`: numpy has no bfloat16, so that API refuses BF16
tensors (SmolLM2, many Llama-2 repacks); the format is a JSON header plus raw little-endian bytes,
which numpy reads directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from minigpt4_local.errors import CheckpointError

# safetensors dtype tag -> numpy dtype of the stored bytes (BF16 is read as raw uint16 bits).
_STORED_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header size


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _Entry:
    __slots__ = ("dtype", "end", "path", "shape", "start")

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], start: int, end: int) -> None:
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end


def _read_header(path: Path) -> tuple[dict, int]:
    """Returns (header dict, byte offset where tensor data starts)."""
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    return header, 8 + n


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: malformed index ({err})") from None
        return [model_dir / name for name in dict.fromkeys(weight_map.values())]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(
            f"{model_dir}: no *.safetensors weights found (convert .bin checkpoints with the checkpoint tools first)"
        )
    return found


class SafetensorsIndex:
    """Header-only view of every tensor in an HF checkpoint directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.entries: dict[str, _Entry] = {}
        for path in _shard_files(self.model_dir):
            if not path.is_file():
                raise CheckpointError(f"{path}: shard named in the index is missing")
            header, data_start = _read_header(path)
            size = path.stat().st_size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = (data_start + int(o) for o in info["data_offsets"])
                if end > size:
                    raise CheckpointError(f"{path}: truncated (tensor {name} ends past the end of the file)")
                self.entries[name] = _Entry(
                    path, info["dtype"], tuple(int(d) for d in info["shape"]), start, end
                )

    def names(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def load_f32(self, name: str) -> np.ndarray:
        """The tensor as a float32 array of its stored shape (a fresh array, not a view of the file)."""
        e = self.entries[name]
        stored = _STORED_DTYPES.get(e.dtype)
        if stored is None:
            raise CheckpointError(f"{e.path}: tensor {name} has unsupported dtype {e.dtype}")
        count = int(np.prod(e.shape)) if e.shape else 1
        if count * stored.itemsize != e.end - e.start:
            raise CheckpointError(
                f"{e.path}: tensor {name} has {e.end - e.start} bytes, expected {count * stored.itemsize}"
            )
        raw = np.memmap(e.path, dtype=stored, mode="r", offset=e.start, shape=(count,))
        flat = bf16_bits_to_f32(raw) if e.dtype == "BF16" else raw.astype(np.float32)
        del raw  # drop the mapping now: only one tensor is resident at a time
        return flat.reshape(e.shape)
