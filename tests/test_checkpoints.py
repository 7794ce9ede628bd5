"""Checkpoint readers, converters and the model directory: keys, shapes, quirks, failures.

Every user-facing failure must be a `MiniGPT4Error` whose message is one line naming the problem.
Numerical parity of converted models is in test_model_parity.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt4_local.checkpoints import model_dir as model_dir_module
from minigpt4_local.checkpoints.hf_llama import copy_llm_dir, read_llm_dims
from minigpt4_local.checkpoints.lavis import convert_blip2_lavis, convert_eva_vit
from minigpt4_local.checkpoints.layout import expected_shapes
from minigpt4_local.checkpoints.minigpt4_proj import load_projection
from minigpt4_local.checkpoints.model_dir import convert, load_model_dir
from minigpt4_local.checkpoints.safe_load import load_safetensors, load_torch_checkpoint
from minigpt4_local.config import get_preset
from minigpt4_local.errors import CheckpointError, ConfigError, MiniGPT4Error, ModelDirError, TokenizerError
from tests.support.checkpoints import (
    lavis_weights,
    llama_weights,
    write_hf_llama_dir,
    write_lavis_blip2,
    write_lavis_eva,
    write_lavis_sources,
    write_minigpt4_proj,
)
from tests.support.tiny_tokenizer import make_tiny_sentencepiece

VICUNA = "tiny-vicuna-7b"
LLAMA2 = "tiny-llama2-7b"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    assert isinstance(err.value, MiniGPT4Error)
    return message


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("tok"), vocab_size=1000)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory):
    """LAVIS-format files for both tiny variants (read-only: tests convert them into tmp_path)."""
    return {p: write_lavis_sources(tmp_path_factory.mktemp(p), p) for p in (VICUNA, LLAMA2)}


# ----- safe loading ------------------------------------------------------------------------------


class NeedsCode:
    """Unpickling this would call a function: weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_missing_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_torch_checkpoint(tmp_path / "nope.pth")
    assert "not found" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        load_safetensors(tmp_path / "nope.safetensors")
    assert "not found" in one_line(err)


def test_truncated_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_torch_checkpoint(tmp_path / "cut.pth")
    assert "cut.pth" in one_line(err) and "truncated or corrupt" in one_line(err)

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as err:
        load_safetensors(tmp_path / "cut.safetensors")
    assert "truncated or corrupt" in one_line(err)


def test_pickle_needing_code_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(2, 2)}, "extra": NeedsCode()}, tmp_path / "evil.pth"
    )
    with pytest.raises(CheckpointError) as err:
        load_torch_checkpoint(tmp_path / "evil.pth")
    message = one_line(err)
    assert "refused" in message and "code execution (print)" in message
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(CheckpointError):  # the projection loader goes through the same door
        load_projection(tmp_path / "evil.pth")


def test_legacy_non_zip_checkpoint_loads(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4.0)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(load_torch_checkpoint(tmp_path / "old.pth")["w"], torch.arange(4.0))


