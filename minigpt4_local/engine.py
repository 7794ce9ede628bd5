"""The inference engine: one loaded model serving many requests at once (the API the CLI, server and Ray use).

Contract:
- `Engine.open(model, options, *, parallel, ctx, image_cache_mb, max_queue, announce)` resolves and loads
  a model like the CLI (`loader.resolve_model` + `loader.load_pipeline`) and owns it; `Engine(pipeline,
  ...)` wraps an already loaded `Pipeline` (with `own=True` it also takes it over: the pipeline's own
  single-sequence llama.cpp context is freed at once, everything at `close()`).
- A llama.cpp pipeline gets the batched scheduler (`engine_batch.BatchedScheduler`: `parallel` slots in
  one multi-sequence context on the same model, continuous batching; `batched` True, `can_constrain`
  True). Torch and GPTQ pipelines run one request at a time through `pipeline.decoder` (`parallel` is
  then 1, `batched` False, `can_constrain` False).
- `submit(prompt, images, options, *, json_schema, grammar, on_text, on_done) -> Job` checks everything
  that can be checked at once (empty prompt, placeholder count, context size, beams on llama.cpp,
  schema/grammar) and raises without queueing anything; the request then waits for its image
  embeddings (`vision_worker.VisionWorker`: batched, cached in `image_cache.EmbeddingCache`) and for a
  free slot (ready requests are admitted first come, first served). `EngineBusy` when `max_queue`
  requests are already waiting, `EngineClosed` once `drain()` or `close()` began.
- One engine thread runs the scheduler; the vision thread overlaps it. `stats()`, `drain(timeout)`,
  `close()` (idempotent; cancels what is left: such jobs end with finish_reason "cancelled"), `with`.
- Greedy answers are token-identical to the sequential `Pipeline.describe` for every `parallel` and
  arrival pattern (tests/test_engine.py).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .engine_batch import BatchedScheduler, Request
from .engine_job import EngineBusy, EngineClosed, Job
from .errors import ConfigError, MiniGPT4Error, PromptError
from .image_cache import EmbeddingCache
from .loader import LoadOptions, load_pipeline, resolve_model
from .pipeline import Answer, Pipeline
from .prompts import IMAGE_PLACEHOLDER, Conversation, new_conversation, postprocess
from .sampling import SamplingOptions
from .stitching import plan_prompt
from .streaming import TextStream
from .vision_worker import VisionWorker

__all__ = ["DEFAULT_IMAGE_CACHE_MB", "DEFAULT_PARALLEL", "Engine", "EngineBusy", "EngineClosed", "Job"]

# Slots decoded together by default (benchmarks/bench_engine.py on a 2-core CPU; see RESULTS.md).
DEFAULT_PARALLEL = 4
DEFAULT_IMAGE_CACHE_MB = 256.0
DEFAULT_MAX_QUEUE = 1024


class _Cancelled(Exception):
    """Raised from a sequential decoder's token callback to stop a cancelled job."""


class SerialScheduler:
    """Torch / GPTQ decoders: one request at a time through `pipeline.decoder.generate`."""

    parallel = 1

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._current: Request | None = None
        self._running: Request | None = None
        self.generated_tokens = 0
        self.completed = 0

    @property
    def active(self) -> int:
        return int(self._current is not None or self._running is not None)

    def jobs(self) -> list[Job]:
        return [r.job for r in (self._current, self._running) if r is not None]

    def free_slots(self) -> int:
        return 1 - self.active

    def admit(self, request: Request) -> None:
        self._current = request

    def step(self) -> None:
        request, self._current = self._current, None
        if request is None:
            return
        self._running = request
        try:
            self._run_one(request)
        finally:
            self._running = None

    def _run_one(self, request: Request) -> None:
        p, job = self.pipeline, request.job
        stream = TextStream(p.tokenizer.decode)
        raw: list[int] = []
        admitted = time.perf_counter()
        first: list[float] = []

        def on_token(token: int) -> None:
            if job.cancel_requested:
                raise _Cancelled
            if not first:
                first.append(time.perf_counter())
            raw.append(int(token))
            self.generated_tokens += 1
            job._emit(stream.push(token))

        reason = "stop"
        try:
            ids = p.decoder.generate(request.plan, request.embeds or [], request.options, p.stop, on_token)
            if not p.stop.is_stop(raw) and len(raw) >= request.options.max_new_tokens:
                reason = "length"
        except _Cancelled:
            ids, reason = p.stop.strip(raw), "cancelled"
        except MiniGPT4Error as exc:
            job._fail(exc)
            return
        job._emit(stream.finish())
        now = time.perf_counter()
        self.completed += 1
        job._finish(_answer(p, request, ids, reason, admitted, first[0] if first else now, now))

    def close(self) -> None:
        self._current = None


