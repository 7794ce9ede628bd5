"""`llama_proj`: the one trainable layer between the frozen vision side and the frozen LLM.

Contract: `project(linear, features, merge) → (B, n_img, llm_hidden)`.
- merge = 1: `features` is the Q-Former output (B, 32, 768) → Linear(768 → 4096 | 5120).
- merge = 4 (Llama-2 variant): `features` is the ViT output (B, 1 + 256, 1408); CLS is dropped and
  4 consecutive raster-order tokens are concatenated: view (B, 256/4, 1408·4) → Linear(5632 → 4096).
The Linear always runs in fp32 (autocast off), as in the original.
"""

from __future__ import annotations

import torch
from torch import nn


def merge_adjacent_tokens(vit_tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, 1 + N, D) ViT output → (B, N / merge, D · merge): drop CLS, concatenate runs of `merge`."""
    patches = vit_tokens[:, 1:, :]
    batch, n, dim = patches.shape
    if n % merge:
        raise ValueError(f"{n} patch tokens cannot be grouped in runs of {merge}")
    return patches.reshape(batch, n // merge, dim * merge)


def project(linear: nn.Linear, features: torch.Tensor, merge: int) -> torch.Tensor:
    if merge > 1:
        features = merge_adjacent_tokens(features, merge)
    with torch.autocast(device_type=features.device.type, enabled=False):
        return linear(features.to(linear.weight.dtype))
