"""The assembled MiniGPT-4 model.

Contract:
- `MiniGPT4(config, with_llm=True)` builds the modules with random weights (no download ever);
  checkpoint loading lives in `minigpt4_local.checkpoints`.
- Parameter names follow HF BLIP-2 + MiniGPT-4: `vision_model.*` (post_layernorm = ln_vision),
  `qformer.*`, `query_tokens`, `llama_proj.*`, and `llm.*` (a `LlamaForCausalLM`).
- `encode_image(pixels (B, 3, H, W)) → (B, n_img, llm_hidden)` float32 on CPU; on GPU it follows
  the precision set by `set_precision` (the original's layout: ViT Linear/Conv weights half,
  norms/CLS/pos-embed/Q-Former/projection fp32, run under autocast so the residual stream is fp32).
- `embed_tokens(ids (B, T)) → (B, T, llm_hidden)` uses the decoder's own embedding table.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..config import MiniGPT4Config
from .language import build_language_model
from .projector import project
from .qformer import build_qformer, run_qformer
from .vision import build_vision_model


class MiniGPT4(nn.Module):
    def __init__(self, config: MiniGPT4Config, with_llm: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.vision_model = build_vision_model(config.vision)
        self.qformer: Any = None  # None for the Llama-2 variant (concat-4 instead)
        self.query_tokens: Any = None  # nn.Parameter when there is a Q-Former
        if config.qformer is not None:
            self.qformer = build_qformer(config.qformer, config.vision.hidden_size)
            self.query_tokens = nn.Parameter(
                torch.zeros(1, config.qformer.num_query_tokens, config.qformer.hidden_size)
            )
        self.llama_proj = nn.Linear(config.projector_in_features, config.llm.hidden_size)
        self.llm: Any = build_language_model(config.llm) if with_llm else None
        self.autocast_dtype: torch.dtype | None = None
        self.eval()

    # ----- precision ----------------------------------------------------------------------
    def set_precision(self, dtype: torch.dtype) -> MiniGPT4:
        """fp32 everywhere, or the original's mixed layout for fp16/bf16 (call after `.to(device)`)."""
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported precision {dtype}")
        for name, child in self.named_children():
            if name != "llm":  # the LLM is cast once below, never upcast transiently
                child.float()
        if self.query_tokens is not None:
            self.query_tokens.data = self.query_tokens.data.float()
        if dtype == torch.float32:
            if self.llm is not None:
                self.llm.float()
            self.autocast_dtype = None
            return self
        # EVA ViT: Conv/Linear weights in half, LayerNorms/CLS/pos-embed stay fp32 (convert_weights_to_fp16).
        for module in self.vision_model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
        if self.llm is not None:
            self.llm.to(dtype)
        self.autocast_dtype = dtype
        return self

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ----- vision side --------------------------------------------------------------------
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision side: ln_vision(ViT(x)) → Q-Former queries (B, 32, 768), or ViT tokens (B, 257, 1408)."""
        cfg = self.config.vision
        interpolate = tuple(pixel_values.shape[-2:]) != (cfg.image_size, cfg.image_size)
        with self._autocast(pixel_values.device):
            vit = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state
            if self.qformer is None:
                return vit.float()
            return run_qformer(self.qformer, self.query_tokens, vit.float()).float()

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        return project(self.llama_proj, features, self.config.projector.merge_tokens)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels → (B, n_img, llm_hidden) image embeddings."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
        return self.project_features(self.vision_features(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # used by the ONNX export
        return self.encode_image(pixel_values)

    # ----- language side ------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.llm is None:
            raise RuntimeError("this MiniGPT4 was built without its language model")
        return self.llm.get_input_embeddings()(input_ids)

    def vision_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the LLM: vision_model.*, qformer.*, query_tokens, llama_proj.*."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}
