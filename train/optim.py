"""Optimizer and learning-rate schedule of the original (LAVIS `linear_warmup_cosine_lr`), docs/numerics.md §14.

Contract:
- `lr_at(step, optim, total_steps)`: for `step < warmup_steps`
  `min(init_lr, warmup_lr + (init_lr - warmup_lr) · step / max(warmup_steps, 1))`; afterwards the cosine
  over the *global* step, `min_lr + (init_lr - min_lr) · ½ · (1 + cos(π · step / total_steps))` (so the
  cosine does not restart at the end of warm-up: with the stage-1 recipe the lr is 1e-4 at step 4999 and
  ≈ 9.71e-5 at step 5000, as in the original). The rate for optimizer step `step` (0-based) is set
  before that step. The original counts warm-up within the first epoch; with every shipped recipe
  (warmup_steps ≤ iters_per_epoch) this is the same.
- `param_groups(named_parameters, weight_decay)`: AdamW groups; weight decay only on parameters with
  two or more dimensions (weights, query tokens), none on biases and norm scales.
- `build_optimizer(named_parameters, optim)`: `torch.optim.AdamW(groups, lr=init_lr, betas=(beta1, beta2))`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimSection


def lr_at(step: int, optim: OptimSection, total_steps: int) -> float:
    if step < optim.warmup_steps:
        ramp = optim.warmup_lr + (optim.init_lr - optim.warmup_lr) * step / max(optim.warmup_steps, 1)
        return min(optim.init_lr, ramp)
    cosine = 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))
    return (optim.init_lr - optim.min_lr) * cosine + optim.min_lr


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, param in named:
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    named: Iterable[tuple[str, torch.nn.Parameter]], optim: OptimSection
) -> torch.optim.AdamW:
    groups = param_groups(named, optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.init_lr, betas=(optim.beta1, optim.beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
