"""What one captioning actor does: load the model once, describe batches of item rows through the engine.

Contract (Ray-free, torch-free on a bundle; one instance per Ray actor, usable alone):
- `DescribeSpec`: the model (as `--model`: a path every node can read, or `demo`), `LoadOptions`, the
  engine's `parallel` slots, the question, sampling overrides (`greedy`, `max_new_tokens`, …, as
  `Engine.sampling`), an optional JSON schema every answer must satisfy, and for stage-2 data generation `continue_prompt` / `continue_below` (the
  "Continue" rule of train/align_data.py: a second turn in the same conversation when the first answer has
  at most `continue_below` generated tokens; the texts are joined by a space).
- `CaptionWorker(spec)` opens the engine once (`open_engine`); `worker(batch) -> pyarrow.Table` takes a
  batch of item rows (a dict of columns as Ray Data's numpy format gives, or a pyarrow Table): `id` (else
  `path` serves as the id), and the image as `image` (encoded bytes, or a decoded HxWxC uint8 array as
  `ray.data.read_images` gives) or `path`; an optional `error` column marks rows the reader could not
  read. Bytes go through `image.decode_image_bytes`, paths through `image.load_image` (the same guards).
  All images of the batch are submitted at once, so the engine fills its slots.
- The result has one row per input row, with the columns of `result_schema(spec)`: `id`, `answer` (None
  on error), `error` (None on success; the one-line `MiniGPT4Error` message: a bad image is an error
  row, never an exception) and `error_type` (its class: ImageError for anything unreadable), `token_ids`, `prompt_tokens`, `new_tokens`, `finish_reason`, timings
  (`load_s` image decoding, `encode_s`, `queue_s`, `prefill_s`, `generate_s` from the engine's Answer,
  `total_s` from submission to answer), `question`, `model`, `worker` (host:pid); with the Continue rule
  also `continued` and `turn_tokens` (generated tokens per turn).
- Greedy answers equal the sequential `minigpt4 describe --greedy` (the engine's invariant; pin
  `LoadOptions.threads` on CPU when comparing).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageError, MiniGPT4Error
from ..image import decode_image_bytes, load_image
from ..loader import LoadOptions

__all__ = ["CaptionWorker", "DescribeSpec", "open_engine", "result_schema"]

DEFAULT_QUESTION = "Describe this image in detail."


@dataclass(frozen=True)
class DescribeSpec:
    model: str | None = None
    load_options: LoadOptions = field(default_factory=LoadOptions)
    parallel: int | None = None  # engine slots (None: the engine's default)
    question: str = DEFAULT_QUESTION
    sampling: dict[str, Any] = field(default_factory=dict)  # Engine.sampling(**sampling)
    continue_prompt: str | None = None
    continue_below: int = 0
    json_schema: dict[str, Any] | None = None  # constrain every answer (the engine's json_schema)
    image_cache_mb: float = 0.0  # dataset images rarely repeat: no embedding cache by default


def open_engine(spec: DescribeSpec) -> Any:
    """The engine this worker runs (minigpt4_local.engine)."""
    from ..engine import DEFAULT_PARALLEL, Engine

    return Engine.open(
        spec.model,
        spec.load_options,
        parallel=spec.parallel or DEFAULT_PARALLEL,
        image_cache_mb=spec.image_cache_mb,
        announce=lambda _line: None,
    )


def result_schema(spec: DescribeSpec) -> Any:
    import pyarrow as pa

    seconds = [(name, pa.float64()) for name in ("load_s", "encode_s", "queue_s", "prefill_s", "generate_s")]
    fields = [
        ("id", pa.string()),
        ("answer", pa.string()),
        ("error", pa.string()),
        ("error_type", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("prompt_tokens", pa.int32()),
        ("new_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        *seconds,
        ("total_s", pa.float64()),
        ("question", pa.string()),
        ("model", pa.string()),
        ("worker", pa.string()),
    ]
    if spec.continue_prompt is not None:
        fields += [("continued", pa.bool_()), ("turn_tokens", pa.list_(pa.int32()))]
    return pa.schema(fields)


def _column(batch: Any, name: str) -> list[Any] | None:
    """A column of a numpy-format dict or a pyarrow Table as a Python list (None when absent)."""
    if isinstance(batch, dict):
        if name not in batch:
            return None
        return list(batch[name])
    if name not in batch.column_names:
        return None
    return batch.column(name).to_pylist()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@dataclass
class _Item:
    id: str
    image: Any = None
    error: str | None = None
    error_type: str | None = None
    load_s: float = 0.0
    conversation: Any = None
    submitted: float = 0.0
    answers: list[Any] = field(default_factory=list)
    done_at: float = 0.0

    def fail(self, err: MiniGPT4Error) -> None:
        self.error, self.error_type = str(err), type(err).__name__


class CaptionWorker:
    """See the module docstring."""

    def __init__(self, spec: DescribeSpec) -> None:
        self.spec = spec
        self.engine = open_engine(spec)
        if spec.json_schema is not None and not self.engine.can_constrain:
            self.engine.close()
            raise ConfigError(f"a JSON schema needs the llama.cpp (GGUF) decoder; {self.engine.name} cannot")
        self.options = self.engine.sampling(**spec.sampling)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.schema = result_schema(spec)

    def close(self) -> None:
        self.engine.close()

    # ----- decoding ------------------------------------------------------------------------------
    def _load(self, item: _Item, image: Any, path: str) -> None:
        try:
            if isinstance(image, np.ndarray) and image.ndim >= 2 and image.dtype != object:
                from PIL import Image

                item.image = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
            elif isinstance(image, (bytes, bytearray, memoryview)) and len(image):
                item.image = decode_image_bytes(image, label=item.id)
            elif path:
                item.image = load_image(path)
            else:
                item.fail(ImageError(f"cannot load image {item.id}: the row has no image and no path"))
        except ImageError as err:
            item.fail(err)
        except (TypeError, ValueError) as err:  # an array Pillow cannot take
            item.fail(ImageError(f"cannot use image {item.id}: {err}"))

    def _items(self, batch: Any) -> list[_Item]:
        ids, paths = _column(batch, "id"), _column(batch, "path")
        if ids is None and paths is None:
            raise MiniGPT4Error("the dataset needs an `id` or a `path` column to identify its rows")
        count = len(ids if ids is not None else paths)  # type: ignore[arg-type]
        images = _column(batch, "image") or [None] * count
        errors = _column(batch, "error") or [None] * count
        paths = paths or [None] * count
        items = []
        for n in range(count):
            item = _Item(_text(ids[n] if ids is not None else paths[n]))
            start = time.perf_counter()
            if _text(errors[n]):  # the reader could not read it (a read error is an image error)
                item.fail(ImageError(_text(errors[n])))
            else:
                self._load(item, images[n], _text(paths[n]))
            item.load_s = time.perf_counter() - start
            items.append(item)
        return items

    # ----- describing ----------------------------------------------------------------------------
    def _submit(self, item: _Item, question: str) -> Any:
        if item.conversation is None:
            item.conversation = self.engine.new_conversation()
            item.conversation.add_image()
            item.submitted = time.perf_counter()
        item.conversation.ask(question)

        def done(_job: Any) -> None:
            item.done_at = time.perf_counter()

        return self.engine.submit(
            item.conversation.prompt(),
            [item.image],
            self.options,
            json_schema=self.spec.json_schema,
            on_done=done,
        )

    def _turn(self, items: Sequence[_Item], question: str) -> None:
        """One question to every item still without an error; all submitted before any is awaited."""
        jobs = []
        for item in items:
            try:
                jobs.append((item, self._submit(item, question)))
            except MiniGPT4Error as err:
                item.fail(err)
        for item, job in jobs:
            try:
                answer = job.result()
            except MiniGPT4Error as err:
                item.fail(err)
                continue
            item.answers.append(answer)
            item.conversation.add_answer(answer.text)

    def __call__(self, batch: Any) -> Any:
        items = self._items(batch)
        self._turn([i for i in items if i.error is None], self.spec.question)
        if self.spec.continue_prompt is not None:
            short = [
                i
                for i in items
                if i.error is None and len(i.answers[0].token_ids) <= self.spec.continue_below
            ]
            self._turn(short, self.spec.continue_prompt)
        return self._table(items)

    def _table(self, items: Sequence[_Item]) -> Any:
        import pyarrow as pa

        rows = [self._row(item) for item in items]
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _row(self, item: _Item) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": item.id,
            "load_s": round(item.load_s, 4),
            "question": self.spec.question,
            "model": self.engine.name,
            "worker": self.worker,
        }
        if item.error is not None or not item.answers:
            row["error"], row["error_type"] = item.error or "no answer", item.error_type or "MiniGPT4Error"
            return row
        first, last = item.answers[0], item.answers[-1]
        texts = [a.text.strip() for a in item.answers]
        timings = {k: sum(float(a.timings.get(k, 0.0)) for a in item.answers) for k in _TIMINGS}
        row.update(
            answer=" ".join(t for t in texts if t) if len(texts) > 1 else first.text,
            token_ids=[t for a in item.answers for t in a.token_ids],
            prompt_tokens=last.prompt_tokens,
            new_tokens=sum(len(a.token_ids) for a in item.answers),
            finish_reason=getattr(last, "finish_reason", None) or "stop",
            total_s=round(item.done_at - item.submitted, 4) if item.done_at else None,
            **{k: round(v, 4) for k, v in timings.items()},
        )
        if self.spec.continue_prompt is not None:
            row["continued"] = len(item.answers) > 1
            row["turn_tokens"] = [len(a.token_ids) for a in item.answers]
        return row


_TIMINGS = ("encode_s", "queue_s", "prefill_s", "generate_s")
