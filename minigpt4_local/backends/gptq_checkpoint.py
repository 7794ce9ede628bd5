"""A GPTQ checkpoint directory (`llm-gptq/`), read and checked without torch.

Contract: `read_gptq_dir(path, llm=None) -> GptqInfo` reads `config.json` and the GPTQ settings
(`quantize_config.json`, or `quantization_config` inside `config.json`), refuses anything that is not a
GPTQ checkpoint, and — given the bundle's `LLMConfig` — refuses a checkpoint whose hidden size, layers,
heads, KV heads, FFN width or vocabulary differ (`check_dims`; `ModelDirError`, one line). `GPTQ_PART` /
`GPTQ_DIR` name the bundle part and its directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import LLMConfig
from ..errors import ModelDirError
from ..files import read_json_object

__all__ = ["GPTQ_DIR", "GPTQ_PART", "QUANTIZE_CONFIG", "GptqInfo", "check_dims", "read_gptq_dir"]

GPTQ_PART = "llm_gptq"  # bundle part name; its directory is `llm-gptq/`
GPTQ_DIR = "llm-gptq"
QUANTIZE_CONFIG = "quantize_config.json"

# User-facing kernel name → GPTQModel BACKEND value.

# HF config key → (our LLMConfig field, what to call it in a message).
_DIM_KEYS: dict[str, tuple[str, str]] = {
    "hidden_size": ("hidden_size", "hidden size"),
    "num_hidden_layers": ("num_layers", "layers"),
    "num_attention_heads": ("num_heads", "attention heads"),
    "num_key_value_heads": ("num_kv_heads", "KV heads"),
    "intermediate_size": ("intermediate_size", "FFN width"),
    "vocab_size": ("vocab_size", "vocabulary rows"),
}


@dataclass(frozen=True)
class GptqInfo:
    path: Path
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    dims: dict[str, int]  # HF config names: hidden_size, num_hidden_layers, vocab_size, …


def _gptq_json(path: Path) -> dict[str, Any]:
    hint = f"{path.parent}: missing {path.name}; is this a GPTQ checkpoint (llm-gptq/)?"
    return read_json_object(path, ModelDirError, missing=hint)


def _quant_settings(root: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """GPTQModel writes quantize_config.json; transformers/optimum keep it in config.json."""
    if (root / QUANTIZE_CONFIG).is_file():
        return _gptq_json(root / QUANTIZE_CONFIG)
    inline = hf_config.get("quantization_config")
    if isinstance(inline, dict):
        return inline
    raise ModelDirError(f"{root}: no {QUANTIZE_CONFIG} and no quantization_config: not a GPTQ checkpoint")


def read_gptq_dir(path: str | os.PathLike, llm: LLMConfig | None = None) -> GptqInfo:
    """Read and check a GPTQ checkpoint directory (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"GPTQ checkpoint not found: {root} is not a directory")
    hf = _gptq_json(root / "config.json")
    quant = _quant_settings(root, hf)
    method = str(quant.get("quant_method", quant.get("method", ""))).lower()
    if method != "gptq":
        raise ModelDirError(f"{root}: quantization method is {method or 'unknown'!r}, expected 'gptq'")
    try:
        bits, group = int(quant["bits"]), int(quant.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise ModelDirError(f"{root}: the GPTQ settings lack a valid 'bits'") from None
    dims = {k: int(hf[k]) for k in _DIM_KEYS if isinstance(hf.get(k), int)}
    dims.setdefault("num_key_value_heads", dims.get("num_attention_heads", 0))
    info = GptqInfo(root, bits, group, bool(quant.get("desc_act", False)), bool(quant.get("sym", True)), dims)
    if llm is not None:
        check_dims(info, llm)
    return info


def check_dims(info: GptqInfo, llm: LLMConfig) -> None:
    """Refuse a checkpoint whose shape differs from the bundle's language model."""
    for hf_key, (ours, what) in _DIM_KEYS.items():
        want = getattr(llm, ours)
        got = info.dims.get(hf_key)
        if got != want:
            raise ModelDirError(
                f"{info.path}: {what} {got} != the bundle architecture's {want} "
                f"(llm.{ours}): this GPTQ checkpoint belongs to another model (mismatched dims)"
            )
