"""Stage-2 data generation (`make-align-data`): detailed prompt, the Continue rule, polishing through an
OpenAI-compatible stub served on 127.0.0.1 by the test, the rule filter, the cc_sbu_align output + review
file, and resuming."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from minigpt4_local.pipeline import Answer
from minigpt4_local.prompts import Conversation
from minigpt4_local.train.align_data import (
    CONTINUE_PROMPT,
    DETAIL_PROMPT,
    filter_reason,
    make_align_data,
    read_review,
)
from minigpt4_local.train.polish import FIXUP_PROMPT, OpenAIPolisher, PolishError, chat_endpoint
from tests.support.train_data import make_tiny_model_dir, toy_image

APOLOGY = "I'm sorry, I made a mistake in the previous description of the image."
PREFIX = "A clear photo of a scene."

Reply = tuple[int, Any, float]  # (HTTP status, JSON body or text, delay in seconds)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def polished_reply(body: dict) -> Reply:
    paragraph = body["messages"][0]["content"].split("\n\n", 1)[1]
    return 200, {"choices": [{"message": {"role": "assistant", "content": f"{PREFIX} {paragraph}"}}]}, 0.0


@dataclass
class Stub:
    script: Callable[[int, dict], Reply] = lambda _n, body: polished_reply(body)
    requests: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    url: str = ""


@contextmanager
def stub_server(stub: Stub) -> Iterator[Stub]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            stub.requests.append({"path": self.path, **body})
            stub.headers.append(dict(self.headers))
            status, payload, delay = stub.script(len(stub.requests), body)
            time.sleep(delay)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


# ----- a scripted describing pipeline (counts every question) ----------------------------------------------------


class FakeSession:
    def __init__(self, owner: FakePipeline) -> None:
        self.owner = owner
        self.questions: list[str] = []

    def add_image(self, image: Any) -> None:
        self.image_size = image.size

    def ask(self, question: str, options: Any) -> Answer:
        self.questions.append(question)
        self.owner.asked.append(question)
        n = self.owner.lengths[len(self.owner.asked) - 1] if question == DETAIL_PROMPT else 7
        text = " ".join(["word"] * n) if question == DETAIL_PROMPT else "and more words after continue"
        return Answer(text=text, token_ids=list(range(n)))


class FakePipeline:
    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths + [0] * 50
        self.asked: list[str] = []

    def session(self) -> FakeSession:
        return FakeSession(self)


@pytest.fixture()
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i, color in enumerate(["red", "blue", "green"]):
        path = folder / f"photo {i}.png"
        toy_image(color, i).save(path)
        paths.append(path)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return [*paths, folder / "broken.jpg"]


def test_filter_rules() -> None:
    assert filter_reason(APOLOGY) == "apology"
    assert filter_reason("The picture shows a dog; I made a mistake earlier about it.") == "mistake"
    assert filter_reason("As an AI language model I cannot see images at all.") == "refusal"
    assert filter_reason("Too short.") == "too short"
    assert filter_reason("A red car is parked on a quiet street next to a tree.") is None


def test_endpoint_forms() -> None:
    assert chat_endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(PolishError, match="http"):
        OpenAIPolisher("ftp://x", "m")


def test_continue_rule_polish_filter_and_outputs(tmp_path: Path, images: list[Path]) -> None:
    # First answers: 100 tokens (> 80: no Continue), 80 (not longer than 80: Continue), 12 (Continue).
    pipeline = FakePipeline([100, 80, 12])
    stub = Stub(
        script=lambda n, body: (
            (200, {"choices": [{"message": {"content": APOLOGY}}]}, 0.0) if n == 3 else polished_reply(body)
        )
    )
    out = tmp_path / "align"
    with stub_server(stub):
        summary = make_align_data(
            images, pipeline, OpenAIPolisher(stub.url, "stub-model", api_key="k"), out, None
        )
    assert pipeline.asked == [DETAIL_PROMPT, DETAIL_PROMPT, CONTINUE_PROMPT, DETAIL_PROMPT, CONTINUE_PROMPT]
    assert len(stub.requests) == 3
    first = stub.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["model"] == "stub-model"
    assert first["messages"][0]["content"] == f"{FIXUP_PROMPT}\n\n{' '.join(['word'] * 100)}"
    assert stub.headers[0]["Authorization"] == "Bearer k"
    assert stub.requests[1]["messages"][0]["content"].endswith(
        " ".join(["word"] * 80) + " and more words after continue"
    )

    review = list(read_review(out).values())
    assert [r.kept for r in review] == [True, True, False, False]
    assert [r.continued for r in review[:3]] == [False, True, True]
    assert review[2].reason == "apology" and review[2].polished == APOLOGY
    assert review[3].reason.startswith("unreadable")
    assert review[0].raw == " ".join(["word"] * 100) and review[0].polished.startswith(PREFIX)
    assert [r.image_id for r in review] == ["photo_0", "photo_1", "photo_2", "broken"]
    captions = json.loads((out / "filter_cap.json").read_text())["annotations"]
    assert captions == [
        {"image_id": "photo_0", "caption": review[0].polished},
        {"image_id": "photo_1", "caption": review[1].polished},
    ]
    assert sorted(p.name for p in (out / "image").iterdir()) == ["photo_0.jpg", "photo_1.jpg"]
    assert "**before**" in (out / "review.md").read_text()
    assert summary.kept == 2 and summary.dropped == {"apology": 1, "unreadable": 1}

    # The output is a cc_sbu_align folder the stage-2 reader accepts.
    from minigpt4_local.train.data import read_cc_sbu_align

    records, _ = read_cc_sbu_align(out)
    assert [Path(r.image).name for r in records] == ["photo_0.jpg", "photo_1.jpg"]

    # Resume: nothing is described or polished again; a new image is.
    extra = images[0].parent / "photo 3.png"
    toy_image("yellow", 3).save(extra)
    with stub_server(Stub()) as again:
        summary = make_align_data([*images, extra], pipeline, OpenAIPolisher(again.url, "m"), out, None)
    assert len(again.requests) == 1 and summary.skipped_done == 4
    assert pipeline.asked[5:] == [DETAIL_PROMPT, CONTINUE_PROMPT]  # 0-token answer: "not longer than 80"
    assert len(json.loads((out / "filter_cap.json").read_text())["annotations"]) == 3


def test_polish_failure_is_recorded_and_retried_without_redescribing(
    tmp_path: Path, images: list[Path]
) -> None:
    pipeline = FakePipeline([100])
    out = tmp_path / "align"
    with stub_server(Stub(script=lambda n, body: (400, {"error": "bad request"}, 0.0))) as down:
        make_align_data(images[:1], pipeline, OpenAIPolisher(down.url, "m", retries=2, backoff=0), out, None)
    assert len(down.requests) == 1  # HTTP 400 is not retried
    (record,) = read_review(out).values()
    assert record.reason.startswith("polish failed") and record.raw and not record.kept
    with stub_server(Stub()) as up:
        make_align_data(images[:1], pipeline, OpenAIPolisher(up.url, "m"), out, None)
    assert pipeline.asked == [DETAIL_PROMPT]  # described once only
    (record,) = read_review(out).values()
    assert record.kept and record.image_id == "photo_0"


def test_polisher_retries_and_timeouts() -> None:
    flaky = Stub(script=lambda n, body: (503, "busy", 0.0) if n == 1 else polished_reply(body))
    with stub_server(flaky):
        assert OpenAIPolisher(flaky.url, "m", backoff=0).polish("a b") == f"{PREFIX} a b"
    assert len(flaky.requests) == 2
    slow = Stub(script=lambda n, body: (*polished_reply(body)[:2], 1.0))
    with stub_server(slow):
        start = time.perf_counter()
        with pytest.raises(PolishError, match="after 2 attempt"):
            OpenAIPolisher(slow.url, "m", timeout=0.2, retries=1, backoff=0).polish("a b")
        assert time.perf_counter() - start < 1.5
    garbage = Stub(script=lambda n, body: (200, {"unexpected": True}, 0.0))
    with stub_server(garbage), pytest.raises(PolishError, match="choices"):
        OpenAIPolisher(garbage.url, "m").polish("x")


def test_make_align_data_with_tiny_torch_model_and_cli(tmp_path: Path, images: list[Path]) -> None:
    """The real torch pipeline: the Continue turn goes through the conversation's multi-turn prompt."""
    from minigpt4_local.loader import LoadOptions, load_pipeline
    from minigpt4_local.train.cli import train_group

    model_dir = make_tiny_model_dir(tmp_path)
    pipeline = load_pipeline(model_dir, LoadOptions(device="cpu"))
    sessions = []
    original = pipeline.session
    pipeline.session = lambda: sessions.append(original()) or sessions[-1]
    options = pipeline.sampling(greedy=True, max_new_tokens=12)
    with stub_server(Stub()) as stub:
        summary = make_align_data(
            images[:2], pipeline, OpenAIPolisher(stub.url, "m"), tmp_path / "a", options
        )
    assert summary.kept == 2
    for session in sessions:  # 12-token answers are "not longer than 80": Continue is asked
        (human, first), (assistant, answer), (human2, cont), (assistant2, _) = session.conversation.messages
        assert (human, assistant, human2, assistant2) == (0, 1, 0, 1)
        assert first == f"<Img><ImageHere></Img> {DETAIL_PROMPT}" and cont == "Continue"
        replay = Conversation("vicuna_v0")
        replay.messages = session.conversation.messages[:3]
        assert replay.prompt().endswith(f"###Assistant: {answer}###Human: Continue###Assistant: ")
    review = list(read_review(tmp_path / "a").values())
    assert all(r.continued and len(r.tokens) == 2 and r.tokens[0] <= 12 for r in review)

    with stub_server(Stub()) as stub:
        result = CliRunner().invoke(
            train_group,
            [
                "make-align-data",
                *map(str, images),
                "--out",
                str(tmp_path / "cli"),
                "--model",
                str(model_dir),
                "--device",
                "cpu",
                "--greedy",
                "--max-new-tokens",
                "8",
                "--continue-below",
                "0",
                "--polish-url",
                stub.url,
                "--polish-model",
                "m",
            ],
        )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["images"] == 4 and summary["kept"] == 3 and summary["dropped"] == {"unreadable": 1}
    assert len(stub.requests) == 3
    result = CliRunner().invoke(
        train_group,
        ["make-align-data", str(images[0]), "--out", str(tmp_path / "x"), "--model", str(model_dir)],
    )
    assert result.exit_code != 0 and "choose one polisher" in result.output


