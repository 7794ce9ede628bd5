"""Converted checkpoints compute what the original computes.

Original-format files (tests/support/checkpoints.py) → `convert` → `load_model_dir` → `encode_image`,
compared with an independent float64 re-statement of docs/numerics.md §3–6 on the LAVIS-named weights
(tests/support/reference_math.py). Tolerance: atol 1e-5 / rtol 1e-5 in fp32 (outputs are O(1–3));
measured max-abs differences are printed (`pytest -s`) with the tag [parity].
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import torch

from minigpt4_local.checkpoints.model_dir import convert, load_model_dir, save_model_dir
from tests.support import reference_math as ref
from tests.support.checkpoints import Sources, write_hf_blip2_dir, write_lavis_sources

ATOL = 1e-5
RTOL = 1e-5


def _pixels(size: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _compare(label: str, got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.double() - want).abs().max().item()
    print(f"[parity] {label}: max abs diff {diff:.2e} (output max {want.abs().max().item():.2f})")
    torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
    return diff


@pytest.fixture(scope="module")
def lavis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Sources, Path]]:
    """Per preset: the LAVIS-format sources and the model directory converted from them."""
    out = {}
    for preset in ("tiny-vicuna-7b", "tiny-llama2-7b"):
        root = tmp_path_factory.mktemp(preset)
        src = write_lavis_sources(root / "src", preset)
        model_dir = convert(
            vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=root / "model", preset=preset
        )
        out[preset] = (src, model_dir)
    return out


@pytest.mark.parametrize("preset", ["tiny-vicuna-7b", "tiny-llama2-7b"])
def test_lavis_conversion_matches_reference(preset: str, lavis) -> None:
    """eva_vit_g.pth (+1 unused block) + BLIP-2 + projection → encode_image == reference (max-abs ~1e-6)."""
    src, model_dir = lavis[preset]
    model = load_model_dir(model_dir, with_llm=False)
    pixels = _pixels(src.cfg.vision.image_size)
    with torch.no_grad():
        got = model.encode_image(pixels)
    want = ref.encode_image(src.truth, pixels, src.cfg)
    assert got.shape == (2, src.cfg.num_image_tokens, src.cfg.llm.hidden_size)
    _compare(f"{preset} LAVIS files", got, want)


@pytest.mark.parametrize("preset", ["tiny-vicuna-7b", "tiny-llama2-7b"])
def test_interpolated_position_embedding_matches_reference(preset: str, lavis) -> None:
    """A 2× image (8×8 grid from a 4×4 pos-embed): bicubic, align_corners=False, as the reference."""
    src, model_dir = lavis[preset]
    model = load_model_dir(model_dir, with_llm=False)
    pixels = _pixels(2 * src.cfg.vision.image_size, batch=1)
    with torch.no_grad():
        vit = model.vision_model(pixels, interpolate_pos_encoding=True).last_hidden_state
    v = src.cfg.vision
    want = ref.ln_vision(src.truth, ref.eva_vit(src.truth, pixels, v.num_layers, v.num_heads, v.patch_size))
    assert vit.shape == (1, 1 + 8 * 8, v.hidden_size)
    _compare(f"{preset} ViT at 2x image size", vit, want)
    if src.cfg.qformer is not None:  # the Q-Former attends to any number of image tokens
        with torch.no_grad():
            got = model.encode_image(pixels)
        q = src.cfg.qformer
        want_q = ref.qformer(src.truth, want, q.num_layers, q.num_heads, q.cross_attention_frequency)
        want_emb = torch.nn.functional.linear(
            want_q, src.truth["llama_proj.weight"].double(), src.truth["llama_proj.bias"].double()
        )
        _compare(f"{preset} encode_image at 2x image size", got, want_emb)


def test_llama2_projection_checkpoint_ln_vision_is_used(tmp_path: Path) -> None:
    """A Llama-2 projection file that carries ln_vision: its weights replace the identity ln_vision."""
    src = write_lavis_sources(tmp_path / "src", "tiny-llama2-7b", proj_ln_vision=True)
    assert "ln_vision.weight" in src.truth
    messages: list[str] = []
    model_dir = convert(
        vit=src.eva, proj=src.proj, llm=src.llm, out=tmp_path / "model", progress=messages.append
    )
    assert any("ln_vision taken from the projection checkpoint" in m for m in messages)
    model = load_model_dir(model_dir, with_llm=False)
    pixels = _pixels(src.cfg.vision.image_size)
    with torch.no_grad():
        got = model.encode_image(pixels)
    _compare(
        "tiny-llama2-7b with ln_vision in the projection file",
        got,
        ref.encode_image(src.truth, pixels, src.cfg),
    )


@pytest.mark.parametrize(("n_shards", "split_bias"), [(3, False), (1, True)])
def test_hf_blip2_dir_matches_reference_and_skips_llm_shards(
    n_shards: int, split_bias: bool, lavis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF BLIP-2 dir as vit (also providing the Q-Former): same outputs; the T5 shard is never opened."""
    src, _ = lavis["tiny-vicuna-7b"]
    hf_dir = tmp_path / "blip2-flan-t5-xxl"
    truth = write_hf_blip2_dir(hf_dir, src.cfg, n_shards=n_shards, split_qkv_bias=split_bias)
    lm_shard = hf_dir / f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    if n_shards > 1:
        lm_shard.write_bytes(b"not a safetensors file: reading it would fail")
    opened: list[Path] = []
    real_open = safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    model_dir = convert(
        vit=hf_dir, proj=src.proj, llm=src.llm, out=tmp_path / "model", preset="tiny-vicuna-7b"
    )
    blip2_opened = {p for p in opened if p.parent == hf_dir.resolve()}
    if n_shards > 1:
        assert lm_shard.resolve() not in blip2_opened
        assert len(blip2_opened) == n_shards - 1
    model = load_model_dir(model_dir, with_llm=False)
    pixels = _pixels(src.cfg.vision.image_size)
    with torch.no_grad():
        got = model.encode_image(pixels)
    truth.update({k: v for k, v in src.truth.items() if k.startswith("llama_proj.")})
    _compare(
        f"tiny-vicuna-7b HF BLIP-2 dir ({n_shards} shard(s), split q/v bias={split_bias})",
        got,
        ref.encode_image(truth, pixels, src.cfg),
    )


