"""LLaMA decoder (Vicuna v0 / Llama-2-chat / SmolLM2) from transformers' `LlamaForCausalLM`.

Contract: `llama_config(cfg)` is the HF `LlamaConfig` equal to our `LLMConfig` (bos/eos as the
tokenizer defines them, fixing Vicuna v0's 0/1); `build_language_model(cfg)` creates a randomly
initialised model (weights come from a checkpoint; nothing is downloaded).
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from ..config import LLMConfig


def llama_config(cfg: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=None,
    )


def build_language_model(cfg: LLMConfig) -> LlamaForCausalLM:
    hf_cfg = llama_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)
