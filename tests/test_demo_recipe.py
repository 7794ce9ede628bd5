"""The demo recipe's pieces on tiny models: prompt without system text, package-held bundle files, the
vision warm-up, and the scene eval loop with a scripted pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt4_local.bundle import Bundle
from minigpt4_local.config import MiniGPT4Config, get_preset
from minigpt4_local.errors import ConfigError, ModelDirError
from minigpt4_local.prompts import Conversation, get_template


def test_template_without_system_text() -> None:
    conv = Conversation(get_template("vicuna_v0", system=""))
    conv.add_image()
    conv.ask("Describe this image in detail.")
    assert conv.prompt() == "###Human: <Img><ImageHere></Img> Describe this image in detail.###Assistant: "
    # None keeps the template's system message (the original demo's).
    assert get_template("vicuna_v0", None).system.startswith("Give the following image")


def test_prompt_system_round_trips_and_is_checked() -> None:
    config = get_preset("tiny-vicuna-7b")
    config.prompt.system = ""
    again = MiniGPT4Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.prompt.system == ""
    bad = config.to_dict()
    bad["prompt"]["system"] = 3
    with pytest.raises(ConfigError, match=r"prompt\.system"):
        MiniGPT4Config.from_dict(bad)


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "site" / "fake_weights_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "weights.bin").write_bytes(b"0123456789" * 10)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def test_bundle_file_held_by_another_package(tmp_path: Path, fake_package: Path) -> None:
    bundle = Bundle.create(tmp_path / "b", get_preset("tiny-vicuna-7b"))
    rel = bundle.add_package_file("weights.bin", "fake_weights_pkg", role="llm")
    bundle.set_part("llm", {"file": rel}, files=[rel])
    bundle.save()
    opened = Bundle.open(tmp_path / "b")  # found and hashed without importing the package
    assert opened.part_path("llm") == fake_package / "weights.bin"
    assert "fake_weights_pkg" not in sys.modules
    (fake_package / "weights.bin").write_bytes(b"9123456789" * 10)  # same size, other bytes
    with pytest.raises(ModelDirError, match="sha256"):
        Bundle.open(tmp_path / "b")
    opened.drop_part("llm")  # forgetting the part never deletes the other package's file
    assert (fake_package / "weights.bin").is_file()


def test_bundle_package_missing_is_one_line(tmp_path: Path, fake_package: Path) -> None:
    bundle = Bundle.create(tmp_path / "b", get_preset("tiny-vicuna-7b"))
    rel = bundle.add_package_file("weights.bin", "fake_weights_pkg", role="llm")
    bundle.manifest["files"][rel]["package"] = "no_such_pkg_xyz"
    bundle.save()
    with pytest.raises(ModelDirError, match=r"package no-such-pkg-xyz, which is not installed \(pip install"):
        Bundle.open(tmp_path / "b")
    bundle.manifest["files"][rel]["package"] = "../evil"
    bundle.save()
    with pytest.raises(ModelDirError, match="not a module name"):
        Bundle.open(tmp_path / "b")


def test_vision_warm_up_trains_vision_and_qformer_only(tiny_tokenizer_dir, tmp_path: Path) -> None:
    import torch

    from minigpt4_local.checkpoints.model_dir import load_model_dir, save_model_dir
    from minigpt4_local.model import MiniGPT4
    from minigpt4_local.train.demo.recipe import WarmUpSettings, warm_up_vision

    config = get_preset("tiny-vicuna-7b")
    config.qformer.num_query_tokens = 9  # one query per grid cell
    torch.manual_seed(0)
    model_dir = save_model_dir(MiniGPT4(config), tiny_tokenizer_dir, tmp_path / "model")
    before = load_model_dir(model_dir, with_llm=False).vision_state_dict()
    settings = WarmUpSettings(steps=3, batch_size=4, train_scenes=8, eval_scenes=4, warmup_steps=1)
    lines: list[str] = []
    result = warm_up_vision(model_dir, settings, echo=lines.append)
    after = load_model_dir(model_dir, with_llm=False).vision_state_dict()
    assert set(result["heldout_cell_accuracy"]) == {"occupied", "shape", "color", "size", "cell", "count"}
    assert all(0.0 <= v <= 1.0 for v in result["heldout_cell_accuracy"].values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_model.") for k in changed)
    assert any(k.startswith("qformer.") for k in changed) and "query_tokens" in changed
    assert not any(k.startswith("llama_proj.") for k in changed)  # the projection trains in stage 2
    assert any("warm-up step 3/3" in line for line in lines)


def test_mirrored_scene_labels_follow_the_pixels() -> None:
    """The warm-up's left-right mirror: the object of cell (r, c) is at (r, 2 - c), same colour and shape."""
    from minigpt4_local.train.demo.recipe import MIRROR_CELLS, cell_targets
    from minigpt4_local.train.demo.scenes import PALETTE, SHAPES, make_scene

    scene = next(s for s in (make_scene(k, 224) for k in range(50)) if len(s.objects) == 3)
    assert any(o.col != 1 for o in scene.objects)  # the mirror moves at least one object
    mirrored = np.asarray(scene.image)[:, ::-1]  # (H, W, 3)
    targets = cell_targets(scene)[list(MIRROR_CELLS)]  # labels of the mirrored scene, by cell
    assert int((targets[:, 0] == 1).sum()) == 3
    for obj in scene.objects:
        x, y = obj.center
        assert tuple(mirrored[y, scene.image_size - 1 - x]) == PALETTE[obj.color]
        assert targets[obj.row * 3 + (2 - obj.col), 1] == SHAPES.index(obj.shape)


