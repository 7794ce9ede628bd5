"""Engine benchmark: many images / prompts decoded together vs one after another (CPU, shared machine).

Contract: `python benchmarks/bench_engine.py [--images 64] [--parallel 1,2,4,8,16] [--repeats 2]
[--prompts 32] [--text-tokens 48] [--threads 2]` measures, in one process with pinned threads:
- demo describe: `--images` held-out demo scenes described greedily through `Engine(parallel=N)` for every N,
  the N interleaved within each repeat (so machine load hits every setting alike); all requests are
  submitted at once. Reported: images/s, generated tok/s, and whether every answer's token ids equal
  N = 1's (the invariant). The image cache is off here, so every image is encoded.
- memory: RSS (VmRSS) after each engine has run, with the KV-cache MiB llama.cpp holds per slot
  (`memory.estimate_memory`), to show what each added slot costs;
- time to first token of a repeated image: a second question about an image that was just described,
  with the image cache (256 MB) and without (0): the median `first_token_s` over the scenes;
- SmolLM2 text prompts: `--prompts` chat prompts answered greedily with `--text-tokens` new tokens through
  the engine at every N, against llama-cpp-python's `Llama` answering them one after another.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from minigpt4_local.demo import demo_bundle_path
from minigpt4_local.engine import Engine
from minigpt4_local.loader import LoadOptions, load_pipeline
from minigpt4_local.memory import estimate_memory
from minigpt4_local.prompts import image_prompt
from minigpt4_local.train.demo.recipe import DEMO_QUESTION, SCENE_RENDER_SIZE
from minigpt4_local.train.demo.scenes import make_scene, scene_seeds

TOPICS = [
    "the sea", "a forest", "a city at night", "bread", "a cat", "the moon", "rain", "a library",
    "mountains", "a bicycle", "coffee", "winter", "a river", "music", "a garden", "the desert",
]  # fmt: skip


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _run_images(pipeline, parallel: int, images, options) -> dict:
    with Engine(pipeline, parallel=parallel, image_cache_mb=0) as eng:
        prompt = image_prompt(eng.config.prompt, DEMO_QUESTION)
        start = time.perf_counter()
        jobs = [eng.submit(prompt, [image], options) for image in images]
        answers = [job.result(timeout=1800) for job in jobs]
        seconds = time.perf_counter() - start
        rss = _rss_mib()
    tokens = sum(len(a.token_ids) for a in answers)
    return {"seconds": seconds, "tokens": tokens, "ids": [a.token_ids for a in answers], "rss_mib": rss}


def _ttft(pipeline, images, options, cache_mb: float) -> float:
    """Median time to first token of a second question about an image described just before."""
    times = []
    with Engine(pipeline, parallel=1, image_cache_mb=cache_mb) as eng:
        first_q = image_prompt(eng.config.prompt, DEMO_QUESTION)
        second_q = image_prompt(eng.config.prompt, "What colour is the largest shape?")
        for image in images:
            eng.submit(first_q, [image], options).result(timeout=600)
            times.append(eng.submit(second_q, [image], options).result(timeout=600).timings["first_token_s"])
    return statistics.median(times)


def _text_prompts(n: int) -> list[str]:
    return [
        f"<|im_start|>user\nWrite two sentences about {TOPICS[i % len(TOPICS)]} (note {i}).<|im_end|>\n"
        "<|im_start|>assistant\n"
        for i in range(n)
    ]


def _run_text_engine(pipeline, parallel: int, prompts, options) -> dict:
    with Engine(pipeline, parallel=parallel) as eng:
        start = time.perf_counter()
        jobs = [eng.submit(p, [], options) for p in prompts]
        answers = [job.result(timeout=1800) for job in jobs]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(len(a.token_ids) for a in answers)}


def _run_text_llama(llama, prompts, max_tokens: int) -> dict:
    start, tokens = time.perf_counter(), 0
    for p in prompts:
        out = llama.create_completion(p, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
        tokens += out["usage"]["completion_tokens"]
    return {"seconds": time.perf_counter() - start, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--parallel", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ttft-images", type=int, default=16)
    args = ap.parse_args()
    levels = [int(x) for x in args.parallel.split(",")]

    rss_start = _rss_mib()
    pipeline = load_pipeline(demo_bundle_path(), LoadOptions(threads=args.threads, verify=False))
    rss_loaded = _rss_mib()
    images = [make_scene(s, SCENE_RENDER_SIZE).image for s in scene_seeds("heldout", args.images)]
    options = pipeline.sampling(greedy=True)
    runs: dict[int, list[dict]] = {n: [] for n in levels}
    for rep in range(args.repeats):
        order = levels if rep % 2 == 0 else list(reversed(levels))
        for n in order:
            runs[n].append(_run_images(pipeline, n, images, options))
            print(f"  images: repeat {rep + 1} parallel {n}: {runs[n][-1]['seconds']:.1f} s", file=sys.stderr)
    reference = runs[levels[0]][0]["ids"]
    image_rows = {}
    for n in levels:
        best = min(r["seconds"] for r in runs[n])
        tokens = runs[n][0]["tokens"]
        image_rows[n] = {
            "images_per_s": round(args.images / best, 3),
            "tokens_per_s": round(tokens / best, 1),
            "seconds": [round(r["seconds"], 2) for r in runs[n]],
            "identical_to_parallel_1": all(r["ids"] == reference for r in runs[n]),
            "rss_mib": round(max(r["rss_mib"] for r in runs[n]), 1),
            "kv_mib_per_slot": round(estimate_memory(demo_bundle_path(), parallel=n).per_slot / 2**20, 2),
        }

    ttft_images = images[: args.ttft_images]
    ttft_cached = _ttft(pipeline, ttft_images, options, 256.0)
    ttft_uncached = _ttft(pipeline, ttft_images, options, 0.0)

    import llama_cpp

    prompts = _text_prompts(args.prompts)
    text_options = pipeline.sampling(greedy=True, max_new_tokens=args.text_tokens)
    gguf = pipeline.decoder.decoder.model.path
    llama = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=args.threads, n_gpu_layers=0, verbose=False)
    text_runs: dict[str, list[dict]] = {"llama": [], **{str(n): [] for n in levels}}
    for rep in range(args.repeats):
        text_runs["llama"].append(_run_text_llama(llama, prompts, args.text_tokens))
        for n in levels if rep % 2 == 0 else list(reversed(levels)):
            text_runs[str(n)].append(_run_text_engine(pipeline, n, prompts, text_options))
        print(f"  text: repeat {rep + 1} done", file=sys.stderr)
    text_rows = {}
    for key, rs in text_runs.items():
        best = min(r["seconds"] for r in rs)
        text_rows[key] = {
            "prompts_per_s": round(args.prompts / best, 3),
            "tokens_per_s": round(rs[0]["tokens"] / best, 1),
        }

    best_n = max(levels, key=lambda n: image_rows[n]["images_per_s"])
    speedup = image_rows[best_n]["images_per_s"] / image_rows[levels[0]]["images_per_s"]
    print(f"demo describe, {args.images} held-out scenes, greedy, {args.threads} threads (shared 2-core CPU)")
    print(f"{'parallel':>8} {'img/s':>7} {'tok/s':>7} {'same ids':>8} {'RSS MiB':>8} {'KV MiB/slot':>11}")
    for n in levels:
        r = image_rows[n]
        print(
            f"{n:>8} {r['images_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} {r['identical_to_parallel_1']!s:>8} "
            f"{r['rss_mib']:>8.0f} {r['kv_mib_per_slot']:>11.2f}"
        )
    print(f"best parallel {best_n}: {speedup:.2f}x the images/s of parallel {levels[0]}")
    print(
        f"time to first token, repeated image: {ttft_cached * 1000:.1f} ms with the cache, "
        f"{ttft_uncached * 1000:.1f} ms without ({ttft_cached / ttft_uncached:.2f}x)"
    )
    print(f"SmolLM2 text prompts ({args.prompts} prompts, up to {args.text_tokens} new tokens, greedy)")
    print(f"{'runner':>14} {'prompts/s':>9} {'tok/s':>7}")
    for key, r in text_rows.items():
        label = "Llama (serial)" if key == "llama" else f"engine N={key}"
        print(f"{label:>14} {r['prompts_per_s']:>9.2f} {r['tokens_per_s']:>7.1f}")
    result = {
        "benchmark": "engine",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "images": args.images,
        "repeats": args.repeats,
        "describe": {str(n): image_rows[n] for n in levels},
        "best_parallel": best_n,
        "images_per_s_speedup": round(speedup, 2),
        "ttft_repeated_image_s": {"cache": round(ttft_cached, 4), "no_cache": round(ttft_uncached, 4)},
        "ttft_ratio": round(ttft_cached / ttft_uncached, 3),
        "text": text_rows,
        "rss_mib": {"start": round(rss_start, 1), "pipeline_loaded": round(rss_loaded, 1)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
