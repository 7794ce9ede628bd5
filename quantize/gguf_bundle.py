"""Model directory -> bundle `llm` part as a llama.cpp GGUF (the work behind `minigpt4 quantize gguf`).

Contract: `export_gguf(model_dir, out, qtype="Q4_K_M", ...) -> dict` (the part it recorded)
1. converts `MODEL_DIR/llm` to an unquantized GGUF (`intermediate`: f32/f16/bf16; "auto" = f32 below
   1B parameters, where it costs little, else f16) in a temp folder inside the bundle;
2. quantizes it with llama.cpp into `BUNDLE/llm.gguf` (an F32/F16/BF16 `qtype` equal to the
   intermediate type is just moved), optionally with an importance matrix;
3. with `eval_text`, measures the perplexity of llm.gguf and of the unquantized reference on the same
   token ids (llama.cpp for both) and, when torch is installed and `agreement_tokens` > 0, the greedy
   agreement of llm.gguf with the torch model on stitched image prompts;
4. replaces any previous `llm` part, lists the file(s) in the manifest (`--keep-f16` keeps the
   reference as `llm-<type>.gguf`), copies the tokenizer when the bundle has none, and saves.
Part keys: backend, format, file, quant_type, source_type, hidden, vocab_size, num_layers, n_ctx (the
architecture's prompt.max_context), bos_id, eos_id, tokenizer_model, imatrix, tensor_types, quality.
The bundle stays valid if anything fails (the new file is moved in only at the end).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigpt4_local.errors import ConfigError, DependencyError, ModelDirError

from .gguf_convert import GGUF_OUT_TYPES, convert_hf_llama_to_gguf
from .gguf_quantize import normalise_qtype, quantize_gguf

LLM_FILE = "llm.gguf"
Say = Callable[[str], None]
_SMALL_MODEL_PARAMS = 1_000_000_000  # below this an f32 intermediate is cheap and exact


def _llm_params(cfg: Any) -> int:
    llm = cfg.llm
    per_layer = 4 * llm.hidden_size**2 + 3 * llm.hidden_size * llm.intermediate_size
    return llm.num_layers * per_layer + 2 * llm.vocab_size * llm.hidden_size


def _pick_intermediate(intermediate: str, cfg: Any) -> str:
    if intermediate == "auto":
        return "f32" if _llm_params(cfg) < _SMALL_MODEL_PARAMS else "f16"
    if intermediate not in GGUF_OUT_TYPES:
        raise ConfigError(
            f"unknown intermediate type {intermediate!r}; choose auto or {', '.join(GGUF_OUT_TYPES)}"
        )
    return intermediate


def _quality(
    model_dir: Path,
    quantized: Path,
    reference: Path,
    reference_type: str,
    eval_text: Path,
    window: int,
    max_tokens: int,
    agreement_tokens: int,
    n_threads: int | None,
    say: Say,
) -> dict[str, Any]:
    from .gguf_eval import gguf_perplexity, stitched_prompt_agreement, tokenize_for_eval

    try:
        text = eval_text.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        raise ModelDirError(f"cannot read the evaluation text {eval_text}: {err}") from None
    ids = tokenize_for_eval(reference, text)[:max_tokens]
    bos = _bos_if_added(reference)
    say(f"perplexity on {len(ids)} tokens of {eval_text.name} (window {window})")
    ppl_q = gguf_perplexity(quantized, ids, window=window, bos_id=bos, n_threads=n_threads)
    ppl_ref = gguf_perplexity(reference, ids, window=window, bos_id=bos, n_threads=n_threads)
    quality: dict[str, Any] = {
        "text": eval_text.name,
        "tokens": len(ids),
        "window": window,
        "ppl": round(ppl_q.ppl, 4),
        "ppl_reference": round(ppl_ref.ppl, 4),
        "reference_type": reference_type,
        "ppl_delta": round(ppl_q.ppl - ppl_ref.ppl, 4),
    }
    if agreement_tokens > 0:
        say(f"greedy agreement with the torch model ({agreement_tokens} tokens per prompt)")
        try:
            results = stitched_prompt_agreement(
                model_dir, quantized, n_new=agreement_tokens, n_threads=n_threads
            )
            quality["greedy_agreement"] = [r.to_dict() for r in results]
        except (ImportError, DependencyError) as err:
            quality["greedy_agreement"] = f"skipped: {err}"
    return quality


def _bos_if_added(gguf_path: Path) -> int | None:
    from minigpt4_local.backends.gguf_file import scan_gguf

    meta = scan_gguf(gguf_path).metadata
    add = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return int(bos) if add and bos is not None else None


def _ensure_tokenizer(bundle: Any, llm_dir: Path) -> None:
    if bundle.has_part("tokenizer"):
        return
    from minigpt4_local.export.vision_export import copy_tokenizer

    copy_tokenizer(llm_dir, bundle)


def export_gguf(
    model_dir: str | Path,
    out: str | Path,
    qtype: str = "Q4_K_M",
    imatrix: str | Path | None = None,
    eval_text: str | Path | None = None,
    keep_reference: bool = False,
    intermediate: str = "auto",
    eval_window: int = 512,
    eval_max_tokens: int = 4096,
    agreement_tokens: int = 32,
    n_threads: int | None = None,
    overwrite: bool = False,
    say: Say | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Build the bundle's `llm` part (see module docstring); returns the part's manifest entry."""
    from minigpt4_local.backends.gguf_file import scan_gguf
    from minigpt4_local.bundle import Bundle
    from minigpt4_local.checkpoints.model_dir import read_model_config

    say = say or (lambda message: None)
    model_dir = Path(model_dir)
    name = normalise_qtype(qtype)
    cfg = read_model_config(model_dir)
    llm_dir = model_dir / "llm"
    if not llm_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} has no llm/ folder")
    inter = _pick_intermediate(intermediate, cfg)
    bundle = Bundle.create(out, cfg, overwrite=overwrite)
    bundle.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=bundle.root) as tmp:
        reference = Path(tmp) / f"llm-{inter}.gguf"
        say(f"converting {llm_dir} to a {inter} GGUF")
        conversion = convert_hf_llama_to_gguf(llm_dir, reference, inter, progress=progress)
        quantized = Path(tmp) / LLM_FILE
        if name.lower() == inter:
            shutil.copyfile(reference, quantized)
            tensor_types = None
        else:
            say(
                f"quantizing to {name} with llama.cpp"
                + (f" (importance matrix {Path(imatrix).name})" if imatrix else "")
            )
            tensor_types = quantize_gguf(
                reference, quantized, name, imatrix=imatrix, n_threads=n_threads
            ).tensor_types
        quality = None
        if eval_text is not None:
            quality = _quality(
                model_dir, quantized, reference, inter, Path(eval_text), eval_window, eval_max_tokens,
                agreement_tokens, n_threads, say,
            )  # fmt: skip
        header = scan_gguf(quantized)
        # Swap in the new files only now: a failure above leaves the previous part untouched.
        bundle.drop_part("llm")
        os.replace(quantized, bundle.root / LLM_FILE)
        files = bundle.add_file(LLM_FILE, role="llm")
        if keep_reference:
            os.replace(reference, bundle.root / reference.name)
            files += bundle.add_file(reference.name, role="llm-reference")
    part: dict[str, Any] = {
        "backend": "llama.cpp",
        "format": "gguf",
        "file": LLM_FILE,
        "quant_type": name,
        "source_type": inter,
        "hidden": conversion.n_embd,
        "vocab_size": conversion.n_vocab,
        "num_layers": conversion.n_layer,
        "n_ctx": cfg.prompt.max_context,
        "bos_id": conversion.special_ids.get("bos"),
        "eos_id": conversion.special_ids.get("eos"),
        "tokenizer_model": conversion.tokenizer_model,
        "imatrix": Path(imatrix).name if imatrix else None,
        "tensor_types": tensor_types or _histogram(header),
    }
    if keep_reference:
        part["reference_file"] = f"llm-{inter}.gguf"
    if quality is not None:
        part["quality"] = quality
    bundle.set_part("llm", part, files=files)
    _ensure_tokenizer(bundle, llm_dir)
    bundle.save()
    return bundle.part("llm")


def _histogram(header: Any) -> dict[str, int]:
    from gguf.constants import GGMLQuantizationType

    hist: dict[str, int] = {}
    for info in header.tensors.values():
        key = GGMLQuantizationType(info.ggml_type).name
        hist[key] = hist.get(key, 0) + 1
    return hist
