"""HF BLIP-2 directory (`Salesforce/blip2-flan-t5-xxl` layout) → our naming, reading only what is needed.

Contract:
- `read_hf_blip2(directory, parts=ALL_PARTS, progress=None)` returns, in our naming and the stored
  dtype, the requested parts: "vision" (`vision_model.*` but ln_vision), "ln_vision"
  (`vision_model.post_layernorm.*`), "qformer" (`qformer.*`, `query_tokens`). The directory holds
  either `model.safetensors.index.json` (`weight_map`: key → shard file) with shards, or one
  `model.safetensors`. With an index, ONLY the shards that hold a
  needed key are opened (the T5 half is ~45 GB), and inside each shard only the needed keys are read
  (`safetensors.safe_open` + `get_tensor`).
- Keys: HF's vision_model already matches ours; `self_attn.qkv.bias` may be stored fused or (older
  transformers) as `self_attn.q_bias` + `self_attn.v_bias`: both are accepted and fused. The Q-Former's
  text-only parts (`qformer.embeddings.*`, text FFN `intermediate.*`/`output.*`) are dropped.
- Leaving "ln_vision" out skips BLIP-2's ln_vision: the Llama-2 variant never loads it (docs/numerics.md §6).
  Its eps (1e-5) is set by our model, not by this file.
- A missing directory/index/shard, a corrupt index or shard, or a directory that is not BLIP-2 raises
  `CheckpointError` (one line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..files import read_json_object
from .names import IGNORE, Rule, fuse_qkv_bias, rename
from .safe_load import load_safetensors

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Which stored keys MiniGPT-4 needs: everything else (language_model.*, language_projection.*) is skipped.
VISION_PREFIX = "vision_model."
QFORMER_PREFIX = "qformer."
QUERY_TOKENS = "query_tokens"
LN_VISION_PREFIX = "vision_model.post_layernorm."

HF_BLIP2_RULES = (
    Rule(r"(vision_model\.encoder\.layers\.\d+\.self_attn)\.(q_bias|v_bias)", r"\1.\2"),  # fused later
    Rule(r"vision_model\..+", r"\g<0>"),
    # Text-input parts some BLIP-2 variants carry; MiniGPT-4 feeds queries only (docs/numerics.md §5).
    Rule(r"qformer\.embeddings\..+", IGNORE),
    Rule(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)", IGNORE),
    Rule(r"qformer\..+", r"\g<0>"),
    Rule(r"query_tokens", "query_tokens"),
)


ALL_PARTS = ("vision", "ln_vision", "qformer")


def part_of(key: str) -> str | None:
    """Which part a stored key belongs to (None: not needed by MiniGPT-4, never read)."""
    if key.startswith(LN_VISION_PREFIX):
        return "ln_vision"
    if key.startswith(VISION_PREFIX):
        return "vision"
    if key.startswith(QFORMER_PREFIX) or key == QUERY_TOKENS:
        return "qformer"
    return None


def _check_config(root: Path, progress: Callable[[str], None] | None) -> None:
    """Refuse a directory whose config.json says it is not BLIP-2; note non-flan-t5 variants."""
    path = root / "config.json"
    if not path.is_file():
        return
    config = read_json_object(path, CheckpointError)
    model_type = config.get("model_type")
    if model_type is not None and model_type != "blip-2":
        raise CheckpointError(f"{root}: config.json says model_type {model_type!r}, expected 'blip-2'")
    text_type = (config.get("text_config") or {}).get("model_type")
    if progress and text_type not in (None, "t5"):
        progress(f"note: {root} is a BLIP-2 with a {text_type} LLM; MiniGPT-4 used the flan-t5-xxl Q-Former")


def shard_plan(root: Path, wanted: Callable[[str], bool]) -> dict[Path, list[str]]:
    """{shard file: [needed keys]} from the index (or the single file's header)."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        plan: dict[Path, list[str]] = {}
        for key, filename in weight_map.items():
            if not wanted(key):
                continue
            shard = (root / str(filename)).resolve()
            if root.resolve() not in shard.parents:
                raise CheckpointError(f"{index_path}: shard {filename!r} is outside the directory")
            plan.setdefault(shard, []).append(key)
        return plan
    single = root / SINGLE_FILE
    if single.is_file():
        from .safe_load import safetensors_shapes

        return {single: [k for k in safetensors_shapes(single) if wanted(k)]}
    raise CheckpointError(f"{root}: no {INDEX_FILE} or {SINGLE_FILE}: not an HF BLIP-2 safetensors directory")


def read_hf_blip2(
    directory: str | Path,
    parts: tuple[str, ...] = ALL_PARTS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Vision (+ Q-Former) weights of an HF BLIP-2 directory in our naming (see module docstring)."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"HF BLIP-2 directory not found: {root}")
    _check_config(root, progress)
    unknown = set(parts) - set(ALL_PARTS)
    if unknown:
        raise ValueError(f"unknown BLIP-2 parts {sorted(unknown)}")
    plan = shard_plan(root, lambda key: part_of(key) in parts)
    raw: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(plan.items()):
        if progress:
            progress(f"reading {len(keys)} tensors from {shard.name}")
        raw.update(load_safetensors(shard, keys))
    source = f"HF BLIP-2 {root}"
    out = fuse_qkv_bias(rename(raw, HF_BLIP2_RULES, source), source)
    required = {
        "vision": "vision_model.embeddings.position_embedding",
        "ln_vision": "vision_model.post_layernorm.weight",
        "qformer": QUERY_TOKENS,
    }
    for part in parts:
        if required[part] not in out:
            raise CheckpointError(f"{root}: holds no {required[part]}: not a BLIP-2 checkpoint")
    return out
