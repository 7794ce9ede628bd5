"""Vision-encoder latency: torch eager vs ONNX Runtime at fp32 / fp16 / int8, batch 1 and 8.

Usage:
    python benchmarks/bench_vision.py [--configs tiny,mid] [--repeats 5] [--batches 1,8]
                                      [--device cpu|cuda] [--providers cuda,cpu] [--threads N]

Contract: builds each config with random weights (no download), exports it once with the project's
exporter (`export_vision_model`, fp32 graph reused for fp16/int8), loads the bundles with the
project's `OnnxVisionEncoder`, and times `encode` against `MiniGPT4.encode_image`:
- torch eager: fp32 on CPU; on CUDA the original's way (fp16 Linear/Conv weights under fp16
  autocast, `set_precision(torch.float16)`), pixels copied to the GPU inside the timed region.
- ONNX Runtime: each precision through the backend; on CUDA via IO binding (`encode_ortvalue`).
torch and ORT use the same thread count (all cores by default). Runs are interleaved round-robin
(one call of every backend per round) so load drift on a shared machine hits all backends alike;
the median of `--repeats` rounds is reported after one warm-up round. Prints a table, the accuracy
each bundle recorded at export (int8: per-tensor and per-channel weight scales, both measured; the
exporter keeps the better), and ends with ONE JSON line (all numbers).

Configs: `tiny` = the tiny-vicuna-7b preset (56 px, ViT 2×32); `mid` = ViT-B-sized vision side
(224 px / 14, ViT 12 layers × 768, 12 heads, MLP 3072) + the real Q-Former shape (12 × 768, 32
queries) + projection to 4096; `vitg` = the real MiniGPT-4 Vicuna-7B vision side (ViT-g, 1 B params;
slow on CPU, GPU only in practice).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def build_config(name: str) -> Any:
    from minigpt4_local.config import QFormerConfig, VisionConfig, get_preset

    if name == "tiny":
        return get_preset("tiny-vicuna-7b")
    if name == "mid":
        cfg = get_preset("minigpt4-vicuna-7b")
        cfg.name = "bench-mid"
        cfg.vision = VisionConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
        cfg.qformer = QFormerConfig()
        return cfg
    if name == "vitg":
        return get_preset("minigpt4-vicuna-7b")
    raise SystemExit(f"unknown config {name!r} (tiny, mid, vitg)")


def init_weights_(model: Any, seed: int = 0) -> None:
    """Random weights at a trained model's scale (fan-in scaled matrices, LayerNorm weights near 1).

    HF's default init of the BLIP-2 vision tower (std 1e-10) is below fp16's smallest subnormal, so
    fp16/int8 accuracy measured on it would say nothing about real checkpoints.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name.lower() and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.ndim >= 2 and not name.endswith(("embedding", "query_tokens")):
                param.copy_(noise / param[0].numel() ** 0.5)  # (out, in…): std 1/sqrt(fan_in)
            else:  # CLS, position embedding, query tokens
                param.copy_(0.5 * noise)


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call. CPU time counts every thread's work, spinning
    included; with --threads 1 it is the compute cost, immune to other processes on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def make_backends(
    model: Any, cfg: Any, work: Path, args: argparse.Namespace, log: Callable[[str], None]
) -> dict:
    """name → (precision, callable(pixels)) plus the recorded verification of each bundle."""
    import torch

    from minigpt4_local.backends.onnx_vision import OnnxVisionEncoder
    from minigpt4_local.export.onnx_graph import export_fp32_graph
    from minigpt4_local.export.vision_export import export_vision_model

    backends: dict[str, tuple[str, Callable[[np.ndarray], Any]]] = {}
    accuracy: dict[str, Any] = {}
    graph = work / "graph" / "vision.onnx"
    graph.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    export_fp32_graph(model, graph)
    log(f"  exported fp32 graph in {time.perf_counter() - t0:.1f} s")
    for precision in args.precisions:
        t0 = time.perf_counter()
        part = export_vision_model(model, work / precision, precision, n_verify=2, fp32_graph=graph)
        v = part["verification"]
        accuracy[precision] = {k: v[k] for k in ("max_abs", "max_rel", "mean_cosine", "min_cosine")}
        if "alternatives" in v:  # int8: per-tensor and per-channel weight scales, both measured
            accuracy[precision]["alternatives"] = v["alternatives"]
        log(f"  {precision} bundle in {time.perf_counter() - t0:.1f} s (max_abs {v['max_abs']:.3g})")
        encoder = OnnxVisionEncoder(work / precision, providers=args.providers, threads=args.threads)
        run = encoder.encode_ortvalue if encoder.device == "cuda" else encoder.encode
        backends[f"ort-{precision}"] = (precision, run, encoder.providers[0])

    if args.device == "cuda":
        model = model.cuda().set_precision(torch.float16)

        def torch_run(pixels: np.ndarray) -> Any:
            with torch.inference_mode():
                return model.encode_image(torch.from_numpy(pixels).cuda(non_blocking=False))

        backends["torch-eager"] = ("fp16-autocast", torch_run, "cuda")
    else:

        def torch_run(pixels: np.ndarray) -> Any:
            with torch.inference_mode():
                return model.encode_image(torch.from_numpy(pixels))

        backends["torch-eager"] = ("fp32", torch_run, "cpu")
    return {"backends": backends, "accuracy": accuracy}


