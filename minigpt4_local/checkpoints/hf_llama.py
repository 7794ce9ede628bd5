"""HF LLaMA / Vicuna / Llama-2 directories: validation, dimensions, and a clean safetensors copy.

Contract:
- `read_llm_dims(directory) -> LLMDims` validates an HF LLaMA directory without loading weights:
  `config.json` (model_type llama), weights as safetensors (`model.safetensors[.index.json]`) or
  PyTorch (`pytorch_model[.bin.index.json|.bin]`, read with `weights_only=True`), every tensor a
  LlamaForCausalLM needs (old `rotary_emb.inv_freq` buffers are tolerated and dropped) and a tokenizer
  (`tokenizer.model` or `tokenizer.json`). Dimensions come from tensor SHAPES (hidden, layers, vocab =
  embedding rows, FFN width, kv heads) and from config.json (heads, eps, rope theta); config.json values
  that contradict the shapes raise `CheckpointError`. bos/eos are the TOKENIZER's ids.
- `llm_config_from_hf(config) -> LLMConfig` is the one mapping of HF `config.json` keys (and their
  older spellings and defaults) to `LLMConfig`; `read_llm_dims` reads config.json through it.
  `read_llm_config(directory) -> LLMConfig`: a directory with weights goes through `read_llm_dims`
  (validated against the tensors and the tokenizer), one with only `config.json` through
  `llm_config_from_hf`.
- Vicuna v0 quirks handled: 32001 embedding rows for 32000 tokenizer pieces is accepted (rows may
  exceed pieces, see `tokenizer.check_vocab`); its config/generation_config say bos 0 / eos 1 while the
  tokenizer says 1 / 2, so `fixed_config()` / `fixed_generation_config()` put the tokenizer's ids in
  (pad ids outside the vocabulary are removed, the old `LLaMAForCausalLM` architecture name fixed).
- `copy_llm_dir(src, dst, progress=None) -> LLMDims` writes a clean HF directory at `dst` (which must
  not exist or be empty): safetensors shards (one per source shard, streamed shard by shard: a 7B/13B
  model is never instantiated), `model.safetensors.index.json` when sharded, the fixed `config.json`
  and `generation_config.json`, and the tokenizer files. Tensors keep their stored dtype.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..files import read_json_object
from .names import IGNORE, Rule, count_layers, rename
from .safe_load import (
    load_safetensors,
    load_torch_checkpoint,
    safetensors_shapes,
    save_safetensors,
    unwrap_state_dict,
)

# The LLMConfig fields an HF LLaMA directory determines (compared with the preset by `layout`).
LLM_DIM_KEYS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
)

if TYPE_CHECKING:
    import torch

    from ..config import LLMConfig

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# Weight layouts of an HF directory, in order of preference: (marker file, format, is_index).
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "safetensors", True),
    ("model.safetensors", "safetensors", False),
    ("pytorch_model.bin.index.json", "bin", True),
    ("pytorch_model.bin", "bin", False),
)

LAYERS = "model.layers."
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)

LLAMA_RULES = (
    Rule(r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight", r"\g<0>"),
    Rule(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight", r"\g<0>"),
    Rule(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight", r"\g<0>"),
    Rule(r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight", r"\g<0>"),
    # Buffers written by transformers < 4.31 (Vicuna v0 conversions): recomputed at load time.
    Rule(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", IGNORE),
)


# LLMConfig field → the HF config.json keys that state it (the first one present wins).
HF_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size",),
    "num_layers": ("num_hidden_layers",),
    "num_heads": ("num_attention_heads",),
    "num_kv_heads": ("num_key_value_heads",),
    "intermediate_size": ("intermediate_size",),
    "vocab_size": ("vocab_size",),
    "rms_norm_eps": ("rms_norm_eps",),
    "rope_theta": ("rope_theta",),  # transformers 5 writes rope_parameters.rope_theta instead
    "max_position_embeddings": ("max_position_embeddings", "max_sequence_length"),  # v0: max_sequence_length
    "tie_word_embeddings": ("tie_word_embeddings",),
    "bos_token_id": ("bos_token_id",),
    "eos_token_id": ("eos_token_id",),
}
HF_REQUIRED = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size")
HF_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")


def hf_config_values(config: Mapping[str, Any], where: str | Path = CONFIG_FILE) -> dict[str, Any]:
    """The LLMConfig fields an HF config.json states, by our names; absent keys are left out.

    Wrongly typed values are a one-line `CheckpointError` naming the HF key.
    """
    out: dict[str, Any] = {}
    for ours, keys in HF_CONFIG_KEYS.items():
        key = next((k for k in keys if config.get(k) is not None), None)
        value = config.get(key) if key else None
        if ours == "rope_theta" and value is None:
            key, value = "rope_parameters.rope_theta", (config.get("rope_parameters") or {}).get("rope_theta")
        if value is None:
            continue
        if ours in _FLOAT_FIELDS:
            kind, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        elif ours == "tie_word_embeddings":
            kind, ok = "true or false", isinstance(value, bool)
        else:
            kind, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise CheckpointError(f"{where}: {key} is {value!r}, expected {kind}")
        if ours in _FLOAT_FIELDS:
            value = float(value)
        out[ours] = value
    return out


def llm_config_from_hf(config: Mapping[str, Any], where: str | Path = CONFIG_FILE) -> LLMConfig:
    """An HF LLaMA config.json (as a dict) → LLMConfig, from the config alone (see module docstring).

    KV heads default to the attention heads (older LLaMA configs), eps / rope theta / context / tying
    to LLaMA's; bos/eos are the config's when stated, else LLMConfig's (1 / 2).
    """
    from ..config import LLMConfig

    values = hf_config_values(config, where)
    missing = [HF_CONFIG_KEYS[k][0] for k in HF_REQUIRED if k not in values]
    if missing:
        raise CheckpointError(f"{where}: missing {', '.join(missing)}")
    values.setdefault("num_kv_heads", values["num_heads"])
    return LLMConfig(**{**HF_DEFAULTS, **values})


def read_llm_config(directory: str | Path) -> LLMConfig:
    """The decoder config of an HF LLaMA directory: validated against its weights when it has them."""
    root = Path(directory)
    if any((root / marker).is_file() for marker, _, _ in WEIGHT_LAYOUTS):
        return read_llm_dims(root).to_llm_config()
    if not (root / CONFIG_FILE).is_file():
        raise CheckpointError(f"{root}: no {CONFIG_FILE}: not an HF model directory")
    config = read_json_object(root / CONFIG_FILE, CheckpointError)
    _check_model_type(config, root)
    return llm_config_from_hf(config, root / CONFIG_FILE)


@dataclass
class LLMDims:
    """What the weights and config of an HF LLaMA directory say, plus where each number came from."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    tokenizer_pieces: int
    sources: dict[str, str] = field(default_factory=dict)

    def as_dims(self) -> dict[str, tuple[Any, str]]:
        """`{config key: (value, where it was read)}` for comparison with a MiniGPT4Config."""
        keys = LLM_DIM_KEYS
        return {
            f"llm.{k}": (getattr(self, k), self.sources.get(k, "llm/config.json"))
            for k in keys
            if getattr(self, k) is not None
        }

    def to_llm_config(self, base: LLMConfig | None = None) -> LLMConfig:
        from ..config import LLMConfig

        values = {
            k: getattr(self, k)
            for k in (
                "hidden_size",
                "num_layers",
                "num_heads",
                "num_kv_heads",
                "intermediate_size",
                "vocab_size",
                "rms_norm_eps",
                "rope_theta",
                "max_position_embeddings",
                "tie_word_embeddings",
                "bos_token_id",
                "eos_token_id",
            )
            if getattr(self, k) is not None
        }
        return replace(base or LLMConfig(), **values)


