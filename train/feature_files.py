"""Reading one stage-1 feature-cache file (safetensors: `features` + JSON `keys`/`captions` metadata).

Contract: `read_cache_file(path) -> (tensors as numpy, metadata)` reads any cache file;
`read_shard_cache(path) -> (keys, raw captions, features (n, ...) float32 numpy)`; an unreadable,
truncated or foreign file raises `ConfigError` naming it. Writing and the cache's manifest live in
`features.py`; this module depends on neither it nor `data.py`, so both can import it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4_local.errors import ConfigError


def _as_numpy(tensor: Any) -> np.ndarray:
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def read_cache_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {k: _as_numpy(handle.get_tensor(k)) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # truncated / foreign file
        raise ConfigError(
            f"feature cache file {path} is unreadable ({type(exc).__name__}); delete it"
        ) from None
    return tensors, meta


def read_shard_cache(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(keys, raw captions, features (n, …) float32) of one stage-1 cache file."""
    tensors, meta = read_cache_file(path)
    return json.loads(meta["keys"]), json.loads(meta["captions"]), tensors["features"]
