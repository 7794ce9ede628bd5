"""Calibration data for GPTQ: plain text, JSONL captions, or images through MiniGPT-4's stitched prompts.

Contract:
- `source_kind(path)`: a directory is "images", a `.jsonl` file "jsonl", any other file "text";
  a missing path is a one-line `ConfigError`.
- `read_text(path)` returns the text; `read_jsonl(path)` returns `CaptionRow`s. A JSONL line is a
  JSON string (a caption) or an object with a `caption`, `text` or `answer` string and optionally
  `image` (a path, relative to the JSONL's folder) and `question`. Bad lines are a `ConfigError`
  naming the line; an empty source too. `image_paths(folder)` lists a folder's images (sorted).
- `split_tokens(ids, eval_fraction, min_eval)` splits one token stream into (calibration, held-out)
  parts: the last `eval_fraction` (at least `min_eval` tokens) is held out for perplexity and never
  calibrated on. `windows(ids, length, bos_id)` cuts calibration windows (BOS first when given).
- `split_items(items, eval_fraction)` holds out the last share of a list (images, captioned images):
  at least one item when there are two or more; a single item is used for both (flagged `overlap`).
- `PromptBuilder(config, tokenizer, embed_tokens)` makes MiniGPT-4 samples for one image exactly the
  way the runtime stitches them: conversation template → `build_plan` → `stitch` (image embedding
  rows between the text-token embeddings). `prompt(image, question)` is the open prompt the decoder
  answers (a `Sample` without answer); `with_answer(sample, answer_ids)` appends answer tokens;
  `captioned(image, question, caption)` renders the caption as the assistant's message.
- `Sample.ids` has one token id per position: text ids, and for image rows a filler id derived from
  the row's content (so that a sample's ids identify its embeddings; GPTQModel calibrates from ids
  and the quantizer's embedding hook swaps the rows back in, see `gptq.py`). `Sample.targets` holds
  the text ids (None on image rows) for perplexity. `QUESTIONS` are the prompts used in turn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from minigpt4_local.config import MiniGPT4Config
from minigpt4_local.errors import ConfigError
from minigpt4_local.prompts import image_prompt
from minigpt4_local.stitching import StitchPlan, build_plan, plan_segments, stitch

__all__ = [
    "QUESTIONS",
    "CaptionRow",
    "PromptBuilder",
    "Sample",
    "image_paths",
    "read_jsonl",
    "read_text",
    "source_kind",
    "split_items",
    "split_tokens",
    "windows",
]

# Questions a MiniGPT-4 user asks about an image; calibration prompts cycle through them.
QUESTIONS = (
    "Describe this image in detail.",
    "What is in the picture?",
    "What is happening in this image?",
    "Describe the main objects and their colors.",
    "Write a short caption for this image.",
    "What stands out in this photo?",
)
CAPTION_KEYS = ("caption", "text", "answer")
T = TypeVar("T")


def source_kind(path: str | os.PathLike) -> str:
    p = Path(path)
    if p.is_dir():
        return "images"
    if not p.is_file():
        raise ConfigError(
            f"calibration source not found: {p} (give a text file, a JSONL of captions or an image folder)"
        )
    return "jsonl" if p.suffix.lower() == ".jsonl" else "text"


def read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration text {p}: {exc}") from None
    if not text.strip():
        raise ConfigError(f"calibration text {p} is empty")
    return text


@dataclass(frozen=True)
class CaptionRow:
    caption: str
    image: Path | None = None
    question: str | None = None


def _caption_row(value: Any, base: Path, where: str) -> CaptionRow:
    if isinstance(value, str):
        return CaptionRow(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a JSON string or object, got {type(value).__name__}")
    caption = next((value[k] for k in CAPTION_KEYS if isinstance(value.get(k), str)), None)
    if caption is None or not caption.strip():
        raise ConfigError(f"{where}: needs a non-empty 'caption' (or 'text'/'answer') string")
    image = value.get("image")
    if image is not None and not isinstance(image, str):
        raise ConfigError(f"{where}: 'image' must be a path string")
    question = value.get("question")
    if question is not None and not isinstance(question, str):
        raise ConfigError(f"{where}: 'question' must be a string")
    return CaptionRow(caption, (base / image) if image else None, question)


def read_jsonl(path: str | os.PathLike) -> list[CaptionRow]:
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration captions {p}: {exc}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{number}: not valid JSON ({exc.msg})") from None
        rows.append(_caption_row(value, p.parent, f"{p}:{number}"))
    if not rows:
        raise ConfigError(f"calibration captions {p} hold no rows")
    return rows


def image_paths(folder: str | os.PathLike) -> list[Path]:
    from minigpt4_local.image import expand_image_inputs

    paths = sorted(expand_image_inputs([folder]))
    if not paths:
        raise ConfigError(f"calibration folder {folder} holds no images (.jpg, .png, …)")
    return paths


# ----- splitting ----------------------------------------------------------------------------------


def split_tokens(ids: Sequence[int], eval_fraction: float, min_eval: int) -> tuple[list[int], list[int]]:
    """(calibration ids, held-out ids): the held-out part is the tail of the stream."""
    n_eval = max(min_eval, round(len(ids) * eval_fraction)) if eval_fraction > 0 else 0
    if n_eval and len(ids) - n_eval < min_eval:
        raise ConfigError(
            f"the calibration text is too short ({len(ids)} tokens) to hold out {n_eval} tokens for the "
            f"perplexity check and still calibrate on {min_eval}; give more text"
        )
    cut = len(ids) - n_eval
    return list(ids[:cut]), list(ids[cut:])


def windows(ids: Sequence[int], length: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive calibration windows of at most `length` positions (BOS first when given)."""
    head = [bos_id] if bos_id is not None else []
    step = max(1, length - len(head))
    return [head + list(ids[i : i + step]) for i in range(0, len(ids), step)]


