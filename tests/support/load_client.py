"""A bounded load generator for OpenAI-compatible streaming chat servers (tests and benchmarks/bench_serve.py).

Contract: `run_load(url, bodies, clients, per_client, api_key=None, timeout=120, stream=True) -> LoadRun`
starts `clients` concurrent clients (asyncio + httpx), each sending `per_client` requests one after the
other; client c's request r is `bodies[(c * per_client + r) % len(bodies)]` (a chat/completions body;
with `stream`, `stream` and `stream_options.include_usage` are set here, else the whole answer is awaited
and the first-token time stays None). Every request is bounded by `timeout`
seconds. Each `Sample` holds the body index, the streamed text, latency (send → [DONE]), time to the
first content, completion tokens (from usage) and the error (None when it succeeded: HTTP 200, an
SSE stream ending in [DONE], no error chunk). `LoadRun.summary()` gives errors, p50/p95 latency and
first-token time, requests/s and completion tokens/s over the wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    body_index: int
    text: str = ""
    latency_s: float = 0.0
    first_token_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LoadRun:
    clients: int
    per_client: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error is not None]

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error is None]
        latencies = sorted(s.latency_s for s in ok)
        firsts = sorted(s.first_token_s for s in ok if s.first_token_s is not None)
        tokens = sum(s.completion_tokens for s in ok)
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "errors": len(self.errors),
            "wall_s": round(self.wall_s, 3),
            "p50_latency_s": _rounded(percentile(latencies, 50)),
            "p95_latency_s": _rounded(percentile(latencies, 95)),
            "p50_first_token_s": _rounded(percentile(firsts, 50)),
            "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
            "completion_tokens": tokens,
            "tokens_per_request": round(tokens / len(ok), 1) if ok else 0.0,
            "tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s else 0.0,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


async def _one(
    client: Any,
    url: str,
    body: dict[str, Any],
    index: int,
    headers: dict[str, str],
    timeout: float,
    stream: bool,
) -> Sample:
    sample = Sample(index)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else dict(body)
    start = time.perf_counter()
    parts: list[str] = []
    done = False

    async def exchange() -> None:
        nonlocal done
        if not stream:
            response = await client.post(url, json=payload, headers=headers)
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {response.content[:200]!r}"
                return
            answer = response.json()
            choice = answer["choices"][0]
            parts.append(choice["message"]["content"] if "message" in choice else choice["text"])
            sample.completion_tokens = answer["usage"]["completion_tokens"]
            done = True
            return
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    sample.error = f"error chunk: {chunk['error'].get('message')}"
                    continue
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                    if text:
                        if sample.first_token_s is None:
                            sample.first_token_s = time.perf_counter() - start
                        parts.append(text)

    try:
        await asyncio.wait_for(exchange(), timeout)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        sample.error = f"timed out after {timeout} s"
    except Exception as err:  # a client-side view of any failure: counted, not raised
        sample.error = f"{type(err).__name__}: {err}"
    sample.latency_s = time.perf_counter() - start
    sample.text = "".join(parts)
    if sample.error is None and not done:
        sample.error = "stream ended without [DONE]"
    return sample


async def _run(
    url: str,
    bodies: list[dict[str, Any]],
    clients: int,
    per_client: int,
    api_key: str | None,
    timeout: float,
    stream: bool,
) -> LoadRun:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def worker(c: int) -> list[Sample]:
            out = []
            for r in range(per_client):
                index = (c * per_client + r) % len(bodies)
                out.append(await _one(client, url, bodies[index], index, headers, timeout, stream))
            return out

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return LoadRun(clients, per_client, wall, [s for batch in results for s in batch])


def run_load(
    url: str,
    bodies: list[dict[str, Any]],
    clients: int,
    per_client: int,
    api_key: str | None = None,
    timeout: float = 120.0,
    stream: bool = True,
) -> LoadRun:
    return asyncio.run(_run(url, bodies, clients, per_client, api_key, timeout, stream))