@dataclass
class LLMSource:
    """A validated HF LLaMA directory: where its weights are and what they hold."""

    root: Path
    config: dict[str, Any]
    generation_config: dict[str, Any] | None
    fmt: str  # "safetensors" | "bin"
    shards: list[Path]
    shapes: dict[str, tuple[int, ...]]
    tokenizer_files: list[Path]
    dims: LLMDims


def _find_shards(root: Path) -> tuple[str, list[Path]]:
    for marker, fmt, is_index in WEIGHT_LAYOUTS:
        path = root / marker
        if not path.is_file():
            continue
        if not is_index:
            return fmt, [path]
        weight_map = read_json_object(path, CheckpointError).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path}: no 'weight_map' object")
        names = sorted({str(v) for v in weight_map.values()})
        shards = [(root / name).resolve() for name in names]
        for name, shard in zip(names, shards, strict=True):
            if root.resolve() not in shard.parents:
                raise CheckpointError(f"{path}: shard {name!r} is outside the directory")
            if not shard.is_file():
                raise CheckpointError(f"{path} lists {name} but that file is missing")
        return fmt, shards
    raise CheckpointError(
        f"{root}: no LLM weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )


def _load_shard(shard: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        return load_safetensors(shard)
    return unwrap_state_dict(load_torch_checkpoint(shard), shard)


def _shard_shapes(shard: Path, fmt: str) -> dict[str, tuple[int, ...]]:
    if fmt == "safetensors":
        return safetensors_shapes(shard)
    # mmap'd when possible: shapes without reading the data
    return {k: tuple(v.shape) for k, v in _load_shard(shard, fmt).items()}


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, root: Path) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{root}: LLM weights lack {key}")
    return shapes[key]


def _tokenizer_info(root: Path, rows: int) -> tuple[int, int | None, int | None]:
    from ..tokenizer import check_vocab, load_tokenizer

    tok = load_tokenizer(root)
    check_vocab(tok, rows)
    return tok.vocab_size, tok.bos_id, tok.eos_id


def _dims(root: Path, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> LLMDims:
    rows, hidden = _shape(shapes, EMBED, root)
    num_layers = count_layers(shapes, LAYERS)
    if num_layers == 0:
        raise CheckpointError(f"{root}: LLM weights have no model.layers.*")
    for i in range(num_layers):
        for name in LAYER_TENSORS:
            _shape(shapes, f"{LAYERS}{i}.{name}", root)
    _shape(shapes, FINAL_NORM, root)
    tied = LM_HEAD not in shapes
    stated = hf_config_values(config, root / CONFIG_FILE)
    num_heads = stated.get("num_heads")
    if num_heads is None:
        raise CheckpointError(f"{root / CONFIG_FILE}: missing num_attention_heads")
    if num_heads <= 0 or hidden % num_heads:
        raise CheckpointError(
            f"{root / CONFIG_FILE}: num_attention_heads {num_heads!r} does not divide hidden {hidden}"
        )
    kv_rows = shapes[f"{LAYERS}0.self_attn.k_proj.weight"][0]
    head_dim = hidden // num_heads
    intermediate = shapes[f"{LAYERS}0.mlp.gate_proj.weight"][0]
    from_shapes = {
        "hidden_size": hidden,
        "num_layers": num_layers,
        "vocab_size": rows,
        "intermediate_size": intermediate,
        "num_kv_heads": kv_rows // head_dim,
    }
    # config.json must agree with the shapes (a mismatch means a broken or mixed-up directory).
    for ours, value in from_shapes.items():
        if stated.get(ours, value) != value:
            raise CheckpointError(
                f"{root / CONFIG_FILE}: {HF_CONFIG_KEYS[ours][0]} is {stated[ours]} but the weights say {value}"
            )
    pieces, bos, eos = _tokenizer_info(root, rows)
    values = {**HF_DEFAULTS, **stated, **from_shapes}
    return LLMDims(
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=from_shapes["num_kv_heads"],
        intermediate_size=intermediate,
        vocab_size=rows,
        rms_norm_eps=values["rms_norm_eps"],
        rope_theta=values["rope_theta"],
        max_position_embeddings=values["max_position_embeddings"],
        tie_word_embeddings=values["tie_word_embeddings"] or tied,
        bos_token_id=bos,
        eos_token_id=eos,
        tokenizer_pieces=pieces,
        sources={
            "hidden_size": f"llm {EMBED}",
            "vocab_size": f"llm {EMBED}",
            "num_layers": "llm model.layers.*",
            "num_kv_heads": "llm k_proj.weight",
            "intermediate_size": "llm gate_proj.weight",
            "bos_token_id": "llm tokenizer",
            "eos_token_id": "llm tokenizer",
            "tie_word_embeddings": "llm lm_head.weight",
        },
    )


def _check_model_type(config: Mapping[str, Any], root: Path) -> None:
    if config.get("model_type", "llama") != "llama":
        raise CheckpointError(
            f"{root / CONFIG_FILE}: model_type {config.get('model_type')!r}, expected 'llama'"
        )


def inspect_llm_dir(directory: str | Path) -> LLMSource:
    """Validate an HF LLaMA directory (see module docstring); reads headers/shapes only."""
    root = Path(directory)
    if not root.is_dir():
        raise CheckpointError(f"LLM directory not found: {root}")
    if not (root / CONFIG_FILE).is_file():
        raise CheckpointError(f"{root}: no {CONFIG_FILE}: not an HF model directory")
    config = read_json_object(root / CONFIG_FILE, CheckpointError)
    _check_model_type(config, root)
    gen_path = root / GENERATION_CONFIG_FILE
    generation = read_json_object(gen_path, CheckpointError) if gen_path.is_file() else None
    fmt, shards = _find_shards(root)
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        part = _shard_shapes(shard, fmt)
        rename(part, LLAMA_RULES, f"LLM shard {shard}")  # unknown keys fail here, before anything is written
        shapes.update(part)
    tokenizer_files = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    dims = _dims(root, config, shapes)
    return LLMSource(root, config, generation, fmt, shards, shapes, tokenizer_files, dims)


def read_llm_dims(directory: str | Path) -> LLMDims:
    return inspect_llm_dir(directory).dims


def _fix_ids(config: dict[str, Any], dims: LLMDims, what: str) -> tuple[dict[str, Any], list[str]]:
    """Put the tokenizer's bos/eos in; drop pad ids outside the vocabulary (Vicuna v0 says -1)."""
    out, notes = dict(config), []
    for key, value in (("bos_token_id", dims.bos_token_id), ("eos_token_id", dims.eos_token_id)):
        if value is not None and out.get(key) != value:
            notes.append(f"{what} {key} {out.get(key)} → {value} (tokenizer)")
            out[key] = value
    pad = out.get("pad_token_id")
    if pad is not None and not (isinstance(pad, int) and 0 <= pad < dims.vocab_size):
        notes.append(f"{what} pad_token_id {pad} removed (outside the vocabulary)")
        out["pad_token_id"] = None
    return out, notes


def fixed_config(config: Mapping[str, Any], dims: LLMDims) -> tuple[dict[str, Any], list[str]]:
    out, notes = _fix_ids(dict(config), dims, "config.json")
    if out.get("architectures") != ["LlamaForCausalLM"]:
        # Early LLaMA conversions wrote "LLaMAForCausalLM", which transformers no longer knows.
        notes.append(f"config.json architectures {out.get('architectures')} → ['LlamaForCausalLM']")
        out["architectures"] = ["LlamaForCausalLM"]
    out["model_type"] = "llama"
    return out, notes


def fixed_generation_config(
    generation: Mapping[str, Any] | None, dims: LLMDims
) -> tuple[dict[str, Any], list[str]]:
    return _fix_ids(dict(generation or {}), dims, "generation_config.json")


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_llm_weights(source: LLMSource, dst: Path, progress: Callable[[str], None] | None = None) -> None:
    """Stream `source` shard by shard into safetensors shards (+ index) under `dst`."""
    n = len(source.shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(source.shards):
        if progress:
            progress(f"LLM shard {i + 1}/{n}: {shard.name}")
        tensors = rename(_load_shard(shard, source.fmt), LLAMA_RULES, f"LLM shard {shard}")
        name = _shard_name(i, n)
        save_safetensors(tensors, dst / name)
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
        del tensors
    if n > 1:
        _write_json(
            dst / SAFETENSORS_INDEX,
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


def copy_llm_dir(src: str | Path, dst: str | Path, progress: Callable[[str], None] | None = None) -> LLMDims:
    """Write a clean HF LLaMA directory at `dst` from `src` (see module docstring)."""
    source = inspect_llm_dir(src)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} already exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    write_llm_weights(source, dst, progress)
    config, notes = fixed_config(source.config, source.dims)
    generation, gen_notes = fixed_generation_config(source.generation_config, source.dims)
    _write_json(dst / CONFIG_FILE, config)
    _write_json(dst / GENERATION_CONFIG_FILE, generation)
    for path in source.tokenizer_files:
        shutil.copyfile(path, dst / path.name)
    if progress:
        for note in notes + gen_notes:
            progress(f"fixed {note}")
    return source.dims
