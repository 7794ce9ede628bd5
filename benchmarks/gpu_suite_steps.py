"""The measuring steps of `gpu_suite.py`, each run in its own worker process.

Contract: `STEPS[name](ctx) -> dict` with optional keys `rows` (table rows: {what, path, value, unit,
note}), `checks` ({name, value, tolerance, ok}), `metrics` (numbers for the JSON line) and `outputs`
(token ids / embeddings that later steps compare against). `ctx` is the suite's context (paths, device,
repeats, token counts, previous steps' `outputs`). Everything runs through the project's own code:
`load_model_dir` + `MiniGPT4.encode_image` (torch; on CUDA the original's mixed fp16 layout),
`OnnxVisionEncoder` (ONNX Runtime; IO binding on CUDA), `benchmarks/bench_decode.py` (our stitched
llama.cpp runtime vs llama-cpp-python's `Llama`), `loader.load_pipeline` (describe), the engine
(`minigpt4_local.engine.Engine`), the GPTQ backend. On `device == "cpu"` the same code runs on the CPU
(the rehearsal); the "device" column then says cpu.

Tolerances (GPU vs CPU reference): embeddings min cosine >= EMBED_COSINE; greedy paths the first
GREEDY_PREFIX generated ids identical (GPU kernels round differently from the CPU's, and a random
model's top-2 logits can be close, so a later divergence is reported, not failed); the GPTQ layer vs
its round-to-nearest dequantized weight: relative error <= GPTQ_LAYER_REL.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4_local.prefix_cache import common_prefix

EMBED_COSINE = 0.999
GREEDY_PREFIX = 8
GPTQ_LAYER_REL = 2e-2
QUESTION = "Describe this image in detail."

Ctx = dict[str, Any]


def _row(what: str, path: str, value: Any, unit: str = "", note: str = "") -> dict[str, Any]:
    return {"what": what, "path": path, "value": value, "unit": unit, "note": note}


def _check(name: str, value: Any, tolerance: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "value": value, "tolerance": tolerance, "ok": bool(ok)}


def _greedy_check(name: str, device_ids: list[int], reference: list[int]) -> dict[str, Any]:
    n = min(len(reference), len(device_ids))
    same = common_prefix(device_ids, reference)
    need = min(GREEDY_PREFIX, n)
    return _check(
        name, f"{same}/{n} leading ids equal", f">= {need} leading ids equal", n > 0 and same >= need
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def _on_gpu(ctx: Ctx) -> bool:
    return ctx["device"] == "cuda"


def _threads(ctx: Ctx) -> int:
    from minigpt4_local.backends.llama_ctx import default_threads

    return int(ctx.get("threads") or default_threads())


def _pin_torch(ctx: Ctx) -> Any:
    import torch

    torch.set_num_threads(_threads(ctx))
    torch.manual_seed(0)
    return torch


def suite_image(size: int = 224, seed: int = 0) -> Any:
    """A deterministic RGB test picture (smooth colour blobs + noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (8, 8, 3))
    smooth = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
    noisy = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB")


