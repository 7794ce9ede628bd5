"""Training sequence layout + label masks (docs/numerics.md §14), caption processor, lr schedule, optimizer groups
and the training config. Expected ids are built from the raw sentencepiece model, not from the code under
test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from minigpt4_local.errors import ConfigError
from minigpt4_local.tokenizer import load_tokenizer
from minigpt4_local.train.captions import ALIGNMENT_PROMPTS, conversation_turns, process_caption
from minigpt4_local.train.config import load_train_config, shipped_configs
from minigpt4_local.train.layout import (
    IGNORE,
    IMAGE_SLOT,
    LayoutSpec,
    layout_sample,
    pad_batch,
    pad_token_id,
)
from tests.support.tiny_tokenizer import make_tiny_sentencepiece

N_IMG = 4
BOS, EOS, UNK = 1, 2, 0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def sp(tok_dir: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


def spec(**kw) -> LayoutSpec:
    base = {"bos_id": BOS, "pad_id": UNK, "num_image_tokens": N_IMG, "end_sym": "\n", "max_txt_len": 32}
    base.update(kw)
    return LayoutSpec(**base)


# ----- caption processor ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog. Running!", "a dog running"),
        ('He said "hi" (twice)*', "he said hi twice"),
        ("x#y:z;w~v", "x y z w v"),
        ("  Lots   of   space \n", "lots of space"),
        ("tab\tkept", "tab\tkept"),  # a single whitespace character other than space survives
        ("Comma, stays", "comma, stays"),
    ],
)
def test_caption_processor(raw: str, expected: str) -> None:
    assert process_caption(raw) == expected


def test_caption_processor_caps_words() -> None:
    text = " ".join(f"w{i}" for i in range(80))
    assert process_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert process_caption(text, max_words=3) == "w0 w1 w2"


def test_conversation_turns() -> None:
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A dog. "},
        {"from": "human", "value": "Color?"},
        {"from": "gpt", "value": "Brown."},
    ]
    assert conversation_turns(conv) == [
        ("<Img><ImageHere></Img> What is it?", "A dog."),
        ("Color?", "Brown."),
    ]
    plain = [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "Ok."}]
    assert conversation_turns(plain) == [("<Img><ImageHere></Img> Describe.", "Ok.")]
    for bad in (
        [],
        [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
        [{"from": "x", "value": "a"}] * 2,
    ):
        with pytest.raises(ValueError):
            conversation_turns(bad)


# ----- layouts ----------------------------------------------------------------------------------------------


def test_stage1_layout_bos_image_caption(tok, sp) -> None:
    out = layout_sample([(None, "a red car")], None, tok, spec())
    caption = sp.encode("a red car\n")
    assert out.ids == [BOS] + [IMAGE_SLOT] * N_IMG + caption
    assert out.labels == [IGNORE] * (1 + N_IMG) + caption
    assert out.supervised == len(caption)


def test_stage1_caption_truncated_to_max_txt_len(tok, sp) -> None:
    caption = " ".join(["dog"] * 40)
    out = layout_sample([(None, caption)], None, tok, spec(max_txt_len=32))
    assert out.ids[1 + N_IMG :] == sp.encode(caption + "\n")[:32]  # HF right truncation: "\n" cut off
    assert out.supervised == 32


def test_stage2_layout_instruction_template(tok, sp) -> None:
    template = "###Human: {} ###Assistant: "
    prompt = ALIGNMENT_PROMPTS[0]
    out = layout_sample(
        [(None, "The sky is blue.")], prompt, tok, spec(end_sym="###", max_txt_len=160, template=template)
    )
    before, after = template.format(prompt).split("<ImageHere>")
    answer = sp.encode("The sky is blue.###")
    masked = [BOS] + sp.encode(before) + [IMAGE_SLOT] * N_IMG + sp.encode(after)
    assert before == "###Human: <Img>" and after == "</Img> Describe this image in detail. ###Assistant: "
    assert out.ids == masked + answer
    assert out.labels == [IGNORE] * len(masked) + answer  # prompt, image, BOS masked; answer + ### kept


def test_multi_turn_supervises_every_answer(tok, sp) -> None:
    template = "###Human: {} ###Assistant: "
    turns = [("<Img><ImageHere></Img> What?", "A dog."), ("Color?", "Brown.")]
    out = layout_sample(turns, "ignored", tok, spec(end_sym="###", template=template))
    second_prompt = sp.encode(template.format("Color?"))
    second_answer = sp.encode("Brown.###")
    assert out.ids[-len(second_prompt) - len(second_answer) :] == second_prompt + second_answer
    assert out.labels[-len(second_answer) :] == second_answer
    assert out.labels[-len(second_prompt) - len(second_answer) : -len(second_answer)] == [IGNORE] * len(
        second_prompt
    )
    assert out.supervised == len(sp.encode("A dog.###")) + len(second_answer)


def test_pad_batch_masks_padding(tok) -> None:
    a = layout_sample([(None, "a dog")], None, tok, spec())
    b = layout_sample([(None, "a big brown dog on the red street")], None, tok, spec())
    batch = pad_batch([a, b], pad_id=7)
    width = len(b.ids)
    assert all(len(r) == width for r in batch.ids + batch.labels + batch.attention)
    extra = width - len(a.ids)
    assert batch.ids[0][len(a.ids) :] == [7] * extra
    assert batch.labels[0][len(a.ids) :] == [IGNORE] * extra
    assert batch.attention[0] == [1] * len(a.ids) + [0] * extra
    assert batch.attention[1] == [1] * width
    assert batch.supervised == a.supervised + b.supervised


def test_pad_token_of_each_release(tok) -> None:
    assert pad_token_id(tok, "april2023") == EOS
    # The tiny vocabulary has no "$$" piece, so the slow tokenizer maps it to <unk>.
    assert pad_token_id(tok, "oct2023") == UNK


def test_llama2_eos_target_kept_only_with_oct_pad(tok) -> None:
    """April padded with EOS and masked it from the targets; Oct's "$$" pad keeps the `</s>` answer end."""
    kw = {"end_sym": "</s>", "template": "[INST] {} [/INST] "}
    april = layout_sample(
        [(None, "A dog.")], ALIGNMENT_PROMPTS[0], tok, spec(pad_id=pad_token_id(tok, "april2023"), **kw)
    )
    octo = layout_sample(
        [(None, "A dog.")], ALIGNMENT_PROMPTS[0], tok, spec(pad_id=pad_token_id(tok, "oct2023"), **kw)
    )
    assert april.ids == octo.ids and april.ids[-1] == EOS
    assert april.labels[-1] == IGNORE
    assert octo.labels[-1] == EOS


