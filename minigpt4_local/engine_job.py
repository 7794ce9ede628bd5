"""A request in flight through the inference engine: its handle (`Job`) and the engine's errors.

Contract (the public half is what `engine.Engine.submit` returns; docs/ARCHITECTURE.md "The engine"):
- `Job` is what `Engine.submit` returns: `id`, `prompt_tokens`, iteration yields text deltas (blocking,
  ends when the job ends; TextStream rules), `result(timeout)` blocks for the `pipeline.Answer` or
  re-raises the job's `MiniGPT4Error` (`TimeoutError` when `timeout` passes first), `finish_reason`
  (None while running, then "stop" | "length" | "cancelled"), `done`, `cancel()`.
- The engine side calls `_emit(text)` for each delta and exactly one of `_finish(answer)` /
  `_fail(error)`; `on_text` / `on_done` callbacks run on the engine's thread and must not block.
  A callback that raises does not stop the engine: the exception is kept and `result()` re-raises it.
- `EngineBusy` (queue full) and `EngineClosed` (draining or closed) are `MiniGPT4Error`s.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .errors import MiniGPT4Error
from .pipeline import Answer

__all__ = ["EngineBusy", "EngineClosed", "Job"]

_END = object()
_IDS = itertools.count(1)


class EngineBusy(MiniGPT4Error):
    """The engine's queue is full: retry later."""


class EngineClosed(MiniGPT4Error):
    """The engine is draining or closed and takes no new requests."""


class Job:
    """One request: see the module docstring."""

    def __init__(
        self,
        prompt_tokens: int,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Job], None] | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.id = next(_IDS)
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self._on_text = on_text
        self._on_done = on_done
        self._wake = wake
        self._deltas: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._cancelled = threading.Event()
        self._answer: Answer | None = None
        self._error: BaseException | None = None

    # ----- caller side ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this job; its slot is freed within one decode step."""
        if not self.done:
            self._cancelled.set()
            if self._wake is not None:
                self._wake()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._deltas.get()
            if item is _END:
                self._deltas.put(_END)  # a second iteration ends at once too
                return
            yield item

    def result(self, timeout: float | None = None) -> Answer:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._answer is not None
        return self._answer

    # ----- engine side ------------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        if not text:
            return
        self._deltas.put(text)
        if self._on_text is not None:
            try:
                self._on_text(text)
            except Exception as exc:  # a caller's bug must not stop the engine
                self._error = self._error or exc
                self._on_text = None

    def _finish(self, answer: Answer) -> None:
        if self.done:
            return
        self._answer = answer
        self.finish_reason = answer.finish_reason
        self._close()

    def _fail(self, error: BaseException) -> None:
        if self.done:
            return
        self._error = error
        self.finish_reason = "error"
        self._close()

    def _close(self) -> None:
        self._deltas.put(_END)
        self._finished.set()
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception as exc:
                self._error = self._error or exc
