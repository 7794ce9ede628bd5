"""One engine job seen from asyncio: submit, stream text, apply stop strings, cancel, summarise.

Contract:
- `StopScanner(stops)`: `push(delta) -> (text, stopped)` returns the part of the stream that can no
  longer become a stop string (a possible beginning of one is held back) and whether a stop string was
  reached (the text before it is the last returned); `flush()` returns what is held back at the end.
  With no stop strings it passes text through unchanged.
- `prepare(engine, request, images, settings) -> Prepared`: counts the prompt's positions (the stitch
  plan of the engine's tokenizer), picks max_new_tokens (the request's, else the model's default cut to
  what the context leaves) and refuses with `APIError` 400 `context_length_exceeded` when prompt +
  answer exceed `engine.n_ctx`; builds the engine's `SamplingOptions` (400 on a bad combination).
- `Generation.start(engine, prepared, loop)` submits the job from a worker thread (engine errors become
  `APIError`: 400 prompt/config errors, 429 queue full, 503 closed) and relays the engine thread's text
  deltas into the loop. `async for text in generation.stream()` yields the visible text; `await
  generation.finish()` waits for the end and returns `Outcome(text, finish_reason, prompt_tokens,
  completion_tokens)`; the concatenated stream equals `Outcome.text` (a final tail is yielded if the
  post-processed answer extends what was streamed). `cancel()` cancels the job (the slot is free within
  one decode step); a stop string cancels it too and reports finish_reason "stop".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, MiniGPT4Error, PromptError
from ..stitching import build_plan
from .errors import APIError, invalid_request, rate_limited, unavailable
from .schemas import GenerationRequest

_DONE = object()


class StopScanner:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)], True
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:size]):
                    best = size
                    break
        return best


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


@dataclass
class Prepared:
    request: GenerationRequest
    images: list[Any]
    options: Any  # SamplingOptions
    prompt_tokens: int


def prepare(engine: Any, request: GenerationRequest, images: list[Any]) -> Prepared:
    plan = build_plan(request.prompt, engine.tokenizer, engine.config.num_image_tokens)
    prompt_tokens = plan.total_length
    room = engine.n_ctx - prompt_tokens
    param = "max_completion_tokens" if request.kind == "chat" else "max_tokens"
    if room < 1 or (request.max_tokens is not None and request.max_tokens > room):
        asked = f" + {request.max_tokens} answer tokens" if request.max_tokens is not None else ""
        raise invalid_request(
            f"the prompt takes {prompt_tokens} positions{asked}, more than the context of {engine.n_ctx}; "
            "shorten the conversation or lower max_tokens",
            param="messages" if room < 1 else param,
            code="context_length_exceeded",
        )
    overrides = dict(request.sampling)
    greedy = bool(overrides.pop("greedy", False))
    max_new = request.max_tokens
    if max_new is None:
        max_new = min(engine.sampling().max_new_tokens, room)
    try:
        options = engine.sampling(greedy=greedy, max_new_tokens=max_new, **overrides)
    except ValueError as err:
        raise invalid_request(str(err)) from None
    return Prepared(request, images, options, prompt_tokens)


@dataclass
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _engine_error(err: MiniGPT4Error) -> APIError:
    name = type(err).__name__
    if name == "EngineBusy":
        return rate_limited(f"the server is busy (request queue full): {err}; retry later")
    if name == "EngineClosed":
        return unavailable("the server is shutting down", "draining")
    if isinstance(err, PromptError):
        return invalid_request(str(err), code="invalid_prompt")
    if isinstance(err, ConfigError):
        return invalid_request(str(err), param="response_format", code="invalid_response_format")
    return invalid_request(str(err))


class Generation:
    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self.prepared = prepared
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._scanner = StopScanner(prepared.request.stop)
        self._emitted: list[str] = []
        self._ended = False
        self.job: Any = None

    # Called on the engine thread.
    def _relay(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    @classmethod
    async def start(cls, engine: Any, prepared: Prepared) -> Generation:
        generation = cls(prepared, asyncio.get_running_loop())
        request = prepared.request

        def submit() -> Any:
            try:
                return engine.submit(
                    request.prompt,
                    prepared.images,
                    prepared.options,
                    json_schema=request.json_schema,
                    on_text=generation._relay,
                    on_done=lambda _job: generation._relay(_DONE),
                )
            except MiniGPT4Error as err:
                raise _engine_error(err) from None

        generation.job = await asyncio.to_thread(submit)
        return generation

    def cancel(self) -> None:
        if self.job is not None and not self.job.done:
            self.job.cancel()

    async def stream(self) -> AsyncIterator[str]:
        """Visible text deltas until the job ends or a stop string is reached."""
        while not self._ended:
            item = await self._queue.get()
            if item is _DONE:
                self._ended = True
                tail = self._scanner.flush()
                if tail:
                    self._emitted.append(tail)
                    yield tail
                break
            text, stopped = self._scanner.push(item)
            if text:
                self._emitted.append(text)
                yield text
            if stopped:
                self.cancel()
                self._ended = True
        final = self._final_text_tail()
        if final:
            yield final

    def _final_text_tail(self) -> str:
        """Text the post-processed answer has beyond what was streamed (normally nothing)."""
        if self._scanner.stopped or self.job is None or not self.job.done:
            return ""
        answer = self._answer()
        if answer is None:
            return ""
        shown = "".join(self._emitted)
        final = cut_at_stop(answer.text, self.prepared.request.stop)
        if final.startswith(shown) and len(final) > len(shown):
            tail = final[len(shown) :]
            self._emitted.append(tail)
            return tail
        return ""

    def _answer(self) -> Any:
        try:
            return self.job.result(timeout=0)
        except MiniGPT4Error:
            return None
        except TimeoutError:
            return None

    async def finish(self) -> Outcome:
        """Consume the rest of the job; the summary for the response (raises APIError on engine errors)."""
        async for _ in self.stream():
            pass
        # The job may still be winding down after a stop string cancelled it.
        answer = await asyncio.to_thread(self._result)
        text = "".join(self._emitted)
        if self._scanner.stopped:
            finish_reason = "stop"
        else:
            finish_reason = answer.finish_reason if answer.finish_reason in ("stop", "length") else "stop"
            final = cut_at_stop(answer.text, self.prepared.request.stop)
            if final != answer.text:
                finish_reason = "stop"
            text = final
        prompt_tokens = (
            getattr(self.job, "prompt_tokens", None) or answer.prompt_tokens or self.prepared.prompt_tokens
        )
        return Outcome(text, finish_reason, int(prompt_tokens), len(answer.token_ids))

    def _result(self) -> Any:
        try:
            return self.job.result()
        except MiniGPT4Error as err:
            raise APIError(
                500, f"generation failed: {err}", type="server_error", code="generation_failed"
            ) from None
