"""Prompt templates (byte-exact, docs/numerics.md §10), conversations, post-processing and stop rules (§12)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minigpt4_local.config import TEMPLATES as CONFIG_TEMPLATES
from minigpt4_local.errors import PromptError
from minigpt4_local.prompts import TEMPLATES, Conversation, StopChecker, postprocess

REPO = Path(__file__).resolve().parents[1]

# Typed out independently from docs/numerics.md §10, not imported from the module under test.
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it "
    "to you. Please answer my questions."
)
IMG = "<Img><ImageHere></Img>"


def test_template_names_match_config() -> None:
    assert set(TEMPLATES) == set(CONFIG_TEMPLATES)


# ----- byte-exact prompts --------------------------------------------------------------------------
SINGLE = {
    "vicuna_v0": SYSTEM + "###Human: " + IMG + " What is this?###Assistant: ",
    "vicuna_v0_april": SYSTEM + "###Human: " + IMG + " What is this?###Assistant:",
    "llama2": SYSTEM + "<s>[INST] " + IMG + " What is this? [/INST] ",
}
MULTI = {
    "vicuna_v0": SYSTEM
    + "###Human: "
    + IMG
    + " What is this?###Assistant: A dog.###Human: Its color?###Assistant: ",
    "vicuna_v0_april": SYSTEM
    + "###Human: "
    + IMG
    + " What is this?###Assistant: A dog.###Human: Its color?###Assistant:",
    "llama2": SYSTEM + "<s>[INST] " + IMG + " What is this? [/INST] A dog.<s>[INST] Its color? [/INST] ",
}
TWO_IMAGES = {
    "vicuna_v0": SYSTEM + "###Human: " + IMG + "###Human: " + IMG + " Compare them.###Assistant: ",
    "vicuna_v0_april": SYSTEM + "###Human: " + IMG + "###Human: " + IMG + " Compare them.###Assistant:",
    "llama2": SYSTEM + "<s>[INST] " + IMG + "<s>[INST] " + IMG + " Compare them. [/INST] ",
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_turn_prompt_is_byte_exact(name: str) -> None:
    conv = Conversation(name)
    conv.add_image()
    conv.ask("What is this?")
    assert conv.prompt() == SINGLE[name]
    assert conv.prompt() == SINGLE[name]  # rendering does not change the conversation
    assert conv.num_images == 1


@pytest.mark.parametrize("name", sorted(MULTI))
def test_multi_turn_prompt_is_byte_exact(name: str) -> None:
    conv = Conversation(name)
    conv.add_image()
    conv.ask("What is this?")
    conv.add_answer("A dog.")
    conv.ask("Its color?")
    assert conv.prompt() == MULTI[name]


@pytest.mark.parametrize("name", sorted(TWO_IMAGES))
def test_two_images_give_two_human_messages(name: str) -> None:
    conv = Conversation(name)
    conv.add_image()
    conv.add_image()
    conv.ask("Compare them.")
    assert conv.prompt() == TWO_IMAGES[name]
    assert conv.num_images == 2
    assert conv.prompt().count("<ImageHere>") == 2


def test_vicuna_prompt_endings() -> None:
    # The Oct 2023 prompt ends with a space, the April one with a colon.
    assert SINGLE["vicuna_v0"].endswith("###Assistant: ")
    assert SINGLE["vicuna_v0_april"].endswith("###Assistant:")


def test_question_without_image_and_reset() -> None:
    conv = Conversation("vicuna_v0")
    conv.ask("Hello?")
    assert conv.prompt() == SYSTEM + "###Human: Hello?###Assistant: "
    assert conv.num_images == 0
    conv.add_answer("Hi.")
    conv.add_image()  # an image after an answer starts a new human message; the question joins it
    conv.ask("And this?")
    assert conv.prompt().endswith("###Assistant: Hi.###Human: " + IMG + " And this?###Assistant: ")
    conv.reset()
    assert conv.messages == [] and conv.num_images == 0


def test_conversation_errors() -> None:
    with pytest.raises(PromptError):
        Conversation("vicuna_v1")
    conv = Conversation("llama2")
    with pytest.raises(PromptError):
        conv.prompt()
    with pytest.raises(PromptError):
        conv.add_answer("no question")
    conv.ask("q")
    conv.add_answer("a")
    with pytest.raises(PromptError):
        conv.prompt()  # the assistant already answered: nothing is open


# ----- post-processing -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The image shows a dog.###Human: more", "The image shows a dog."),
        ("  A cat on a mat.  ", "A cat on a mat."),
        ("Assistant: a red car###", "a red car"),
        ("x Assistant: first Assistant: second###Assistant: third", "second"),
        ("###Human: nothing", ""),
        ("line one\nline two\n##", "line one\nline two\n##"),
        ("", ""),
    ],
)
def test_postprocess(raw: str, clean: str) -> None:
    assert postprocess(raw) == clean


# ----- stop rules ----------------------------------------------------------------------------------
def test_stop_checker_vicuna_sequences_step_by_step() -> None:
    stop = StopChecker([[835], [2277, 29937]], eos_id=2, stop_on_eos=False)
    generated: list[int] = []
    seen = []
    for token in [450, 11203, 29889, 2277, 29937]:  # "The dog." then "##" "#" over two steps
        generated.append(token)
        seen.append(stop.is_stop(generated))
    assert seen == [False, False, False, False, True]
    assert stop.strip(generated) == [450, 11203, 29889]
    assert stop.is_stop([450, 835]) and stop.strip([450, 835]) == [450]
    assert not stop.is_stop([29937])  # "#" alone is not a stop
    assert not stop.is_stop([29937, 2277])
    assert not stop.is_stop([])
    assert not stop.is_stop([450, 2])  # EOS is not a stop when stop_on_eos is off
    assert stop.strip([450, 2]) == [450, 2]


def test_stop_checker_llama2_eos() -> None:
    stop = StopChecker([[835], [2277, 29937]], eos_id=2, stop_on_eos=True)
    assert stop.is_stop([450, 2])
    assert stop.strip([450, 2]) == [450]
    assert stop.strip([450, 2277, 29937, 2]) == [450]
    assert stop.strip([450]) == [450]
    assert stop.eos_id == 2 and stop.stop_on_eos


def test_stop_checker_without_eos_id() -> None:
    stop = StopChecker([[7, 8]], eos_id=None, stop_on_eos=True)
    assert not stop.stop_on_eos
    assert not stop.is_stop([1, 2])
    assert stop.is_stop([5, 7, 8]) and stop.strip([5, 7, 8]) == [5]


def test_stop_checker_strips_longest_match() -> None:
    stop = StopChecker([[29937], [2277, 29937]], eos_id=None, stop_on_eos=False)
    assert stop.strip([1, 2277, 29937]) == [1]


# ----- torch-free ----------------------------------------------------------------------------------
def test_prompts_module_is_torch_free() -> None:
    code = (
        "import sys\n"
        "from minigpt4_local.prompts import Conversation, postprocess\n"
        "c = Conversation('llama2'); c.add_image(); c.ask('q'); c.prompt(); postprocess('a###')\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
