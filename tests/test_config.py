"""Config presets match docs/numerics.md; JSON round-trips; validation names the offending key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigpt4_local.config import (
    MiniGPT4Config,
    get_preset,
    load_config,
    preset_names,
    save_config,
)
from minigpt4_local.errors import ConfigError


def test_real_presets_match_the_spec() -> None:
    v7 = get_preset("minigpt4-vicuna-7b")
    assert (v7.vision.image_size, v7.vision.patch_size, v7.vision.num_tokens) == (224, 14, 257)
    assert (v7.vision.hidden_size, v7.vision.num_heads, v7.vision.intermediate_size) == (1408, 16, 6144)
    assert v7.vision.num_layers == 39
    assert (v7.vision.layer_norm_eps, v7.vision.ln_vision_eps) == (1e-6, 1e-5)
    assert v7.qformer is not None
    assert (v7.qformer.num_query_tokens, v7.qformer.hidden_size, v7.qformer.num_layers) == (32, 768, 12)
    assert (v7.qformer.cross_attention_frequency, v7.qformer.layer_norm_eps) == (2, 1e-12)
    assert (v7.projector_in_features, v7.llm.hidden_size, v7.num_image_tokens) == (768, 4096, 32)
    assert (v7.llm.vocab_size, v7.llm.bos_token_id, v7.llm.eos_token_id) == (32001, 1, 2)
    assert v7.prompt.template == "vicuna_v0"
    assert v7.prompt.stop_sequences == [[835], [2277, 29937]]
    assert v7.prompt.max_context == 2000
    g = v7.generation
    assert (g.max_new_tokens, g.top_p, g.top_k, g.temperature, g.repetition_penalty) == (
        300,
        0.9,
        50,
        1.0,
        1.05,
    )

    v13 = get_preset("minigpt4-vicuna-13b")
    assert (v13.projector_in_features, v13.llm.hidden_size, v13.llm.num_layers) == (768, 5120, 40)

    l2 = get_preset("minigpt4-llama2-7b")
    assert l2.qformer is None
    assert (l2.projector.merge_tokens, l2.projector_in_features, l2.num_image_tokens) == (4, 5632, 64)
    assert (l2.llm.vocab_size, l2.prompt.template) == (32000, "llama2")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name: str, tmp_path: Path) -> None:
    config = get_preset(name)
    path = tmp_path / "config.json"
    save_config(config, path)
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d["llm"].update(hiden_size=1), "llm.hiden_size"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["vision"].update(num_heads=5), "vision.num_heads"),
        (lambda d: d["vision"].update(image_size=100), "vision.image_size"),
        (lambda d: d["llm"].update(hidden_size="4096"), "llm.hidden_size"),
        (lambda d: d["llm"].update(num_kv_heads=3), "llm.num_kv_heads"),
        (lambda d: d["llm"].update(eos_token_id=99999), "llm.eos_token_id"),
        (lambda d: d["projector"].update(merge_tokens=4), "projector.merge_tokens"),
        (lambda d: d["prompt"].update(template="chatml"), "prompt.template"),
        (lambda d: d["prompt"].update(stop_sequences=[[40000]]), "prompt.stop_sequences"),
        (lambda d: d["generation"].update(max_new_tokens=5000), "generation.max_new_tokens"),
        (lambda d: d.update(qformer=[1]), "qformer"),
        (lambda d: d.update(format="something-else"), "format"),
    ],
)
def test_invalid_configs_name_the_key(mutate, key: str) -> None:
    data = get_preset("minigpt4-vicuna-7b").to_dict()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        MiniGPT4Config.from_dict(data)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_llama2_without_qformer_needs_merge_dividing_patches() -> None:
    data = get_preset("minigpt4-llama2-7b").to_dict()
    data["projector"]["merge_tokens"] = 3  # 256 patches are not divisible by 3
    with pytest.raises(ConfigError, match=r"projector\.merge_tokens"):
        MiniGPT4Config.from_dict(data)


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)
    broken.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(broken)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("minigpt4-vicuna-70b")


def test_april_template_defaults_to_no_repetition_penalty() -> None:
    """The April 2023 demo decoded with repetition penalty 1.0, the Oct 2023 one with 1.05."""
    from minigpt4_local.config import GenerationDefaults, PromptConfig
    from minigpt4_local.sampling import SamplingOptions

    april = get_preset("minigpt4-vicuna-7b").to_dict()
    april["prompt"]["template"] = "vicuna_v0_april"
    del april["generation"]["repetition_penalty"]
    assert MiniGPT4Config.from_dict(april).generation.repetition_penalty == 1.0
    del april["generation"]
    assert MiniGPT4Config.from_dict(april).generation.repetition_penalty == 1.0
    april["generation"] = {"repetition_penalty": 1.05}  # an explicit value is kept
    assert MiniGPT4Config.from_dict(april).generation.repetition_penalty == 1.05

    october = get_preset("minigpt4-vicuna-7b").to_dict()
    del october["generation"]["repetition_penalty"]
    assert MiniGPT4Config.from_dict(october).generation.repetition_penalty == 1.05

    built = MiniGPT4Config(prompt=PromptConfig(template="vicuna_v0_april"))
    assert built.generation.repetition_penalty == 1.0
    assert SamplingOptions.from_defaults(built.generation).repetition_penalty == 1.0
    shared = GenerationDefaults(max_new_tokens=20)  # penalty not given: each config applies its template's
    assert (
        MiniGPT4Config(
            prompt=PromptConfig(template="vicuna_v0_april"), generation=shared
        ).generation.repetition_penalty
        == 1.0
    )
    assert MiniGPT4Config(generation=shared).generation.repetition_penalty == 1.05
    explicit = GenerationDefaults(repetition_penalty=1.05)
    assert (
        MiniGPT4Config(
            prompt=PromptConfig(template="vicuna_v0_april"), generation=explicit
        ).generation.repetition_penalty
        == 1.05
    )
    assert (
        SamplingOptions.from_defaults(GenerationDefaults()).repetition_penalty == 1.05
    )  # standalone defaults