def test_layout_errors(tok) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        layout_sample([("no image here", "x")], None, tok, spec(template="{}"))
    with pytest.raises(ValueError, match="cuts into the image"):
        layout_sample([(None, "x")], None, tok, spec(max_length=3))


# ----- schedule and optimizer -----------------------------------------------------------------------------------


def test_lr_schedule_matches_original_stage1_recipe() -> None:
    from minigpt4_local.train.optim import lr_at

    cfg = load_train_config("vicuna7b-stage1")
    total = 4 * 5000
    assert cfg.total_steps == total

    def cosine(step: int) -> float:  # typed from the original's formula
        return (1e-4 - 8e-5) * 0.5 * (1 + math.cos(math.pi * step / total)) + 8e-5

    assert lr_at(0, cfg.optim, total) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(2500, cfg.optim, total) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5, rel=1e-12)
    assert lr_at(4999, cfg.optim, total) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 4999 / 5000, rel=1e-12)
    assert lr_at(5000, cfg.optim, total) == pytest.approx(cosine(5000), rel=1e-12)
    assert lr_at(5000, cfg.optim, total) == pytest.approx(9.7071e-5, rel=1e-4)
    assert lr_at(19999, cfg.optim, total) == pytest.approx(cosine(19999), rel=1e-12)
    stage2 = load_train_config("vicuna7b-stage2")
    assert lr_at(0, stage2.optim, stage2.total_steps) == pytest.approx(1e-6)
    assert lr_at(200, stage2.optim, 1000) == pytest.approx(
        (3e-5 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 5)) + 1e-5
    )


def test_weight_decay_only_on_matrices() -> None:
    import torch

    from minigpt4_local.train.optim import build_optimizer

    named = [
        ("llama_proj.weight", torch.nn.Parameter(torch.zeros(4, 3))),
        ("llama_proj.bias", torch.nn.Parameter(torch.zeros(4))),
        ("query_tokens", torch.nn.Parameter(torch.zeros(1, 2, 3))),
        ("qformer.layernorm.weight", torch.nn.Parameter(torch.ones(3))),
    ]
    cfg = load_train_config("vicuna7b-stage1").optim
    opt = build_optimizer(named, cfg)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    none = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(named[0][1]), id(named[2][1])}
    assert none == {id(named[1][1]), id(named[3][1])}
    assert opt.defaults["betas"] == (0.9, 0.999)
    assert isinstance(opt, torch.optim.AdamW)


