"""MiniGPT-4 projection checkpoints (`pretrained_minigpt4.pth`, `prerained_minigpt4_7b.pth`,
`pretrained_minigpt4_llama2_7b.pth`) → `llama_proj.*` (+ `ln_vision` if the file has it).

Contract:
- `convert_projection(checkpoint)` is the pure mapping: from `{"model": {...}, "optimizer": ...,
  "scaler": ..., "config": ..., ...}` (or a bare state dict) it keeps only `llama_proj.weight/bias`
  (also when saved with a DDP `module.` prefix) and, if present, `ln_vision.weight/bias` →
  `vision_model.post_layernorm.*`. Other training leftovers are ignored. LoRA tensors (a MiniGPT-v2
  checkpoint) are refused: dropping them would silently give a different model.
- `load_projection(path, expected_in=None, expected_out=None, progress=None)` reads the file safely
  and checks the shapes: a missing `llama_proj` or a Linear of the wrong size raises `CheckpointError`
  saying expected vs found and which preset the found size fits (768→4096 vicuna-7b, 768→5120
  vicuna-13b, 5632→4096 llama2-7b). Finding `ln_vision.*` is reported through `progress` (docs/numerics.md §6: the
  Llama-2 variant's ln_vision is identity unless its checkpoint carries one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .names import IGNORE, Rule, rename
from .safe_load import load_torch_checkpoint, unwrap_state_dict

if TYPE_CHECKING:
    import torch

PROJ_WEIGHT = "llama_proj.weight"
PROJ_BIAS = "llama_proj.bias"
LN_VISION = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")

PROJ_RULES = (
    Rule(r"(?:module\.)?llama_proj\.(weight|bias)", r"llama_proj.\1"),
    Rule(r"(?:module\.)?ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    Rule(r".*", IGNORE),  # optimizer-era leftovers and frozen parts MiniGPT-4 did not train
)


def presets_for_projection(in_features: int, out_features: int) -> list[str]:
    """Preset names whose llama_proj is Linear(in_features → out_features)."""
    from ..config import get_preset, preset_names

    names = []
    for name in preset_names():
        cfg = get_preset(name)
        if (cfg.projector_in_features, cfg.llm.hidden_size) == (in_features, out_features):
            names.append(name)
    return names


def convert_projection(
    checkpoint: Mapping[str, Any], source: str = "projection checkpoint"
) -> dict[str, torch.Tensor]:
    """Keep only llama_proj.* (and ln_vision.* in our naming) from a MiniGPT-4 checkpoint."""
    state = unwrap_state_dict(checkpoint, source)
    lora = [k for k in state if "lora_" in k]
    if lora:
        raise CheckpointError(
            f"{source}: holds LoRA weights ({lora[0]}): a MiniGPT-v2-style checkpoint, not a MiniGPT-4 projection"
        )
    out = rename(state, PROJ_RULES, source)
    if PROJ_WEIGHT not in out or PROJ_BIAS not in out:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{source}: no llama_proj.weight/llama_proj.bias (keys: {sample}); is this the right file?"
        )
    return out


def _fits(in_features: int, out_features: int) -> str:
    names = presets_for_projection(in_features, out_features)
    return f"; a {in_features} → {out_features} projection fits preset {' / '.join(names)}" if names else ""


def check_projection_shape(
    state: Mapping[str, torch.Tensor], expected_in: int | None, expected_out: int | None, source: str
) -> None:
    weight, bias = state[PROJ_WEIGHT], state[PROJ_BIAS]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"{source}: llama_proj has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}: not a Linear layer"
        )
    out_features, in_features = weight.shape
    want_in = in_features if expected_in is None else expected_in
    want_out = out_features if expected_out is None else expected_out
    if (in_features, out_features) != (want_in, want_out):
        raise CheckpointError(
            f"{source}: llama_proj is Linear {in_features} → {out_features}, expected {want_in} → {want_out}"
            + _fits(in_features, out_features)
        )


def load_projection(
    path: str | Path,
    expected_in: int | None = None,
    expected_out: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a MiniGPT-4 projection checkpoint: `llama_proj.*` (+ ln_vision in our naming if present)."""
    source = str(path)
    state = convert_projection(load_torch_checkpoint(path), source)
    check_projection_shape(state, expected_in, expected_out, source)
    if LN_VISION[0] in state and progress:
        progress(f"{Path(path).name} carries ln_vision weights: using them")
    return state
