"""The torch-free runtime: a bundle's ONNX Runtime vision encoder + its quantized decoder.

Contract: `load_bundle_pipeline(path, verify=True, providers=None, n_gpu_layers=None, n_threads=None,
decoder=None, device=None, dtype=None, gptq_kernel="auto")` opens and validates the bundle (checksums
unless `verify=False`), then builds a `Pipeline` from `OnnxVisionEncoder` and the chosen decoder part:
`llm` (GGUF through llama.cpp) or `llm_gptq` (GPTQ through GPTQModel, which imports torch). By default
the GGUF part wins, so `describe --model BUNDLE` never imports torch when the bundle has a GGUF decoder.
Before anything runs it checks that the parts fit together: vision output width == decoder embedding
width, tokenizer vocabulary vs decoder vocabulary, and a prompt template in the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..bundle import Bundle
from ..errors import ModelDirError
from ..pipeline import Pipeline
from ..tokenizer import check_vocab, derive_stop_sequences, load_tokenizer


def _bundle_tokenizer(bundle: Bundle, fallback: Any) -> Any:
    if bundle.has_part("tokenizer"):
        return load_tokenizer(bundle.part_path("tokenizer"))
    return fallback()


def load_bundle_pipeline(
    path: str | Path,
    verify: bool = True,
    providers: list[str] | None = None,
    n_gpu_layers: int | None = None,
    n_threads: int | None = None,
    decoder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    gptq_kernel: str = "auto",
) -> Pipeline:
    from .gptq_backend import load_gptq_pipeline, pick_decoder
    from .onnx_vision import OnnxVisionEncoder

    bundle = Bundle.open(path, verify=verify)
    config = bundle.config
    if not config.prompt.template:
        raise ModelDirError(f"bundle {bundle.root} has no prompt template in its manifest")
    if not bundle.has_part("vision"):
        raise ModelDirError(f"bundle {bundle.root} has no vision part: run `minigpt4 export onnx` first")
    if pick_decoder(bundle, decoder) == "gptq":
        # Files were verified just above: no second hashing pass.
        return load_gptq_pipeline(
            bundle.root, device=device, kernel=gptq_kernel, dtype=dtype, providers=providers, verify=False
        )
    from .llamacpp import LlamaCppDecoder, LlamaCppPipelineDecoder, LlamaCppTokenizer

    vision = OnnxVisionEncoder(bundle, providers=providers, verify=False)  # files were verified above
    llm = LlamaCppDecoder(
        bundle.part_path("llm"),
        n_ctx=config.prompt.max_context,
        n_gpu_layers=-1 if n_gpu_layers is None else n_gpu_layers,
        n_threads=n_threads,
    )
    width, vocab = llm.n_embd, llm.n_vocab
    tokenizer = _bundle_tokenizer(bundle, lambda: LlamaCppTokenizer(llm))
    label = f"llama.cpp {bundle.part('llm').get('type', '')}".strip()
    vision_width = int(bundle.part("vision").get("hidden", config.llm.hidden_size))
    if vision_width != width:
        raise ModelDirError(
            f"bundle {bundle.root}: vision.onnx gives {vision_width}-wide embeddings but the decoder takes {width}"
        )
    check_vocab(tokenizer, vocab)
    stops = config.prompt.stop_sequences or derive_stop_sequences(tokenizer)
    return Pipeline(
        config, tokenizer, vision, LlamaCppPipelineDecoder(llm), stops, name=f"{bundle.name} (onnx + {label})"
    )
