"""Training sequence layout and label masking of the original (docs/numerics.md §14), torch-free.

Contract:
- A sample is a list of turns `[(instruction | None, answer), …]`; `instruction=None` on the first turn
  means "the batch's instruction" (stage 2: one drawn per batch from the prompt list; stage 1: none).
- `layout_sample(turns, batch_instruction, tokenizer, spec) -> SampleLayout(ids, labels)`:
    ids    = [BOS] (only if `spec.bos_id`: the tokenizer adds one) + for each turn: prompt tokens (+ `num_image_tokens` × IMAGE_SLOT in the first turn)
             + answer tokens
    labels = IGNORE (-100) for BOS, every prompt token and every image slot; the answer tokens for the
             answer, except answer tokens equal to `spec.pad_id` (the original masks them too).
  The prompt of a turn is `spec.template.format(instruction)` (or the instruction itself when the
  template is empty); with no instruction at all (stage 1) it is `<ImageHere>` alone, giving
  `[BOS][img][caption\\n]`. The prompt is split on `<ImageHere>` and each text segment is tokenized on
  its own without BOS (the original's `prompt_wrap`). The answer is `answer + end_sym` tokenized without
  BOS and cut to its first `max_txt_len` tokens (HF right truncation: end_sym may be cut). The whole
  sequence is cut to `spec.max_length`; the image slots must survive that cut.
- `pad_batch(layouts, pad_id) -> PaddedBatch(ids, labels, attention)`: right padding to the longest
  sample with `pad_id`, labels IGNORE and attention 0 on padding (`[BOS][prompt_i][answer_i][pad…]`).
- `pad_token_id(tokenizer, release)`: April 2023 pads with EOS; Oct 2023 with the token `$$` (the id the
  slow LLaMA tokenizer gives that string: its piece if the vocabulary has one, else `<unk>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from minigpt4_local.errors import ConfigError
from minigpt4_local.tokenizer import Tokenizer

from .captions import IMAGE_PLACEHOLDER

IMAGE_SLOT = -1  # id placeholder where one image-embedding row goes
IGNORE = -100  # label of a position the loss skips (HF/PyTorch ignore_index)
OCT_PAD_TEXT = "$$"


@dataclass(frozen=True)
class LayoutSpec:
    bos_id: int | None  # None: the tokenizer never adds BOS, so neither does the runtime nor training
    pad_id: int
    num_image_tokens: int
    end_sym: str
    max_txt_len: int
    template: str = ""
    max_length: int = 2000


@dataclass
class SampleLayout:
    ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class PaddedBatch:
    ids: list[list[int]]  # (B, T), IMAGE_SLOT where image rows go
    labels: list[list[int]]  # (B, T)
    attention: list[list[int]]  # (B, T), 1 = real position

    @property
    def supervised(self) -> int:
        return sum(1 for row in self.labels for t in row if t != IGNORE)


def _prompt_text(instruction: str | None, spec: LayoutSpec, first: bool) -> str:
    if instruction is None:
        if not first:
            raise ValueError("only the first turn may take the batch's instruction")
        return IMAGE_PLACEHOLDER  # stage 1: the image alone
    return spec.template.format(instruction) if spec.template else instruction


def _prompt_ids(prompt: str, tokenizer: Tokenizer, spec: LayoutSpec, first: bool) -> list[int]:
    segments = prompt.split(IMAGE_PLACEHOLDER)
    if first and len(segments) != 2:
        raise ValueError(f"the first prompt must hold exactly one {IMAGE_PLACEHOLDER}: {prompt!r}")
    if not first and len(segments) != 1:
        raise ValueError(f"only the first turn may show the image: {prompt!r}")
    ids: list[int] = []
    for index, segment in enumerate(segments):
        if index:
            ids += [IMAGE_SLOT] * spec.num_image_tokens
        ids += tokenizer.encode(segment, add_bos=False)
    return ids


def layout_sample(
    turns: Sequence[tuple[str | None, str]],
    batch_instruction: str | None,
    tokenizer: Tokenizer,
    spec: LayoutSpec,
) -> SampleLayout:
    """One sample's ids and labels (see module docstring)."""
    if not turns:
        raise ValueError("a sample needs at least one (instruction, answer) turn")
    ids, labels = ([spec.bos_id], [IGNORE]) if spec.bos_id is not None else ([], [])
    for k, (instruction, answer) in enumerate(turns):
        first = k == 0
        chosen = instruction if instruction is not None or not first else batch_instruction
        prompt = _prompt_ids(_prompt_text(chosen, spec, first), tokenizer, spec, first)
        answer_ids = tokenizer.encode(answer + spec.end_sym, add_bos=False)[: spec.max_txt_len]
        ids += prompt + answer_ids
        labels += [IGNORE] * len(prompt) + [IGNORE if t == spec.pad_id else t for t in answer_ids]
    ids, labels = ids[: spec.max_length], labels[: spec.max_length]
    if ids.count(IMAGE_SLOT) != spec.num_image_tokens:
        raise ValueError(f"the sequence limit ({spec.max_length}) cuts into the image embeddings")
    return SampleLayout(ids, labels)


def pad_batch(layouts: Sequence[SampleLayout], pad_id: int) -> PaddedBatch:
    """Right-pad to the longest sample (see module docstring)."""
    width = max(len(x.ids) for x in layouts)
    ids, labels, attention = [], [], []
    for x in layouts:
        extra = width - len(x.ids)
        ids.append(x.ids + [pad_id] * extra)
        labels.append(x.labels + [IGNORE] * extra)
        attention.append([1] * len(x.ids) + [0] * extra)
    return PaddedBatch(ids, labels, attention)


def _piece_id(tokenizer: Tokenizer, piece: str) -> int | None:
    for token_id in range(tokenizer.vocab_size):
        if tokenizer.id_to_piece(token_id) == piece:
            return token_id
    return None


def pad_token_id(tokenizer: Tokenizer, release: str) -> int:
    """The pad id of the chosen release (see module docstring)."""
    if release == "april2023":
        if tokenizer.eos_id is None:
            raise ConfigError("model.release april2023 pads with EOS, but the tokenizer has no EOS token")
        return tokenizer.eos_id
    found = _piece_id(tokenizer, OCT_PAD_TEXT)
    if found is not None:
        return found
    if tokenizer.unk_id is None:
        raise ConfigError("the tokenizer has neither a '$$' piece nor <unk> for the Oct 2023 pad token")
    return tokenizer.unk_id