# ----- LAVIS converters ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [False, True])
def test_eva_conversion(tmp_path: Path, prefix: bool) -> None:
    cfg = get_preset(VICUNA)
    truth = write_lavis_eva(tmp_path / "eva.pth", cfg, extra_blocks=2, prefix=prefix)
    raw = load_torch_checkpoint(tmp_path / "eva.pth")
    assert all(v.dtype == torch.float16 for v in raw.values())
    out = convert_eva_vit(raw, cfg.vision)
    vision_expected = {
        k for k in expected_shapes(cfg) if k.startswith("vision_model.") and "post_layernorm" not in k
    }
    assert set(out) == vision_expected  # extra blocks 2 and 3 dropped, nothing missing
    assert all(v.dtype == torch.float32 for v in out.values())
    q = truth["visual_encoder.blocks.1.attn.q_bias"]
    v = truth["visual_encoder.blocks.1.attn.v_bias"]
    bias = out["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    d = cfg.vision.hidden_size
    assert (
        torch.equal(bias[:d], q)
        and torch.equal(bias[d : 2 * d], torch.zeros(d))
        and torch.equal(bias[2 * d :], v)
    )
    assert torch.equal(out["vision_model.embeddings.position_embedding"], truth["visual_encoder.pos_embed"])
    kept = convert_eva_vit(raw, None, upcast=False)  # all blocks, stored dtype
    assert "vision_model.encoder.layers.3.mlp.fc2.bias" in kept
    assert kept["vision_model.encoder.layers.0.mlp.fc1.weight"].dtype == torch.float16


def test_eva_unknown_or_mixed_keys_fail(tmp_path: Path) -> None:
    cfg = get_preset(VICUNA)
    write_lavis_eva(tmp_path / "eva.pth", cfg)
    raw = load_torch_checkpoint(tmp_path / "eva.pth")
    with pytest.raises(CheckpointError) as err:
        convert_eva_vit({**raw, "blocks.0.attn.relative_position_bias_table": torch.zeros(3)}, cfg.vision)
    assert "blocks.0.attn.relative_position_bias_table" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        convert_eva_vit({**raw, "visual_encoder.cls_token": raw["cls_token"]}, cfg.vision)
    assert "mixes" in one_line(err)
    no_v_bias = {k: v for k, v in raw.items() if k != "blocks.0.attn.v_bias"}
    with pytest.raises(CheckpointError) as err:
        convert_eva_vit(no_v_bias, cfg.vision)
    assert "v_bias" in one_line(err)
    # documented unused heads of EVA-CLIP are accepted and dropped
    out = convert_eva_vit(
        {**raw, "norm.weight": torch.ones(32), "head.weight": torch.ones(2, 32)}, cfg.vision
    )
    assert not any(k == "norm.weight" or k.startswith("head") for k in out)


def test_blip2_conversion_ignores_t5_and_text_parts(tmp_path: Path) -> None:
    cfg = get_preset(VICUNA)
    truth = write_lavis_blip2(tmp_path / "blip2.pth", cfg)
    checkpoint = load_torch_checkpoint(tmp_path / "blip2.pth")
    assert any(k.startswith("t5_proj.") for k in checkpoint["model"])
    out = convert_blip2_lavis(checkpoint)
    expected = {
        k
        for k in expected_shapes(cfg)
        if k.startswith(("qformer.", "query_tokens", "vision_model.post_layernorm"))
    }
    assert set(out) == expected  # no t5_proj, no text FFN, no word embeddings, no cls head
    assert torch.equal(out["qformer.layernorm.weight"], truth["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(
        out["qformer.encoder.layer.0.crossattention.attention.key.weight"],
        truth["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"],
    )
    assert torch.equal(out["vision_model.post_layernorm.bias"], truth["ln_vision.bias"])


def test_blip2_unexpected_or_missing_keys_fail() -> None:
    cfg = get_preset(VICUNA)
    state = {
        k: v for k, v in lavis_weights(cfg).items() if not k.startswith(("visual_encoder.", "llama_proj."))
    }
    with pytest.raises(CheckpointError) as err:
        convert_blip2_lavis({"model": {**state, "vision_proj.weight": torch.zeros(2, 2)}})
    assert "vision_proj.weight" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        convert_blip2_lavis({"model": {k: v for k, v in state.items() if k != "query_tokens"}})
    assert "query_tokens" in one_line(err)


def test_visual_encoder_inside_blip2_file_wins(sources, tmp_path: Path) -> None:
    """Original load order: the BLIP-2 checkpoint (loaded after EVA, strict=False) overrides the ViT."""
    src = sources[VICUNA]
    blip2 = tmp_path / "blip2_with_vit.pth"
    other = write_lavis_blip2(blip2, src.cfg, seed=1, with_visual_encoder=True)
    messages: list[str] = []
    out = convert(
        vit=src.eva,
        qformer=blip2,
        proj=src.proj,
        llm=src.llm,
        out=tmp_path / "m",
        preset=VICUNA,
        progress=messages.append,
    )
    stored = load_file(str(out / "vision.safetensors"))
    assert torch.equal(
        stored["vision_model.encoder.layers.0.mlp.fc1.weight"].float(),
        other["visual_encoder.blocks.0.mlp.fc1.weight"],
    )
    assert any("override EVA" in m for m in messages)


# ----- projection ------------------------------------------------------------------------------------


def test_projection_takes_only_llama_proj(tmp_path: Path) -> None:
    cfg = get_preset(VICUNA)
    truth = write_minigpt4_proj(tmp_path / "proj.pth", cfg)
    raw = load_torch_checkpoint(tmp_path / "proj.pth")
    assert {"optimizer", "scaler", "config", "epoch"} <= set(raw)
    out = load_projection(tmp_path / "proj.pth", expected_in=32, expected_out=64)
    assert set(out) == {"llama_proj.weight", "llama_proj.bias"}
    assert torch.equal(out["llama_proj.weight"], truth["llama_proj.weight"])


def test_projection_module_prefix_and_ln_vision(tmp_path: Path) -> None:
    cfg = get_preset(LLAMA2)
    truth = write_minigpt4_proj(tmp_path / "proj.pth", cfg, with_ln_vision=True, module_prefix=True)
    messages: list[str] = []
    out = load_projection(tmp_path / "proj.pth", 128, 64, progress=messages.append)
    assert set(out) == {
        "llama_proj.weight",
        "llama_proj.bias",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
    }
    assert torch.equal(out["vision_model.post_layernorm.weight"], truth["ln_vision.weight"])
    assert any("ln_vision" in m for m in messages)


def test_projection_absent_or_misshaped_fails(tmp_path: Path) -> None:
    torch.save({"model": {"something.weight": torch.zeros(2)}, "optimizer": {}}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError) as err:
        load_projection(tmp_path / "none.pth")
    assert "no llama_proj" in one_line(err)

    write_minigpt4_proj(tmp_path / "llama2.pth", get_preset(LLAMA2))  # Linear 128 → 64
    with pytest.raises(CheckpointError) as err:
        load_projection(tmp_path / "llama2.pth", expected_in=32, expected_out=64)
    message = one_line(err)
    assert "128 → 64" in message and "expected 32 → 64" in message and LLAMA2 in message

    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(4, 3), "llama_proj.lora_A": torch.zeros(1)}},
        tmp_path / "v2.pth",
    )
    with pytest.raises(CheckpointError) as err:
        load_projection(tmp_path / "v2.pth")
    assert "LoRA" in one_line(err)


