"""PyTorch backend: full-precision vision encoder and decoder from a model directory.

Contract: `build_torch_decoder(source, options)` is the `torch` entry of `loader.DECODERS`: the model
directory's `MiniGPT4`, whose vision side (`TorchVision`: `MiniGPT4.encode_image`) and decoder
(`TorchDecoder`: text-token and image embeddings joined by `stitching.stitch`, then
`torch_generation.generate_from_embeds`) it provides. Device and precision: `pick_device` / `pick_dtype` (CPU →
fp32; CUDA → fp16 with the original's precision layout); `loader.LoadOptions` can swap in the ONNX vision
encoder while keeping the torch decoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..checkpoints.model_dir import load_model_dir
from ..devices import default_precision, resolve_device, torch_dtype
from ..image import preprocess
from ..model import MiniGPT4
from ..prompts import StopChecker
from ..sampling import SamplingOptions
from ..stitching import StitchPlan, stitch
from .torch_generation import generate_from_embeds


def pick_device(device: str | None) -> torch.device:
    return torch.device(resolve_device(device))


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    return torch_dtype(name or default_precision(device.type))


class TorchVision:
    name = "torch"

    def __init__(self, model: MiniGPT4, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.config = model.config

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> list[torch.Tensor]:
        v = self.config.vision
        pixels = torch.from_numpy(preprocess(images, v.image_size, v.image_mean, v.image_std)).to(self.device)
        embeds = self.model.encode_image(pixels)  # (B, n_img, hidden)
        return list(embeds.unbind(0))


class TorchDecoder:
    name = "torch"

    def __init__(self, model: MiniGPT4, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.last_prefill_s = 0.0

    def stitch(self, plan: StitchPlan, image_embeds: Sequence[Any]) -> torch.Tensor:
        """(T, hidden) stitched embeddings in the decoder's dtype."""
        llm_dtype = self.model.llm.get_input_embeddings().weight.dtype
        images = [_as_tensor(e, self.device, llm_dtype) for e in image_embeds]

        def embed(ids: list[int]) -> torch.Tensor:
            return self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=self.device))

        return stitch(plan, embed, images, torch.cat)

    @torch.inference_mode()
    def generate(
        self,
        plan: StitchPlan,
        image_embeds: Sequence[Any],
        options: SamplingOptions,
        stop: StopChecker,
        on_token: Callable[[int], None] | None,
    ) -> list[int]:
        start = time.perf_counter()
        embeds = self.stitch(plan, image_embeds).unsqueeze(0)  # (1, T, hidden)
        self.last_prefill_s = time.perf_counter() - start
        return generate_from_embeds(self.model.llm, embeds, options, stop, on_token)


def _as_tensor(x: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.to(device=device, dtype=dtype)


def build_torch_decoder(source: Any, options: Any) -> Any:
    """`loader.DECODERS["torch"]`: a model directory's full-precision model (see `loader.load_pipeline`)."""
    from ..loader import DecoderBuild

    dev = pick_device(options.device)
    torch_dtype = pick_dtype(options.dtype, dev)
    model = load_model_dir(source.path, device=str(dev), dtype=torch_dtype, with_llm=True)
    label = f"torch {dev.type}, {str(torch_dtype).removeprefix('torch.')}"
    hidden = int(model.llm.get_input_embeddings().weight.shape[1])
    return DecoderBuild(
        TorchDecoder(model, dev), hidden, source.config.llm.vocab_size, label, vision=TorchVision(model, dev)
    )