def split_items(items: Sequence[T], eval_fraction: float) -> tuple[list[T], list[T], bool]:
    """(calibration, held out, overlap): overlap is True when one item had to serve both."""
    if len(items) == 1:
        return list(items), list(items), True
    n_eval = max(1, round(len(items) * eval_fraction)) if eval_fraction > 0 else 0
    n_eval = min(n_eval, len(items) - 1)
    cut = len(items) - n_eval
    return list(items[:cut]), list(items[cut:]), False


# ----- stitched samples -----------------------------------------------------------------------------


@dataclass
class Sample:
    ids: list[int]  # one id per position (image rows: content-derived filler ids)
    targets: list[int | None]  # the text token at each position, None on image rows
    embeds: Any = None  # (T, hidden) torch tensor for samples with image rows; None for plain text
    kind: str = "text"
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def filler_ids(rows: Any, vocab_size: int) -> list[int]:
    """A token id per image row derived from its content (same rows → same ids, else almost surely not)."""
    import numpy as np

    array = np.ascontiguousarray(rows.detach().float().cpu().numpy() if hasattr(rows, "detach") else rows)
    return [
        int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little") % vocab_size
        for r in array.astype(np.float32)
    ]


class PromptBuilder:
    """MiniGPT-4 samples for single images, stitched as the runtime stitches them."""

    def __init__(
        self,
        config: MiniGPT4Config,
        tokenizer: Any,
        embed_tokens: Callable[[list[int]], Any],
        max_length: int,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.embed_tokens = embed_tokens  # ids -> (len(ids), hidden) torch tensor
        self.max_length = max_length

    def _sample(self, plan: StitchPlan, image: Any, kind: str) -> Sample:
        import torch

        embeds = stitch(plan, self.embed_tokens, [image], torch.cat)  # (T, hidden)
        ids: list[int] = []
        targets: list[int | None] = []
        for segment in plan_segments(plan, [image]):
            if isinstance(segment, list):  # text ids
                ids.extend(segment)
                targets.extend(segment)
            else:  # image rows
                ids.extend(filler_ids(segment, self.config.llm.vocab_size))
                targets.extend([None] * len(segment))
        return Sample(ids, targets, embeds, kind)

    def _plan(self, prompt: str) -> StitchPlan:
        from minigpt4_local.stitching import truncate_left

        plan = build_plan(prompt, self.tokenizer, self.config.num_image_tokens)
        return truncate_left(plan, self.max_length)

    def prompt(self, image: Any, question: str) -> Sample:
        """The open prompt (system, image, question, `Assistant:` turn) the decoder will answer."""
        return self._sample(self._plan(image_prompt(self.config.prompt, question)), image, "image")

    def with_answer(self, sample: Sample, answer_ids: Sequence[int]) -> Sample:
        """`sample` followed by answer tokens (e.g. the reference model's own answer)."""
        import torch

        room = max(0, self.max_length - len(sample))
        answer = list(answer_ids)[:room]
        if not answer:
            return sample
        rows = self.embed_tokens(answer).to(sample.embeds.dtype)
        return Sample(
            sample.ids + answer,
            sample.targets + answer,
            torch.cat([sample.embeds, rows], dim=0),
            sample.kind,
            dict(sample.extra),
        )

    def captioned(self, image: Any, question: str, caption: str) -> Sample:
        """A finished turn: the caption rendered as the assistant's message after the image prompt."""
        text = image_prompt(self.config.prompt, question, answer=caption.strip())
        return self._sample(self._plan(text), image, "captioned-image")
