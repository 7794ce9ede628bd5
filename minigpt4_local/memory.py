"""Predicted memory of a bundle served by the engine: GGUF weights, KV cache, compute buffers, ONNX graph.

Contract: `estimate_memory(bundle_path, ctx=None, parallel=DEFAULT_PARALLEL, kv_type="f16", n_batch=512)
-> MemoryEstimate` reads only file headers (`gguf_file.scan_gguf`, the bundle manifest) and predicts:
- weights: the sum of the GGUF's tensor sizes (llama.cpp maps them; all pages are touched in a forward pass);
- kv: layers x KV heads x (key + value head dims) x cells x bytes per element, cells = ctx x parallel
  rounded up to llama.cpp's 256 (K and V: the "x 2" of the usual formula);
- compute: llama.cpp's scratch for one batch of `n_batch` rows (dominated by the n_batch x n_vocab float
  logits of the output projection) plus the output buffer (n_vocab floats per sequence);
- vision: the ONNX graph's file size (ONNX Runtime holds its initializers once).
With every layer offloaded (a GPU build), weights + kv + compute sit in VRAM and only the vision graph
(on the CPU provider) in RAM; on a CPU build everything is RAM. `per_slot` is the memory one more slot
adds (its KV stream). tests/test_memory.py checks the prediction against a measured RSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelDirError

__all__ = ["KV_BYTES", "MemoryEstimate", "estimate_memory"]

KV_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}
_CELL_PAD = 256


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv: int
    compute: int
    vision: int
    per_slot: int
    ctx: int
    parallel: int

    @property
    def decoder(self) -> int:
        return self.weights + self.kv + self.compute

    @property
    def total(self) -> int:
        return self.decoder + self.vision

    def lines(self) -> list[str]:
        mib = 2**20
        return [
            f"memory estimate for ctx {self.ctx} x parallel {self.parallel}:",
            f"  llm weights      {self.weights / mib:9.1f} MiB",
            f"  KV cache         {self.kv / mib:9.1f} MiB  ({self.per_slot / mib:.1f} MiB per slot)",
            f"  compute buffers  {self.compute / mib:9.1f} MiB",
            f"  vision (ONNX)    {self.vision / mib:9.1f} MiB",
            f"  total            {self.total / mib:9.1f} MiB  (CPU build: all RAM; GPU build with every layer "
            f"offloaded: {self.decoder / mib:.0f} MiB VRAM + {self.vision / mib:.0f} MiB RAM)",
        ]


def _int(value: object, what: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, list | tuple) and value:  # per-layer arrays: the largest bounds the cache
        return int(max(value))
    raise ModelDirError(f"the GGUF does not record {what}")


def estimate_memory(
    bundle_path: str | Path,
    ctx: int | None = None,
    parallel: int | None = None,
    kv_type: str = "f16",
    n_batch: int = 512,
) -> MemoryEstimate:
    from .backends.gguf_file import scan_gguf
    from .bundle import Bundle
    from .engine import DEFAULT_PARALLEL

    bundle = Bundle.open(bundle_path, verify=False)
    if not bundle.has_part("llm"):
        raise ModelDirError(
            f"{bundle_path}: the memory estimate covers GGUF bundles; this one has no llm part"
        )
    header = scan_gguf(bundle.part_path("llm"))
    parallel = parallel or DEFAULT_PARALLEL
    ctx = ctx or bundle.config.prompt.max_context
    layers = _int(header.arch_value("block_count"), "block_count")
    n_embd = _int(header.arch_value("embedding_length"), "embedding_length")
    heads = _int(header.arch_value("attention.head_count"), "attention.head_count")
    kv_heads = _int(header.arch_value("attention.head_count_kv", heads), "attention.head_count_kv")
    k_dim = _int(header.arch_value("attention.key_length", n_embd // heads), "attention.key_length")
    v_dim = _int(header.arch_value("attention.value_length", n_embd // heads), "attention.value_length")
    n_ff = _int(header.arch_value("feed_forward_length", 4 * n_embd), "feed_forward_length")
    n_vocab = header.tensors["token_embd.weight"].shape[1] if "token_embd.weight" in header.tensors else 32000
    cells = -(-ctx * parallel // _CELL_PAD) * _CELL_PAD
    per_cell = layers * kv_heads * (k_dim + v_dim) * KV_BYTES[kv_type]
    weights = sum(t.nbytes for t in header.tensors.values())
    batch = min(n_batch, ctx * parallel)
    compute = batch * (n_vocab + n_ff) * 4 + n_vocab * parallel * 4
    vision = bundle.part_path("vision").stat().st_size if bundle.has_part("vision") else 0
    return MemoryEstimate(
        weights=int(weights),
        kv=int(per_cell * cells),
        compute=int(compute),
        vision=int(vision),
        per_slot=int(per_cell * ctx),
        ctx=ctx,
        parallel=parallel,
    )
