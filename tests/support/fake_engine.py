"""A small stand-in for `minigpt4_local.engine.Engine` that follows its public contract (for server tests).

Contract: `FakeEngine(config, tokenizer, parallel=2, max_queue=4, token_delay=0.01)` answers every job
on its own thread with a deterministic text built from the prompt (`answer_for(prompt, n_images)`), one
word per "decode step" of `token_delay` seconds, through the same callbacks and `Job` surface as the
real engine (`on_text` deltas, `on_done`, `result()`, `cancel()`, `finish_reason`, `prompt_tokens`);
at most `parallel` jobs run at once and at most `max_queue` wait (else `EngineBusy`); `drain()` stops
admitting (`EngineClosed`) and waits. `fail_next` makes the next job fail with a MiniGPT4Error.
It needs no model files: the demo bundle's config and tokenizer give it a real template and token counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from minigpt4_local.errors import ConfigError, MiniGPT4Error, PromptError
from minigpt4_local.pipeline import Answer
from minigpt4_local.prompts import IMAGE_PLACEHOLDER, new_conversation
from minigpt4_local.sampling import SamplingOptions
from minigpt4_local.stitching import build_plan


class EngineBusy(MiniGPT4Error):
    pass


class EngineClosed(MiniGPT4Error):
    pass


def answer_for(prompt: str, n_images: int) -> str:
    question = prompt.rsplit("Human: ", 1)[-1].split("###")[0].replace("<Img><ImageHere></Img>", "").strip()
    return f"I see {n_images} image(s) and you asked: {question or 'nothing'}"


class FakeJob:
    def __init__(self, job_id: int, prompt_tokens: int) -> None:
        self.id = job_id
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._answer: Answer | None = None
        self._error: MiniGPT4Error | None = None
        self._deltas: list[str] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def result(self, timeout: float | None = None) -> Answer:
        if not self._done.wait(timeout):
            raise TimeoutError("job still running")
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    def __iter__(self) -> Any:
        self._done.wait()
        return iter(self._deltas)


class FakeEngine:
    def __init__(
        self, config: Any, tokenizer: Any, *, parallel: int = 2, max_queue: int = 4, token_delay: float = 0.01
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.name = "fake engine"
        self.parallel = parallel
        self.batched = True
        self.can_constrain = True
        self.n_ctx = config.prompt.max_context
        self.max_queue = max_queue
        self.token_delay = token_delay
        self.fail_next = False
        self._slots = threading.Semaphore(parallel)
        self._lock = threading.Lock()
        self._active = 0
        self._queued = 0
        self._completed = 0
        self._generated = 0
        self._next_id = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.submitted: list[dict[str, Any]] = []

    def sampling(self, greedy: bool = False, **overrides: object) -> SamplingOptions:
        return SamplingOptions.from_defaults(self.config.generation, greedy=greedy, **overrides)

    def new_conversation(self) -> Any:
        return new_conversation(self.config.prompt)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "slots": self.parallel,
                "active": self._active,
                "queued": self._queued,
                "completed": self._completed,
                "generated_tokens": self._generated,
                "image_cache": {"entries": 0, "bytes": 0, "hits": 0, "misses": 0},
            }

    def submit(
        self,
        prompt: str,
        images: Sequence[Any],
        options: SamplingOptions,
        *,
        json_schema: dict | None = None,
        grammar: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Any], None] | None = None,
    ) -> FakeJob:
        if self._closed:
            raise EngineClosed("the engine is draining")
        if not prompt:
            raise PromptError("the prompt is empty")
        if prompt.count(IMAGE_PLACEHOLDER) != len(images):
            raise PromptError("image count does not match the placeholders")
        if json_schema is not None and not isinstance(json_schema, dict):
            raise ConfigError("invalid schema")
        plan = build_plan(prompt, self.tokenizer, self.config.num_image_tokens)
        if plan.total_length + options.max_new_tokens > self.n_ctx:
            raise PromptError("prompt + max_new_tokens longer than the context")
        with self._lock:
            if self._queued >= self.max_queue:
                raise EngineBusy(f"{self._queued} requests are waiting")
            self._queued += 1
            self._next_id += 1
            job = FakeJob(self._next_id, plan.total_length)
        self.submitted.append(
            {"prompt": prompt, "images": list(images), "options": options, "json_schema": json_schema}
        )
        fail = self.fail_next
        self.fail_next = False
        text = '{"answer": "fake"}' if json_schema is not None else answer_for(prompt, len(images))
        thread = threading.Thread(
            target=self._run, args=(job, text, options, fail, on_text, on_done), daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return job

    def _run(
        self, job: FakeJob, text: str, options: SamplingOptions, fail: bool, on_text: Any, on_done: Any
    ) -> None:
        self._slots.acquire()
        with self._lock:
            self._queued -= 1
            self._active += 1
        words = text.split(" ")
        ids: list[int] = []
        shown = ""
        finish = "stop"
        try:
            for index, word in enumerate(words):
                if job._cancel.is_set():
                    finish = "cancelled"
                    break
                if index >= options.max_new_tokens:
                    finish = "length"
                    break
                time.sleep(self.token_delay)
                delta = word if index == 0 else " " + word
                shown += delta
                ids.append(index)
                job._deltas.append(delta)
                if on_text is not None:
                    on_text(delta)
            if fail:
                job._error = MiniGPT4Error("decoder failed")
            job.finish_reason = finish
            job._answer = Answer(
                text=shown, token_ids=ids, timings={"new_tokens": len(ids)}, prompt_tokens=job.prompt_tokens
            )
            job._answer.finish_reason = finish  # type: ignore[attr-defined]
        finally:
            with self._lock:
                self._active -= 1
                self._completed += 1
                self._generated += len(ids)
            self._slots.release()
            job._done.set()
            if on_done is not None:
                on_done(job)

    def drain(self, timeout: float | None = None) -> bool:
        self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return all(not t.is_alive() for t in self._threads)

    def close(self) -> None:
        self._closed = True
