"""Server logic without a model: request parsing onto the MiniGPT-4 template, image URLs, stop strings,
and the HTTP surface (status codes, error bodies, SSE shape, loading/draining, queue full, key) on a
fake engine that follows the engine contract (tests/support/fake_engine.py). The same surface against
the real engine is tested in test_server_openai.py and test_server_hostile.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from PIL import Image

from minigpt4_local.bundle import Bundle
from minigpt4_local.config import PromptConfig
from minigpt4_local.demo import demo_bundle_path
from minigpt4_local.prompts import image_prompt
from minigpt4_local.server.app import create_app
from minigpt4_local.server.errors import APIError
from minigpt4_local.server.generation import StopScanner, cut_at_stop
from minigpt4_local.server.images import resolve_image_url
from minigpt4_local.server.schemas import parse_chat_request, parse_completion_request, parse_json_body
from minigpt4_local.server.settings import ServerSettings
from minigpt4_local.tokenizer import load_tokenizer
from tests.support.fake_engine import FakeEngine, answer_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "one-shape.png"
PNG_URL = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
DEMO_PROMPT = PromptConfig(template="vicuna_v0", system="")


def image_part(url: str = PNG_URL) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def chat(messages: list[dict[str, Any]], **extra: Any) -> Any:
    return parse_chat_request({"messages": messages, **extra}, DEMO_PROMPT, ServerSettings())


def api_error(fn: Any, *args: Any, **kwargs: Any) -> APIError:
    with pytest.raises(APIError) as err:
        fn(*args, **kwargs)
    return err.value


# ----- messages → template --------------------------------------------------------------------------


def test_image_then_question_renders_like_describe() -> None:
    request = chat([{"role": "user", "content": [image_part(), {"type": "text", "text": "What is it?"}]}])
    assert request.prompt == image_prompt(DEMO_PROMPT, "What is it?")
    assert [ref.label for ref in request.images] == ["messages[0].content[0].image_url"]
    # An image-only message followed by a text-only one joins the same turn (the original demo's flow).
    split = chat([{"role": "user", "content": [image_part()]}, {"role": "user", "content": "What is it?"}])
    assert split.prompt == request.prompt


def test_several_images_and_turns_follow_the_conversation() -> None:
    request = chat(
        [
            {"role": "user", "content": [image_part(), {"type": "text", "text": "First?"}]},
            {"role": "assistant", "content": "a circle"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "And"}, image_part(), {"type": "text", "text": "this?"}],
            },
        ]
    )
    assert request.prompt == (
        "###Human: <Img><ImageHere></Img> First?###Assistant: a circle###Human: And###"
        "Human: <Img><ImageHere></Img> this?###Assistant: "
    )
    assert len(request.images) == 2 and request.images[1].label == "messages[2].content[1].image_url"


def test_system_message_replaces_the_template_system_text() -> None:
    request = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert request.prompt == "Be brief.###Human: Hi###Assistant: "
    parts = chat(
        [
            {"role": "developer", "content": [{"type": "text", "text": "A"}]},
            {"role": "system", "content": "B"},
            {"role": "user", "content": "Hi"},
        ]
    )
    assert parts.prompt.startswith("A\nB###Human: Hi")


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}], "messages[1]"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "messages[0]"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "user", "content": "d"},
            ],
            "messages[2]",
        ),
        ([{"role": "user", "content": "  "}], "messages[0].content"),
        ([{"role": "user", "content": "say <ImageHere>"}], "messages[0].content"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "messages[0].content[0].type"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].image_url",
        ),
        (["hello"], "messages[0]"),
    ],
)
def test_bad_conversations_name_the_parameter(messages: list[Any], param: str) -> None:
    err = api_error(chat, messages)
    assert err.status == 400 and err.param == param, err.message


def test_sampling_parameters() -> None:
    user = [{"role": "user", "content": "hi"}]
    assert chat(user, temperature=0).sampling == {"greedy": True}
    assert chat(user, temperature=0.7, top_p=0.5, seed=3).sampling == {
        "temperature": 0.7,
        "do_sample": True,
        "top_p": 0.5,
        "seed": 3,
    }
    assert chat(user, max_tokens=5, max_completion_tokens=7).max_tokens == 7
    assert chat(user, stop="###x").stop == ["###x"]
    assert chat(user, response_format={"type": "json_object"}).json_schema == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert (
        chat(
            user, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        ).json_schema
        == schema
    )
    assert chat(user, n=1, presence_penalty=0, logprobs=False, user="me").stream is False
    streamed = chat(user, stream=True, stream_options={"include_usage": True})
    assert streamed.stream and streamed.include_usage


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"max_tokens": -5}, "max_tokens", None),
        ({"max_tokens": "10"}, "max_tokens", None),
        ({"max_tokens": True}, "max_tokens", None),
        ({"temperature": 3}, "temperature", None),
        ({"temperature": "hot"}, "temperature", None),
        ({"top_p": 0}, "top_p", None),
        ({"seed": -1}, "seed", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"stop": [1]}, "stop", None),
        ({"stream": "yes"}, "stream", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
        ({"response_format": {"type": "xml"}}, "response_format.type", None),
        ({"presence_penalty": 1.0}, "presence_penalty", "unsupported_parameter"),
        ({"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"frobnicate": 1}, "frobnicate", "unsupported_parameter"),
        ({"model": 7}, "model", None),
    ],
)
def test_bad_parameters(extra: dict[str, Any], param: str, code: str | None) -> None:
    err = api_error(chat, [{"role": "user", "content": "hi"}], **extra)
    assert (err.status, err.param, err.code) == (400, param, code), err.message


def test_too_many_images_are_refused_before_decoding() -> None:
    content = [image_part("data:image/png;base64,AAAA")] * 17
    err = api_error(chat, [{"role": "user", "content": content}])
    assert err.code == "too_many_images"


def test_completion_request_uses_the_prompt_as_is() -> None:
    request = parse_completion_request({"prompt": ["Once upon"], "max_tokens": 3}, ServerSettings())
    assert (request.prompt, request.images, request.max_tokens, request.kind) == (
        "Once upon",
        [],
        3,
        "completion",
    )
    assert api_error(parse_completion_request, {"prompt": ["a", "b"]}, ServerSettings()).param == "prompt"
    assert (
        api_error(parse_completion_request, {"prompt": "x", "echo": True}, ServerSettings()).code
        == "unsupported_parameter"
    )


@pytest.mark.parametrize(
    "raw", [b"", b"{", b"[1]", b"\xff\xfe", b'{"a": NaN}', b"[" * 100_000 + b"]" * 100_000]
)
def test_bad_json_bodies(raw: bytes) -> None:
    assert api_error(parse_json_body, raw).code == "invalid_json"


# ----- stop strings ---------------------------------------------------------------------------------


def test_stop_scanner_holds_back_possible_starts() -> None:
    scanner = StopScanner(["STOP"])
    out = [scanner.push(d) for d in ["abc S", "T", "x ST", "OP tail"]]
    assert out == [("abc ", False), ("", False), ("STx ", False), ("", True)]
    assert scanner.flush() == ""
    plain = StopScanner([])
    assert plain.push("S") == ("S", False)
    tail = StopScanner(["\n\n"])
    assert tail.push("line\n") == ("line", False) and tail.flush() == "\n"
    assert cut_at_stop("a, b. c", [". ", "!"]) == "a, b"


# ----- image URLs -----------------------------------------------------------------------------------


def b64(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def test_image_urls(tmp_path: Path) -> None:
    settings = ServerSettings(max_image_pixels=60_000)
    image = resolve_image_url(PNG_URL, "img", settings)
    assert image.mode == "RGB" and image.size == Image.open(EXAMPLE).size
    webp = io.BytesIO()
    Image.new("RGB", (9, 7), (1, 2, 3)).save(webp, format="WEBP")
    assert resolve_image_url(b64(webp.getvalue(), "webp"), "img", settings).size == (9, 7)
    bmp = io.BytesIO()
    Image.new("RGB", (9, 7)).save(bmp, format="BMP")
    big = io.BytesIO()
    Image.new("L", (300, 250)).save(big, format="PNG")
    refused = {
        "https://example.com/a.png": "offline",
        "ftp://host/a.png": "scheme",
        "data:text/plain;base64,aGk=": "unsupported image type",
        "data:image/png,rawdata": "data: URI",
        b64(b"not base64 at all!")[:-4] + "@@@@": "base64",
        b64(b"hello there"): "not an image",
        b64(EXAMPLE.read_bytes()[:300]): "truncated",
        b64(bmp.getvalue(), "png"): "not an image",  # a BMP dressed as PNG: only the four formats decode
        b64(big.getvalue()): "300x250",
        str(EXAMPLE): "--allow-local-files",
        "file://" + str(EXAMPLE): "--allow-local-files",
    }
    for url, words in refused.items():
        err = api_error(resolve_image_url, url, "messages[0].content[0].image_url", settings)
        assert err.status == 400 and err.param == "messages[0].content[0].image_url"
        assert words in err.message, (url[:40], err.message)
        assert "Traceback" not in err.message and "\n" not in err.message


def test_local_files_stay_inside_the_allowed_directory(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(EXAMPLE.read_bytes())
    (tmp_path / "secret.png").write_bytes(EXAMPLE.read_bytes())
    (allowed / "escape.png").symlink_to(tmp_path / "secret.png")
    (allowed / "inner.png").symlink_to(allowed / "sub" / "a.png")
    os.mkfifo(allowed / "pipe.png")
    settings = ServerSettings(allow_local_files=allowed)
    for ok in [
        "sub/a.png",
        str(allowed / "sub" / "a.png"),
        "file://" + str(allowed / "sub" / "a.png"),
        "inner.png",
    ]:
        assert resolve_image_url(ok, "img", settings).size == Image.open(EXAMPLE).size
    refused = {
        "../secret.png": "'..'",
        str(allowed / ".." / "secret.png"): "'..'",
        "file://" + str(tmp_path / "secret.png"): "outside",
        "escape.png": "outside",
        "/etc/passwd": "outside",
        "pipe.png": "FIFO",
        "sub": "directory",
        "missing.png": "no such file",
    }
    for url, words in refused.items():
        start = time.perf_counter()
        err = api_error(resolve_image_url, url, "img", settings)
        assert words in err.message, (url, err.message)
        assert time.perf_counter() - start < 2.0


# ----- HTTP surface on the fake engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_parts() -> tuple[Any, Any]:
    bundle = Bundle.open(demo_bundle_path(), verify=False)
    return bundle.config, load_tokenizer(bundle.part_path("tokenizer"))


def wait_ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("server not ready")


def sse_events(response: Any) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_loading_then_ready_then_generation(demo_parts: tuple[Any, Any]) -> None:
    config, tokenizer = demo_parts
    release = threading.Event()
    engine = FakeEngine(config, tokenizer)

    def slow_open() -> FakeEngine:
        release.wait(10)
        return engine

    with TestClient(create_app(ServerSettings(), slow_open)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        busy = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        release.set()
        wait_ready(client)
        model_id = client.get("/v1/models").json()["data"][0]["id"]
        assert model_id == config.name
        body = {
            "model": model_id,
            "messages": [{"role": "user", "content": [image_part(), {"type": "text", "text": "Hi?"}]}],
        }
        answer = client.post("/v1/chat/completions", json=body).json()
        expected = answer_for(engine.submitted[-1]["prompt"], 1)
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected, "refusal": None}
        assert answer["choices"][0]["finish_reason"] == "stop"
        assert answer["usage"]["completion_tokens"] == len(expected.split(" "))
        assert engine.submitted[-1]["options"].max_new_tokens == config.generation.max_new_tokens
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all({"id", "object", "created", "model", "choices"} <= set(c) for c in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == expected
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(
            expected.split(" ")
        )
        # Stop strings cut the answer (and cancel the job); max_tokens gives finish_reason "length".
        stopped = client.post("/v1/chat/completions", json={**body, "stop": ["you asked"]}).json()
        assert stopped["choices"][0]["message"]["content"] == "I see 1 image(s) and "
        short = client.post("/v1/chat/completions", json={**body, "max_tokens": 2}).json()
        assert short["choices"][0]["finish_reason"] == "length"
        completion = client.post(
            "/v1/completions", json={"prompt": "Human: tell me", "max_tokens": 50}
        ).json()
        assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == answer_for(
            "Human: tell me", 0
        )


def test_errors_are_openai_objects(demo_parts: tuple[Any, Any]) -> None:
    config, tokenizer = demo_parts
    engine = FakeEngine(config, tokenizer, parallel=1, max_queue=1, token_delay=0.05)
    settings = ServerSettings(api_key="s3cret", max_body_bytes=4096)
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(settings, lambda: engine)) as client:
        wait_ready(client)
        cases = [
            (client.get("/v1/models"), 401),
            (client.get("/v1/models", headers={"Authorization": "Bearer s3cre"}), 401),
            (client.get("/v1/models", headers={"Authorization": "Basic s3cret"}), 401),
            (client.post("/v1/chat/completions", content=b"x" * 5000, headers=auth), 413),
            (
                client.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
                    headers=auth,
                ),
                404,
            ),
            (client.get("/v1/nothing", headers=auth), 404),
            (client.get("/v1/chat/completions", headers=auth), 405),
            (
                client.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "x " * 600}]},
                    headers=auth,
                ),
                400,
            ),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
        assert cases[-1][0].json()["error"]["code"] == "context_length_exceeded"
        assert client.get("/health").status_code == 200  # /health needs no key
        assert client.get("/v1/models", headers=auth).status_code == 200

        # Queue full: one running, one waiting, the third is refused with 429.
        results: list[int] = []
        body = {"messages": [{"role": "user", "content": "a question long enough to take a while"}]}

        def call() -> None:
            results.append(client.post("/v1/chat/completions", json=body, headers=auth).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        third = client.post("/v1/chat/completions", json=body, headers=auth)
        for thread in threads:
            thread.join()
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        assert sorted(results) == [200, 200]

        # A failure inside the engine reaches a streaming client as an error chunk before [DONE].
        engine.fail_next = True
        with client.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=auth
        ) as response:
            events = sse_events(response)
        assert events[-1] == "[DONE]" and "error" in events[-2]

        # Draining: every API call is 503, /health too.
        client.app.state.server.begin_draining()
        drained = client.post("/v1/chat/completions", json=body, headers=auth)
        assert drained.status_code == 503 and drained.json()["error"]["code"] == "draining"
        assert client.get("/health").status_code == 503


def test_chat_page_is_served(demo_parts: tuple[Any, Any]) -> None:
    config, tokenizer = demo_parts
    with TestClient(create_app(ServerSettings(), lambda: FakeEngine(config, tokenizer))) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<title>MiniGPT-4 local</title>" in page.text
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200
    # Nothing is loaded from another origin (no CDN): every src/href/url()/fetch target is local.
    static = Path(__file__).resolve().parents[1] / "minigpt4_local" / "server" / "static"
    for path in static.iterdir():
        text = path.read_text(encoding="utf-8")
        remote = re.findall(
            r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|fetch\(\s*["'`]https?:""",
            text,
        )
        assert not remote, (path.name, remote)
