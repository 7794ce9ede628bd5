"""Choosing the torch device and precision: one place for every torch path (torch imported lazily).

Contract:
- `resolve_device(requested=None, local_rank=None) -> str`: None or "auto" → "cuda" when torch sees a GPU
  (with `local_rank`, "cuda:{local_rank}", one GPU per distributed process), else "cpu"; a bare "cuda"
  with `local_rank` gets that index; a CUDA device on a machine where torch sees none is a one-line
  `DependencyError` (install a CUDA build of torch, or choose cpu).
- `default_precision(device) -> "fp16" | "fp32"`: fp16 on CUDA (the original's layout), fp32 elsewhere.
- `torch_dtype(name)` maps "fp32" | "fp16" | "bf16" to the torch dtype.
"""

from __future__ import annotations

from typing import Any

from .errors import DependencyError

PRECISIONS = ("fp32", "fp16", "bf16")

__all__ = ["PRECISIONS", "default_precision", "resolve_device", "torch_dtype"]


def resolve_device(requested: str | None = None, local_rank: int | None = None) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested in (None, "", "auto"):
        if not has_cuda:
            return "cpu"
        return "cuda" if local_rank is None else f"cuda:{local_rank}"
    assert requested is not None
    if requested.startswith("cuda"):
        if not has_cuda:
            raise DependencyError(
                f"device {requested} asked for, but this PyTorch sees no CUDA GPU "
                "(install a CUDA build of torch, or use --device cpu)"
            )
        if requested == "cuda" and local_rank is not None:
            return f"cuda:{local_rank}"
    return requested


def default_precision(device: str) -> str:
    return "fp16" if device.startswith("cuda") else "fp32"


def torch_dtype(name: str) -> Any:
    import torch

    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
