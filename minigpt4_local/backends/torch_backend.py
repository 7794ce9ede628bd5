"""PyTorch backend: full-precision vision encoder and decoder from a model directory.

Contract: `load_torch_pipeline(model_dir, device=None, dtype=None)` returns a `Pipeline` whose vision
side is `MiniGPT4.encode_image` and whose decoder stitches text-token embeddings and image embeddings
(`stitching.stitch`) and runs `generation.generate_from_embeds`. Defaults: CPU → fp32; CUDA → fp16
with the original's precision layout. `vision_override` plugs in another vision encoder (ONNX Runtime)
while keeping the torch decoder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.model_dir import load_model_dir
from ..config import MiniGPT4Config, load_config
from ..generation import generate_from_embeds
from ..image import preprocess
from ..model import MiniGPT4
from ..pipeline import Pipeline, VisionEncoder
from ..prompts import StopChecker
from ..sampling import SamplingOptions
from ..stitching import StitchPlan, stitch
from ..tokenizer import check_vocab, derive_stop_sequences, load_tokenizer

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name:
        return _DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


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


def stop_sequences_for(config: MiniGPT4Config, tokenizer: Any) -> list[list[int]]:
    return config.prompt.stop_sequences or derive_stop_sequences(tokenizer)


def load_torch_pipeline(
    model_dir: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    vision_override: VisionEncoder | None = None,
) -> Pipeline:
    model_dir = Path(model_dir)
    config = load_config(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir / "llm")
    check_vocab(tokenizer, config.llm.vocab_size)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    model = load_model_dir(model_dir, device=str(dev), dtype=torch_dtype, with_llm=True)
    vision = vision_override or TorchVision(model, dev)
    return Pipeline(
        config,
        tokenizer,
        vision,
        TorchDecoder(model, dev),
        stop_sequences_for(config, tokenizer),
        name=f"{config.name} (torch {dev.type}, {str(torch_dtype).removeprefix('torch.')})",
    )
