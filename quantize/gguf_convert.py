"""Convert an HF LLaMA decoder directory (the model dir's `llm/`) to a GGUF file that stock llama.cpp loads.

Contract:
- `convert_hf_llama_to_gguf(llm_dir, out_path, out_type="f16", context_length=None, progress=None)`
  writes `out_path` (atomically: a temp file renamed at the end) and returns a `GGUFConversion`
  summary. `out_type` is one of `GGUF_OUT_TYPES` (f32 / f16 / bf16; 1-D norm weights always stay f32,
  as llama.cpp expects).
- Tensors are streamed one at a time from the safetensors shards (header-only planning pass, then one
  memory-mapped tensor at a time), so a 7B/13B checkpoint never has to fit in RAM.
- Names come from gguf's own LLaMA name table (`gguf.get_tensor_name_map`); q/k projection rows are
  permuted from HF's rotate-half layout to llama.cpp's interleaved-pair layout.
- Tokenizer: a sentencepiece `tokenizer.model` becomes `tokenizer.ggml.model = "llama"`; a byte-level BPE
  `tokenizer.json` (SmolLM2 style) becomes `"gpt2"` with merges and a `tokenizer.ggml.pre` chosen from
  the pre-tokenizer's structure. The token table always has exactly as many entries as the embedding
  matrix has rows (Vicuna v0: 32001 rows, 32000 pieces -> the extra id is an unused placeholder), and
  bos/eos/unk ids come from the tokenizer, never from Vicuna's wrong config (bos 0 / eos 1).
- Every user-facing failure is a one-line `CheckpointError` / `TokenizerError` / `ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4_local.errors import CheckpointError, ConfigError, TokenizerError
from minigpt4_local.files import read_json_object

from .safetensors_np import SafetensorsIndex

ProgressFn = Callable[[int, int, str], None]  # (tensors done, tensors total, gguf tensor name)

# out_type -> (GGML tensor type for 2-D weights, general.file_type)
GGUF_OUT_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
}

# HF tensors that carry no weights llama.cpp needs (old checkpoints saved the RoPE cache).
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)

# GGUF tensor kind (gguf.MODEL_TENSOR member name) -> which head count its rows are grouped by.
_PERMUTED_TENSORS = {"ATTN_Q": "num_attention_heads", "ATTN_K": "num_key_value_heads"}

# HF rope_type -> GGUF rope scaling type (None = no scaling keys written).
_ROPE_TYPES: dict[str | None, str | None] = {None: None, "default": None, "linear": "LINEAR"}

# sentencepiece piece kind -> GGUF token type name (checked in this order; NORMAL otherwise).
_SPM_KINDS = (
    ("is_unknown", "UNKNOWN"),
    ("is_control", "CONTROL"),
    ("is_unused", "UNUSED"),
    ("is_byte", "BYTE"),
)

# Structural signature of a tokenizer.json pre-tokenizer -> llama.cpp's `tokenizer.ggml.pre` name.
# ByteLevel alone is GPT-2's regex; SmolLM2 first splits every digit ("\p{N}") and then applies it.
_BPE_PRE_NAMES: dict[tuple[str, ...], str] = {
    ("ByteLevel",): "gpt-2",
    ("Digits:individual", "ByteLevel"): "smollm",
}


@dataclass
class TokenizerMeta:
    """Everything the `tokenizer.ggml.*` keys need."""

    model: str  # "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    n_placeholders: int = 0  # rows of the embedding matrix the tokenizer has no piece for


@dataclass
class GGUFConversion:
    path: Path
    out_type: str
    n_tensors: int
    n_vocab: int
    n_embd: int
    n_layer: int
    context_length: int
    tokenizer_model: str
    n_placeholder_tokens: int
    special_ids: dict[str, int]


# --------------------------------------------------------------------------------------------------
# config


@dataclass
class LlamaHParams:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_type: str | None
    rope_factor: float | None
    name: str

    @classmethod
    def from_config(cls, cfg: dict[str, Any], llm_dir: Path) -> LlamaHParams:
        arch = cfg.get("model_type")
        if arch not in ("llama", None):
            raise ConfigError(f"{llm_dir}/config.json: model_type {arch!r} is not a LLaMA decoder")
        try:
            n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            # transformers 5 nests rope settings in rope_parameters; 4.x kept them at the top level.
            rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
            return cls(
                n_embd=n_embd,
                n_ff=int(cfg["intermediate_size"]),
                n_layer=int(cfg["num_hidden_layers"]),
                n_head=n_head,
                n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                n_ctx=int(cfg.get("max_position_embeddings", 2048)),
                rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rope_type=rope.get("rope_type", rope.get("type")),
                rope_factor=rope.get("factor"),
                name=str(cfg.get("_name_or_path") or llm_dir.name) or "llama",
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{llm_dir}/config.json: missing or bad LLaMA field {err}") from None


def _write_hparams(writer: Any, hp: LlamaHParams, context_length: int | None, file_type: int) -> int:
    import gguf

    n_ctx = int(context_length or hp.n_ctx)
    writer.add_name(hp.name)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.head_dim * hp.n_head != hp.n_embd:  # only then does llama.cpp need explicit head sizes
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_type not in _ROPE_TYPES:
        raise ConfigError(f"rope scaling {hp.rope_type!r} is not supported by this converter (only linear)")
    scaling = _ROPE_TYPES[hp.rope_type]
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType[scaling])
        writer.add_rope_scaling_factor(float(hp.rope_factor or 1.0))
    writer.add_file_type(file_type)
    return n_ctx


# --------------------------------------------------------------------------------------------------
# tokenizer


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _placeholder(i: int) -> str:
    # llama.cpp also recognises "unused" in a control token's text as unused.
    return f"<unused{i}>"


def _pad_table(meta: TokenizerMeta, n_vocab: int) -> None:
    """Make the token table exactly n_vocab long (the model's embedding rows)."""
    import gguf

    if len(meta.tokens) > n_vocab:
        raise TokenizerError(
            f"tokenizer has {len(meta.tokens)} tokens but the model has only {n_vocab} embedding rows"
        )
    extra = n_vocab - len(meta.tokens)
    meta.tokens += [_placeholder(i) for i in range(len(meta.tokens), n_vocab)]
    meta.types += [int(gguf.TokenType.UNUSED)] * extra
    if meta.scores is not None:
        meta.scores += [-1e4] * extra  # never chosen by the sentencepiece merge search
    meta.n_placeholders += extra


def _added_tokens_spm(llm_dir: Path, tok_cfg: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """Ids past the sentencepiece model: added_tokens.json and tokenizer_config's added_tokens_decoder."""
    added: dict[int, tuple[str, bool]] = {}
    path = llm_dir / "added_tokens.json"
    if path.is_file():
        for content, idx in read_json_object(path, TokenizerError).items():
            added[int(idx)] = (content, False)
    for idx, info in (tok_cfg.get("added_tokens_decoder") or {}).items():
        added[int(idx)] = (info["content"], bool(info.get("special", False)))
    return added


def _spm_tokenizer(llm_dir: Path, tok_cfg: dict[str, Any]) -> TokenizerMeta:
    import gguf
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor()
    try:
        proc.LoadFromFile(str(llm_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as err:
        raise TokenizerError(f"{llm_dir}/tokenizer.model: not a sentencepiece model ({err})") from None
    n = proc.vocab_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        kind = next((name for attr, name in _SPM_KINDS if getattr(proc, attr)(i)), "NORMAL")
        tokens.append(proc.id_to_piece(i))
        scores.append(float(proc.get_score(i)))
        types.append(int(gguf.TokenType[kind]))
    for idx, (content, special) in sorted(_added_tokens_spm(llm_dir, tok_cfg).items()):
        if idx < n:
            continue  # e.g. <unk>/<s>/</s> restated in added_tokens_decoder
        while len(tokens) < idx:  # a gap in the added ids: keep ids aligned with rows
            tokens.append(_placeholder(len(tokens)))
            scores.append(-1e4)
            types.append(int(gguf.TokenType.UNUSED))
        tokens.append(content)
        scores.append(0.0)
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    # Special ids from the sentencepiece model itself: Vicuna v0's config.json says bos=0/eos=1 (wrong).
    special = {"bos": proc.bos_id(), "eos": proc.eos_id(), "unk": proc.unk_id(), "pad": proc.pad_id()}
    return TokenizerMeta(
        model="llama",
        tokens=tokens,
        types=types,
        scores=scores,
        special={k: v for k, v in special.items() if v >= 0},
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None,
    )


def _pre_signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    if not pre:
        return ()
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in parts or []:
        kind = p.get("type", "?")
        if kind == "Digits":
            kind += ":individual" if p.get("individual_digits") else ":grouped"
        elif kind == "ByteLevel" and p.get("use_regex") is False:
            kind += ":noregex"
        sig.append(kind)
    return tuple(sig)


def _bpe_tokenizer(llm_dir: Path, tok_cfg: dict[str, Any], hf_cfg: dict[str, Any]) -> TokenizerMeta:
    import gguf

    data = read_json_object(llm_dir / "tokenizer.json", TokenizerError)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(
            f"{llm_dir}/tokenizer.json: only byte-level BPE is supported without a tokenizer.model "
            "(a LLaMA sentencepiece tokenizer needs its tokenizer.model file)"
        )
    signature = _pre_signature(data.get("pre_tokenizer"))
    pre = _BPE_PRE_NAMES.get(signature)
    if pre is None:
        raise TokenizerError(
            f"{llm_dir}/tokenizer.json: unsupported BPE pre-tokenizer {'+'.join(signature) or 'none'}"
        )
    by_id: dict[int, tuple[str, int]] = {
        int(i): (t, int(gguf.TokenType.NORMAL)) for t, i in model["vocab"].items()
    }
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], int(kind))
    size = max(by_id) + 1
    tokens = [by_id.get(i, (_placeholder(i), int(gguf.TokenType.UNUSED)))[0] for i in range(size)]
    types = [by_id.get(i, (_placeholder(i), int(gguf.TokenType.UNUSED)))[1] for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    token_to_id = {t: i for i, t in enumerate(tokens)}
    special: dict[str, int] = {}
    for key in ("bos", "eos", "unk", "pad"):
        content = _token_content(tok_cfg.get(f"{key}_token"))
        if content in token_to_id:
            special[key] = token_to_id[content]
        elif isinstance(hf_cfg.get(f"{key}_token_id"), int):
            special[key] = int(hf_cfg[f"{key}_token_id"])
    # A post-processor template that starts with a special token means "the tokenizer adds BOS".
    template = (data.get("post_processor") or {}).get("single") or []
    adds_bos = bool(template) and "SpecialToken" in template[0]
    return TokenizerMeta(
        model="gpt2",
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        special=special,
        add_bos=bool(tok_cfg.get("add_bos_token", adds_bos)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None,
    )


def read_tokenizer(llm_dir: str | Path, n_vocab: int) -> TokenizerMeta:
    """The tokenizer of an HF LLaMA directory as GGUF token tables, padded to `n_vocab` rows."""
    llm_dir = Path(llm_dir)
    cfg_path = llm_dir / "tokenizer_config.json"
    tok_cfg = read_json_object(cfg_path, TokenizerError) if cfg_path.is_file() else {}
    hf_cfg = read_json_object(llm_dir / "config.json")
    if (llm_dir / "tokenizer.model").is_file():
        meta = _spm_tokenizer(llm_dir, tok_cfg)
    elif (llm_dir / "tokenizer.json").is_file():
        meta = _bpe_tokenizer(llm_dir, tok_cfg, hf_cfg)
    else:
        raise TokenizerError(f"{llm_dir}: no tokenizer.model or tokenizer.json next to the LLaMA weights")
    _pad_table(meta, n_vocab)
    for key, idx in meta.special.items():
        if not 0 <= idx < n_vocab:
            raise TokenizerError(
                f"{llm_dir}: {key} token id {idx} is outside the vocabulary (0..{n_vocab - 1})"
            )
    return meta


# Writer method per special-token key.
_SPECIAL_WRITERS = {
    "bos": "add_bos_token_id",
    "eos": "add_eos_token_id",
    "unk": "add_unk_token_id",
    "pad": "add_pad_token_id",
}


def _write_tokenizer(writer: Any, meta: TokenizerMeta) -> None:
    writer.add_tokenizer_model(meta.model)
    if meta.pre is not None:
        writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.types)
    if meta.scores is not None:
        writer.add_token_scores(meta.scores)
    if meta.merges is not None:
        writer.add_token_merges(meta.merges)
    for key, idx in meta.special.items():
        getattr(writer, _SPECIAL_WRITERS[key])(idx)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)


# --------------------------------------------------------------------------------------------------
# tensors


def hf_to_llamacpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows (out_features first) from HF rotate-half to interleaved pairs.

    HF keeps, per head, the first half of the head's dims as the "real" parts and the second half as the
    "imaginary" parts; llama.cpp's LLaMA RoPE rotates adjacent pairs (2i, 2i+1). Per head, row order
    [0, d/2, 1, d/2+1, ...] maps one onto the other. Works for weights (rows, cols) and biases (rows,).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class _PlannedTensor:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    ggml_type: str  # gguf.GGMLQuantizationType member name
    permute_heads: int  # 0 = no q/k permutation


def _plan_tensors(index: SafetensorsIndex, hp: LlamaHParams, out_type: str) -> list[_PlannedTensor]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layer)
    heads = {"num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv}
    plan = []
    for hf_name in index.names():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise CheckpointError(
                f"{index.model_dir}: tensor {hf_name!r} has no GGUF name (not a plain LLaMA decoder?)"
            )
        kind, gguf_name = found
        shape = index.shape(hf_name)
        # llama.cpp keeps 1-D tensors (norms, biases) in f32 whatever the file type.
        ggml_type = GGUF_OUT_TYPES[out_type][0] if len(shape) >= 2 else "F32"
        head_key = _PERMUTED_TENSORS.get(kind.name)
        plan.append(_PlannedTensor(hf_name, gguf_name, shape, ggml_type, heads[head_key] if head_key else 0))
    return plan


def _encode(arr: np.ndarray, ggml_type: str) -> np.ndarray:
    """float32 array -> the bytes/elements written for that GGML type."""
    import gguf

    if ggml_type == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if ggml_type == "F16":
        return np.ascontiguousarray(arr.astype(np.float16))
    # BF16 with llama.cpp's rounding (gguf.quants implements ggml's fp32 -> bf16); uint8 bytes.
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), gguf.GGMLQuantizationType.BF16)


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    return int(np.prod(shape)) * {"F32": 4, "F16": 2, "BF16": 2}[ggml_type]


