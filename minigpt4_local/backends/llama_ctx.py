"""Thin owners of llama.cpp resources (model, context, batch, sampler chain) for the torch-free runtime.

Contract:
- `llama_cpp_module()` imports llama-cpp-python lazily (`DependencyError` when missing), initialises
  the backend once and silences llama.cpp's own log output unless `set_llama_log(True)` (or the
  environment variable MINIGPT4_LLAMA_LOG=1) asks for it.
- `LlamaModel`, `LlamaContext`, `LlamaBatch`, `SamplerChain` each own exactly one C object and free it
  exactly once: on `close()`, on leaving a `with` block, when garbage-collected, or at interpreter
  exit (a `weakref.finalize`; finalizers run in reverse creation order, so a context is freed before
  its model). A context keeps its model alive; using a closed object raises `RuntimeError`.
- `LlamaModel` validates the file with `scan_gguf` first, so a truncated/corrupt GGUF gives a one-line
  `ModelDirError` instead of a llama.cpp abort.
- `LlamaContext(..., n_seq_max=1, kv_unified=None)`: `n_seq_max` sequences share the context;
  `kv_unified=False` gives every sequence its own KV stream of `n_ctx / n_seq_max` cells (decoding
  several sequences together is then bit-identical to decoding each alone), None keeps llama.cpp's
  default. `n_ctx_seq` is the context one sequence may use.
- `LlamaBatch(capacity, n_embd=0)` is a token batch (n_embd 0) or an embedding batch, single sequence
  (id 0); numpy views over its C arrays make filling it cheap. `MultiBatch(capacity, n_embd=0)` is the
  same with a sequence id per row, filled row run by row run (`clear`, `add_tokens`, `add_embeddings`).
- `ConstrainedSampler(model, options, seed, grammar)` samples under a GBNF grammar the way llama.cpp's
  own tools do: the unconstrained choice first (argmax for plain greedy, else the sampler chain applied
  to the logits), checked against the grammar alone; only when the grammar rejects it is the grammar
  applied to the whole vocabulary and the choice made again. `sample(logits_row)` returns the token (and
  advances grammar and penalty history) or None when the grammar allows no token at all.
- `SamplerChain(options, n_vocab, seed)` mirrors transformers' sampling order: repetition penalty, then
  temperature, top-k, top-p, then a seeded draw; greedy keeps the repetition penalty (transformers
  applies it in greedy search too) and takes the argmax.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DependencyError, ModelDirError
from ..sampling import SamplingOptions
from .gguf_file import GGUFHeader, scan_gguf

_STATE: dict[str, Any] = {"module": None, "log_callback": None, "verbose": False}

# KV-cache element type name -> GGML type id (f32 makes llama.cpp match torch's fp32 to ~1e-6).
KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}
# flash attention: None = llama.cpp decides, True/False = force.
_FLASH_ATTN = {None: -1, False: 0, True: 1}


def llama_cpp_module() -> Any:
    """The `llama_cpp` ctypes module, imported and initialised once."""
    if _STATE["module"] is None:
        try:
            import llama_cpp
        except ImportError as err:
            raise DependencyError(
                f"the llama.cpp backend needs llama-cpp-python (`pip install 'minigpt4-local[gguf]'`): {err}"
            ) from None
        llama_cpp.llama_backend_init()
        _STATE["module"] = llama_cpp
        set_llama_log(os.environ.get("MINIGPT4_LLAMA_LOG", "") not in ("", "0"))
    return _STATE["module"]


def set_llama_log(verbose: bool) -> None:
    """Route llama.cpp's log lines to stderr (verbose) or drop them (default)."""
    lib = llama_cpp_module()
    _STATE["verbose"] = verbose
    if _STATE["log_callback"] is None:

        def _log(level: int, text: bytes, user_data: Any) -> None:
            if _STATE["verbose"]:
                sys.stderr.write(text.decode("utf-8", errors="replace"))

        # Kept in _STATE: llama.cpp holds only the raw pointer, a collected callback would crash it.
        _STATE["log_callback"] = lib.llama_log_callback(_log)
    lib.llama_log_set(_STATE["log_callback"], ctypes.c_void_p(0))


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Owned:
    """Holds one C object; `release(handle)` runs exactly once (close, GC or interpreter exit)."""

    _what = "llama.cpp object"

    def _own(self, handle: Any, release: Callable[[Any], None]) -> None:
        self._handle = handle
        self._finalizer = weakref.finalize(self, release, handle)

    @property
    def handle(self) -> Any:
        if not self._finalizer.alive:
            raise RuntimeError(f"{self._what} is closed")
        return self._handle

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_gpu_layers(n_gpu_layers: int) -> int:
    """-1 = every layer when this llama.cpp build can offload (CUDA/Metal/...), else 0."""
    lib = llama_cpp_module()
    if n_gpu_layers < 0:
        return -1 if lib.llama_supports_gpu_offload() else 0
    return n_gpu_layers