def test_projection_fit_names_real_presets(tmp_path: Path) -> None:
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(5120, 768), "llama_proj.bias": torch.zeros(5120)}},
        tmp_path / "p.pth",
    )
    with pytest.raises(CheckpointError) as err:
        load_projection(tmp_path / "p.pth", expected_in=768, expected_out=4096)
    assert "minigpt4-vicuna-13b" in one_line(err)


# ----- HF LLaMA -------------------------------------------------------------------------------------


def test_vicuna_quirks_fixed_in_written_llm(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = get_preset(VICUNA)
    weights = write_hf_llama_dir(tmp_path / "src", cfg, tokenizer_dir, vicuna_quirks=True)
    src_config = json.loads((tmp_path / "src" / "config.json").read_text())
    assert (src_config["bos_token_id"], src_config["eos_token_id"]) == (0, 1)
    dims = copy_llm_dir(tmp_path / "src", tmp_path / "dst")
    assert (dims.vocab_size, dims.tokenizer_pieces, dims.bos_token_id, dims.eos_token_id) == (
        1001,
        1000,
        1,
        2,
    )
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    generation = json.loads((tmp_path / "dst" / "generation_config.json").read_text())
    for data in (config, generation):
        assert (data["bos_token_id"], data["eos_token_id"]) == (1, 2)
        assert data.get("pad_token_id") is None
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "dst" / "tokenizer.model").is_file()
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    written = {}
    for shard in set(index["weight_map"].values()):
        written.update(load_file(str(tmp_path / "dst" / shard)))
    assert set(written) == set(weights)  # rotary_emb.inv_freq buffers dropped
    assert all(torch.equal(written[k], weights[k]) for k in weights)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_bin_llm_is_converted_to_safetensors(tmp_path: Path, tokenizer_dir: Path, n_shards: int) -> None:
    cfg = get_preset(LLAMA2)
    weights = write_hf_llama_dir(
        tmp_path / "src", cfg, tokenizer_dir, vicuna_quirks=False, bin_format=True, n_shards=n_shards
    )
    assert not list((tmp_path / "src").glob("*.safetensors"))
    copy_llm_dir(tmp_path / "src", tmp_path / "dst")
    files = sorted(p.name for p in (tmp_path / "dst").glob("*.safetensors"))
    assert len(files) == n_shards and not list((tmp_path / "dst").glob("*.bin"))
    written = {}
    for name in files:
        written.update(load_file(str(tmp_path / "dst" / name)))
    assert set(written) == set(weights) and all(torch.equal(written[k], weights[k]) for k in weights)
    generation = json.loads((tmp_path / "dst" / "generation_config.json").read_text())
    assert generation["temperature"] == 0.6  # other fields are kept


