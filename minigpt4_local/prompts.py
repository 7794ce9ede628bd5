"""Prompt templates, conversations, answer post-processing and stop rules (torch-free).

Contract (docs/numerics.md §10–12, byte-exact with the original demo):
- `TEMPLATES[name]` for `vicuna_v0` (Oct 2023), `vicuna_v0_april` (April 2023) and `llama2`; a prompt
  renders as `system + sep` followed, for each message, by `role_prefix + message + sep`, and ends
  with the open assistant turn. Single turn:
    vicuna_v0        `{system}###Human: <Img><ImageHere></Img> {question}###Assistant: `
    vicuna_v0_april  `{system}###Human: <Img><ImageHere></Img> {question}###Assistant:`
    llama2           `{system}<s>[INST] <Img><ImageHere></Img> {question} [/INST] `
- `Conversation(template)` mirrors the original Chat: `add_image()` appends a human message
  `<Img><ImageHere></Img>` (one per image, so two images give two consecutive human messages);
  `ask(q)` joins `q` onto the last human message with a space if that ends with `</Img>`, else appends
  a new human message; `prompt()` renders with the assistant turn open (the conversation is not
  changed); `add_answer(text)` records the answer; `num_images`; `reset()`.
- `new_conversation(prompt_config)` is the conversation a model's prompt settings call for (its template,
  its system text); `image_prompt(prompt_config, question, answer=None)` renders the single-image turn
  (`<Img><ImageHere></Img> question`) with the assistant turn open, or closed with `answer` — the one
  prompt builder that describe, chat, calibration, evaluation and training-data code share.
- `postprocess(text)`: the text before the first `###`, then after the last `Assistant:`, stripped.
- `StopChecker(stop_sequences, eos_id, stop_on_eos)`: `is_stop(ids)` is True when the generated ids
  end with a stop sequence (or with EOS when `stop_on_eos`); `strip(ids)` removes one trailing EOS and
  then one trailing stop sequence (the longest that matches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import PromptError

SYSTEM_TEXT = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
IMAGE_MESSAGE = "<Img><ImageHere></Img>"
IMAGE_PLACEHOLDER = "<ImageHere>"
STOP_TEXT = "###"
HUMAN, ASSISTANT = 0, 1


@dataclass(frozen=True)
class Template:
    """How the original `Conversation.get_prompt` writes one conversation (SINGLE separator style)."""

    name: str
    system: str
    role_prefixes: tuple[str, str]  # written before a filled human / assistant message
    open_roles: tuple[str, str]  # written for a message without text (the open assistant turn)
    sep: str  # written after the system text and after every filled message

    def render(self, messages: Sequence[tuple[int, str | None]]) -> str:
        parts = [self.system, self.sep]
        for role, text in messages:
            # The original tests `if message:`, so an empty answer renders like an open turn.
            parts.append(self.role_prefixes[role] + text + self.sep if text else self.open_roles[role])
        return "".join(parts)


TEMPLATES: dict[str, Template] = {
    # Oct 2023: roles ("Human: ", "Assistant: "), ret += role + message + sep / role.
    "vicuna_v0": Template(
        "vicuna_v0", SYSTEM_TEXT, ("Human: ", "Assistant: "), ("Human: ", "Assistant: "), STOP_TEXT
    ),
    # April 2023: roles ("Human", "Assistant"), ret += role + ": " + message + sep / role + ":".
    "vicuna_v0_april": Template(
        "vicuna_v0_april", SYSTEM_TEXT, ("Human: ", "Assistant: "), ("Human:", "Assistant:"), STOP_TEXT
    ),
    # Llama-2: roles ("<s>[INST] ", " [/INST] "), empty sep; the literal `<s>` tokenizes to BOS.
    "llama2": Template("llama2", SYSTEM_TEXT, ("<s>[INST] ", " [/INST] "), ("<s>[INST] ", " [/INST] "), ""),
}


def get_template(name: str, system: str | None = None) -> Template:
    """The template `name`; `system` (when not None) replaces its system text."""
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise PromptError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}") from None
    return template if system is None else replace(template, system=system)


class Conversation:
    """One chat in the original demo's shape: messages are (role, text) with role HUMAN or ASSISTANT."""

    def __init__(self, template: str | Template = "vicuna_v0") -> None:
        self.template = template if isinstance(template, Template) else get_template(template)
        self.messages: list[tuple[int, str]] = []

    def reset(self) -> None:
        self.messages.clear()

    @property
    def num_images(self) -> int:
        return sum(text.count(IMAGE_PLACEHOLDER) for _, text in self.messages)

    def add_image(self) -> None:
        self.messages.append((HUMAN, IMAGE_MESSAGE))

    def ask(self, question: str) -> None:
        if self.messages and self.messages[-1][0] == HUMAN and self.messages[-1][1].endswith("</Img>"):
            self.messages[-1] = (HUMAN, f"{self.messages[-1][1]} {question}")
        else:
            self.messages.append((HUMAN, question))

    def prompt(self) -> str:
        """The prompt with the assistant turn open, ready for generation."""
        if not self.messages or self.messages[-1][0] != HUMAN:
            raise PromptError("nothing to answer: add an image or ask a question first")
        return self.template.render([*self.messages, (ASSISTANT, None)])

    def add_answer(self, text: str) -> None:
        if not self.messages or self.messages[-1][0] != HUMAN:
            raise PromptError("an answer must follow a question")
        self.messages.append((ASSISTANT, text))


def new_conversation(prompt_config: Any) -> Conversation:
    """A conversation in the template (and with the system text) of a model's `PromptConfig`."""
    return Conversation(get_template(prompt_config.template, prompt_config.system))


def image_prompt(prompt_config: Any, question: str, answer: str | None = None) -> str:
    """One image and one question; the assistant turn open, or holding `answer` (a training target)."""
    conv = new_conversation(prompt_config)
    conv.add_image()
    conv.ask(question)
    if answer is None:
        return conv.prompt()
    conv.add_answer(answer)
    return conv.template.render(conv.messages)


def postprocess(text: str) -> str:
    """The original's answer clean-up: cut at the first `###`, keep what follows the last `Assistant:`."""
    return text.split(STOP_TEXT)[0].split("Assistant:")[-1].strip()


class StopChecker:
    """Stop rule of the original: generated ids ending in a `###` encoding (and EOS where enabled)."""

    def __init__(
        self, stop_sequences: Sequence[Sequence[int]], eos_id: int | None, stop_on_eos: bool
    ) -> None:
        # Longest first so that `strip` removes [2277, 29937] rather than a shorter [29937] suffix.
        self.stop_sequences = sorted((list(s) for s in stop_sequences if len(s)), key=len, reverse=True)
        self.eos_id = eos_id
        self.stop_on_eos = stop_on_eos and eos_id is not None

    def _ends_with_eos(self, ids: Sequence[int]) -> bool:
        return self.stop_on_eos and len(ids) > 0 and ids[-1] == self.eos_id

    def _stop_suffix(self, ids: Sequence[int]) -> int:
        """Length of the stop sequence that `ids` ends with (0 if none)."""
        for seq in self.stop_sequences:
            if len(ids) >= len(seq) and list(ids[-len(seq) :]) == seq:
                return len(seq)
        return 0

    def is_stop(self, generated_ids: Sequence[int]) -> bool:
        return self._ends_with_eos(generated_ids) or self._stop_suffix(generated_ids) > 0

    def strip(self, generated_ids: Sequence[int]) -> list[int]:
        ids = list(generated_ids)
        if self._ends_with_eos(ids):
            ids.pop()
        cut = self._stop_suffix(ids)
        return ids[: len(ids) - cut]