class LlamaModel(_Owned):
    _what = "llama.cpp model"

    def __init__(self, path: str | Path, n_gpu_layers: int = -1) -> None:
        self.path = Path(path)
        self.header: GGUFHeader = scan_gguf(self.path)  # one-line ModelDirError before llama.cpp sees it
        lib = llama_cpp_module()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = resolve_gpu_layers(n_gpu_layers)
        if hasattr(lib, "LLAMA_LOAD_MODE_MMAP"):
            # Memory-map the weights (llama.cpp's classic default, and what `llama_cpp.Llama` asks for):
            # pages come straight from the page cache and are shared between processes.
            params.load_mode = lib.LLAMA_LOAD_MODE_MMAP
        self.n_gpu_layers = params.n_gpu_layers
        ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise ModelDirError(
                f"{self.path}: llama.cpp could not load this GGUF (architecture {self.header.architecture!r}); "
                "set MINIGPT4_LLAMA_LOG=1 to see why"
            )
        self._own(ptr, lib.llama_model_free)
        self.vocab = lib.llama_model_get_vocab(ptr)
        self.n_embd = int(lib.llama_model_n_embd(ptr))
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(ptr))
        self.n_layer = int(lib.llama_model_n_layer(ptr))


class LlamaContext(_Owned):
    _what = "llama.cpp context"

    def __init__(
        self,
        model: LlamaModel,
        n_ctx: int,
        n_batch: int,
        n_threads: int,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        n_seq_max: int = 1,
        kv_unified: bool | None = None,
    ) -> None:
        lib = llama_cpp_module()
        if kv_type not in KV_TYPES:
            raise ConfigError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        self.model = model  # keeps the model alive at least as long as this context
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        if kv_unified is not None:
            if not hasattr(params, "kv_unified"):
                raise ConfigError("this llama.cpp build cannot choose the KV-cache layout (kv_unified)")
            params.kv_unified = kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = params.type_v = KV_TYPES[kv_type]
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        params.no_perf = True
        ptr = lib.llama_init_from_model(model.handle, params)
        if not ptr:
            raise ModelDirError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)")
        self._own(ptr, lib.llama_free)
        self.memory = lib.llama_get_memory(ptr)
        self.n_ctx = int(lib.llama_n_ctx(ptr))
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_seq_max = int(lib.llama_n_seq_max(ptr))
        seq_ctx = getattr(lib, "llama_n_ctx_seq", None)
        self.n_ctx_seq = int(seq_ctx(ptr)) if seq_ctx is not None else self.n_ctx // max(1, n_seq_max)


