"""Model assembly: shapes per preset, concat-4 order, ln_vision eps, the original's precision layout."""

from __future__ import annotations

import pytest
import torch

from minigpt4_local.config import get_preset
from minigpt4_local.model import MiniGPT4
from minigpt4_local.model.projector import merge_adjacent_tokens


@pytest.mark.parametrize(
    ("name", "n_img"), [("tiny-vicuna-7b", 4), ("tiny-vicuna-13b", 4), ("tiny-llama2-7b", 4)]
)
def test_encode_image_shapes(name: str, n_img: int) -> None:
    torch.manual_seed(0)
    config = get_preset(name)
    model = MiniGPT4(config, with_llm=False)
    assert config.num_image_tokens == n_img
    out = model.encode_image(torch.randn(3, 3, config.vision.image_size, config.vision.image_size))
    assert out.shape == (3, n_img, config.llm.hidden_size)
    assert out.dtype == torch.float32


def test_concat4_drops_cls_and_joins_four_consecutive_raster_tokens() -> None:
    batch, n, dim = 2, 16, 3
    tokens = torch.arange(batch * (n + 1) * dim, dtype=torch.float32).reshape(batch, n + 1, dim)
    merged = merge_adjacent_tokens(tokens, 4)  # (B, 4, 12)
    assert merged.shape == (batch, n // 4, dim * 4)
    for b in range(batch):
        for j in range(n // 4):
            expected = torch.cat([tokens[b, 1 + 4 * j + k] for k in range(4)])
            assert torch.equal(merged[b, j], expected)


def test_full_size_llama2_projection_shape() -> None:
    config = get_preset("minigpt4-llama2-7b")
    vit = torch.zeros(1, 257, 1408)
    assert merge_adjacent_tokens(vit, 4).shape == (1, 64, 5632)
    assert config.projector_in_features == 5632


def test_ln_vision_has_its_own_eps() -> None:
    model = MiniGPT4(get_preset("tiny-vicuna-7b"), with_llm=False)
    assert model.vision_model.post_layernorm.eps == 1e-5
    assert model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert model.qformer.layernorm.eps == 1e-12


def test_half_precision_layout_keeps_norms_and_embeddings_fp32() -> None:
    torch.manual_seed(0)
    config = get_preset("tiny-vicuna-7b")
    model = MiniGPT4(config, with_llm=True)
    for p in model.parameters():  # non-trivial values everywhere
        p.data.normal_(0, 0.2)
    pixels = torch.randn(2, 3, 56, 56)
    ref = model.encode_image(pixels)
    model.set_precision(torch.bfloat16)
    vm = model.vision_model
    assert vm.encoder.layers[0].self_attn.qkv.weight.dtype == torch.bfloat16
    assert vm.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert vm.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
    assert vm.post_layernorm.weight.dtype == torch.float32
    assert vm.embeddings.class_embedding.dtype == torch.float32
    assert vm.embeddings.position_embedding.dtype == torch.float32
    assert model.llama_proj.weight.dtype == torch.float32
    assert next(model.qformer.parameters()).dtype == torch.float32
    assert model.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model.encode_image(pixels)
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    assert cos > 0.99, cos
    model.set_precision(torch.float32)
    torch.testing.assert_close(model.encode_image(pixels), ref, rtol=1e-2, atol=1e-2)


def test_residual_stream_stays_fp32_under_autocast() -> None:
    model = MiniGPT4(get_preset("tiny-llama2-7b"), with_llm=False).set_precision(torch.bfloat16)
    seen: list[torch.dtype] = []
    hook = model.vision_model.encoder.layers[0].register_forward_hook(
        lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype)
    )
    model.encode_image(torch.randn(1, 3, 56, 56))
    hook.remove()
    assert seen == [torch.float32]