def _answer(
    p: Any, request: Request, ids: list[int], reason: str, admitted: float, first: float, now: float
) -> Answer:
    generate_s = now - admitted
    timings = {
        "encode_s": round(request.encode_s, 4),
        "queue_s": round(max(0.0, admitted - request.submitted - request.encode_s), 4),
        "prefill_s": round(first - admitted, 4),
        "generate_s": round(generate_s, 4),
        "new_tokens": len(ids),
        "tokens_per_s": round(len(ids) / generate_s, 2) if generate_s > 0 else 0.0,
        "first_token_s": round(first - request.submitted, 4),
    }
    return Answer(
        text=postprocess(p.tokenizer.decode(ids)),
        token_ids=ids,
        timings=timings,
        prompt_tokens=request.plan.total_length,
        finish_reason=reason,
    )


class Engine:
    """See the module docstring."""

    @classmethod
    def open(
        cls,
        model: str | Path | None,
        options: LoadOptions | None = None,
        *,
        parallel: int = DEFAULT_PARALLEL,
        ctx: int | None = None,
        image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
        max_queue: int = DEFAULT_MAX_QUEUE,
        announce: Callable[[str], None] | None = None,
    ) -> Engine:
        path = resolve_model(None if model is None else str(model), announce=announce)
        pipeline = load_pipeline(path, options)
        try:
            return cls(
                pipeline,
                parallel=parallel,
                ctx=ctx,
                image_cache_mb=image_cache_mb,
                max_queue=max_queue,
                own=True,
            )
        except BaseException:
            _close_pipeline(pipeline)
            raise

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        parallel: int = DEFAULT_PARALLEL,
        ctx: int | None = None,
        image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
        max_queue: int = DEFAULT_MAX_QUEUE,
        own: bool = False,
    ) -> None:
        if parallel < 1:
            raise ConfigError(f"parallel must be at least 1, got {parallel}")
        if image_cache_mb < 0:
            raise ConfigError(f"the image cache size must be >= 0 MB, got {image_cache_mb}")
        self.pipeline = pipeline
        self.name = pipeline.name
        self.config = pipeline.config
        self.tokenizer = pipeline.tokenizer
        self.max_queue = max(1, int(max_queue))
        self._own = own
        self.n_ctx = int(ctx or self.config.prompt.max_context)
        llm = _llama_decoder(pipeline)
        self.batched = llm is not None
        if llm is not None:
            self._scheduler: Any = BatchedScheduler(llm, pipeline.stop, self.tokenizer, parallel, self.n_ctx)
            if own:
                llm.release_context()
            self._model = llm.model
        else:
            self._scheduler = SerialScheduler(pipeline)
            self._model = None
        self.parallel = self._scheduler.parallel
        self.can_constrain = self.batched
        self.cache = EmbeddingCache(int(image_cache_mb * 2**20))
        vision = pipeline.vision
        batchable = hasattr(vision, "preprocess") and hasattr(vision, "encode")
        self.vision = VisionWorker(vision, self.cache, max_batch=None if batchable else 1)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._closing = False  # no new submissions (drain or close)
        self._stopped = False  # the engine thread must exit
        self._thread = threading.Thread(target=self._run, name="minigpt4-engine", daemon=True)
        self._thread.start()

    # ----- the model's settings -----------------------------------------------------------------
    def sampling(self, greedy: bool = False, **overrides: object) -> SamplingOptions:
        return self.pipeline.sampling(greedy=greedy, **overrides)

    def new_conversation(self) -> Conversation:
        return new_conversation(self.config.prompt)

    # ----- requests -------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        images: Sequence[Any],
        options: SamplingOptions,
        *,
        json_schema: dict | None = None,
        grammar: str | None = None,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[Job], None] | None = None,
    ) -> Job:
        if self._closing:
            raise EngineClosed("the engine is shutting down and takes no new requests")
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        try:
            options.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.batched and options.num_beams != 1:
            raise ConfigError(
                "the llama.cpp backend has no beam search: use num_beams 1 (or the torch backend)"
            )
        images = list(images)
        slots = prompt.count(IMAGE_PLACEHOLDER)
        if slots != len(images):
            raise PromptError(f"the prompt has {slots} image slot(s) but {len(images)} image(s) were given")
        gbnf = self._grammar(json_schema, grammar)
        plan = plan_prompt(prompt, self.tokenizer, self.config, options.max_new_tokens)
        if plan.total_length + options.max_new_tokens > self.n_ctx:
            raise PromptError(
                f"prompt of {plan.total_length} positions + {options.max_new_tokens} new tokens does not fit "
                f"the context of {self.n_ctx} (shorten the prompt or lower max_new_tokens)"
            )
        job = Job(plan.total_length, on_text, on_done, wake=self._notify)
        request = Request(job, plan, options, gbnf, time.perf_counter())
        with self._lock:
            if self._closing:
                raise EngineClosed("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(
                    f"the engine's queue is full ({self.max_queue} waiting requests); retry later"
                )
            self._waiting.append(request)
        if all(isinstance(im, np.ndarray) for im in images):
            self._embedded(request, list(images), None, 0.0)
        else:
            self.vision.submit(images, lambda e, err, s: self._embedded(request, e, err, s))
        return job

    def _grammar(self, json_schema: dict | None, grammar: str | None) -> str | None:
        if json_schema is None and grammar is None:
            return None
        if json_schema is not None and grammar is not None:
            raise ConfigError("give a JSON schema or a grammar, not both")
        if not self.can_constrain:
            raise ConfigError(
                f"constrained output (JSON schema / grammar) needs the llama.cpp decoder; {self.name} cannot"
            )
        if grammar is None:
            from .grammar import schema_grammar

            grammar = schema_grammar(json_schema)  # type: ignore[arg-type]
        from .backends.llama_ctx import grammar_sampler, llama_cpp_module

        llama_cpp_module().llama_sampler_free(grammar_sampler(self._model, grammar))  # parse check
        return grammar

    def _embedded(
        self, request: Request, embeds: list[Any] | None, error: BaseException | None, seconds: float
    ) -> None:
        with self._lock:
            if error is not None:
                if request in self._waiting:
                    self._waiting.remove(request)
                request.job._fail(
                    error
                    if isinstance(error, MiniGPT4Error)
                    else MiniGPT4Error(f"encoding the image failed: {type(error).__name__}: {error}")
                )
            else:
                request.embeds, request.encode_s = embeds, seconds
            self._lock.notify_all()

    def encode_images(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Image embeddings through the cache and the batched vision worker."""
        return self.vision.encode(list(images))

    # ----- the engine thread ---------------------------------------------------------------------
    def _notify(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _ready_requests(self) -> list[Request]:
        """Under the lock: drop cancelled waiting requests, pop ready ones for the free slots."""
        for request in [r for r in self._waiting if r.job.cancel_requested]:
            self._waiting.remove(request)
            self._cancel_waiting(request)
        free = self._scheduler.free_slots()
        ready: list[Request] = []
        for request in list(self._waiting):
            if len(ready) >= free:
                break
            if request.embeds is not None:
                self._waiting.remove(request)
                ready.append(request)
        return ready

    def _cancel_waiting(self, request: Request) -> None:
        now = time.perf_counter()
        request.job._finish(_answer(self.pipeline, request, [], "cancelled", now, now, now))

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    ready = self._ready_requests()
                    if ready or self._scheduler.active:
                        break
                    self._lock.notify_all()  # idle: wake drain()
                    self._lock.wait()
            for request in ready:
                try:
                    self._scheduler.admit(request)
                except MiniGPT4Error as exc:
                    request.job._fail(exc)
            try:
                self._scheduler.step()
            except Exception as exc:  # a bug: fail what is running rather than hang every caller
                self._fail_running(MiniGPT4Error(f"internal engine error: {type(exc).__name__}: {exc}"))

    def _fail_running(self, error: MiniGPT4Error) -> None:
        for slot in getattr(self._scheduler, "slots", []):
            if slot.request is not None:
                self._scheduler._fail(slot, error)

    # ----- status and shutdown ------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            queued = len(self._waiting)
        return {
            "slots": self.parallel,
            "active": self._scheduler.active,
            "queued": queued,
            "completed": self._scheduler.completed,
            "generated_tokens": self._scheduler.generated_tokens,
            "image_cache": self.cache.stats(),
        }

    def drain(self, timeout: float | None = None) -> bool:
        """Stop admitting new requests; wait for running and queued ones. True if all finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._closing = True
            while self._waiting or self._scheduler.active:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._closing = True
            self._stopped = True
            for job in [r.job for r in self._waiting] + self._scheduler.jobs():
                job.cancel()
            self._lock.notify_all()
        self._thread.join()
        with self._lock:
            for request in list(self._waiting):
                self._cancel_waiting(request)
            self._waiting.clear()
        self.vision.close()
        self._scheduler.close()
        if self._own:
            _close_pipeline(self.pipeline)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _llama_decoder(pipeline: Pipeline) -> Any:
    """The `LlamaCppDecoder` behind a llama.cpp pipeline, else None."""
    from .backends.llamacpp import LlamaCppPipelineDecoder

    decoder = pipeline.decoder
    return decoder.decoder if isinstance(decoder, LlamaCppPipelineDecoder) else None


def _close_pipeline(pipeline: Pipeline) -> None:
    for part in (pipeline.decoder, getattr(pipeline.decoder, "decoder", None)):
        close = getattr(part, "close", None)
        if callable(close):
            close()
            return
