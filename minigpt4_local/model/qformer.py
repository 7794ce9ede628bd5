"""Q-Former with its learned queries, built from transformers' `Blip2QFormerModel`.

Contract: `run_qformer(qformer, query_tokens, image_embeds (B, N, Dv)) → (B, n_query, Dq)`:
the query tokens pass through `layernorm` only (no word/position embeddings), cross-attend to all N
image tokens (CLS included) every `cross_attention_frequency` layers, and the last hidden state is
returned. Only the query FFN exists (`use_qformer_text_input=False`). Dropout is zero.
"""

from __future__ import annotations

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from ..config import QFormerConfig


def hf_qformer_config(cfg: QFormerConfig, encoder_hidden_size: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=cfg.layer_norm_eps,
        cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=False,
    )


def build_qformer(cfg: QFormerConfig, encoder_hidden_size: int) -> Blip2QFormerModel:
    hf_cfg = hf_qformer_config(cfg, encoder_hidden_size)
    hf_cfg._attn_implementation = "eager"
    return Blip2QFormerModel(hf_cfg)


def run_qformer(
    qformer: Blip2QFormerModel, query_tokens: torch.Tensor, image_embeds: torch.Tensor
) -> torch.Tensor:
    queries = query_tokens.expand(image_embeds.shape[0], -1, -1)  # (B, n_query, Dq)
    return qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