def _iter_tensor_data(
    index: SafetensorsIndex, plan: list[_PlannedTensor]
) -> Iterator[tuple[_PlannedTensor, np.ndarray]]:
    for t in plan:
        arr = index.load_f32(t.hf_name)
        if t.permute_heads:
            arr = hf_to_llamacpp_rows(arr, t.permute_heads)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{index.model_dir}: tensor {t.hf_name} contains NaN or Inf")
        yield t, _encode(arr, t.ggml_type)


# --------------------------------------------------------------------------------------------------
# entry point


def convert_hf_llama_to_gguf(
    llm_dir: str | Path,
    out_path: str | Path,
    out_type: str = "f16",
    context_length: int | None = None,
    progress: ProgressFn | None = None,
) -> GGUFConversion:
    """Write `out_path` (GGUF, llama arch) from the HF LLaMA directory `llm_dir`."""
    import gguf

    llm_dir, out_path = Path(llm_dir), Path(out_path)
    if out_type not in GGUF_OUT_TYPES:
        raise ConfigError(f"unknown GGUF output type {out_type!r}; choose one of {', '.join(GGUF_OUT_TYPES)}")
    if not llm_dir.is_dir():
        raise CheckpointError(f"{llm_dir}: LLaMA directory not found")
    hp = LlamaHParams.from_config(read_json_object(llm_dir / "config.json"), llm_dir)
    index = SafetensorsIndex(llm_dir)
    if "model.embed_tokens.weight" not in index:
        raise CheckpointError(f"{llm_dir}: no model.embed_tokens.weight (not a LlamaForCausalLM checkpoint?)")
    n_vocab, n_embd = index.shape("model.embed_tokens.weight")
    if n_embd != hp.n_embd:
        raise CheckpointError(
            f"{llm_dir}: embedding width {n_embd} != hidden_size {hp.n_embd} in config.json"
        )
    tokenizer = read_tokenizer(llm_dir, n_vocab)
    plan = _plan_tensors(index, hp, out_type)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        n_ctx = _write_hparams(
            writer, hp, context_length, int(gguf.LlamaFileType[GGUF_OUT_TYPES[out_type][1]])
        )
        writer.add_vocab_size(n_vocab)
        _write_tokenizer(writer, tokenizer)
        for t in plan:
            # Logical shape + raw type: the writer records the header now, data is streamed below.
            writer.add_tensor_info(
                t.gguf_name, t.shape, np.dtype(np.float32), _tensor_nbytes(t.shape, t.ggml_type),
                raw_dtype=gguf.GGMLQuantizationType[t.ggml_type],
            )  # fmt: skip
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, (t, data) in enumerate(_iter_tensor_data(index, plan)):
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plan), t.gguf_name)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFConversion(
        path=out_path,
        out_type=out_type,
        n_tensors=len(plan),
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=hp.n_layer,
        context_length=n_ctx,
        tokenizer_model=tokenizer.model,
        n_placeholder_tokens=tokenizer.n_placeholders,
        special_ids=dict(tokenizer.special),
    )