def test_fit_ridge_recovers_a_linear_map() -> None:
    import torch

    from minigpt4_local.train.demo.recipe import fit_ridge

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    weight, bias = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    y = x @ weight.double().T + bias.double()
    got_w, got_b = fit_ridge(x, y, ridge=1e-9)
    torch.testing.assert_close(got_w, weight.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got_b, bias.double(), atol=1e-6, rtol=0)
    shrunk, _ = fit_ridge(x, y, ridge=1e3)
    assert shrunk.norm() < got_w.norm()  # the ridge shrinks the weight, not the bias


def test_align_projection_changes_only_the_projection(tiny_tokenizer_dir, tmp_path: Path) -> None:
    import torch

    from minigpt4_local.checkpoints.model_dir import load_model_dir, save_model_dir
    from minigpt4_local.model import MiniGPT4
    from minigpt4_local.train.demo.recipe import align_projection_to_words

    config = get_preset("tiny-vicuna-7b")
    config.qformer.num_query_tokens = 9
    torch.manual_seed(0)
    model_dir = save_model_dir(MiniGPT4(config), tiny_tokenizer_dir, tmp_path / "model")
    before = load_model_dir(model_dir, with_llm=False).vision_state_dict()
    lines: list[str] = []
    facts = align_projection_to_words(model_dir, n_scenes=30, echo=lines.append)
    after = load_model_dir(model_dir, with_llm=False).vision_state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"llama_proj.weight", "llama_proj.bias"}
    assert facts["heldout_r2"] <= 1.0
    for key in ("nearest_size_word", "nearest_color_word", "nearest_shape_word"):
        assert 0.0 <= facts[key] <= 1.0
    assert len(lines) == 1 and lines[0].startswith("projection aligned to word embeddings")


def test_vision_warm_up_needs_a_query_per_cell(tiny_model_dir) -> None:
    from minigpt4_local.train.demo.recipe import WarmUpSettings, warm_up_vision

    with pytest.raises(ConfigError, match="at least 9 queries"):
        warm_up_vision(tiny_model_dir("tiny-vicuna-7b"), WarmUpSettings(steps=1), echo=lambda s: None)


def test_init_vision_for_training_replaces_tiny_blip2_init() -> None:
    import torch

    from minigpt4_local.model import MiniGPT4
    from minigpt4_local.train.demo.recipe import init_vision_for_training, sincos_2d

    model = MiniGPT4(get_preset("tiny-vicuna-7b"), with_llm=False)
    emb = model.vision_model.embeddings
    assert float(emb.patch_embedding.weight.detach().std()) < 1e-6  # transformers' BLIP-2 init
    init_vision_for_training(model)
    assert 0.01 < float(emb.patch_embedding.weight.detach().std()) < 0.03
    grid, width = model.config.vision.grid, model.config.vision.hidden_size
    torch.testing.assert_close(emb.position_embedding.detach()[0, 1:], sincos_2d(grid, width))
    assert float(emb.position_embedding.detach()[0, 0].abs().max()) == 0.0  # CLS has no position
    table = sincos_2d(4, 8)
    assert len({tuple(row.tolist()) for row in table}) == 16  # every patch position distinct


