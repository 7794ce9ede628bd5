"""LAVIS checkpoints → our naming (HF BLIP-2 + MiniGPT-4). Pure functions; no file I/O.

Contract:
- `convert_eva_vit(state_dict, cfg=None, upcast=True)` maps `eva_vit_g.pth` (a raw fp16 state dict,
  keys with or without the `visual_encoder.` prefix) to `vision_model.embeddings.*` /
  `vision_model.encoder.layers.*`: q_bias/v_bias become `qkv.bias` = cat(q_bias, 0, v_bias); blocks
  with index >= `cfg.num_layers` are dropped (EVA-CLIP-g has 40, MiniGPT-4 builds 39; `cfg=None` keeps
  all); tensors are upcast to fp32 unless `upcast=False` (the model directory stores them lossless in
  their source dtype). Documented unused keys (final `norm`/`fc_norm`/`head` of the classifier the
  original never builds) are dropped; any other unknown key raises `CheckpointError`.
- `convert_blip2_lavis(checkpoint, vision_cfg=None, upcast=True)` maps `blip2_pretrained_flant5xxl.pth`
  (`{"model": {...}}` or the bare dict): `ln_vision.*` → `vision_model.post_layernorm.*`,
  `Qformer.bert.*` → `qformer.*` (`attention.self` → `attention.attention`, also in
  `crossattention`; `embeddings.LayerNorm` → `layernorm`), `query_tokens` kept. Ignored on purpose:
  `t5_proj.*`, `t5_model.*`, `Qformer.cls.*`, the Q-Former's word/position embeddings and position_ids,
  and the text FFN (`intermediate.*`/`output.*` without `_query`), none of which MiniGPT-4 uses.
  If the file also holds `visual_encoder.*`, those are converted like `eva_vit_g.pth` and returned as
  `vision_model.*`: the original loads the BLIP-2 checkpoint after EVA with `strict=False`, so the
  BLIP-2 copy wins; `model_dir.convert` applies it last for that reason (and says so).
- Dimension inference works on our naming and lives in `layout.vision_dims`.
The mapping rules are data: `EVA_RULES`, `BLIP2_RULES` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .names import IGNORE, Rule, drop_layers_from, fuse_qkv_bias, rename
from .safe_load import unwrap_state_dict

if TYPE_CHECKING:
    import torch

    from ..config import VisionConfig

VISION_LAYERS = "vision_model.encoder.layers."
EVA_PREFIX = "visual_encoder."

_V = "vision_model.embeddings"
_L = r"vision_model.encoder.layers.\1"

# eva_vit_g.pth (prefix `visual_encoder.` already removed) → ours.
EVA_RULES = (
    Rule(r"cls_token", f"{_V}.class_embedding"),
    Rule(r"pos_embed", f"{_V}.position_embedding"),
    Rule(r"patch_embed\.proj\.(weight|bias)", rf"{_V}.patch_embedding.\1"),
    Rule(r"blocks\.(\d+)\.norm1\.(weight|bias)", rf"{_L}.layer_norm1.\2"),
    Rule(r"blocks\.(\d+)\.norm2\.(weight|bias)", rf"{_L}.layer_norm2.\2"),
    Rule(r"blocks\.(\d+)\.attn\.qkv\.weight", rf"{_L}.self_attn.qkv.weight"),
    # Fused into self_attn.qkv.bias by fuse_qkv_bias.
    Rule(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)", rf"{_L}.self_attn.\2"),
    Rule(r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", rf"{_L}.self_attn.projection.\2"),
    Rule(r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", rf"{_L}.mlp.\2.\3"),
    # The classifier head / final norms of EVA-CLIP: MiniGPT-4's ViT has no final norm (docs/numerics.md §3).
    Rule(r"(norm|fc_norm|head)\.(weight|bias)", IGNORE),
)

_Q = r"qformer.encoder.layer.\1"

# blip2_pretrained_flant5xxl.pth → ours. `visual_encoder.*` is routed to EVA_RULES before this table.
BLIP2_RULES = (
    Rule(r"query_tokens", "query_tokens"),
    Rule(r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    Rule(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    Rule(r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight", IGNORE),
    Rule(r"Qformer\.bert\.embeddings\.position_ids", IGNORE),
    Rule(
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
        rf"{_Q}.\2.attention.\3.\4",
    ),
    Rule(
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
        rf"{_Q}.\2.output.\3.\4",
    ),
    Rule(
        r"Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)",
        rf"{_Q}.\2.\3.\4",
    ),
    # Text-side FFN: MiniGPT-4 feeds only queries, so only the *_query FFN runs (docs/numerics.md §5).
    Rule(
        r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)", IGNORE
    ),
    Rule(r"Qformer\.cls\..*", IGNORE),
    Rule(r"t5_proj\..*", IGNORE),
    Rule(r"t5_model\..*", IGNORE),
)

# Keys whose absence means "wrong file" (ours → LAVIS name, for the message).
_BLIP2_REQUIRED = {
    "query_tokens": "query_tokens",
    "qformer.layernorm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
    "vision_model.post_layernorm.weight": "ln_vision.weight",
}


def _upcast(state: dict[str, torch.Tensor], upcast: bool) -> dict[str, torch.Tensor]:
    import torch

    if not upcast:
        return state
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Accept EVA keys with or without `visual_encoder.` (all or none: a mix is a wrong file)."""
    with_prefix = [k for k in state if k.startswith(prefix)]
    if not with_prefix:
        return dict(state)
    if len(with_prefix) != len(state):
        other = next(k for k in state if not k.startswith(prefix))
        raise CheckpointError(f"EVA ViT checkpoint mixes {prefix}* keys with others (e.g. {other})")
    return {k[len(prefix) :]: v for k, v in state.items()}


def convert_eva_vit(
    state_dict: Mapping[str, Any], cfg: VisionConfig | None = None, upcast: bool = True
) -> dict[str, torch.Tensor]:
    """eva_vit_g.pth state dict → `vision_model.embeddings.*` + `vision_model.encoder.layers.*`."""
    source = "EVA ViT checkpoint"
    state = _strip_prefix(unwrap_state_dict(state_dict, source), EVA_PREFIX)
    out = fuse_qkv_bias(rename(state, EVA_RULES, source), source)
    if f"{_V}.position_embedding" not in out or f"{_V}.patch_embedding.weight" not in out:
        raise CheckpointError(f"{source}: no pos_embed / patch_embed.proj.weight: not an EVA ViT state dict")
    if cfg is not None:
        out = drop_layers_from(out, VISION_LAYERS, cfg.num_layers)
    return _upcast(out, upcast)


def convert_blip2_lavis(
    checkpoint: Mapping[str, Any], vision_cfg: VisionConfig | None = None, upcast: bool = True
) -> dict[str, torch.Tensor]:
    """blip2_pretrained_flant5xxl.pth → `qformer.*`, `query_tokens`, `vision_model.post_layernorm.*`
    (+ `vision_model.*` if the file carries `visual_encoder.*`, see module docstring)."""
    source = "BLIP-2 checkpoint"
    state = unwrap_state_dict(checkpoint, source)
    vit = {k: v for k, v in state.items() if k.startswith(EVA_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(EVA_PREFIX)}
    out = rename(rest, BLIP2_RULES, source)
    for ours, theirs in _BLIP2_REQUIRED.items():
        if ours not in out:
            raise CheckpointError(f"{source}: no {theirs}: not a LAVIS BLIP-2 (flan-t5-xxl) checkpoint")
    if vit:
        out.update(convert_eva_vit(vit, vision_cfg, upcast=upcast))
    return _upcast(out, upcast)