def test_read_llm_dims_from_shapes(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = get_preset(VICUNA)
    write_hf_llama_dir(tmp_path / "llm", cfg, tokenizer_dir)
    dims = read_llm_dims(tmp_path / "llm")
    llm = cfg.llm
    assert (dims.hidden_size, dims.num_layers, dims.vocab_size, dims.intermediate_size) == (
        llm.hidden_size,
        llm.num_layers,
        llm.vocab_size,
        llm.intermediate_size,
    )
    assert (dims.num_heads, dims.num_kv_heads, dims.tie_word_embeddings) == (
        llm.num_heads,
        llm.num_kv_heads,
        False,
    )
    assert dims.to_llm_config(llm) == llm


def test_hf_config_maps_to_llm_config_in_one_place(tmp_path: Path, tokenizer_dir: Path) -> None:
    from minigpt4_local.checkpoints.hf_llama import llm_config_from_hf, read_llm_config
    from minigpt4_local.config import LLMConfig

    smollm2 = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert llm_config_from_hf(smollm2) == LLMConfig(
        576, 30, 9, 3, 1536, 49152, 1e-5, 100000.0, 8192, True, 1, 2
    )
    v0 = {k: smollm2[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
    v0.update(intermediate_size=1536, max_sequence_length=512)  # Vicuna v0: no kv heads, max_sequence_length
    llm = llm_config_from_hf(v0)
    assert (llm.num_kv_heads, llm.max_position_embeddings, llm.rope_theta, llm.rms_norm_eps) == (
        9,
        512,
        1e4,
        1e-6,
    )
    with pytest.raises(CheckpointError) as err:
        llm_config_from_hf({k: v for k, v in smollm2.items() if k != "num_attention_heads"}, "x/config.json")
    assert one_line(err) == "x/config.json: missing num_attention_heads"
    with pytest.raises(CheckpointError, match="hidden_size"):
        llm_config_from_hf({**smollm2, "hidden_size": "576"})

    # A directory with weights: dims from the tensor shapes and the tokenizer, config.json checked against them.
    cfg = get_preset(VICUNA)
    write_hf_llama_dir(tmp_path / "llm", cfg, tokenizer_dir, vicuna_quirks=False)
    assert read_llm_config(tmp_path / "llm") == read_llm_dims(tmp_path / "llm").to_llm_config() == cfg.llm
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 2}))
    with pytest.raises(CheckpointError) as err:
        read_llm_config(tmp_path / "llm")
    assert "num_key_value_heads is 2 but the weights say 4" in one_line(err)
    (tmp_path / "alone").mkdir()  # config.json alone: taken as it is
    (tmp_path / "alone" / "config.json").write_text(json.dumps(smollm2))
    assert read_llm_config(tmp_path / "alone") == llm_config_from_hf(smollm2)