def test_local_gguf_polisher(tmp_path: Path) -> None:
    """--polish-gguf: the fix-up prompt through our llama.cpp runtime (a tiny random GGUF: the text is noise,
    the plumbing is real)."""
    pytest.importorskip("llama_cpp")
    from minigpt4_local.quantize.gguf_convert import convert_hf_llama_to_gguf
    from minigpt4_local.train.polish import CHAT_FORMATS, LlamaCppPolisher, detect_chat_format

    model_dir = make_tiny_model_dir(tmp_path)
    gguf = tmp_path / "tiny.gguf"
    convert_hf_llama_to_gguf(model_dir / "llm", gguf, out_type="f32")
    polisher = LlamaCppPolisher(str(gguf), chat_format="vicuna", max_tokens=6, n_gpu_layers=0)
    try:
        first = polisher.polish("A red car on the street.")
        assert isinstance(first, str) and polisher.polish("A red car on the street.") == first  # greedy
        assert "vicuna" in polisher.name
    finally:
        polisher.close()
    assert detect_chat_format({"tokenizer.chat_template": "{{'<|im_start|>' + role}}"}) == "chatml"
    assert detect_chat_format({}) == "vicuna"
    assert set(CHAT_FORMATS) >= {"chatml", "llama2", "llama3", "vicuna"}
    with pytest.raises(PolishError, match="unknown chat format"):
        LlamaCppPolisher(str(gguf), chat_format="nope", n_gpu_layers=0)
