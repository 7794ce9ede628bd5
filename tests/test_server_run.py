"""The runner (`server.run.serve`) in a real process on the fake engine: SIGTERM drains in-flight answers
and exits 0, new connections are refused meanwhile, a model that fails to load ends the process with
status 1 and one line, a client that disconnects mid-stream frees its slot, and a non-loopback bind
without a key warns. (The same behaviour on the real engine: test_server_openai.py.)
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from tests.support.server import ServerProcess, http_get  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "one two three four five six seven eight"}], "stream": True}


def fake_server(*args: str) -> ServerProcess:
    return ServerProcess.start(argv=[sys.executable, "-m", "tests.support.fake_server", "{port}", *args])


def stats(server: ServerProcess) -> dict[str, Any]:
    return json.loads(http_get(server.url + "/health")[1])


def test_sigterm_finishes_running_answers_then_exits_0() -> None:
    server = fake_server("0.1").wait_ready(60)
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=BODY, timeout=30) as response:
            lines.extend(line for line in response.iter_lines() if line)

    client = threading.Thread(target=stream)
    client.start()
    deadline = time.monotonic() + 10
    while stats(server)["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # the listening socket is closed: nothing new is admitted
        http_get(server.url + "/health", timeout=2)
    client.join(30)
    assert server.process.wait(30) == 0, server.log()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.endswith("one two three four five six seven eight")  # the whole answer, not cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "Traceback" not in server.log()


def test_a_model_that_fails_to_load_ends_the_server_with_one_line() -> None:
    server = fake_server("--fail-load")
    assert server.process.wait(60) == 1
    errors = [line for line in server.log().splitlines() if "error" in line]
    assert errors == ["minigpt4: error: model path does not exist: /nowhere"]


def test_disconnect_mid_stream_frees_the_slot() -> None:
    server = fake_server("0.2").wait_ready(60)
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=BODY, timeout=30) as response:
            for line in response.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # one word arrived; leave mid-answer
        start = time.monotonic()
        while stats(server)["active"] and time.monotonic() - start < 5:
            time.sleep(0.02)
        freed_after = time.monotonic() - start
        after = stats(server)
        assert after["active"] == 0 and freed_after < 1.0  # one decode step is 0.2 s here
        assert after["generated_tokens"] < 8  # the answer was not finished in the background
    finally:
        assert server.stop() == 0


def test_binding_beyond_loopback_without_a_key_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from minigpt4_local.server.run import serve
    from minigpt4_local.server.settings import ServerSettings

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)  # nothing is bound
    lines: list[str] = []
    assert serve(ServerSettings(host="0.0.0.0"), lambda: None, lines.append) == 0
    assert "warning" in lines[0] and "--api-key" in lines[0]
    lines.clear()
    serve(ServerSettings(host="0.0.0.0", api_key="k"), lambda: None, lines.append)
    serve(ServerSettings(), lambda: None, lines.append)
    assert not any("warning" in line for line in lines)
