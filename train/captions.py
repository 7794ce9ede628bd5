"""Caption processing and the stage-2 instruction prompts (torch-free).

Contract (docs/numerics.md §14):
- `process_caption(text, max_words=50)` is the original stage-1 caption processor: lower-case; each of
  the characters `.!"()*#:;~` becomes a space; every run of two or more whitespace characters becomes
  one space (a single tab/newline is left alone, as in the original); a trailing newline and leading /
  trailing spaces are stripped; the caption is cut to its first `max_words` space-separated words.
- `ALIGNMENT_PROMPTS` are the four stage-2 instructions of the original (`<Img><ImageHere></Img> …`);
  `STAGE2_TEMPLATES` maps a prompt template name to the instruction template of the original configs.
- `conversation_turns(record)` turns a JSONL `conversations` list (LLaVA/ShareGPT style:
  `[{"from": "human"|"gpt", "value": …}, …]`, or `{"role": "user"|"assistant", "content": …}`) into
  `[(instruction, answer), …]`; the `<image>` tag (or, if absent, the start of the first instruction)
  becomes `<Img><ImageHere></Img>`. Raises `ValueError` for a malformed list.
"""

from __future__ import annotations

import re
from typing import Any

from minigpt4_local.prompts import IMAGE_MESSAGE as IMAGE_TAG
from minigpt4_local.prompts import IMAGE_PLACEHOLDER

LLAVA_IMAGE = "<image>"

# The characters the original caption processor turns into spaces.
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE_RUN = re.compile(r"\s{2,}")

ALIGNMENT_PROMPTS: tuple[str, ...] = (
    "<Img><ImageHere></Img> Describe this image in detail.",
    "<Img><ImageHere></Img> Take a look at this image and describe what you notice.",
    "<Img><ImageHere></Img> Please provide a detailed description of the picture.",
    "<Img><ImageHere></Img> Could you describe the contents of this image for me?",
)

# Instruction templates of the original stage-2 configs, by model family.
STAGE2_TEMPLATES: dict[str, str] = {
    "vicuna": "###Human: {} ###Assistant: ",
    "llama2": "[INST] {} [/INST] ",
}

# Role names used by common conversation dumps → whether the turn is the human's.
_HUMAN_ROLES = {"human": True, "user": True, "gpt": False, "assistant": False, "bot": False, "model": False}


def process_caption(text: str, max_words: int = 50) -> str:
    """The original `blip_caption` processor (see module docstring)."""
    caption = _PUNCTUATION.sub(" ", text.lower())
    caption = _WHITESPACE_RUN.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def _turn_text(turn: Any) -> tuple[bool, str]:
    """(is_human, text) of one conversation entry."""
    if not isinstance(turn, dict):
        raise ValueError("each conversation turn must be an object")
    role = turn.get("from", turn.get("role"))
    text = turn.get("value", turn.get("content"))
    if not isinstance(role, str) or role.lower() not in _HUMAN_ROLES:
        raise ValueError(f"unknown conversation role {role!r} (use human/gpt or user/assistant)")
    if not isinstance(text, str):
        raise ValueError("a conversation turn has no text")
    return _HUMAN_ROLES[role.lower()], text


def _with_image_tag(instruction: str) -> str:
    if IMAGE_PLACEHOLDER in instruction:
        return instruction
    if LLAVA_IMAGE in instruction:
        return " ".join(instruction.replace(LLAVA_IMAGE, IMAGE_TAG, 1).split())
    return f"{IMAGE_TAG} {instruction.strip()}"


def conversation_turns(conversations: Any) -> list[tuple[str, str]]:
    """[(instruction, answer), …] from a human/assistant alternation (see module docstring)."""
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise ValueError("'conversations' must be a list of at least one human and one assistant turn")
    entries = [_turn_text(t) for t in conversations]
    if len(entries) % 2:
        raise ValueError("'conversations' must alternate human and assistant turns")
    turns: list[tuple[str, str]] = []
    for k in range(0, len(entries), 2):
        (human_a, question), (human_b, answer) = entries[k], entries[k + 1]
        if not human_a or human_b:
            raise ValueError("'conversations' must alternate human and assistant turns, human first")
        # Only the first turn carries the image, as in the original prompts.
        question = _with_image_tag(question) if k == 0 else question.replace(LLAVA_IMAGE, "").strip()
        turns.append((question, answer.strip()))
    return turns
