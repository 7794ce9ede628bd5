"""Process-group setup for `torchrun` (one process per GPU, any number of nodes) and single-process runs.

Contract:
- `setup(device="auto") -> DistContext`: reads torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (absent: a
  single process); picks the device (`auto`: `cuda:LOCAL_RANK` when CUDA is available, else CPU) and the
  backend (NCCL on CUDA, gloo on CPU); initialises the default process group from the environment
  (`MASTER_ADDR`/`MASTER_PORT`) when the world has more than one process.
- `DistContext` offers `is_main` (rank 0: the only process that writes checkpoints and logs),
  `barrier()`, `sum(values)` (all-reduce of a few floats, in float64), `gather(obj)` (every rank's
  picklable object, on every rank) and `close()`. All are no-ops for a single process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from minigpt4_local.devices import resolve_device
from minigpt4_local.errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        if not self.distributed:
            return [float(v) for v in values]
        # gloo reduces CPU tensors, NCCL device tensors.
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_(self, tensor: torch.Tensor) -> None:
        if self.distributed:
            dist.broadcast(tensor, src=0)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str = "auto") -> DistContext:
    """Join torchrun's process group (or run alone); see module docstring."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    chosen = torch.device(resolve_device(device, local_rank))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if world <= 1:
        return DistContext(0, 1, 0, chosen, None)
    owns = False
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(
                    f"WORLD_SIZE={world} but {key} is not set: start multi-process runs with torchrun"
                )
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
        if backend == "nccl":
            kwargs["device_id"] = chosen
        dist.init_process_group(**kwargs)
        owns = True
    return DistContext(rank, world, local_rank, chosen, backend, owns_group=owns)
