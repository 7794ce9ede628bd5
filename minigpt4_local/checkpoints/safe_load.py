"""Safe readers and writers for checkpoint files (never plain pickle).

Contract:
- `load_torch_checkpoint(path)` reads a `.pth`/`.bin` with `torch.load(weights_only=True,
  map_location="cpu")`, memory-mapped (`mmap=True`) when the file is a zip-format checkpoint, so a
  multi-GB file is not copied into RAM up front. It returns whatever the file holds (a state dict or a
  dict with a `model` entry, ...).
- `load_safetensors(path, keys=None)` returns all tensors of a `.safetensors` file, or only `keys`
  (read one by one through `safetensors.safe_open`, so the rest of the file is never read).
- `safetensors_shapes(path)` returns `{key: shape}` from the header only (no tensor data read).
- `save_safetensors(tensors, path)` writes tensors (made contiguous, shared storage split) atomically
  enough for our callers: to `path` directly; callers write into temporary directories.
- `unwrap_state_dict(obj)` returns the tensor mapping of a checkpoint: the object itself, or its
  `model` / `state_dict` entry.
Every failure (missing file, directory, truncated or corrupt file, a pickle that would need arbitrary
code to load) raises `CheckpointError` with one line naming the file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Wrapper keys under which training frameworks store the weights, tried in this order.
_STATE_DICT_ENTRIES = ("model", "state_dict", "module")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")


def _refused_global(message: str) -> str:
    """The 'GLOBAL module.name' torch names when weights_only refuses a pickle (for the one-line error)."""
    match = re.search(r"GLOBAL\s+([\w.]+)", message)
    return match.group(1) if match else "an object that is not plain tensors/containers"


def load_torch_checkpoint(path: str | Path) -> Any:
    """Load a PyTorch checkpoint safely (weights_only) on CPU; mmap when the zip format allows it."""
    import pickle

    import torch

    path = Path(path)
    _check_file(path)
    # mmap needs the zip container (torch >= 1.6 format); legacy files are loaded normally.
    use_mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs code execution ({_refused_global(str(exc))}); "
            "only plain weight files are accepted"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}"
        ) from None


def unwrap_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint: the object itself or its model/state_dict entry."""
    import torch

    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for entry in _STATE_DICT_ENTRIES:
        inner = obj.get(entry)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})")
    return tensors


def _safetensors_error(path: Path, exc: Exception) -> CheckpointError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {first}")


def load_safetensors(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or only `keys` (the others are never read)."""
    import safetensors  # attribute lookup at call time: tests spy on safetensors.safe_open

    path = Path(path)
    _check_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            available = set(handle.keys())
            wanted = list(available) if keys is None else list(keys)
            missing = [k for k in wanted if k not in available]
            if missing:
                raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:3])}")
            return {k: handle.get_tensor(k) for k in wanted}
    except CheckpointError:
        raise
    except Exception as exc:  # SafetensorError is not importable as a stable public name
        raise _safetensors_error(path, exc) from None


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """`{key: shape}` read from the file header only."""
    import safetensors

    path = Path(path)
    _check_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:
        raise _safetensors_error(path, exc) from None


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` as safetensors; tensors sharing storage (tied or mmap views) are copied apart."""
    import torch
    from safetensors.torch import save_file

    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    save_file(out, str(path), metadata=metadata or {"format": "pt"})