def bench_config(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from minigpt4_local.export.onnx_verify import verification_pixels
    from minigpt4_local.model import MiniGPT4

    cfg = build_config(name)
    torch.manual_seed(0)
    model = MiniGPT4(cfg, with_llm=False)
    init_weights_(model)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"[{name}] {params / 1e6:.1f} M params, {cfg.vision.image_size} px, ViT {cfg.vision.num_layers}×{cfg.vision.hidden_size}"
    )
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        built = make_backends(model, cfg, Path(tmp), args, log)
        backends = built["backends"]
        for batch in args.batches:
            v = cfg.vision
            pixels = verification_pixels(batch, v.image_size, v.image_mean, v.image_std, seed=batch)
            times: dict[str, list[float]] = {k: [] for k in backends}
            cpu: dict[str, list[float]] = {k: [] for k in backends}
            for round_ in range(args.repeats + 1):  # round 0 = warm-up
                for key, (_, run, _) in backends.items():
                    elapsed, used = timed(lambda run=run, pixels=pixels: run(pixels), sync)
                    if round_:
                        times[key].append(elapsed)
                        cpu[key].append(used)
            base = statistics.median(times["torch-eager"])
            base_cpu = statistics.median(cpu["torch-eager"])
            for key, (precision, _, where) in backends.items():
                med = statistics.median(times[key])
                med_cpu = statistics.median(cpu[key])
                rows.append(
                    {
                        "config": name,
                        "backend": key.split("-")[0],
                        "precision": precision,
                        "batch": batch,
                        "provider": where,
                        "median_ms": med * 1e3,
                        "images_per_s": batch / med,
                        "speedup_vs_torch": base / med,
                        "median_cpu_ms": med_cpu * 1e3,
                        "cpu_speedup_vs_torch": base_cpu / med_cpu,
                        "runs_ms": [round(t * 1e3, 2) for t in times[key]],
                    }
                )
                log(f"  batch {batch} {key:<12} {med * 1e3:9.1f} ms wall {med_cpu * 1e3:9.1f} ms cpu")
    return {"config": name, "params": params, "rows": rows, "accuracy": built["accuracy"]}


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'config':<6} {'backend':<8} {'precision':<14} {'provider':<28} {'batch':>5} {'median ms':>10} {'img/s':>8} {'vs torch':>8} {'cpu ms':>10} {'cpu vs torch':>12}"
    print(header)
    print("-" * len(header))
    for result in results:
        for r in result["rows"]:
            print(
                f"{r['config']:<6} {r['backend']:<8} {r['precision']:<14} {r['provider']:<28} {r['batch']:>5} "
                f"{r['median_ms']:>10.1f} {r['images_per_s']:>8.2f} {r['speedup_vs_torch']:>7.2f}x "
                f"{r['median_cpu_ms']:>10.1f} {r['cpu_speedup_vs_torch']:>11.2f}x"
            )
    print()
    print("accuracy recorded at export (ORT on CPU vs torch fp32, 2 images):")
    for result in results:
        for precision, a in result["accuracy"].items():
            print(
                f"  {result['config']:<6} {precision:<5} max_abs {a['max_abs']:.3g}  max_rel {a['max_rel']:.3g}  "
                f"min cosine {a['min_cosine']:.6f}"
            )
            for alt in a.get("alternatives", []):
                scales = "per-channel" if alt.get("int8", {}).get("per_channel") else "per-tensor"
                print(
                    f"    {scales:<11} max_abs {alt['max_abs']:.3g}  max_rel {alt['max_rel']:.3g}  "
                    f"min cosine {alt['min_cosine']:.6f}"
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--providers", default=None, help="ORT providers (default: CPU for --device cpu, else CUDA)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.precisions = args.precisions.split(",")
    default_providers = "cpu" if args.device == "cpu" else "cuda,cpu"
    args.providers = (args.providers or default_providers).split(",")

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = [bench_config(name, args, log) for name in args.configs.split(",")]
    print_table(results)
    ratios = {
        res["config"]: {
            f"{r['precision']}@{r['batch']}": round(r["speedup_vs_torch"], 3)
            for r in res["rows"]
            if r["backend"] == "ort"
        }
        for res in results
    }
    summary = {
        "bench": "vision",
        "device": args.device,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "load_avg_before": load_before,
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "ort_speedup_vs_torch": ratios,
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