def test_broken_llm_dirs_fail(tmp_path: Path, tokenizer_dir: Path) -> None:
    cfg = get_preset(VICUNA)
    small = cfg.copy()
    small.llm.vocab_size = 900  # fewer rows than the tokenizer's 1000 pieces
    write_hf_llama_dir(tmp_path / "small", small, tokenizer_dir)
    with pytest.raises(TokenizerError) as err:
        read_llm_dims(tmp_path / "small")
    assert "1000" in one_line(err)

    write_hf_llama_dir(tmp_path / "liar", cfg, tokenizer_dir)
    config = json.loads((tmp_path / "liar" / "config.json").read_text())
    (tmp_path / "liar" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(CheckpointError) as err:
        read_llm_dims(tmp_path / "liar")
    assert "hidden_size is 128 but the weights say 64" in one_line(err)

    write_hf_llama_dir(tmp_path / "holes", cfg, tokenizer_dir, n_shards=1)
    weights = load_file(str(tmp_path / "holes" / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "holes" / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        read_llm_dims(tmp_path / "holes")
    assert "model.layers.1.mlp.up_proj.weight" in one_line(err)

    write_hf_llama_dir(tmp_path / "notok", cfg, tokenizer_dir)
    (tmp_path / "notok" / "tokenizer.model").unlink()
    with pytest.raises(TokenizerError):
        read_llm_dims(tmp_path / "notok")


# ----- convert / model directory ------------------------------------------------------------------


def test_preset_mismatch_names_key_and_fitting_preset(sources, tmp_path: Path) -> None:
    src = sources[VICUNA]
    with pytest.raises(CheckpointError) as err:
        convert(vit=src.eva, proj=src.proj, llm=src.llm, out=tmp_path / "m", preset=LLAMA2)
    message = one_line(err)
    assert "projector.in_features: weights say 32" in message and f"preset {LLAMA2} says 128" in message
    assert f"use --preset {VICUNA}" in message
    assert not (tmp_path / "m").exists()


def test_llm_and_projection_disagree(sources, tmp_path: Path) -> None:
    src = sources[VICUNA]
    wide = src.cfg.copy()
    wide.llm.hidden_size, wide.llm.intermediate_size = 96, 192
    write_hf_llama_dir(tmp_path / "llm96", wide, src.tokenizer)
    with pytest.raises(CheckpointError) as err:
        convert(
            vit=src.eva,
            qformer=src.blip2,
            proj=src.proj,
            llm=tmp_path / "llm96",
            out=tmp_path / "m",
            preset=VICUNA,
        )
    message = one_line(err)
    assert message.startswith("llm.hidden_size:") and "64" in message and "96" in message


def test_preset_is_picked_from_shapes(sources, tmp_path: Path) -> None:
    src = sources[LLAMA2]
    messages: list[str] = []
    out = convert(vit=src.eva, proj=src.proj, llm=src.llm, out=tmp_path / "m", progress=messages.append)
    assert json.loads((out / "config.json").read_text())["name"] == LLAMA2
    assert any(f"match preset {LLAMA2}" in m for m in messages)


def test_variant_inputs_are_checked(sources, tmp_path: Path) -> None:
    vicuna, llama2 = sources[VICUNA], sources[LLAMA2]
    with pytest.raises(CheckpointError) as err:
        convert(
            vit=llama2.eva,
            qformer=vicuna.blip2,
            proj=llama2.proj,
            llm=llama2.llm,
            out=tmp_path / "a",
            preset=LLAMA2,
        )
    assert "no Q-Former" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        convert(vit=vicuna.eva, proj=vicuna.proj, llm=vicuna.llm, out=tmp_path / "b", preset=VICUNA)
    assert "Q-Former" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        convert(vit=tmp_path / "missing.pth", proj=vicuna.proj, llm=vicuna.llm, out=tmp_path / "c")
    assert "not found" in one_line(err)
    with pytest.raises(ConfigError):
        convert(
            vit=vicuna.eva,
            proj=vicuna.proj,
            llm=vicuna.llm,
            out=tmp_path / "d",
            preset=VICUNA,
            config_path=tmp_path / "x.json",
        )
    with pytest.raises(ConfigError):
        convert(vit=vicuna.eva, proj=vicuna.proj, llm=vicuna.llm, out=tmp_path / "d", preset="no-such-preset")


def test_config_file_instead_of_preset(sources, tmp_path: Path) -> None:
    from minigpt4_local.config import save_config

    src = sources[VICUNA]
    cfg = src.cfg.copy()
    cfg.name = "my-tiny"
    cfg.generation.max_new_tokens = 7
    save_config(cfg, tmp_path / "mine.json")
    out = convert(
        vit=src.eva,
        qformer=src.blip2,
        proj=src.proj,
        llm=src.llm,
        out=tmp_path / "m",
        config_path=tmp_path / "mine.json",
    )
    assert json.loads((out / "config.json").read_text())["generation"]["max_new_tokens"] == 7


def test_interrupted_convert_leaves_nothing(sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = sources[VICUNA]

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_dir_module, "copy_llm_dir", boom)
    out = tmp_path / "out" / "model"
    with pytest.raises(KeyboardInterrupt):
        convert(vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=out, preset=VICUNA)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no partial temp directory either


def test_existing_output_is_not_clobbered(sources, tmp_path: Path) -> None:
    src = sources[VICUNA]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(ModelDirError) as err:
        convert(vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=tmp_path / "m", preset=VICUNA)
    assert "already exists" in one_line(err)
    convert(
        vit=src.eva,
        qformer=src.blip2,
        proj=src.proj,
        llm=src.llm,
        out=tmp_path / "m",
        preset=VICUNA,
        overwrite=True,
    )
    assert not (tmp_path / "m" / "keep.txt").exists() and (tmp_path / "m" / "vision.safetensors").is_file()


def test_vision_file_keeps_source_dtype(sources, tmp_path: Path) -> None:
    src = sources[VICUNA]
    out = convert(
        vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=tmp_path / "m", preset=VICUNA
    )
    stored = load_file(str(out / "vision.safetensors"))
    assert stored["vision_model.encoder.layers.0.self_attn.qkv.weight"].dtype == torch.float16  # EVA: fp16
    assert stored["qformer.layernorm.weight"].dtype == torch.float32
    assert set(stored) == set(expected_shapes(src.cfg))
    model = load_model_dir(out, with_llm=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.llm is None


@pytest.fixture()
def model_dir(sources, tmp_path: Path) -> Path:
    src = sources[VICUNA]
    return convert(
        vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=tmp_path / "m", preset=VICUNA
    )


def test_load_model_dir_missing_parts(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError) as err:
        load_model_dir(tmp_path / "nothing")
    assert "not found" in one_line(err)
    (model_dir / "vision.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ModelDirError) as err:
        load_model_dir(model_dir)
    assert "vision.safetensors" in one_line(err)


def test_load_model_dir_checks_keys_and_shapes(model_dir: Path) -> None:
    path = model_dir / "vision.safetensors"
    good = load_file(str(path))
    save_file({**good, "qformer.extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(model_dir, with_llm=False)
    assert "unexpected qformer.extra.weight" in one_line(err)
    save_file({**good, "llama_proj.bias": torch.zeros(65)}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(model_dir, with_llm=False)
    assert "llama_proj.bias has shape (65,), expected (64,)" in one_line(err)
    save_file({k: v for k, v in good.items() if k != "query_tokens"}, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(model_dir, with_llm=False)
    assert "missing query_tokens" in one_line(err)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        load_model_dir(model_dir, with_llm=False)
    assert "truncated or corrupt" in one_line(err)


def test_load_model_dir_checks_llm(model_dir: Path) -> None:
    index = json.loads((model_dir / "llm" / "model.safetensors.index.json").read_text())
    shard = model_dir / "llm" / index["weight_map"]["model.norm.weight"]
    tensors = load_file(str(shard))
    del tensors["model.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as err:
        load_model_dir(model_dir)
    assert "missing model.norm.weight" in one_line(err)


def test_llm_weights_round_trip_exactly(model_dir: Path, sources) -> None:
    model = load_model_dir(model_dir)
    want = llama_weights(sources[VICUNA].cfg)
    state = model.llm.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in want.items())
    assert not any(b.is_meta for b in model.buffers())


def test_tied_embeddings_llm(sources, tmp_path: Path) -> None:
    """An LLM without lm_head.weight (tied, SmolLM2-style) converts and loads with the head tied."""
    from minigpt4_local.config import save_config

    src = sources[VICUNA]
    cfg = src.cfg.copy()
    cfg.llm.tie_word_embeddings = True
    weights = write_hf_llama_dir(tmp_path / "llm", cfg, src.tokenizer, vicuna_quirks=False)
    assert "lm_head.weight" not in weights
    save_config(cfg, tmp_path / "tied.json")
    with pytest.raises(CheckpointError) as err:  # the preset says untied: the weights disagree
        convert(
            vit=src.eva,
            qformer=src.blip2,
            proj=src.proj,
            llm=tmp_path / "llm",
            out=tmp_path / "x",
            preset=VICUNA,
        )
    assert "llm.tie_word_embeddings" in one_line(err)
    out = convert(
        vit=src.eva,
        qformer=src.blip2,
        proj=src.proj,
        llm=tmp_path / "llm",
        out=tmp_path / "m",
        config_path=tmp_path / "tied.json",
    )
    model = load_model_dir(out)
    assert model.llm.lm_head.weight.data_ptr() == model.llm.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.llm.lm_head.weight, weights["model.embed_tokens.weight"].float())


def test_qformer_from_hf_dir_with_lavis_vit(sources, tmp_path: Path) -> None:
    """eva_vit_g.pth + Q-Former/ln_vision from an HF BLIP-2 dir == the all-LAVIS conversion."""
    from tests.support.checkpoints import write_hf_blip2_dir

    src = sources[VICUNA]
    write_hf_blip2_dir(tmp_path / "hf", src.cfg, n_shards=3)
    a = convert(
        vit=src.eva, qformer=tmp_path / "hf", proj=src.proj, llm=src.llm, out=tmp_path / "a", preset=VICUNA
    )
    b = convert(vit=src.eva, qformer=src.blip2, proj=src.proj, llm=src.llm, out=tmp_path / "b", preset=VICUNA)
    sa, sb = load_file(str(a / "vision.safetensors")), load_file(str(b / "vision.safetensors"))
    assert set(sa) == set(sb)
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_llm_rms_eps_follows_llm_config(sources, tmp_path: Path) -> None:
    """The original builds the LLM from its config.json: its rms_norm_eps wins over the preset's."""
    src = sources[VICUNA]
    llm = tmp_path / "llm"
    shutil.copytree(src.llm, llm)
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    messages: list[str] = []
    out = convert(
        vit=src.eva,
        qformer=src.blip2,
        proj=src.proj,
        llm=llm,
        out=tmp_path / "m",
        preset=VICUNA,
        progress=messages.append,
    )
    assert json.loads((out / "config.json").read_text())["llm"]["rms_norm_eps"] == 1e-5
    assert any("llm.rms_norm_eps: using 1e-05" in m for m in messages)
    assert load_model_dir(out).llm.config.rms_norm_eps == 1e-5


def test_model_dir_module_is_torch_free_to_import(model_dir: Path) -> None:
    code = (
        "import sys; from minigpt4_local.checkpoints.model_dir import read_model_config; "
        f"cfg = read_model_config({str(model_dir)!r}); "
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, 'heavy import'; print(cfg.name)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == VICUNA
