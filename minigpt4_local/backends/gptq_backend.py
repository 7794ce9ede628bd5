"""GPTQ decoder backend: `pipeline.Decoder` on a GPTQ checkpoint run through GPTQModel's kernels.

Contract:
- `GptqDecoder(llm)` (llm: `gptq_runtime.GptqLLM`) stitches text-token embeddings (the checkpoint's own,
  unquantized embedding table) and image embeddings (numpy from ONNX Runtime, or torch) with
  `stitching.stitch`, then decodes with `torch_generation.generate_from_embeds`, i.e. exactly the
  sampling and stop rules of the torch backend, streaming through `on_token`. KV cache reuse: a
  `prefix_cache.PrefixCache` holds what the cache holds (a token id per text position, a content digest
  per image row, then the generated ids); the next call keeps the longest common prefix (at least one
  position is always recomputed, for its logits) and prefills only the rest. Beam search runs without
  the cache (beams rewrite it). `last_reused`, `last_first_token_s` and `last_stitch_s` describe the
  last call; `reset()` forgets the cache.
- `build_gptq_decoder(source, options)` is the `gptq` entry of `loader.DECODERS`: a bundle's `llm_gptq`
  part (checkpoint checks in `gptq_checkpoint`, loading in `gptq_runtime`; its tokenizer: the bundle's,
  else the checkpoint's). `torch_vision_for(model_dir)` is the full-precision torch vision encoder of a
  model directory, to pass as `LoadOptions.vision_override`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PromptError
from ..prefix_cache import PositionKey, PrefixCache, position_keys
from ..stitching import StitchPlan, stitch
from .gptq_checkpoint import GPTQ_PART, read_gptq_dir
from .gptq_runtime import GptqLLM, load_gptq_llm

if TYPE_CHECKING:
    import torch

    from ..pipeline import VisionEncoder
    from ..prompts import StopChecker
    from ..sampling import SamplingOptions

__all__ = ["GptqDecoder", "build_gptq_decoder", "torch_vision_for"]


class _CachedGenerate:
    """Stands in for the HF model inside `generate_from_embeds`: adds the KV cache to `generate`
    and keeps the raw output (the generated ids before the stop sequence is stripped)."""

    def __init__(self, model: Any, cache: Any | None) -> None:
        self.model = model
        self.cache = cache
        self.output: Any = None

    def generate(self, **kwargs: Any) -> Any:
        if self.cache is not None:
            kwargs["past_key_values"] = self.cache
        self.output = self.model.generate(**kwargs)
        return self.output


class GptqDecoder:
    """`pipeline.Decoder` on a GPTQ model, with KV-cache prefix reuse across chat turns."""

    name = "gptq"

    def __init__(self, llm: GptqLLM) -> None:
        self.llm = llm
        self.model = llm.model
        self.device = llm.device
        self._cache: Any = None
        self.prefix = PrefixCache()  # keys of what `_cache` holds
        self.last_reused = 0
        self.last_stitch_s = 0.0
        self.last_first_token_s = 0.0

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def reset(self) -> None:
        self._cache = None
        self.prefix.clear()

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), hidden) rows of the checkpoint's embedding table."""
        import torch

        table = self.model.get_input_embeddings()
        with torch.inference_mode():
            return table(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def stitch(self, plan: StitchPlan, image_embeds: Sequence[Any]) -> torch.Tensor:
        """(T, hidden) stitched embeddings on the model's device, in its dtype."""
        import torch

        images = []
        for index, emb in enumerate(image_embeds):
            tensor = emb if isinstance(emb, torch.Tensor) else torch.as_tensor(_host_array(emb))
            if tensor.ndim == 2 and tensor.shape[-1] != self.hidden_size:
                raise PromptError(
                    f"image {index} embedding has hidden size {tensor.shape[-1]}, the GPTQ decoder expects "
                    f"{self.hidden_size} (vision and decoder come from different models)"
                )
            images.append(tensor.to(device=self.device, dtype=self.llm.dtype))
        return stitch(plan, self.embed_tokens, images, torch.cat)

    def _reuse(self, keys: list[PositionKey], beams: int) -> Any:
        """The cache to continue from (cut to the shared prefix), or None for beam search."""
        from transformers import DynamicCache

        if beams > 1:
            self.reset()  # beam search expands and reorders the cache: nothing reusable remains
            self.last_reused = 0
            return None
        keep = self.prefix.reusable(keys) if self._cache is not None else 0
        if keep <= 0 or self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
            keep = 0
        else:
            held = self._cache.get_seq_length()
            if held > keep:
                self._cache.crop(keep - held)  # transformers 5: a negative count drops that many positions
        self.last_reused = keep
        return self._cache

    def generate(
        self,
        plan: StitchPlan,
        image_embeds: Sequence[Any],
        options: SamplingOptions,
        stop: StopChecker,
        on_token: Callable[[int], None] | None,
    ) -> list[int]:
        from .torch_generation import generate_from_embeds

        start = time.perf_counter()
        embeds = self.stitch(plan, image_embeds).unsqueeze(0)  # (1, T, hidden)
        keys = position_keys(plan, image_embeds)
        self.last_stitch_s = time.perf_counter() - start
        cache = self._reuse(keys, options.num_beams)
        runner = _CachedGenerate(self.model, cache)
        first: list[float] = []

        def forward_token(token: int) -> None:
            if not first:
                first.append(time.perf_counter() - start)
            if on_token is not None:
                on_token(token)

        try:
            ids = generate_from_embeds(runner, embeds, options, stop, forward_token)  # type: ignore[arg-type]
        except BaseException:
            self.reset()  # a half-written cache must not be reused
            raise
        self.last_first_token_s = first[0] if first else time.perf_counter() - start
        if cache is not None and runner.output is not None:
            raw = [int(t) for t in runner.output[0].tolist()]
            self.prefix.keys = [*keys, *raw][: cache.get_seq_length()]
        return ids


def _host_array(x: Any) -> Any:
    """numpy view of an ONNX Runtime output (numpy already, or an OrtValue on the host)."""
    import numpy as np

    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return x.numpy()
    return np.asarray(x)


# ----- pipeline -------------------------------------------------------------------------------------


def build_gptq_decoder(source: Any, options: Any) -> Any:
    """`loader.DECODERS["gptq"]`: a bundle's `llm-gptq/` through GPTQModel (see `loader.load_pipeline`)."""
    from ..loader import DecoderBuild
    from ..tokenizer import load_tokenizer

    gptq_dir = source.bundle.part_path(GPTQ_PART)
    info = read_gptq_dir(gptq_dir, source.config.llm)  # cheap checks before torch/GPTQModel load
    own_tokenizer = None if source.bundle.has_part("tokenizer") else load_tokenizer(gptq_dir)
    llm = load_gptq_llm(
        gptq_dir,
        device=options.device,
        kernel=options.gptq_kernel,
        dtype=options.dtype,
        llm=source.config.llm,
    )
    label = f"gptq {info.bits}-bit g{info.group_size}, {llm.kernel} kernel on {llm.device.type}"
    decoder = GptqDecoder(llm)
    return DecoderBuild(decoder, decoder.hidden_size, source.config.llm.vocab_size, label, own_tokenizer)


def torch_vision_for(model_dir: str | os.PathLike, device: str | None = None) -> VisionEncoder:
    """The full-precision torch vision encoder of a model directory (to pair with a GPTQ decoder)."""
    from ..checkpoints.model_dir import load_model_dir
    from .torch_backend import TorchVision, pick_device

    dev = pick_device(device)
    model = load_model_dir(Path(model_dir), device=str(dev), with_llm=False)
    return TorchVision(model, dev)
