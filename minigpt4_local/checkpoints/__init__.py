"""Checkpoint conversion and the model directory (needs the `torch` extra when called).

Modules (importing them is cheap: torch/safetensors are imported inside the functions):
- `safe_load`: weights-only `torch.load`, partial safetensors reads, one-line `CheckpointError`s.
- `names`: the table-driven key-renaming engine the converters share.
- `lavis`: `eva_vit_g.pth` and `blip2_pretrained_flant5xxl.pth` → our naming (pure functions).
- `hf_blip2`: HF BLIP-2 directory → our naming, opening only the shards that hold what is needed.
- `minigpt4_proj`: MiniGPT-4 projection checkpoints → `llama_proj.*` (+ ln_vision if present).
- `hf_llama`: HF LLaMA/Vicuna directory validation, dimensions, clean safetensors copy (Vicuna v0 fixes).
- `layout`: expected keys/shapes of a config, dimensions read from weights, preset choice.
- `model_dir`: `convert`, `load_model_dir`, `save_model_dir`, `read_model_config`.
Our naming = HF BLIP-2 + MiniGPT-4: `vision_model.*` (post_layernorm = ln_vision), `qformer.*`,
`query_tokens`, `llama_proj.*`; the LLM stays an HF LLaMA directory.
"""