class _ScriptedPipeline:
    """Answers with the true caption for even seeds and nonsense for odd ones."""

    def __init__(self) -> None:
        self.calls = 0

    def sampling(self, greedy: bool = False) -> dict:
        assert greedy
        return {}

    def describe(self, image, question, options):
        from types import SimpleNamespace

        from minigpt4_local.train.demo.scenes import make_scene, scene_seeds

        seed = list(scene_seeds("heldout", 10))[self.calls]
        self.calls += 1
        truth = make_scene(seed, 224)
        assert image.tobytes() == truth.image.tobytes()  # the eval renders the held-out scene itself
        assert question == "Describe this image in detail."
        return SimpleNamespace(text=truth.caption if self.calls % 2 else "a purple elephant")


def test_evaluate_scores_held_out_scenes() -> None:
    from minigpt4_local.train.demo.eval import evaluate

    result = evaluate(_ScriptedPipeline(), 4, "scripted")
    assert result.accuracy["scenes"] == 4
    assert 0.2 < result.accuracy["overall"] < 0.8  # two perfect scenes, two scoring nothing
    assert result.examples[0]["said"] == "a purple elephant"
    assert json.loads(json.dumps(result.to_json()))["backend"] == "scripted"
    with pytest.raises(ConfigError):
        evaluate(_ScriptedPipeline(), 0, "scripted")


def test_demo_config_reads_the_decoder_dims(tmp_path: Path) -> None:
    from minigpt4_local.train.demo.recipe import DEMO_IMAGE_SIZE, demo_config

    hf = {
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
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = demo_config(tmp_path)
    config.validate()
    assert (config.llm.hidden_size, config.llm.num_kv_heads, config.llm.rope_theta) == (576, 3, 100000.0)
    assert config.vision.image_size == DEMO_IMAGE_SIZE and config.num_image_tokens == 9
    assert config.prompt.system == "" and not config.generation.do_sample


def test_demo_config_checks_a_full_decoder_dir_against_its_weights(tmp_path: Path) -> None:
    from minigpt4_local.errors import CheckpointError
    from minigpt4_local.train.demo.recipe import demo_config
    from tests.support.checkpoints import write_hf_llama_dir
    from tests.support.tiny_tokenizer import make_tiny_sentencepiece

    cfg = get_preset("tiny-vicuna-7b")
    tokenizer = make_tiny_sentencepiece(tmp_path / "tok", vocab_size=1000)
    write_hf_llama_dir(tmp_path / "llm", cfg, tokenizer, vicuna_quirks=False, n_shards=1)
    assert demo_config(tmp_path / "llm").llm == cfg.llm  # the shared dims table: shapes + tokenizer ids
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(CheckpointError, match="hidden_size is 128 but the weights say 64"):
        demo_config(tmp_path / "llm")
    del config["num_key_value_heads"]  # config.json alone, without kv heads (older LLaMA): one per head
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "config.json").write_text(json.dumps(config))
    assert demo_config(tmp_path / "alone").llm.num_kv_heads == cfg.llm.num_heads


def test_match_projection_scale() -> None:
    import torch

    from minigpt4_local.model import MiniGPT4
    from minigpt4_local.train.demo.recipe import match_projection_scale

    torch.manual_seed(0)
    model = MiniGPT4(get_preset("tiny-vicuna-7b"))
    target = match_projection_scale(model)
    rows = model.llama_proj(torch.randn(4096, model.llama_proj.in_features)).detach()
    assert abs(float(rows.std()) / target - 1.0) < 0.1  # image rows start at the token-embedding spread


def test_demo_commands_are_registered(capsys) -> None:
    from minigpt4_local.cli import main

    for args in (
        ["eval-demo", "--help"],
        ["train", "demo-prepare", "--help"],
        ["train", "demo-export", "--help"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "onnx+gguf" in out and "--training-facts" in out and "--warmup-steps" in out


def test_eval_demo_rejects_a_broken_bundle(capsys, tmp_path: Path) -> None:
    from minigpt4_local.cli import main

    (tmp_path / "minigpt4.json").write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        main(["eval-demo", "--model", str(tmp_path), "--n", "2"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "not valid JSON" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