# ----- config -------------------------------------------------------------------------------------------------


def test_shipped_configs_load_and_match_recipes() -> None:
    assert {
        "vicuna7b-stage1",
        "vicuna7b-stage2",
        "vicuna13b-stage1",
        "vicuna13b-stage2",
        "llama2-stage1",
        "llama2-stage2",
        "tiny-stage1",
        "tiny-stage2",
    } <= set(shipped_configs())
    s1 = load_train_config("vicuna7b-stage1")
    assert (s1.model.max_txt_len, s1.model.end_sym, s1.model.prompt_template) == (32, "\n", "")
    assert [(s.name, s.ratio) for s in s1.data.sources] == [("laion", 115.0), ("cc_sbu", 14.0)]
    assert (s1.data.batch_size, s1.optim.weight_decay, s1.optim.precision, s1.optim.seed) == (
        64,
        0.05,
        "fp16",
        42,
    )
    s2 = load_train_config("vicuna7b-stage2")
    assert (s2.model.max_txt_len, s2.model.end_sym, s2.model.prompt_template) == (
        160,
        "###",
        "###Human: {} ###Assistant: ",
    )
    assert s2.instruction_prompts == list(ALIGNMENT_PROMPTS)
    assert (s2.data.batch_size, s2.optim.warmup_steps, s2.optim.init_lr, s2.optim.min_lr) == (
        12,
        200,
        3e-5,
        1e-5,
    )
    l2 = load_train_config("llama2-stage2")
    assert (l2.model.end_sym, l2.model.prompt_template) == ("</s>", "[INST] {} [/INST] ")


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_train_config(
        "tiny-stage1",
        [
            "optim.init_lr=1e-1",
            "model.trainable=[projection, llm]",
            "data.sources=[{name: a, kind: webdataset, path: x.tar}]",
        ],
    )
    assert cfg.optim.init_lr == 0.1 and cfg.model.trainable == ["projection", "llm"]
    assert cfg.data.sources[0].path == "x.tar"
    bad = {
        "optim.bogus=1": "unknown config key optim.bogus",
        "optim.epochs=abc": "optim.epochs must be an integer",
        "model.trainable=[foo]": "model.trainable is 'foo'",
        "data.sources=[{name: a, kind: jsonl, path: x}]": "not a stage-1 source",
        "optim.precision=fp8": "optim.precision",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_train_config("tiny-stage1", [override])
    with pytest.raises(ConfigError, match="run `minigpt4 train stage1`"):
        load_train_config("tiny-stage1", stage=2)
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(str(tmp_path / "missing.yaml"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("<Img><ImageHere></Img> One.\nno placeholder\n<Img><ImageHere></Img> Two.\n")
    s2 = load_train_config("tiny-stage2", [f"model.prompts_file={prompts}"])
    assert s2.instruction_prompts == ["<Img><ImageHere></Img> One.", "<Img><ImageHere></Img> Two."]


def test_training_bos_of_llama_tokenizer(tok) -> None:
    from minigpt4_local.train.trainer import training_bos_id

    assert training_bos_id(tok) == BOS  # LLaMA: BOS first, as the original's training


@pytest.mark.parametrize("adds_bos", [False, True])
def test_training_bos_follows_the_runtime_stitch(tmp_path: Path, adds_bos: bool) -> None:
    """A SmolLM2-style tokenizer never adds BOS, so the runtime's stitch starts with the prompt text; training
    must lay sequences out the same way (with BOS first the bundled demo answered nonsense at run time)."""
    from minigpt4_local.stitching import build_plan
    from minigpt4_local.train.trainer import training_bos_id
    from tests.support.tiny_tokenizer import make_tiny_bpe_tokenizer_json

    bpe = load_tokenizer(make_tiny_bpe_tokenizer_json(tmp_path, bos_in_template=adds_bos))
    bos = training_bos_id(bpe)
    assert bos == (bpe.bos_id if adds_bos else None)
    prompt = "###Human: <Img><ImageHere></Img> Describe this image.###Assistant: "
    layout = layout_sample([(None, "a red circle")], prompt.removeprefix("###Human: ").split("###")[0], bpe,
                           spec(bos_id=bos, template="###Human: {}###Assistant: ", end_sym="###"))  # fmt: skip
    plan = build_plan(prompt, bpe, N_IMG)
    runtime_prefix = [
        i for part in plan.parts for i in (part.ids if hasattr(part, "ids") else [IMAGE_SLOT] * N_IMG)
    ]
    assert layout.ids[: len(runtime_prefix)] == runtime_prefix
