"""Stitch plan: where text tokens and image embeddings go in the LLM's input sequence (array-agnostic).

Contract (docs/numerics.md §11, the original `get_context_emb`):
- `build_plan(prompt, tokenizer, num_image_tokens)` splits the prompt on `<ImageHere>` and tokenizes
  every text segment separately (BOS only on the first; each segment gets the tokenizer's own prefix
  handling, i.e. the "▁" dummy prefix of the legacy LLaMA tokenizer). The result is an ordered list of
  parts, `TextPart(ids)` and `ImagePart(image, first_row, rows)`, with `total_length`, `num_images`
  (image embeddings `stitch` expects) and `positions` (start of each image in the final sequence).
  Backends that feed tokens and embeddings separately (llama.cpp) walk `plan.parts` directly.
- `truncate_left(plan, max_length)` keeps the LAST `max_length` positions, exactly like the original's
  `embs[:, begin_idx:]` with `max_length = max_context - max_new_tokens`. A text part cut in the middle
  keeps its last ids; an image cut in the middle keeps only its last rows (`first_row` > 0), as the
  tensor slice did; an image cut entirely disappears from `parts` (its position becomes None) but
  `num_images` is unchanged, so the caller still passes every image's embeddings.
- `plan_segments(plan, image_embeds)` is the one walk over a plan that every consumer uses: the parts in
  order, a text part as its list of token ids and an image part as the slice of its embedding rows
  (`image_embeds[i][first_row : first_row + length]`, same array type as given), after the same checks as
  `stitch`. llama.cpp feeds the segments as token / embedding batches, the torch paths embed and join them.
- `plan_prompt(prompt, tokenizer, config, max_new_tokens)` is the one way a prompt becomes a plan for
  generation: `build_plan`, then `truncate_left` to `config.prompt.max_context - max_new_tokens`
  (`PromptError` when nothing is left for the prompt).
- `stitch(plan, embed_tokens, image_embeds, concat=None)` materialises the (T, hidden) sequence:
  `embed_tokens(ids) -> (len(ids), hidden)`, `image_embeds[i]` is (num_image_tokens, hidden). It raises
  `PromptError` when the count of image embeddings differs from `plan.num_images`, or an image has the
  wrong shape or hidden size. Works on numpy and torch arrays: `concat` defaults to `numpy.concatenate`
  or `torch.cat` (along axis 0) by the arrays' type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import PromptError
from .prompts import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from .config import MiniGPT4Config

__all__ = [
    "IMAGE_PLACEHOLDER",
    "ImagePart",
    "StitchPlan",
    "TextPart",
    "build_plan",
    "plan_prompt",
    "plan_segments",
    "stitch",
    "truncate_left",
]


class _Encoder(Protocol):
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class TextPart:
    ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.ids)

    def keep_last(self, n: int) -> TextPart:
        return TextPart(self.ids[len(self.ids) - n :])


@dataclass(frozen=True)
class ImagePart:
    image: int  # index into the image embeddings given to `stitch`
    first_row: int  # rows [first_row, first_row + length) of that image's embedding are used
    length: int

    def keep_last(self, n: int) -> ImagePart:
        return ImagePart(self.image, self.first_row + self.length - n, n)


Part = TextPart | ImagePart


@dataclass(frozen=True)
class StitchPlan:
    parts: tuple[Part, ...]
    num_images: int  # image embeddings `stitch` expects (every image of the prompt, even if truncated)
    num_image_tokens: int  # rows of one image embedding

    @property
    def total_length(self) -> int:
        return sum(p.length for p in self.parts)

    @property
    def positions(self) -> tuple[int | None, ...]:
        """Where each image's (kept) rows start in the final sequence; None if truncated away."""
        starts: list[int | None] = [None] * self.num_images
        offset = 0
        for part in self.parts:
            if isinstance(part, ImagePart):
                starts[part.image] = offset
            offset += part.length
        return tuple(starts)

    def token_ids(self) -> list[int]:
        """All text ids in order (the image rows omitted)."""
        return [i for p in self.parts if isinstance(p, TextPart) for i in p.ids]