def _providers(ctx: Ctx) -> list[str]:
    """ONNX Runtime providers: CUDA first on a GPU run. Without onnxruntime-gpu (it did not travel, or
    the image's CPU build shadows it) the ONNX part falls back to the CPU; the rows name the provider."""
    if not _on_gpu(ctx):
        return ["cpu"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        print("onnxruntime has no CUDAExecutionProvider here: ONNX vision runs on the CPU", file=sys.stderr)
        return ["cpu"]
    return ["cuda", "cpu"]


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds cuDNN/cuBLAS of the nvidia-* wheels through preload_dlls (ORT >= 1.21)."""
    import onnxruntime

    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # a missing library is reported by the session itself
            print(f"onnxruntime.preload_dlls: {exc}", file=sys.stderr)


# ----- memory sampling ------------------------------------------------------------------------------


class MemorySampler:
    """Peak device memory while the block runs: NVML (whole GPU, minus the used memory before), or on the
    CPU the process's peak RSS growth. Samples every `interval` seconds in a thread."""

    def __init__(self, on_gpu: bool, interval: float = 0.005) -> None:
        self.on_gpu, self.interval = on_gpu, interval
        self.peak = self.base = 0
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read: Callable[[], int] = lambda: 0

    def _nvml_reader(self) -> Callable[[], int]:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.source = "NVML device memory used (GPU 0), minus before loading"
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def __enter__(self) -> MemorySampler:
        if self.on_gpu:
            self._read = self._nvml_reader()
            self.base = self._read()
            self.peak = self.base

            def loop() -> None:
                while not self._stop.is_set():
                    self.peak = max(self.peak, self._read())
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        else:
            import resource

            self.source = "process peak RSS (ru_maxrss) minus RSS before loading"
            self.base = _rss_bytes()
            self._read = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._read())

    @property
    def used_gb(self) -> float:
        return (self.peak - self.base) / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----- vision ------------------------------------------------------------------------------------------


def step_vision(ctx: Ctx) -> dict[str, Any]:
    """torch eager (CUDA: fp16 mixed layout; CPU: fp32) vs ONNX Runtime (CUDA EP + IO binding) at b1/b8."""
    torch = _pin_torch(ctx)
    from minigpt4_local.backends.onnx_vision import OnnxVisionEncoder
    from minigpt4_local.checkpoints.model_dir import load_model_dir
    from minigpt4_local.export.onnx_verify import verification_pixels

    gpu = _on_gpu(ctx)
    model = load_model_dir(ctx["model_dir"], device="cpu", with_llm=False)
    v = model.config.vision
    pixels = verification_pixels(8, v.image_size, v.image_mean, v.image_std, seed=8)
    with torch.inference_mode():
        reference = model.encode_image(torch.from_numpy(pixels[:2])).float().numpy()  # CPU fp32
    if gpu:
        model = model.cuda().set_precision(torch.float16)  # the original's layout on CUDA
        sync = torch.cuda.synchronize
    else:
        sync = lambda: None  # noqa: E731

    def torch_run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            out = model.encode_image(torch.from_numpy(x).to(ctx["device"]))
        sync()
        return out

    if gpu:
        _preload_cuda_libraries()
    encoder = OnnxVisionEncoder(ctx["bundle"], providers=_providers(ctx), verify=False)
    ort_run = encoder.encode_ortvalue if encoder.device == "cuda" else encoder.encode
    torch_path = "torch fp16 (mixed layout), cuda" if gpu else "torch fp32, cpu"
    ort_path = f"onnxruntime fp16, {encoder.providers[0].removesuffix('ExecutionProvider')}" + (
        " + IO binding" if encoder.device == "cuda" else ""
    )
    rows, metrics = [], {}
    for batch in (1, 8):
        x = pixels[:batch]
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for round_ in range(ctx["repeats"] + 1):  # round 0 warms up
            for key, run in (("torch", torch_run), ("ort", ort_run)):
                start = time.perf_counter()
                run(x)
                if round_:
                    times[key].append(time.perf_counter() - start)
        t_med, o_med = statistics.median(times["torch"]), statistics.median(times["ort"])
        rows.append(_row(f"vision encode b{batch}", torch_path, round(t_med * 1e3, 2), "ms"))
        rows.append(_row(f"vision encode b{batch}", ort_path, round(o_med * 1e3, 2), "ms",
                         f"{t_med / o_med:.2f}x vs torch"))  # fmt: skip
        metrics[f"torch_b{batch}_ms"] = round(t_med * 1e3, 3)
        metrics[f"ort_b{batch}_ms"] = round(o_med * 1e3, 3)
        metrics[f"ort_speedup_b{batch}"] = round(t_med / o_med, 3)
    device_torch = torch_run(pixels[:2]).float().cpu().numpy()
    device_ort = encoder.encode(pixels[:2])
    cos_torch, cos_ort = _cosines(device_torch, reference), _cosines(device_ort, reference)
    checks = [
        _check(f"vision {torch_path} vs torch fp32 cpu", round(cos_torch, 7), f"min cosine >= {EMBED_COSINE}",
               cos_torch >= EMBED_COSINE),
        _check(f"vision {ort_path} vs torch fp32 cpu", round(cos_ort, 7), f"min cosine >= {EMBED_COSINE}",
               cos_ort >= EMBED_COSINE),
    ]  # fmt: skip
    metrics.update({"ort_provider": encoder.providers[0], "cos_torch": cos_torch, "cos_ort": cos_ort})
    return {"rows": rows, "checks": checks, "metrics": metrics}


