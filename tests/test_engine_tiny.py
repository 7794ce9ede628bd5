"""The engine on the tiny stitched fixtures (random-weight MiniGPT-4 → ONNX vision + f32 GGUF bundle):
greedy answers at parallel 1, 2, 4 and 8 equal the sequential describe, with staggered arrivals."""

from __future__ import annotations

from pathlib import Path

import pytest

from minigpt4_local.cli import main
from minigpt4_local.engine import Engine
from minigpt4_local.loader import LoadOptions, load_pipeline
from minigpt4_local.prompts import image_prompt
from tests.support.engine import THREADS, submit_waves
from tests.support.images import gradient_rgb

pytest.importorskip("llama_cpp")


def _cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:
        assert not exc.code, f"minigpt4 {' '.join(args)} exited {exc.code}"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> Path:
    model = tiny_model_dir("tiny-vicuna-7b")
    out = tmp_path_factory.mktemp("engine-bundle") / "b"
    _cli("export", "onnx", str(model), "--out", str(out), "--precision", "fp32", "--verify-images", "2")
    _cli("quantize", "gguf", str(model), "--out", str(out), "--type", "f32", "--agreement-tokens", "0")
    return out


@pytest.mark.slow
def test_tiny_bundle_batched_equals_sequential(tiny_bundle: Path) -> None:
    pipeline = load_pipeline(tiny_bundle, LoadOptions(threads=THREADS, verify=False))
    images = [gradient_rgb(30 + 7 * i, 20 + 5 * i, seed=i) for i in range(10)]
    questions = ["Describe this image in detail.", "What is it?", "Colours?"]
    # Random weights never stop on their own: a fixed answer length, every token of it compared.
    options = pipeline.sampling(greedy=True, max_new_tokens=24, repetition_penalty=1.0)
    asked = [questions[i % len(questions)] for i in range(len(images))]
    reference = [pipeline.describe(im, q, options).token_ids for im, q in zip(images, asked, strict=True)]
    assert all(len(r) == 24 for r in reference)
    prompts = [image_prompt(pipeline.config.prompt, q) for q in asked]
    for parallel in (1, 2, 4, 8):
        with Engine(pipeline, parallel=parallel) as eng:
            answers = submit_waves(eng, prompts, images, options, seed=10 + parallel)
        assert [a.token_ids for a in answers] == reference, f"parallel {parallel}"
