"""An independent functional re-statement of MiniGPT-4's image path (docs/numerics.md §3–6), for tests.

Contract: plain torch ops (no transformers, no package modules) over a LAVIS-named state dict
(`visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens`, `llama_proj.*`), computed in
float64 so the comparison measures the model's own fp32 error:
- `eva_vit(sd, pixels, num_layers, num_heads, patch_size)`: patch conv + CLS + learned pos-embed
  (bicubic-interpolated, align_corners=False, when the grid differs), `num_layers` pre-LN blocks
  (eps 1e-6; qkv without bias plus cat(q_bias, 0, v_bias); q·k scaled by head_dim^-0.5; exact GELU
  MLP), NO final norm. Extra blocks in `sd` are ignored.
- `ln_vision(sd, x)`: LayerNorm eps 1e-5 with `ln_vision.*` (identity weights when absent: the
  Llama-2 variant never loads BLIP-2's).
- `qformer(sd, image_embeds, num_layers, num_heads, cross_every=2)`: queries → embeddings.LayerNorm
  (eps 1e-12) only; per layer post-LN BERT self-attention, cross-attention to ALL image tokens every
  `cross_every`-th layer (0, 2, ...), then the query FFN (`intermediate_query`/`output_query`, GELU).
- `merge4(x)`: drop CLS, view (B, N/4, 4·D) (Llama-2 variant).
- `encode_image(sd, pixels, cfg)`: the whole path → (B, n_img, llm_hidden), float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EVA_EPS = 1e-6
LN_VISION_EPS = 1e-5
QFORMER_EPS = 1e-12


def _f64(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Tq, D), (B, Tk, D), (B, Tk, D) → (B, Tq, D), softmax(q k^T / sqrt(hd)) v per head."""
    b, tq, d = q.shape
    hd = d // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, x.shape[1], heads, hd).transpose(1, 2)  # (B, H, T, hd)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(hd)
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, tq, d)


def interpolate_pos_embed(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1, 1 + g·g, D) → (1, 1 + grid_h·grid_w, D): bicubic on the patch grid, CLS kept."""
    g = round((pos.shape[1] - 1) ** 0.5)
    if (grid_h, grid_w) == (g, g):
        return pos
    d = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d)], dim=1)


def eva_vit(
    sd: dict[str, torch.Tensor], pixels: torch.Tensor, num_layers: int, num_heads: int, patch_size: int
) -> torch.Tensor:
    sd = _f64(sd)
    p = "visual_encoder."
    x = F.conv2d(
        pixels.double(), sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch_size
    )
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # (B, gh·gw, D)
    x = torch.cat([sd[p + "cls_token"].expand(b, 1, d), x], dim=1)
    x = x + interpolate_pos_embed(sd[p + "pos_embed"], gh, gw)
    for i in range(num_layers):
        blk = f"{p}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[blk + "norm1.weight"], sd[blk + "norm1.bias"], EVA_EPS)
        q_bias, v_bias = sd[blk + "attn.q_bias"], sd[blk + "attn.v_bias"]
        qkv = F.linear(h, sd[blk + "attn.qkv.weight"], torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
        q, k, v = qkv.split(d, dim=-1)
        x = x + F.linear(
            _attention(q, k, v, num_heads), sd[blk + "attn.proj.weight"], sd[blk + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (d,), sd[blk + "norm2.weight"], sd[blk + "norm2.bias"], EVA_EPS)
        h = F.gelu(F.linear(h, sd[blk + "mlp.fc1.weight"], sd[blk + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[blk + "mlp.fc2.weight"], sd[blk + "mlp.fc2.bias"])
    return x


def ln_vision(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    weight = sd.get("ln_vision.weight", torch.ones(d)).double()
    bias = sd.get("ln_vision.bias", torch.zeros(d)).double()
    return F.layer_norm(x, (d,), weight, bias, LN_VISION_EPS)


def _bert_attention(sd, pre: str, hidden: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    q = F.linear(hidden, sd[pre + "self.query.weight"], sd[pre + "self.query.bias"])
    k = F.linear(context, sd[pre + "self.key.weight"], sd[pre + "self.key.bias"])
    v = F.linear(context, sd[pre + "self.value.weight"], sd[pre + "self.value.bias"])
    out = F.linear(_attention(q, k, v, heads), sd[pre + "output.dense.weight"], sd[pre + "output.dense.bias"])
    d = hidden.shape[-1]
    return F.layer_norm(
        out + hidden,
        (d,),
        sd[pre + "output.LayerNorm.weight"],
        sd[pre + "output.LayerNorm.bias"],
        QFORMER_EPS,
    )


def qformer(
    sd: dict[str, torch.Tensor],
    image_embeds: torch.Tensor,
    num_layers: int,
    num_heads: int,
    cross_every: int = 2,
) -> torch.Tensor:
    sd = _f64(sd)
    bert = "Qformer.bert."
    queries = sd["query_tokens"].expand(image_embeds.shape[0], -1, -1)
    d = queries.shape[-1]
    x = F.layer_norm(
        queries,
        (d,),
        sd[bert + "embeddings.LayerNorm.weight"],
        sd[bert + "embeddings.LayerNorm.bias"],
        QFORMER_EPS,
    )
    for i in range(num_layers):
        layer = f"{bert}encoder.layer.{i}."
        x = _bert_attention(sd, layer + "attention.", x, x, num_heads)
        if i % cross_every == 0:
            x = _bert_attention(sd, layer + "crossattention.", x, image_embeds.double(), num_heads)
        h = F.gelu(
            F.linear(
                x, sd[layer + "intermediate_query.dense.weight"], sd[layer + "intermediate_query.dense.bias"]
            )
        )
        h = F.linear(h, sd[layer + "output_query.dense.weight"], sd[layer + "output_query.dense.bias"])
        x = F.layer_norm(
            h + x,
            (d,),
            sd[layer + "output_query.LayerNorm.weight"],
            sd[layer + "output_query.LayerNorm.bias"],
            QFORMER_EPS,
        )
    return x


def merge4(vit_tokens: torch.Tensor) -> torch.Tensor:
    patches = vit_tokens[:, 1:]
    b, n, d = patches.shape
    return patches.reshape(b, n // 4, 4 * d)


def encode_image(sd: dict[str, torch.Tensor], pixels: torch.Tensor, cfg) -> torch.Tensor:
    """LAVIS state dict + pixels → image embeddings (float64); `cfg` gives only counts (layers, heads)."""
    v = cfg.vision
    x = ln_vision(sd, eva_vit(sd, pixels, v.num_layers, v.num_heads, v.patch_size))
    if cfg.qformer is not None:
        q = cfg.qformer
        x = qformer(sd, x, q.num_layers, q.num_heads, q.cross_attention_frequency)
    else:
        x = merge4(x)
    return F.linear(x, sd["llama_proj.weight"].double(), sd["llama_proj.bias"].double())