# ----- decode: ours vs Llama ----------------------------------------------------------------------------


def _stitched_greedy(gguf: str, n_gpu_layers: int, n_new: int, threads: int) -> list[int]:
    """Greedy ids after text + random image rows + text, through our stitched runtime."""
    from minigpt4_local.backends.llamacpp import LlamaCppDecoder
    from minigpt4_local.sampling import SamplingOptions

    with LlamaCppDecoder(gguf, n_ctx=1024, n_gpu_layers=n_gpu_layers, n_threads=threads) as dec:
        head, tail = dec.tokenize("Look at this: ", add_bos=True), dec.tokenize(" What is it?")
        scale = float(dec.embed_tokens(list(range(100, 200))).std())
        rows = np.random.default_rng(0).normal(0, scale, size=(32, dec.n_embd)).astype(np.float32)
        dec.prefill([head, rows, tail])

        class Never:
            def is_stop(self, ids: list[int]) -> bool:
                return False

        options = SamplingOptions(max_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
        return dec.generate(options, Never())


def step_decode(ctx: Ctx) -> dict[str, Any]:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_decode

    threads = _threads(ctx)
    gguf = str(Path(ctx["bundle"]) / "llm.gguf")
    args = argparse.Namespace(gguf=gguf, threads=threads, n_ctx=1024, n_batch=512, prompt_tokens=128,
                              new_tokens=ctx["new_tokens"], image_rows=32, repeats=ctx["repeats"])  # fmt: skip
    res = bench_decode.run(args)
    where = f"n_gpu_layers {res['n_gpu_layers']}" if res["n_gpu_layers"] else "cpu"
    rows = [
        _row("decode tok/s", f"ours (stitched llama.cpp), {where}", res["ours_decode"], "tok/s"),
        _row("decode tok/s", f"llama-cpp-python Llama, {where}", res["llama_decode"], "tok/s",
             f"ours/Llama {res['decode_ratio']:.3f}"),
        _row("decode tok/s lockstep", "ours vs Llama", res["ours_decode_lockstep"], "tok/s",
             f"Llama {res['llama_decode_lockstep']}, ratio {res['decode_ratio_lockstep']:.3f}"),
        _row("prefill tok/s", "ours / Llama", res["ours_prefill"], "tok/s", f"Llama {res['llama_prefill']}"),
        _row("time to first token", "ours (text+32 image rows+text)", res["ours_ttft"], "s",
             f"Llama (tokens only) {res['llama_ttft']}"),
    ]  # fmt: skip
    n_ref = ctx["ref_tokens"]
    device_ids = _stitched_greedy(gguf, -1, n_ref, threads)
    cpu_ids = _stitched_greedy(gguf, 0, n_ref, threads)
    checks = [
        _check("decode: ours vs Llama, same greedy ids", res["same_greedy_tokens"], "identical", res["same_greedy_tokens"]),
        _greedy_check(f"decode: ours {where} vs ours cpu (stitched prompt)", device_ids, cpu_ids),
    ]  # fmt: skip
    res.pop("runs", None)
    return {"rows": rows, "checks": checks, "metrics": res}


# ----- describe ------------------------------------------------------------------------------------------


def _timed_describes(pipeline: Any, ctx: Ctx, n_new: int) -> tuple[dict[str, Any], list[int]]:
    image = suite_image(pipeline.config.vision.image_size)
    pipeline.describe(image, QUESTION, pipeline.sampling(greedy=True, max_new_tokens=4))  # warm-up
    walls, rates, ids = [], [], []
    for _ in range(max(1, ctx["repeats"] // 2)):
        start = time.perf_counter()
        answer = pipeline.describe(image, QUESTION, pipeline.sampling(greedy=True, max_new_tokens=n_new))
        walls.append(time.perf_counter() - start)
        rates.append(answer.timings.get("tokens_per_s", 0.0))
        ids = answer.token_ids
    return {"wall_s": round(statistics.median(walls), 4), "tokens": len(ids),
            "generate_tok_s": round(statistics.median(rates), 2)}, ids  # fmt: skip


MEMORY_PREDICTION_TOLERANCE = 0.30  # |measured / predicted - 1| on a GPU at 7B, where the weights dominate


def _predicted_memory(ctx: Ctx, n_ctx: int, vision_on_gpu: bool) -> dict[str, Any]:
    """`minigpt4 info BUNDLE --memory --ctx N --parallel 1` (minigpt4_local.memory, the project's one
    estimator): bytes predicted for the device the measurement covers (a GPU: the offloaded decoder, plus
    the ONNX graph when ONNX Runtime runs on CUDA; the CPU: everything)."""
    from minigpt4_local.memory import estimate_memory

    est = estimate_memory(ctx["bundle"], ctx=n_ctx, parallel=1)
    device = est.decoder + (est.vision if vision_on_gpu else 0) if _on_gpu(ctx) else est.total
    return {
        "bytes": device,
        "weights": est.weights,
        "kv": est.kv,
        "compute": est.compute,
        "vision": est.vision,
    }


def step_describe_bundle(ctx: Ctx) -> dict[str, Any]:
    """The torch-free bundle (ONNX Runtime + llama.cpp) at 2,048 context: describe 128 tokens + peak memory."""
    from minigpt4_local.loader import LoadOptions, load_pipeline

    gpu = _on_gpu(ctx)
    if gpu:
        _preload_cuda_libraries()
    n_ctx = 2048
    with MemorySampler(gpu) as memory:
        pipeline = load_pipeline(ctx["bundle"], LoadOptions(providers=_providers(ctx), n_ctx=n_ctx,
                                                            threads=_threads(ctx), verify=False))  # fmt: skip
        timing, ids = _timed_describes(pipeline, ctx, ctx["describe_tokens"])
    providers = getattr(pipeline.vision, "providers", ["?"])
    label = f"bundle ({pipeline.name.split('(')[-1].rstrip(')')}), {ctx['device']}, ORT {providers[0].removesuffix('ExecutionProvider')}"
    rows = [
        _row(f"describe {timing['tokens']} tokens", label, timing["wall_s"], "s",
             f"generate {timing['generate_tok_s']} tok/s"),
        _row(f"peak {'GPU' if gpu else 'RAM'} memory, ctx {n_ctx}", label, round(memory.used_gb, 3), "GB",
             memory.source),
    ]  # fmt: skip
    checks = []
    metrics = {**timing, "peak_memory_gb": round(memory.used_gb, 3), "memory_source": memory.source}
    if gpu and ctx["shape"] == "7b":
        goal = 6.5
        checks.append(_check("bundle peak GPU memory (7B Q4_K_M, ctx 2048)", round(memory.used_gb, 3),
                             f"<= {goal} GB (goal)", memory.used_gb <= goal))  # fmt: skip
    predicted = _predicted_memory(ctx, n_ctx, vision_on_gpu=providers[0] != "CPUExecutionProvider")
    ratio = memory.used_gb * 1e9 / predicted["bytes"]
    metrics["predicted_memory"] = {**predicted, "measured_over_predicted": round(ratio, 3)}
    rows.append(_row(f"predicted {'GPU' if gpu else 'RAM'} memory, ctx {n_ctx}", "minigpt4 info --memory",
                     round(predicted["bytes"] / 1e9, 3), "GB", f"measured / predicted {ratio:.2f}"))  # fmt: skip
    if gpu and ctx["shape"] == "7b":
        tol = MEMORY_PREDICTION_TOLERANCE
        checks.append(_check("info --memory prediction vs measured (NVML)", f"ratio {ratio:.2f}",
                             f"within {tol:.0%}", abs(ratio - 1) <= tol))  # fmt: skip
    return {"rows": rows, "checks": checks, "metrics": metrics, "outputs": {"bundle_ids": ids}}


def step_describe_torch(ctx: Ctx) -> dict[str, Any]:
    """The full-precision torch model (CUDA: fp16 LLM + the original's mixed vision layout)."""
    _pin_torch(ctx)
    from minigpt4_local.loader import LoadOptions, load_pipeline

    gpu = _on_gpu(ctx)
    options = LoadOptions(decoder="torch", device=ctx["device"], dtype="fp16" if gpu else "fp32")
    start = time.perf_counter()
    pipeline = load_pipeline(ctx["model_dir"], options)
    load_s = time.perf_counter() - start
    timing, ids = _timed_describes(pipeline, ctx, ctx["describe_tokens"])
    label = f"torch {'fp16 cuda' if gpu else 'fp32 cpu'}"
    rows = [
        _row(f"describe {timing['tokens']} tokens", label, timing["wall_s"], "s",
             f"generate {timing['generate_tok_s']} tok/s; load {load_s:.1f} s"),
    ]  # fmt: skip
    if gpu:
        import torch

        peak = torch.cuda.max_memory_allocated() / 1e9
        rows.append(_row("peak GPU memory (torch allocator)", label, round(peak, 3), "GB"))
    return {"rows": rows, "metrics": {**timing, "load_s": round(load_s, 2)}, "outputs": {"torch_ids": ids}}


# ----- engine ---------------------------------------------------------------------------------------------


def step_engine(ctx: Ctx) -> dict[str, Any]:
    """Throughput of the engine's continuous batching at parallel 1/8/32; greedy ids vs parallel 1.

    The four test images are encoded once (parallel 1's engine) and submitted as embedding arrays, so
    the figures are the decoder's batching (vision is timed in its own step) and the ids of a job can
    only differ through decode batching: on the CPU they must be identical (the engine's invariant), on
    a GPU the kernels llama.cpp picks change with the batch size, so GREEDY_PREFIX leading ids must be.
    """
    from minigpt4_local.engine import Engine
    from minigpt4_local.loader import LoadOptions

    gpu = _on_gpu(ctx)
    if gpu:
        _preload_cuda_libraries()
    n_new = ctx["engine_tokens"]
    rows, metrics, reference = [], {}, {}
    agree, total = 0, 0
    embeds: list[Any] = []
    for parallel in (1, 8, 32):
        options = LoadOptions(providers=_providers(ctx), threads=_threads(ctx), verify=False)
        with Engine.open(ctx["bundle"], options, parallel=parallel, ctx=512, image_cache_mb=0) as engine:
            if not embeds:
                size = engine.config.vision.image_size
                embeds = [engine.encode_images([suite_image(size, seed=s)])[0] for s in range(4)]
            conversation = engine.new_conversation()
            conversation.add_image()
            conversation.ask(QUESTION)
            text = conversation.prompt()
            sampling = engine.sampling(greedy=True, max_new_tokens=n_new)
            engine.submit(text, [embeds[0]], engine.sampling(greedy=True, max_new_tokens=2)).result()
            n_jobs = max(parallel, 4)
            start = time.perf_counter()
            jobs = [engine.submit(text, [embeds[i % 4]], sampling) for i in range(n_jobs)]
            answers = [job.result(timeout=600) for job in jobs]
            wall = time.perf_counter() - start
        tokens = sum(len(a.token_ids) for a in answers)
        metrics[f"parallel_{parallel}_tok_s"] = round(tokens / wall, 2)
        rows.append(_row(f"engine parallel {parallel}", f"{n_jobs} jobs x {n_new} tokens, {ctx['device']}",
                         round(tokens / wall, 2), "tok/s", f"wall {wall:.2f} s; image embeddings precomputed"))  # fmt: skip
        for i, answer in enumerate(answers):
            if parallel == 1:
                reference.setdefault(i % 4, answer.token_ids)
                continue
            want = reference[i % 4]
            same = common_prefix(answer.token_ids, want)
            total += 1
            agree += (
                same == len(want) == len(answer.token_ids)
                if not gpu
                else same >= min(GREEDY_PREFIX, len(want))
            )
    rule = "all ids equal (cpu)" if not gpu else f">= {GREEDY_PREFIX} leading ids equal"
    checks = [_check("engine: greedy ids at parallel 8/32 vs parallel 1", f"{agree}/{total} jobs", rule,
                     total > 0 and agree == total)]  # fmt: skip
    return {"rows": rows, "checks": checks, "metrics": metrics}


# ----- GPTQ -------------------------------------------------------------------------------------------------


def _gptq_layer_check(llm: Any, model_dir: str) -> float:
    """Relative error of one quantized layer against x @ W_rtn^T (W_rtn: our RTN dequantization)."""
    import torch
    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_suite_synth import rtn_dequantize

    llm_dir = Path(model_dir) / "llm"
    index = llm_dir / "model.safetensors.index.json"
    key = "model.layers.0.mlp.down_proj.weight"
    shard = json.loads(index.read_text())["weight_map"][key] if index.is_file() else "model.safetensors"
    with safe_open(str(llm_dir / shard), framework="pt") as f:
        weight = f.get_tensor(key).float()
    layer = llm.model.model.layers[0].mlp.down_proj
    x = torch.randn(4, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = layer(x.to(device=llm.device, dtype=llm.dtype)).float().cpu()
    want = x @ rtn_dequantize(weight).t()
    return float((got - want).norm() / want.norm())


def _gptq_run(ctx: Ctx, device: str, n_new: int, repeats: int) -> dict[str, Any]:
    from minigpt4_local.loader import LoadOptions, load_pipeline
    from minigpt4_local.prompts import StopChecker, image_prompt
    from minigpt4_local.stitching import plan_prompt

    options = LoadOptions(decoder="gptq", device=device, gptq_kernel=ctx.get("gptq_kernel", "auto"),
                          providers=_providers(ctx) if device == "cuda" else ["cpu"], verify=False)  # fmt: skip
    start = time.perf_counter()
    pipeline = load_pipeline(ctx["bundle"], options)
    load_s = time.perf_counter() - start
    decoder = pipeline.decoder
    (embeds,) = pipeline.vision.encode_images([suite_image(pipeline.config.vision.image_size)])
    sampling = pipeline.sampling(greedy=True, max_new_tokens=n_new)
    plan = plan_prompt(
        image_prompt(pipeline.config.prompt, QUESTION), pipeline.tokenizer, pipeline.config, n_new
    )
    never = StopChecker([], None, False)
    rates, ids = [], []
    decoder.generate(plan, [embeds], pipeline.sampling(greedy=True, max_new_tokens=2), never, None)  # warm-up
    for _ in range(repeats):
        decoder.reset()
        stamps: list[float] = []
        ids = decoder.generate(
            plan, [embeds], sampling, never, lambda _t, s=stamps: s.append(time.perf_counter())
        )
        if len(stamps) > 1:
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    layer_rel = _gptq_layer_check(decoder.llm, ctx["model_dir"])
    return {"kernel": decoder.llm.kernel, "load_s": round(load_s, 2), "ids": ids, "layer_rel": layer_rel,
            "decode_tok_s": round(statistics.median(rates), 2) if rates else 0.0,
            "dtype": str(decoder.llm.dtype).removeprefix("torch.")}  # fmt: skip


def step_gptq(ctx: Ctx) -> dict[str, Any]:
    """GPTQ 4-bit decode tok/s with the kernel GPTQModel picks; its layer math vs the RTN weights."""
    _pin_torch(ctx)
    run = _gptq_run(ctx, ctx["device"], ctx["new_tokens"], max(1, ctx["repeats"] // 2))
    label = f"gptq 4-bit g128, {run['kernel']} kernel, {ctx['device']} {run['dtype']}"
    rows = [
        _row(
            "gptq decode tok/s",
            label,
            run["decode_tok_s"],
            "tok/s",
            f"load {run['load_s']} s (incl. kernel JIT)",
        )
    ]
    checks = [_check(f"gptq layer ({run['kernel']}) vs x @ W_rtn^T", f"{run['layer_rel']:.2e}",
                     f"relative error <= {GPTQ_LAYER_REL}", run["layer_rel"] <= GPTQ_LAYER_REL)]  # fmt: skip
    ids = run.pop("ids")
    return {"rows": rows, "checks": checks, "metrics": run, "outputs": {"gptq_ids": ids[: ctx["ref_tokens"]]}}


# ----- CPU references for the greedy paths --------------------------------------------------------------


def step_ref_bundle(ctx: Ctx) -> dict[str, Any]:
    """The bundle on the CPU (ONNX Runtime CPU + llama.cpp without offload) vs the device run's ids."""
    from minigpt4_local.loader import LoadOptions, load_pipeline

    device_ids = ctx["outputs"].get("bundle_ids")
    if device_ids is None:
        raise RuntimeError("no device ids to compare with (describe-bundle did not run)")
    pipeline = load_pipeline(ctx["bundle"], LoadOptions(providers=["cpu"], n_gpu_layers=0, n_ctx=2048,
                                                        threads=_threads(ctx), verify=False))  # fmt: skip
    image = suite_image(pipeline.config.vision.image_size)
    answer = pipeline.describe(
        image, QUESTION, pipeline.sampling(greedy=True, max_new_tokens=ctx["ref_tokens"])
    )
    return {
        "checks": [
            _greedy_check(f"describe: bundle {ctx['device']} vs bundle cpu", device_ids, answer.token_ids)
        ]
    }


def step_ref_torch(ctx: Ctx) -> dict[str, Any]:
    """The torch model in fp32 on the CPU vs the device run's ids."""
    _pin_torch(ctx)
    from minigpt4_local.loader import LoadOptions, load_pipeline

    device_ids = ctx["outputs"].get("torch_ids")
    if device_ids is None:
        raise RuntimeError("no device ids to compare with (describe-torch did not run)")
    pipeline = load_pipeline(ctx["model_dir"], LoadOptions(decoder="torch", device="cpu", dtype="fp32"))
    image = suite_image(pipeline.config.vision.image_size)
    answer = pipeline.describe(
        image, QUESTION, pipeline.sampling(greedy=True, max_new_tokens=ctx["ref_tokens"])
    )
    return {
        "checks": [
            _greedy_check(f"describe: torch {ctx['device']} vs torch fp32 cpu", device_ids, answer.token_ids)
        ]
    }


def step_ref_gptq(ctx: Ctx) -> dict[str, Any]:
    """The GPTQ checkpoint on the CPU kernel vs the device run's ids."""
    _pin_torch(ctx)
    device_ids = ctx["outputs"].get("gptq_ids")
    if device_ids is None:
        raise RuntimeError("no device ids to compare with (gptq did not run)")
    run = _gptq_run({**ctx, "gptq_kernel": "auto"}, "cpu", ctx["ref_tokens"], 1)  # the CPU's own kernel
    return {
        "checks": [_greedy_check(f"gptq: {ctx['device']} vs cpu ({run['kernel']})", device_ids, run["ids"])]
    }


STEPS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "vision": step_vision,
    "decode": step_decode,
    "describe-bundle": step_describe_bundle,
    "describe-torch": step_describe_torch,
    "engine": step_engine,
    "gptq": step_gptq,
    "ref-bundle": step_ref_bundle,
    "ref-torch": step_ref_torch,
    "ref-gptq": step_ref_gptq,
}
