"""Torch backend generation: stitched greedy decoding equals an independent step-by-step loop; stop
rules, seeds, beams, streaming, multi-turn and truncation behave as the original demo's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

from minigpt4_local.image import preprocess
from minigpt4_local.loader import LoadOptions, load_pipeline
from minigpt4_local.prompts import StopChecker

QUESTION = "Describe this image in detail."


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["tiny-vicuna-7b", "tiny-llama2-7b"])
def pipeline(request: pytest.FixtureRequest, tiny_model_dir) -> object:
    return load_pipeline(tiny_model_dir(request.param), LoadOptions(device="cpu"))


def _reference_greedy(
    pipe, tok_dir: Path, image: Image.Image, prompt: str, n: int, stop: StopChecker
) -> list[int]:
    """Independent path: sentencepiece per segment, torch.cat, full forward per step, argmax."""
    model = pipe.decoder.model
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    before, after = prompt.split("<ImageHere>")

    def encode(text: str) -> list[int]:  # the legacy slow-tokenizer rule: literal <s> is BOS
        ids: list[int] = []
        for i, chunk in enumerate(text.split("<s>")):
            if i:
                ids.append(sp.bos_id())
            if chunk:
                ids.extend(sp.encode(chunk))
        return ids

    first = [sp.bos_id(), *encode(before)]
    second = encode(after)
    v = pipe.config.vision
    pixels = torch.from_numpy(preprocess([image], v.image_size, v.image_mean, v.image_std))
    with torch.no_grad():
        img = model.encode_image(pixels)[0]
        emb = model.llm.get_input_embeddings()
        seq = torch.cat([emb(torch.tensor(first)), img, emb(torch.tensor(second))])[None]
        out: list[int] = []
        for _ in range(n):
            token = int(model.llm(inputs_embeds=seq).logits[0, -1].argmax())
            out.append(token)
            if stop.is_stop(out):
                break
            seq = torch.cat([seq, emb(torch.tensor([[token]]))], dim=1)
    return stop.strip(out)


def test_greedy_equals_independent_loop(pipeline, tiny_tokenizer_dir: Path) -> None:
    options = pipeline.sampling(greedy=True, max_new_tokens=12, repetition_penalty=1.0)
    conversation = pipeline.session().conversation
    conversation.add_image()
    conversation.ask(QUESTION)
    prompt = conversation.prompt()
    answer = pipeline.describe(_image(), QUESTION, options)
    expected = _reference_greedy(pipeline, tiny_tokenizer_dir, _image(), prompt, 12, pipeline.stop)
    assert answer.token_ids == expected
    assert answer.token_ids, "generated nothing"


def test_stop_sequence_ends_generation_and_is_stripped(pipeline) -> None:
    options = pipeline.sampling(greedy=True, max_new_tokens=10, repetition_penalty=1.0)
    free = pipeline.describe(_image(), QUESTION, options).token_ids
    assert len(free) >= 5
    stop_seq = free[3:5]
    saved = pipeline.stop
    try:
        pipeline.stop = StopChecker([stop_seq], saved.eos_id, stop_on_eos=False)
        stopped = pipeline.describe(_image(), QUESTION, options).token_ids
    finally:
        pipeline.stop = saved
    first = next(i for i in range(1, len(free)) if free[i - 1 : i + 1] == stop_seq)
    assert stopped == free[: first - 1]


def test_sampling_is_reproducible_with_a_seed(pipeline) -> None:
    options = pipeline.sampling(max_new_tokens=8, seed=123)
    a = pipeline.describe(_image(), QUESTION, options).token_ids
    b = pipeline.describe(_image(), QUESTION, options).token_ids
    assert a == b


def test_beam_search_runs_and_one_beam_is_greedy(pipeline) -> None:
    greedy = pipeline.sampling(greedy=True, max_new_tokens=6, repetition_penalty=1.0)
    one_beam = pipeline.sampling(greedy=True, max_new_tokens=6, repetition_penalty=1.0, num_beams=1)
    assert (
        pipeline.describe(_image(), QUESTION, greedy).token_ids
        == pipeline.describe(_image(), QUESTION, one_beam).token_ids
    )
    beams = pipeline.describe(
        _image(), QUESTION, pipeline.sampling(greedy=True, max_new_tokens=6, num_beams=3)
    )
    assert 0 < len(beams.token_ids) <= 6
    assert all(0 <= t < pipeline.config.llm.vocab_size for t in beams.token_ids)


def test_streamed_text_equals_the_final_answer(pipeline) -> None:
    chunks: list[str] = []
    answer = pipeline.describe(
        _image(1), QUESTION, pipeline.sampling(greedy=True, max_new_tokens=15), chunks.append
    )
    assert "".join(chunks) == answer.text


def test_multi_turn_keeps_history_and_images(pipeline) -> None:
    options = pipeline.sampling(greedy=True, max_new_tokens=5)
    session = pipeline.session()
    session.add_image(_image(0))
    first = session.ask("What is this?", options)
    session.add_image(_image(1))
    second = session.ask("And this one?", options)
    assert second.prompt_tokens > first.prompt_tokens + 2 * pipeline.config.num_image_tokens - 1
    assert session.conversation.num_images == 2
    assert first.text in "".join(m[1] or "" for m in session.conversation.messages)


def test_left_truncation_to_context(pipeline) -> None:
    options = pipeline.sampling(greedy=True, max_new_tokens=4)
    saved = pipeline.config.prompt.max_context
    try:
        pipeline.config.prompt.max_context = 30
        answer = pipeline.describe(_image(), QUESTION, options)
    finally:
        pipeline.config.prompt.max_context = saved
    assert answer.prompt_tokens == 30 - 4
