"""llama.cpp decoder backend (torch-free): stitched text + image-embedding prefill, KV reuse, decoding.

Contract:
- `LlamaCppDecoder(gguf_path, n_ctx=None, n_gpu_layers=-1, n_batch=512, n_threads=None, seed=None)`
  owns one llama.cpp model + context (one sequence) + two reusable batches. `n_ctx=None` takes the
  GGUF's training context; `n_gpu_layers=-1` offloads every layer when the build supports it (0 on a
  CPU build). A bad/truncated GGUF raises a one-line `ModelDirError` before llama.cpp sees it.
  `close()` / `with` / GC / interpreter exit free everything exactly once (Ctrl-C included).
- `prefill(parts)`: parts are token-id sequences and float32 (n, n_embd) arrays, appended in order at
  the current position (`n_past`) of the single sequence: token runs go in as token batches and image
  rows as `embd` batches, each chunked by `n_batch` (token segments never need their embeddings read
  back from the file, and a token batch is bit-identical to feeding that token's embedding row).
  A prompt that does not fit (`n_past + len(parts) > n_ctx`) raises `PromptError` before any decode.
  `all_logits=True` returns the (T, n_vocab) logits of every prefilled position (perplexity).
- `generate(options, stop, on_token=None) -> list[int]` samples with llama.cpp's own sampler chain
  (repetition penalty, temperature, top-k, top-p, seeded draw; greedy = argmax after the penalty;
  plain greedy without a penalty is a numpy argmax of the logits row, the same token, cheaper)
  until `stop.is_stop(ids)`, `options.max_new_tokens`, or a full context. `on_token(id, text)` streams
  each token with its newly completed UTF-8 text. The ids returned are stripped with `stop.strip` when
  `stop` has it (the torch backend's convention), else returned as generated. Every sampled token
  except the last is in the KV cache afterwards.
- `release_context()` frees the context and batches but keeps the model (and the vocabulary) for the
  engine, which decodes in a multi-sequence context of its own on `model`; `n_threads`, `kv_type` and
  `flash_attn` record how the context was built so the engine's is built alike.
- `history` lists what the KV cache holds (token ids, and a content digest per embedding row);
  `truncate(n)` keeps the first n positions; `reset()` clears it. Multi-turn chat re-prefills only
  the part of a new prompt that differs from `history` (`LlamaCppPipelineDecoder` does this).
- `embed_tokens(ids) -> (len(ids), n_embd) float32` dequantizes rows of the GGUF's token_embd.weight;
  `tokenize(text, add_bos, special)` / `detokenize(ids, special)` use llama.cpp's vocabulary.
- `LlamaCppPipelineDecoder` implements `pipeline.Decoder` (stitch plan + image embeddings -> ids, with
  KV-cache prefix reuse); `LlamaCppTokenizer` implements the `tokenizer.Tokenizer` protocol on the
  GGUF vocabulary for bundles without tokenizer files.
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, MiniGPT4Error, PromptError
from ..prefix_cache import PositionKey, PrefixCache, common_prefix, position_keys, row_digests
from ..sampling import SamplingOptions
from ..stitching import plan_segments
from .llama_ctx import (
    LlamaBatch,
    LlamaContext,
    LlamaModel,
    SamplerChain,
    default_threads,
    llama_cpp_module,
    set_llama_log,
)

Part = Sequence[int] | np.ndarray  # token ids, or (n, n_embd) embedding rows
_RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed

# llama_decode return codes worth a specific message.
_DECODE_ERRORS = {
    1: "no KV-cache slot left for the batch (prompt too long for the context)",
    2: "decoding was aborted",
    -1: "invalid batch",
}


class StopRule(Protocol):
    def is_stop(self, ids: Sequence[int]) -> bool: ...


class _Argmax:
    """Plain greedy (no penalty): numpy argmax of the logits row, the first maximal id like llama.cpp's
    greedy sampler, but ~4x cheaper (that sampler first builds a candidate array of the whole vocabulary)."""

    def __init__(self, row_logits: Callable[[int], np.ndarray]) -> None:
        self._row_logits = row_logits

    def sample(self, ctx: object) -> int:
        return int(np.argmax(self._row_logits(-1)))

    def __enter__(self) -> _Argmax:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _is_embedding(part: Part) -> bool:
    return isinstance(part, np.ndarray) and part.ndim == 2


class LlamaCppDecoder:
    """One llama.cpp model + single-sequence context; see the module docstring."""

    name = "llama.cpp"

    def __init__(
        self,
        gguf_path: str | Path,
        n_ctx: int | None = None,
        n_gpu_layers: int = -1,
        n_batch: int = 512,
        n_threads: int | None = None,
        seed: int | None = None,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        verbose: bool = False,
    ) -> None:
        llama_cpp_module()
        if verbose:
            set_llama_log(True)
        self.seed = seed
        # Kept so that another context on the same model (the engine's) is built the same way.
        self.n_threads = n_threads or default_threads()
        self.kv_type = kv_type
        self.flash_attn = flash_attn
        self._model = LlamaModel(gguf_path, n_gpu_layers)
        try:
            want_ctx = int(n_ctx or self._model.n_ctx_train)
            self._ctx = LlamaContext(
                self._model,
                want_ctx,
                min(n_batch, want_ctx),
                self.n_threads,
                kv_type,
                flash_attn,
            )
            self._tokens = LlamaBatch(self._ctx.n_batch)
            self._embds = LlamaBatch(self._ctx.n_batch, self._model.n_embd)
        except BaseException:
            self.close()
            raise
        self._lib = llama_cpp_module()
        # llama.cpp rounds the KV cache up (to 256); the limit we enforce is what was asked for.
        self._n_ctx = min(want_ctx, self._ctx.n_ctx)
        self.prefix = PrefixCache()  # keys of what the KV cache holds
        self._logits_ready = False
        self._piece_buf = ctypes.create_string_buffer(64)
        self._logits_row = ctypes.c_float * self._model.n_vocab

    # ----- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Free batches, context and model (idempotent; also runs on GC and at interpreter exit)."""
        for name in ("_embds", "_tokens", "_ctx", "_model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()

    def release_context(self) -> None:
        """Free the single-sequence context and its batches, keep the model and its vocabulary (the
        engine decodes in a context of its own on this model); prefill/generate raise afterwards."""
        for name in ("_embds", "_tokens", "_ctx"):
            getattr(self, name).close()
        self.prefix.clear()

    @property
    def model(self) -> LlamaModel:
        return self._model

    def __enter__(self) -> LlamaCppDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- sizes ------------------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self._model.n_embd

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        return self._ctx.n_batch

    @property
    def n_past(self) -> int:
        return len(self.prefix)

    @property
    def n_gpu_layers(self) -> int:
        return self._model.n_gpu_layers

    @property
    def history(self) -> list[PositionKey]:
        return list(self.prefix.keys)

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF key/values (long arrays appear as their length)."""
        return self._model.header.metadata

    # ----- vocabulary -------------------------------------------------------------------------
    def _special(self, fn: str) -> int | None:
        token = int(getattr(self._lib, fn)(self._model.vocab))
        return token if token >= 0 else None

    @property
    def bos_id(self) -> int | None:
        return self._special("llama_vocab_bos")

    @property
    def eos_id(self) -> int | None:
        return self._special("llama_vocab_eos")

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """llama.cpp tokenization; BOS only if `add_bos` and the vocabulary adds one."""
        self._check_model()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        for _ in range(2):
            buf = (ctypes.c_int32 * cap)()
            n = self._lib.llama_tokenize(self._model.vocab, raw, len(raw), buf, cap, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            cap = -n  # buffer too small: llama.cpp reports the size it needs
        raise MiniGPT4Error("llama.cpp tokenization failed")

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        self._check_model()
        buf = self._piece_buf  # reused: this runs once per generated token
        n = self._lib.llama_token_to_piece(self._model.vocab, token_id, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._model.vocab, token_id, buf, -n, 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int], special: bool = False) -> str:
        self._check_model()
        arr = (ctypes.c_int32 * max(len(ids), 1))(*ids)
        cap = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(self._model.vocab, arr, len(ids), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            cap = -n
        raise MiniGPT4Error("llama.cpp detokenization failed")

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), n_embd) float32 rows of the GGUF's token-embedding matrix, dequantized."""
        return self._model.header.token_embedding_rows(ids)

    # ----- KV cache ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything in the context (the next prefill starts at position 0)."""
        self._check_open()
        self._lib.llama_memory_clear(self._ctx.memory, True)
        self.prefix.clear()
        self._logits_ready = False

    def truncate(self, n_keep: int) -> None:
        """Keep the first `n_keep` positions of the sequence, drop the rest."""
        self._check_open()
        if n_keep >= self.n_past:
            return
        if n_keep <= 0 or not self._lib.llama_memory_seq_rm(self._ctx.memory, 0, n_keep, -1):
            self.reset()  # (some memory types cannot drop a suffix: start over)
            return
        self.prefix.keep(n_keep)
        self._logits_ready = False

    def common_prefix(self, keys: Sequence[PositionKey]) -> int:
        """How many leading `keys` the KV cache already holds."""
        return common_prefix(self.prefix.keys, keys)

    # ----- evaluation -------------------------------------------------------------------------
    def _decode(self, batch: LlamaBatch) -> None:
        code = int(self._lib.llama_decode(self._ctx.handle, batch.batch))
        if code != 0:
            # Partial batches may have landed in the cache: make the state consistent by starting over.
            self.reset()
            message = _DECODE_ERRORS.get(code, f"error code {code}")
            raise (PromptError if code == 1 else MiniGPT4Error)(f"llama.cpp decode failed: {message}")

    def _row_logits(self, index: int) -> np.ndarray:
        """(n_vocab,) float32 view of llama.cpp's logits row `index` (-1 = last output); writable."""
        ptr = self._lib.llama_get_logits_ith(self._ctx.handle, index)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        if not address:
            raise RuntimeError(f"llama.cpp has no logits for output {index}")
        # from_address on a cached array type: ~3x cheaper than np.ctypeslib.as_array, once per token.
        row = self._logits_row.from_address(address)
        return np.frombuffer(row, dtype=np.float32)  # type: ignore[call-overload]

    def last_logits(self) -> np.ndarray:
        """Copy of the (n_vocab,) logits for the next position."""
        self._check_open()
        if not self._logits_ready:
            raise RuntimeError("no logits for the next position: prefill first")
        return self._row_logits(-1).copy()

    def _normalise(self, parts: Sequence[Part]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for part in parts:
            if _is_embedding(part):
                rows = np.ascontiguousarray(part, dtype=np.float32)
                if rows.shape[1] != self.n_embd:
                    raise PromptError(
                        f"embedding rows have width {rows.shape[1]}, the decoder expects {self.n_embd}"
                    )
                if not np.isfinite(rows).all():
                    raise PromptError("embedding rows contain NaN or Inf")
                out.append(rows)
            else:
                ids = np.asarray(part, dtype=np.int32).reshape(-1)
                if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
                    raise PromptError(f"token id outside the vocabulary (0..{self.n_vocab - 1})")
                out.append(ids)
        return out

    def _check_model(self) -> None:
        if self._model.closed:
            raise RuntimeError("the llama.cpp decoder is closed")

    def _check_open(self) -> None:
        if self._ctx.closed:
            raise RuntimeError("the llama.cpp decoder is closed")

    def prefill(self, parts: Sequence[Part], all_logits: bool = False) -> np.ndarray | None:
        """Append `parts` to the sequence (see module docstring); returns logits when `all_logits`."""
        self._check_open()
        chunks = [p for p in self._normalise(parts) if len(p)]
        total = sum(len(p) for p in chunks)
        if total == 0:
            raise PromptError("nothing to prefill (empty prompt)")
        if self.n_past + total > self.n_ctx:
            raise PromptError(
                f"prompt of {total} positions does not fit the context: {self.n_past} already used of {self.n_ctx} "
                "(shorten the conversation or raise the context size)"
            )
        collected: list[np.ndarray] = []
        self._logits_ready = False
        done = 0
        for part in chunks:
            is_embd = part.ndim == 2
            batch = self._embds if is_embd else self._tokens
            for start in range(0, len(part), self.n_batch):
                piece = part[start : start + self.n_batch]
                n = len(piece)
                done += n
                last = done == total
                setter = batch.set_embeddings if is_embd else batch.set_tokens
                setter(piece, self.n_past, all_logits=all_logits, last_logits=last)
                self._decode(batch)
                self.prefix.extend(row_digests(piece) if is_embd else piece.tolist())
                if all_logits:
                    collected.append(np.stack([self._row_logits(i).copy() for i in range(n)]))
        self._logits_ready = True
        return np.concatenate(collected) if all_logits else None

    def _decode_one(self, token: int) -> None:
        self._tokens.set_one_token(token, self.n_past)
        self._decode(self._tokens)
        self.prefix.extend((token,))
        self._logits_ready = True

    def generate(
        self,
        options: SamplingOptions,
        stop: StopRule,
        on_token: Callable[[int, str], None] | None = None,
    ) -> list[int]:
        """Decode after a prefill (see module docstring)."""
        self._check_open()
        options.validate()
        if options.num_beams != 1:
            raise ConfigError(
                "the llama.cpp backend has no beam search: use num_beams 1 (or the torch backend)"
            )
        if not self._logits_ready:
            raise RuntimeError("generate() needs a prefill() first")
        seed = options.seed if options.seed is not None else self.seed
        eos = getattr(stop, "eos_id", None) if getattr(stop, "stop_on_eos", False) else None
        # transformers with inputs_embeds: min_length counts the prompt, so only max(min - T, 0) new tokens
        # must avoid EOS (0 for the defaults).
        block_eos_until = max(options.min_length - self.n_past, 0) if eos is not None else 0
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[int] = []
        plain_greedy = not options.do_sample and options.repetition_penalty == 1.0
        sampler = (
            _Argmax(self._row_logits)
            if plain_greedy
            else SamplerChain(options, self.n_vocab, _RANDOM_SEED if seed is None else seed & 0xFFFFFFFF)
        )
        with sampler:
            while True:
                if len(generated) < block_eos_until:
                    self._row_logits(-1)[eos] = -np.inf  # in place: the sampler reads these logits
                token = sampler.sample(self._ctx)
                generated.append(token)
                if on_token is not None:
                    on_token(token, text.decode(self.token_bytes(token)))
                if (
                    stop.is_stop(generated)
                    or len(generated) >= options.max_new_tokens
                    or self.n_past >= self.n_ctx
                ):
                    break
                self._decode_one(token)
        self._logits_ready = False  # the last sampled token is not in the cache
        strip = getattr(stop, "strip", None)
        return strip(generated) if callable(strip) else generated


# --------------------------------------------------------------------------------------------------
# Pipeline adapters


def _slice_from(parts: Sequence[Part], start: int) -> list[Part]:
    """Drop the first `start` positions of a part list."""
    out: list[Part] = []
    for part in parts:
        n = len(part)
        if start >= n:
            start -= n
            continue
        out.append(part[start:])
        start = 0
    return out


class LlamaCppPipelineDecoder:
    """`pipeline.Decoder` on llama.cpp: each turn re-prefills only what the KV cache does not hold."""

    name = "llama.cpp"

    def __init__(self, decoder: LlamaCppDecoder) -> None:
        self.decoder = decoder
        self.last_prefill_s = 0.0
        self.last_reused = 0  # positions of the last prompt served from the KV cache

    def generate(
        self,
        plan: Any,
        image_embeds: Sequence[Any],
        options: SamplingOptions,
        stop: Any,
        on_token: Callable[[int], None] | None,
    ) -> list[int]:
        import time

        parts: list[Part] = [
            s if isinstance(s, list) else np.asarray(s, dtype=np.float32)
            for s in plan_segments(plan, image_embeds)
        ]
        self.decoder.truncate(self.decoder.prefix.reusable(position_keys(plan, image_embeds)))
        self.last_reused = self.decoder.n_past
        start = time.perf_counter()
        self.decoder.prefill(_slice_from(parts, self.decoder.n_past))
        self.last_prefill_s = time.perf_counter() - start
        callback = (lambda token, _text: on_token(token)) if on_token is not None else None
        return self.decoder.generate(options, stop, callback)


class LlamaCppTokenizer:
    """`tokenizer.Tokenizer` on a GGUF vocabulary (for bundles that carry no tokenizer files)."""

    def __init__(self, decoder: LlamaCppDecoder) -> None:
        self.decoder = decoder
        meta = decoder.metadata
        self._unk = meta.get("tokenizer.ggml.unknown_token_id")
        self._pad = meta.get("tokenizer.ggml.padding_token_id")

    @property
    def bos_id(self) -> int | None:
        return self.decoder.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.decoder.eos_id

    @property
    def unk_id(self) -> int | None:
        return None if self._unk is None else int(self._unk)

    @property
    def pad_id(self) -> int | None:
        return None if self._pad is None else int(self._pad)

    @property
    def vocab_size(self) -> int:
        return self.decoder.n_vocab

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self.decoder.tokenize(text, add_bos=add_bos, special=True)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.decoder.detokenize([int(i) for i in ids], special=not skip_special)

    def id_to_piece(self, token_id: int) -> str:
        return self.decoder.token_bytes(token_id, special=True).decode("utf-8", errors="replace")


def build_gguf_decoder(source: Any, options: Any) -> Any:
    """`loader.DECODERS["gguf"]`: a bundle's `llm.gguf` in llama.cpp (see `loader.load_pipeline`)."""
    from ..loader import DecoderBuild

    bundle = source.bundle
    llm = LlamaCppDecoder(
        bundle.part_path("llm"),
        n_ctx=options.n_ctx or source.config.prompt.max_context,
        n_gpu_layers=-1 if options.n_gpu_layers is None else options.n_gpu_layers,
        n_threads=options.threads,
    )
    label = f"onnx + llama.cpp {bundle.part('llm').get('type', '')}".strip()
    return DecoderBuild(
        LlamaCppPipelineDecoder(llm), llm.n_embd, llm.n_vocab, label, tokenizer=LlamaCppTokenizer(llm)
    )
