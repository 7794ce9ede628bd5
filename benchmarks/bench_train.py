"""Training throughput benchmark: stage-1 samples/s with and without the feature cache, fp32 vs AMP.

Builds a small MiniGPT-4 (224-px ViT with 257 tokens, Q-Former with 32 queries, a 2-layer decoder; random
weights, nothing downloaded), writes webdataset shards of 224-px JPEGs, and trains the projection for a few
steps in each mode on this machine (CPU by default; `--device cuda` uses fp16 + GradScaler as AMP). The
throughput is the median of the per-step samples/s after `--warmup` steps; the one-off time to build the
feature cache is reported separately. Prints a table, then one JSON line with every figure.

    python benchmarks/bench_train.py [--steps 10] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def small_config():
    from minigpt4_local.config import (
        GenerationDefaults,
        LLMConfig,
        MiniGPT4Config,
        PromptConfig,
        QFormerConfig,
        VisionConfig,
    )

    return MiniGPT4Config(
        name="bench-small",
        vision=VisionConfig(
            image_size=224, patch_size=14, hidden_size=192, num_layers=4, num_heads=6, intermediate_size=768
        ),
        qformer=QFormerConfig(
            num_query_tokens=32, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512
        ),
        llm=LLMConfig(
            hidden_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            intermediate_size=688,
            vocab_size=1001,
            max_position_embeddings=512,
        ),
        prompt=PromptConfig(stop_sequences=[], max_context=400),
        generation=GenerationDefaults(max_new_tokens=20),
    )


def build_model_dir(root: Path) -> Path:
    import torch

    from minigpt4_local.checkpoints.model_dir import save_model_dir
    from minigpt4_local.model import MiniGPT4
    from tests.support.tiny_tokenizer import make_tiny_sentencepiece
    from tests.support.train_data import _init_weights

    torch.manual_seed(0)
    model = MiniGPT4(small_config())
    _init_weights(model, 0)
    return save_model_dir(model, make_tiny_sentencepiece(root / "tok"), root / "model")


def write_shards(root: Path, shards: int, per_shard: int) -> str:
    import io
    import tarfile

    from tests.support.train_data import CAPTIONS, COLORS, toy_image

    colors = list(COLORS)
    folder = root / "wds"
    folder.mkdir()
    for s in range(shards):
        with tarfile.open(folder / f"{s:03d}.tar", "w") as tar:
            for j in range(per_shard):
                color = colors[(s * per_shard + j) % len(colors)]
                buf = io.BytesIO()
                toy_image(color, s * 1000 + j, size=256).save(buf, format="JPEG", quality=90)
                for name, data in (
                    (f"{s:03d}{j:04d}.jpg", buf.getvalue()),
                    (f"{s:03d}{j:04d}.json", json.dumps({"caption": CAPTIONS[color]}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{folder}/{{000..{shards - 1:03d}}}.tar"


def run(
    model_dir: Path, shards: str, out: Path, precision: str, cache: Path | None, args: argparse.Namespace
) -> dict:
    from minigpt4_local.train.config import load_train_config
    from minigpt4_local.train.report import read_log
    from minigpt4_local.train.trainer import run_training

    config = load_train_config(
        {
            "stage": 1,
            "model": {"dir": str(model_dir), "init_projection": "random"},
            "data": {
                "sources": [{"name": "bench", "kind": "webdataset", "path": shards}],
                "batch_size": args.batch,
                "num_workers": args.workers,
                "shuffle_buffer": 64,
                "augment": "none",
            },
            "optim": {
                "iters_per_epoch": args.steps,
                "warmup_steps": 2,
                "precision": precision,
                "device": args.device,
                "log_every": 1000,
            },
            "output": {
                "dir": str(out),
                "cache_features": str(cache or ""),
                "export_model_dir": False,
                "progress": False,
            },
        }
    )
    start = time.perf_counter()
    run_training(config, echo=lambda _m: None)
    total = time.perf_counter() - start
    rates = [r["samples_per_s"] for r in read_log(out / "train_log.jsonl")][args.warmup :]
    return {"samples_per_s": statistics.median(rates), "wall_s": round(total, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    amp = "fp16" if args.device.startswith("cuda") else "bf16"
    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        model_dir = build_model_dir(root)
        shards = write_shards(root, shards=4, per_shard=args.batch * args.steps // 4 + 4)
        results: dict[str, dict] = {}
        for precision in ("fp32", amp):
            results[f"{precision}/images"] = run(
                model_dir, shards, root / f"run-{precision}", precision, None, args
            )
            cache = root / f"cache-{precision}"
            build_start = time.perf_counter()
            first = run(model_dir, shards, root / f"build-{precision}", precision, cache, args)
            results[f"{precision}/cache_build_run"] = {
                **first,
                "wall_s": round(time.perf_counter() - build_start, 2),
            }
            results[f"{precision}/cached"] = run(
                model_dir, shards, root / f"cached-{precision}", precision, cache, args
            )
        base = results["fp32/images"]["samples_per_s"]
        print(
            f"stage-1 training throughput, {args.device}, {torch.get_num_threads()} threads, batch {args.batch}, "
            f"{args.steps} steps (median after {args.warmup})"
        )
        print(f"{'mode':<26}{'samples/s':>12}{'vs fp32':>10}{'run wall s':>12}")
        for name, row in results.items():
            print(
                f"{name:<26}{row['samples_per_s']:>12.1f}{row['samples_per_s'] / base:>9.2f}x{row['wall_s']:>12.2f}"
            )
        summary = {
            "benchmark": "train_stage1",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "batch": args.batch,
            "steps": args.steps,
            "amp": amp,
            "samples_per_s": {k: round(v["samples_per_s"], 2) for k, v in results.items()},
            "wall_s": {k: v["wall_s"] for k, v in results.items()},
            "cache_speedup_fp32": round(results["fp32/cached"]["samples_per_s"] / base, 2),
            f"cache_speedup_{amp}": round(
                results[f"{amp}/cached"]["samples_per_s"] / results[f"{amp}/images"]["samples_per_s"], 2
            ),
            "amp_speedup_images": round(results[f"{amp}/images"]["samples_per_s"] / base, 2),
        }
        print(json.dumps(summary))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