class LlamaBatch(_Owned):
    """A single-sequence llama_batch of `capacity` tokens (n_embd 0) or embedding rows (n_embd > 0)."""

    _what = "llama.cpp batch"

    def __init__(self, capacity: int, n_embd: int = 0) -> None:
        lib = llama_cpp_module()
        batch = lib.llama_batch_init(capacity, n_embd, 1)
        self._own(batch, lib.llama_batch_free)
        self.batch = batch
        self.capacity, self.n_embd = capacity, n_embd
        self.pos = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))[:] = 1
        for i in range(capacity):
            batch.seq_id[i][0] = 0  # everything lives in sequence 0
        if n_embd:
            self.embd = np.ctypeslib.as_array(batch.embd, shape=(capacity, n_embd))
        else:
            self.token = np.ctypeslib.as_array(batch.token, shape=(capacity,))

    def _require_open(self) -> None:
        # The numpy views point into the C arrays: writing through them after a free corrupts the heap.
        if self.closed:
            raise RuntimeError(f"{self._what} is closed")

    def _set_positions(self, n: int, start: int, all_logits: bool, last_logits: bool) -> None:
        self.batch.n_tokens = n
        self.pos[:n] = np.arange(start, start + n, dtype=np.int32)
        self.logits[:n] = 1 if all_logits else 0
        if last_logits:
            self.logits[n - 1] = 1

    def set_tokens(
        self, ids: np.ndarray, start: int, all_logits: bool = False, last_logits: bool = True
    ) -> None:
        self._require_open()
        n = len(ids)
        self.token[:n] = ids
        self._set_positions(n, start, all_logits, last_logits)

    def set_one_token(self, token: int, pos: int) -> None:
        """The decode-loop fast path: one token with logits (no numpy temporaries)."""
        self._require_open()
        self.batch.n_tokens = 1
        self.token[0], self.pos[0], self.logits[0] = token, pos, 1

    def set_embeddings(
        self, rows: np.ndarray, start: int, all_logits: bool = False, last_logits: bool = True
    ) -> None:
        self._require_open()
        n = rows.shape[0]
        self.embd[:n] = rows  # (n, n_embd) float32 copied into the C buffer
        self._set_positions(n, start, all_logits, last_logits)


class MultiBatch(LlamaBatch):
    """A llama_batch whose rows carry their own sequence id: runs of rows are appended per sequence."""

    _what = "llama.cpp batch"

    def clear(self) -> None:
        self._require_open()
        self.batch.n_tokens = 0

    @property
    def size(self) -> int:
        return int(self.batch.n_tokens)

    @property
    def room(self) -> int:
        return self.capacity - int(self.batch.n_tokens)

    def _append(self, n: int, start: int, seq: int, last_logits: bool) -> int:
        """Positions, sequence ids and output flags for `n` new rows; returns the first row's index."""
        first = int(self.batch.n_tokens)
        end = first + n
        if end > self.capacity:
            raise RuntimeError(f"batch overflow: {end} rows for a capacity of {self.capacity}")
        self.pos[first:end] = np.arange(start, start + n, dtype=np.int32)
        self.logits[first:end] = 0
        if last_logits:
            self.logits[end - 1] = 1
        seq_ids = self.batch.seq_id
        for i in range(first, end):
            seq_ids[i][0] = seq
        self.batch.n_tokens = end
        return first

    def add_tokens(self, ids: np.ndarray, start: int, seq: int, last_logits: bool) -> int:
        """Append token rows of sequence `seq` at positions start..; returns the last row's index."""
        self._require_open()
        first = self._append(len(ids), start, seq, last_logits)
        self.token[first : first + len(ids)] = ids
        return first + len(ids) - 1

    def add_embeddings(self, rows: np.ndarray, start: int, seq: int, last_logits: bool) -> int:
        """Append (n, n_embd) float32 rows of sequence `seq`; returns the last row's index."""
        self._require_open()
        first = self._append(rows.shape[0], start, seq, last_logits)
        self.embd[first : first + rows.shape[0]] = rows
        return first + rows.shape[0] - 1