def test_hf_blip2_dir_for_llama2_takes_vit_only(lavis, tmp_path: Path) -> None:
    """Llama-2 variant from an HF BLIP-2 dir: ViT only, BLIP-2's ln_vision NOT loaded (identity)."""
    src, _ = lavis["tiny-llama2-7b"]
    hf_dir = tmp_path / "blip2"
    truth = write_hf_blip2_dir(hf_dir, src.cfg, n_shards=3)
    truth.pop("ln_vision.weight"), truth.pop("ln_vision.bias")
    truth.update({k: v for k, v in src.truth.items() if k.startswith("llama_proj.")})
    model_dir = convert(
        vit=hf_dir, proj=src.proj, llm=src.llm, out=tmp_path / "model"
    )  # preset picked from shapes
    model = load_model_dir(model_dir, with_llm=False)
    assert model.qformer is None
    assert torch.equal(model.vision_model.post_layernorm.weight, torch.ones(src.cfg.vision.hidden_size))
    pixels = _pixels(src.cfg.vision.image_size)
    with torch.no_grad():
        got = model.encode_image(pixels)
    _compare("tiny-llama2-7b HF BLIP-2 dir", got, ref.encode_image(truth, pixels, src.cfg))


def test_llm_weights_survive_conversion(lavis) -> None:
    """The LLM in the model dir holds exactly the source fp16 tensors; transformers reads llm/ alike."""
    from transformers import LlamaForCausalLM

    src, model_dir = lavis["tiny-vicuna-7b"]
    model = load_model_dir(model_dir)
    state = model.llm.state_dict()
    for key, tensor in src.llm_weights.items():
        assert torch.equal(state[key], tensor.float()), key
    hf = LlamaForCausalLM.from_pretrained(model_dir / "llm", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 17, 300, 999, 1000]])  # 1000: Vicuna's extra row
    with torch.no_grad():
        ours, theirs = model.llm(ids).logits, hf(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(
        f"[parity] LLM logits, load_model_dir vs transformers from_pretrained(llm/): max abs diff {diff:.2e}"
    )
    assert torch.equal(ours, theirs)


def test_model_dir_round_trip_is_bit_identical(lavis, tmp_path: Path) -> None:
    """load → save_model_dir → load: identical vision outputs and LLM logits (bit for bit)."""
    src, model_dir = lavis["tiny-vicuna-7b"]
    first = load_model_dir(model_dir)
    again_dir = save_model_dir(first, model_dir / "llm", tmp_path / "again")
    second = load_model_dir(again_dir)
    pixels = _pixels(src.cfg.vision.image_size)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.equal(first.encode_image(pixels), second.encode_image(pixels))
        assert torch.equal(first.llm(ids).logits, second.llm(ids).logits)
    assert (again_dir / "llm" / "tokenizer.model").is_file()
    assert second.config == first.config
