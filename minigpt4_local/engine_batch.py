"""Continuous batching on llama.cpp: N slots decoded together in one multi-sequence context.

Contract:
- `BatchedScheduler(llm, stop, tokenizer, parallel, ctx, n_batch=512)` creates ONE llama.cpp context on
  the model of `llm` (a `LlamaCppDecoder`) with `n_seq_max = parallel` and a KV stream per sequence
  (`kv_unified=False`, `ctx` cells each): with separate streams every logit of a sequence is bit-identical
  to decoding it alone (stack-probe.md; tests/test_engine.py keeps checking it), so answers never depend
  on what else is running. Slot i is llama.cpp sequence i.
- `admit(request)` puts a request whose embeddings are ready into a free slot: the one whose
  `PrefixCache` shares the longest prefix with the new prompt; only the positions after that prefix are
  removed (`llama_memory_seq_rm`) and prefilled again.
- `step()` runs one round on the engine thread: cancelled slots are released, then ONE token batch with
  the next token of every generating slot (one row per sequence: llama.cpp keeps it in one ubatch),
  then prefill of admitted slots, one sequence per decode call (token runs as token batches, image rows
  as embedding batches, as `LlamaCppDecoder.prefill` does), up to `n_batch` rows per step. Each slot's
  next token is sampled right after the decode that produced its logits row.
- Per slot the decoding rules are exactly `LlamaCppDecoder.generate`'s: EOS blocked for the first
  max(min_length - prompt positions, 0) tokens, plain greedy = numpy argmax, anything else llama.cpp's
  sampler chain (`_build_chain`, with a grammar sampler first when the request has one) with the
  request's seed, stop on the stop rule / max_new_tokens / a full slot context; the answer's ids are
  stripped with the stop rule. A finished slot keeps its KV stream (nobody else can use those cells);
  the next request admitted there keeps only the common prefix.
- `active` / `idle` tell the engine whether to wait; `close()` frees the context and batches.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.llama_ctx import (
    ConstrainedSampler,
    LlamaContext,
    MultiBatch,
    SamplerChain,
    llama_cpp_module,
)
from .engine_job import Job
from .errors import MiniGPT4Error
from .pipeline import Answer
from .prefix_cache import PrefixCache, position_keys, row_digests
from .prompts import postprocess
from .stitching import plan_segments
from .streaming import TextStream

__all__ = ["BatchedScheduler", "Request"]

_RANDOM_SEED = 0xFFFFFFFF


@dataclass
class Request:
    """A submitted job with everything the scheduler needs once its images are encoded."""

    job: Job
    plan: Any  # StitchPlan
    options: Any  # SamplingOptions
    grammar: str | None
    submitted: float
    embeds: list[Any] | None = None  # set when the vision side is done
    encode_s: float = 0.0


@dataclass
class _Slot:
    index: int
    prefix: PrefixCache = field(default_factory=PrefixCache)
    request: Request | None = None
    pending: list[np.ndarray] = field(default_factory=list)  # prompt parts still to prefill
    n_past: int = 0
    prompt_len: int = 0
    next_token: int | None = None  # sampled, to be decoded in the next step
    generated: list[int] = field(default_factory=list)
    sampler: Any = None  # SamplerChain / ConstrainedSampler, or None for plain greedy
    constrained: bool = False
    block_eos_until: int = 0
    stream: TextStream | None = None
    admitted: float = 0.0
    first_token: float | None = None
    finish_reason: str | None = None


def _parts(plan: Any, embeds: list[Any]) -> list[np.ndarray]:
    out = []
    for seg in plan_segments(plan, embeds):
        if isinstance(seg, list):
            out.append(np.asarray(seg, dtype=np.int32))
        else:
            out.append(np.ascontiguousarray(seg, dtype=np.float32))
    return [p for p in out if len(p)]


def _slice_from(parts: list[np.ndarray], start: int) -> list[np.ndarray]:
    out = []
    for part in parts:
        if start >= len(part):
            start -= len(part)
            continue
        out.append(part[start:])
        start = 0
    return out


class BatchedScheduler:
    def __init__(
        self,
        llm: Any,
        stop: Any,
        tokenizer: Any,
        parallel: int,
        ctx: int,
        n_batch: int = 512,
        kv_type: str | None = None,
        n_threads: int | None = None,
    ) -> None:
        from .backends.llama_ctx import default_threads

        self._lib = llama_cpp_module()
        self.llm = llm
        self.model = llm._model
        self.stop = stop
        self.tokenizer = tokenizer
        self.parallel = parallel
        self.n_ctx = ctx
        self.eos = stop.eos_id if getattr(stop, "stop_on_eos", False) else None
        threads = n_threads or getattr(llm, "n_threads", None) or default_threads()
        self.context = LlamaContext(
            self.model,
            ctx * parallel,
            n_batch,
            threads,
            str(kv_type or getattr(llm, "kv_type", None) or "f16"),
            getattr(llm, "flash_attn", None),
            n_seq_max=parallel,
            kv_unified=False,
        )
        if self.context.n_ctx_seq < ctx:
            self.context.close()
            raise MiniGPT4Error(
                f"llama.cpp gave each sequence {self.context.n_ctx_seq} cells, {ctx} were asked for"
            )
        self.n_batch = self.context.n_batch
        self._tokens = MultiBatch(self.n_batch)
        self._embds = MultiBatch(self.n_batch, self.model.n_embd)
        self._logits_row = ctypes.c_float * self.model.n_vocab
        self.slots = [_Slot(i) for i in range(parallel)]
        self.generated_tokens = 0
        self.completed = 0

    # ----- bookkeeping ------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(s.request is not None for s in self.slots)

    def jobs(self) -> list[Job]:
        return [s.request.job for s in self.slots if s.request is not None]

    def free_slots(self) -> int:
        return sum(s.request is None for s in self.slots)

    def close(self) -> None:
        for slot in self.slots:
            if slot.request is not None:
                self._end(slot, "cancelled")
        for obj in (self._embds, self._tokens, self.context):
            obj.close()

    def _row(self, index: int) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self.context.handle, index)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        if not address:
            raise RuntimeError(f"llama.cpp has no logits for output {index}")
        return np.frombuffer(self._logits_row.from_address(address), dtype=np.float32)

    # ----- admission --------------------------------------------------------------------------
    def admit(self, request: Request) -> None:
        """Put a request whose embeddings are ready into the best free slot (one must be free)."""
        assert request.embeds is not None
        parts = _parts(request.plan, request.embeds)
        keys = position_keys(request.plan, request.embeds)
        free = [s for s in self.slots if s.request is None]
        slot = max(free, key=lambda s: (s.prefix.reusable(keys), -s.index))
        keep = slot.prefix.reusable(keys)
        mem = self.context.memory
        if keep < len(slot.prefix):
            if keep <= 0 or not self._lib.llama_memory_seq_rm(mem, slot.index, keep, -1):
                self._lib.llama_memory_seq_rm(mem, slot.index, -1, -1)
                keep = 0
            slot.prefix.keep(keep)
        options = request.options
        slot.request = request
        slot.pending = _slice_from(parts, keep)
        slot.n_past = keep
        slot.prompt_len = len(keys)
        slot.next_token = None
        slot.generated = []
        slot.finish_reason = None
        slot.admitted = time.perf_counter()
        slot.first_token = None
        slot.constrained = request.grammar is not None
        # Constrained output ends where the grammar ends (an end-of-generation token), not at "###".
        slot.stream = TextStream(self.tokenizer.decode, stop_mark=None if slot.constrained else "###")
        slot.block_eos_until = max(options.min_length - slot.prompt_len, 0) if self.eos is not None else 0
        seed = options.seed if options.seed is not None else self.llm.seed
        seed = _RANDOM_SEED if seed is None else seed & 0xFFFFFFFF
        slot.sampler = None
        if request.grammar is not None:
            slot.sampler = ConstrainedSampler(self.model, options, seed, request.grammar)
        elif options.do_sample or options.repetition_penalty != 1.0:
            slot.sampler = SamplerChain(options, self.model.n_vocab, seed)

    # ----- one step -----------------------------------------------------------------------------
    def step(self) -> None:
        """One round of decoding over every active slot (see the module docstring)."""
        for slot in self.slots:
            if slot.request is not None and slot.request.job.cancel_requested:
                self._end(slot, "cancelled")
        tok, emb = self._tokens, self._embds
        # 1. The next token of every generating slot. One row per sequence keeps the batch in one
        #    ubatch: with per-sequence KV streams llama.cpp splits a batch into ubatches holding the same
        #    number of rows per sequence, so a prefill run mixed in would cut it into many small ones.
        tok.clear()
        outputs: list[tuple[_Slot, int]] = []
        for slot in self.slots:
            if slot.request is not None and slot.next_token is not None:
                token = np.array([slot.next_token], dtype=np.int32)
                row = tok.add_tokens(token, slot.n_past, slot.index, True)
                slot.prefix.extend((slot.next_token,))
                slot.n_past += 1
                slot.next_token = None
                outputs.append((slot, row))
        if outputs:
            self._run_batch(tok, outputs, [s for s, _ in outputs])
        # 2. Prefill of admitted slots, one sequence per decode call, up to n_batch rows per step.
        budget = self.n_batch
        prefilling = sorted(
            (s for s in self.slots if s.request is not None and s.pending), key=lambda s: s.admitted
        )
        for slot in prefilling:
            while budget > 0 and slot.request is not None and slot.pending:
                part = slot.pending[0]
                is_embd = part.ndim == 2
                batch = emb if is_embd else tok
                batch.clear()
                piece = part[: min(budget, batch.capacity)]
                n = len(piece)
                last = n == len(part) and len(slot.pending) == 1
                if is_embd:
                    row = batch.add_embeddings(piece, slot.n_past, slot.index, last)
                    slot.prefix.extend(row_digests(piece))
                else:
                    row = batch.add_tokens(piece, slot.n_past, slot.index, last)
                    slot.prefix.extend(piece.tolist())
                slot.n_past += n
                budget -= n
                if n == len(part):
                    slot.pending.pop(0)
                else:
                    slot.pending[0] = part[n:]
                self._run_batch(batch, [(slot, row)] if last else [], [slot])

    def _run_batch(self, batch: MultiBatch, outputs: list[tuple[_Slot, int]], involved: list[_Slot]) -> None:
        """Decode `batch`, then sample for the slots whose logits row it produced."""
        try:
            self._decode(batch)
        except MiniGPT4Error as exc:
            for slot in involved:
                if slot.request is not None:
                    self._fail(slot, exc)
            return
        self._sample(outputs)

    def _decode(self, batch: MultiBatch) -> None:
        code = int(self._lib.llama_decode(self.context.handle, batch.batch))
        if code != 0:
            raise MiniGPT4Error(f"llama.cpp decode failed with code {code}")

    # ----- sampling and the stop rules --------------------------------------------------------
    def _sample(self, outputs: list[tuple[_Slot, int]]) -> None:
        now = time.perf_counter()
        for slot, row in outputs:
            request = slot.request
            if request is None:
                continue
            options = request.options
            if len(slot.generated) < slot.block_eos_until:
                self._row(row)[self.eos] = -np.inf  # in place: the sampler reads these logits
            if slot.first_token is None:
                slot.first_token = now
            if slot.constrained:
                token = slot.sampler.sample(self._row(row))
                if token is None or self._lib.llama_vocab_is_eog(self.model.vocab, token):
                    self._end(slot, "stop")  # the grammar is complete (or allows nothing more)
                    continue
            elif slot.sampler is None:
                token = int(np.argmax(self._row(row)))
            else:
                token = slot.sampler.sample(self.context, row)
            slot.generated.append(token)
            self.generated_tokens += 1
            assert slot.stream is not None
            request.job._emit(slot.stream.push(token))
            # slot.n_past: the prompt plus every generated token but this one (as LlamaCppDecoder)
            if not slot.constrained and self.stop.is_stop(slot.generated):
                self._end(slot, "stop")
            elif len(slot.generated) >= options.max_new_tokens or slot.n_past >= self.n_ctx:
                self._end(slot, "length")
            else:
                slot.next_token = token

    def _release(self, slot: _Slot) -> Request | None:
        request = slot.request
        slot.request = None
        slot.pending = []
        slot.next_token = None
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None
        return request

    def _end(self, slot: _Slot, reason: str) -> None:
        if slot.pending:
            # A prefill cut short: its cache keys must not claim positions that were never decoded.
            slot.prefix.keep(slot.n_past)
        request = self._release(slot)
        if request is None:
            return
        now = time.perf_counter()
        strip = getattr(self.stop, "strip", None)
        if slot.constrained:
            ids = list(slot.generated)  # the end-of-generation token was never appended
        else:
            ids = strip(slot.generated) if callable(strip) else list(slot.generated)
        if slot.stream is not None:
            request.job._emit(slot.stream.finish())
        generate_s = now - slot.admitted
        first = slot.first_token or now
        timings = {
            "encode_s": round(request.encode_s, 4),
            "queue_s": round(max(0.0, slot.admitted - request.submitted - request.encode_s), 4),
            "prefill_s": round(first - slot.admitted, 4),
            "generate_s": round(generate_s, 4),
            "new_tokens": len(ids),
            "tokens_per_s": round(len(ids) / generate_s, 2) if generate_s > 0 else 0.0,
            "first_token_s": round(first - request.submitted, 4),
        }
        text = self.tokenizer.decode(ids)
        answer = Answer(
            text=text.strip() if slot.constrained else postprocess(text),
            token_ids=ids,
            timings=timings,
            prompt_tokens=request.plan.total_length,
            finish_reason=reason,
        )
        self.completed += 1
        request.job._finish(answer)

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        # The slot's KV stream may hold part of the failed batch: forget it entirely.
        self._lib.llama_memory_seq_rm(self.context.memory, slot.index, -1, -1)
        slot.prefix.clear()
        request = self._release(slot)
        if request is not None:
            request.job._fail(error)