def _build_chain(lib: Any, options: SamplingOptions, n_vocab: int, seed: int) -> Any:
    """Samplers in transformers' order (see module docstring); each `add` hands ownership to the chain."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    stages = []
    if options.repetition_penalty != 1.0:
        # Window = every generated token (the prompt is never accepted: with inputs_embeds, HF only
        # penalises generated ids). freq/presence penalties off.
        window = options.max_new_tokens + 1
        penalty = (window, options.repetition_penalty, 0.0, 0.0)
        # Some llama.cpp releases take n_vocab first; the binding's argtypes say which one is loaded.
        takes_vocab = len(lib.llama_sampler_init_penalties.argtypes) == 5
        stages.append(lib.llama_sampler_init_penalties(*((n_vocab, *penalty) if takes_vocab else penalty)))
    if options.do_sample:
        stages.append(lib.llama_sampler_init_temp(options.temperature))
        if options.top_k > 0:
            stages.append(lib.llama_sampler_init_top_k(options.top_k))
        if options.top_p < 1.0:
            stages.append(lib.llama_sampler_init_top_p(options.top_p, 1))
        stages.append(lib.llama_sampler_init_dist(seed))
    else:
        stages.append(lib.llama_sampler_init_greedy())
    for stage in stages:
        lib.llama_sampler_chain_add(chain, stage)
    return chain


def grammar_sampler(model: LlamaModel, grammar: str, root: str = "root") -> Any:
    """A llama.cpp grammar sampler for a GBNF text (`ConfigError` when llama.cpp refuses the grammar).
    The caller owns it (free it with llama_sampler_free)."""
    lib = llama_cpp_module()
    ptr = lib.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), root.encode("utf-8"))
    if not ptr:
        raise ConfigError("llama.cpp could not parse the grammar (set MINIGPT4_LLAMA_LOG=1 to see why)")
    return ptr


class SamplerChain(_Owned):
    _what = "llama.cpp sampler"

    def __init__(self, options: SamplingOptions, n_vocab: int, seed: int) -> None:
        lib = llama_cpp_module()
        self._lib = lib
        self._own(_build_chain(lib, options, n_vocab, seed), lib.llama_sampler_free)

    def sample(self, ctx: LlamaContext, index: int = -1) -> int:
        """Sample from output row `index` of `ctx` (-1: the last) and record the token (penalty
        history)."""
        return int(self._lib.llama_sampler_sample(self.handle, ctx.handle, index))


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class ConstrainedSampler:
    """Grammar-constrained sampling with the cheap check first (see the module docstring)."""

    def __init__(self, model: LlamaModel, options: SamplingOptions, seed: int, grammar: str) -> None:
        lib = llama_cpp_module()
        self._lib = lib
        self._grammar = _Handle(grammar_sampler(model, grammar), lib.llama_sampler_free)
        plain_greedy = not options.do_sample and options.repetition_penalty == 1.0
        self._chain = (
            None
            if plain_greedy
            else _Handle(_build_chain(lib, options, model.n_vocab, seed), lib.llama_sampler_free)
        )
        n = model.n_vocab
        self._all = np.zeros(n, dtype=_TOKEN_DATA)
        self._all["id"] = np.arange(n, dtype=np.int32)
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._arrays = {
            "all": self._array(self._all),
            "one": self._array(self._one),
        }

    def _array(self, data: np.ndarray) -> Any:
        lib = self._lib
        pointer = ctypes.cast(data.ctypes.data, ctypes.POINTER(lib.llama_token_data))
        return lib.llama_token_data_array(pointer, len(data), -1, False)

    def _apply(self, sampler: Any, which: str, data: np.ndarray) -> Any:
        array = self._arrays[which]
        array.size, array.selected, array.sorted = len(data), -1, False
        self._lib.llama_sampler_apply(sampler, ctypes.byref(array))
        return array

    def _choose(self, logits: np.ndarray | None) -> int:
        """The unconstrained choice from `self._all` (refilled from `logits` unless None)."""
        if logits is not None:
            self._all["id"] = np.arange(len(self._all), dtype=np.int32)
            self._all["logit"] = logits
            self._all["p"] = 0.0
        if self._chain is None:
            return int(self._all["id"][int(np.argmax(self._all["logit"]))])
        array = self._apply(self._chain.handle, "all", self._all)
        return int(self._all["id"][array.selected])

    def sample(self, logits: np.ndarray) -> int | None:
        token = self._choose(logits)
        self._one[0] = (token, logits[token], 0.0)
        self._apply(self._grammar.handle, "one", self._one)
        if not np.isfinite(self._one["logit"][0]):
            # Rejected: mask the whole vocabulary with the grammar, then choose again.
            self._all["id"] = np.arange(len(self._all), dtype=np.int32)
            self._all["logit"] = logits
            self._all["p"] = 0.0
            self._apply(self._grammar.handle, "all", self._all)
            if not np.isfinite(self._all["logit"]).any():
                return None
            token = self._choose(None)
        self._lib.llama_sampler_accept(self._grammar.handle, token)
        if self._chain is not None:
            self._lib.llama_sampler_accept(self._chain.handle, token)
        return token

    def close(self) -> None:
        for handle in (self._grammar, self._chain):
            if handle is not None:
                handle.close()


class _Handle(_Owned):
    _what = "llama.cpp sampler"

    def __init__(self, handle: Any, release: Callable[[Any], None]) -> None:
        self._own(handle, release)
