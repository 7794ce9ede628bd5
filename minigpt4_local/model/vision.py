"""EVA ViT-g/14 + `ln_vision`, built from transformers' `Blip2VisionModel`.

Contract: `build_vision_model(cfg)` returns a `Blip2VisionModel` whose forward maps
pixels (B, 3, H, W) → `last_hidden_state` (B, 1 + (H/p)·(W/p), D) = ln_vision(block_N(...)).
- All block norms use eps `cfg.layer_norm_eps` (1e-6); `post_layernorm` is MiniGPT-4's `ln_vision`
  and uses `cfg.ln_vision_eps` (1e-5): HF applies one eps to all vision norms, so it is overridden.
- The embedding sum (CLS, patches, position) is kept in fp32 even when the conv weight is fp16, so
  the residual stream stays fp32 under autocast as in the original (docs/numerics.md §7).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings

from ..config import VisionConfig


class Fp32ResidualEmbeddings(Blip2VisionEmbeddings):
    """Blip2VisionEmbeddings that adds CLS and position embeddings in fp32 (the original's layout)."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        conv_dtype = self.patch_embedding.weight.dtype
        patch = self.patch_embedding(pixel_values.to(conv_dtype))  # (B, D, h, w)
        patch = patch.flatten(2).transpose(1, 2).float()  # (B, h·w, D)
        cls = self.class_embedding.float().expand(batch_size, 1, -1)
        embeddings = torch.cat([cls, patch], dim=1)  # (B, 1 + h·w, D)
        if interpolate_pos_encoding:
            pos = self.interpolate_pos_encoding(embeddings, height, width)
        else:
            pos = self.position_embedding
        return embeddings + pos[:, : embeddings.size(1)].float()


def hf_vision_config(cfg: VisionConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
        qkv_bias=True,
        attention_dropout=0.0,
    )


def build_vision_model(cfg: VisionConfig) -> Blip2VisionModel:
    hf_cfg = hf_vision_config(cfg)
    hf_cfg._attn_implementation = "eager"  # deterministic, exportable; sdpa gives the same math
    model = Blip2VisionModel(hf_cfg)
    old = model.embeddings
    model.embeddings = Fp32ResidualEmbeddings(hf_cfg)
    model.embeddings.load_state_dict(old.state_dict())
    # `ln_vision` has its own eps (1e-5) in the original.
    model.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)
    return model