def build_plan(prompt: str, tokenizer: _Encoder, num_image_tokens: int) -> StitchPlan:
    """Tokenize the prompt segment by segment around the `<ImageHere>` slots."""
    if num_image_tokens < 1:
        raise PromptError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    segments = prompt.split(IMAGE_PLACEHOLDER)
    parts: list[Part] = []
    for index, segment in enumerate(segments):
        if index > 0:
            parts.append(ImagePart(image=index - 1, first_row=0, length=num_image_tokens))
        ids = tokenizer.encode(segment, add_bos=index == 0)
        if ids:
            parts.append(TextPart(tuple(ids)))
    return StitchPlan(tuple(parts), num_images=len(segments) - 1, num_image_tokens=num_image_tokens)


def truncate_left(plan: StitchPlan, max_length: int) -> StitchPlan:
    """Keep the last `max_length` positions (whole parts where possible, else the part's tail)."""
    if max_length < 1:
        raise PromptError(
            f"no room for the prompt: the context leaves {max_length} positions (lower max_new_tokens)"
        )
    excess = plan.total_length - max_length
    if excess <= 0:
        return plan
    kept: list[Part] = []
    for part in plan.parts:
        if excess >= part.length:
            excess -= part.length  # the whole part falls off the left edge
            continue
        kept.append(part.keep_last(part.length - excess) if excess else part)
        excess = 0
    return dataclasses.replace(plan, parts=tuple(kept))


def _default_concat(arrays: Sequence[Any]) -> Any:
    # Dispatch on the array library without importing torch in the torch-free runtime.
    if type(arrays[0]).__module__.split(".")[0] == "torch":
        import torch

        return torch.cat(list(arrays), dim=0)
    import numpy as np

    return np.concatenate(list(arrays), axis=0)


def _check_images(plan: StitchPlan, image_embeds: Sequence[Any]) -> None:
    if len(image_embeds) != plan.num_images:
        raise PromptError(
            f"the prompt has {plan.num_images} image slot(s) but {len(image_embeds)} image embedding(s) were given"
        )
    hidden = {tuple(e.shape)[-1] for e in image_embeds if len(e.shape) == 2}
    for index, emb in enumerate(image_embeds):
        shape = tuple(emb.shape)
        if len(shape) != 2 or shape[0] != plan.num_image_tokens:
            raise PromptError(
                f"image {index} embedding has shape {shape}, expected ({plan.num_image_tokens}, hidden)"
            )
    if len(hidden) > 1:
        raise PromptError(f"image embeddings disagree on the hidden size: {sorted(hidden)}")


def plan_segments(plan: StitchPlan, image_embeds: Sequence[Any]) -> list[list[int] | Any]:
    """The plan's parts in order: token-id lists for text, embedding-row slices for images."""
    _check_images(plan, image_embeds)
    segments: list[list[int] | Any] = []
    for part in plan.parts:
        if isinstance(part, TextPart):
            segments.append(list(part.ids))
        else:
            segments.append(image_embeds[part.image][part.first_row : part.first_row + part.length])
    return segments


def plan_prompt(prompt: str, tokenizer: _Encoder, config: MiniGPT4Config, max_new_tokens: int) -> StitchPlan:
    """A rendered prompt → the plan to generate from, left-truncated so the answer fits the context."""
    budget = config.prompt.max_context - max_new_tokens
    if budget <= 0:
        raise PromptError(
            f"max_new_tokens ({max_new_tokens}) leaves no room in the context ({config.prompt.max_context})"
        )
    return truncate_left(build_plan(prompt, tokenizer, config.num_image_tokens), budget)


def stitch(
    plan: StitchPlan,
    embed_tokens: Callable[[list[int]], Any],
    image_embeds: Sequence[Any],
    concat: Callable[[list[Any]], Any] | None = None,
) -> Any:
    """Interleave text embeddings and image rows into one (plan.total_length, hidden) array."""
    pieces = [embed_tokens(s) if isinstance(s, list) else s for s in plan_segments(plan, image_embeds)]
    if not pieces:
        raise PromptError("the prompt is empty: nothing to feed the language model")
    widths = {tuple(p.shape)[-1] for p in pieces}
    if len(widths) != 1 or any(len(p.shape) != 2 for p in pieces):
        shapes = [tuple(p.shape) for p in pieces]
        raise PromptError(f"embeddings must be 2-D (rows, hidden) with one hidden size; got shapes {shapes}")
    return (concat or _default_concat)(pieces)
