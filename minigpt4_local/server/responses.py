"""OpenAI response objects and stream chunks, as plain dicts (pure functions, no framework).

Contract: `ResponseIds.new(kind, model)` fixes the id, `created` and model of one response; its methods
build the shapes OpenAI's clients read:
- chat: `chat_completion(text, finish_reason, usage)` (object "chat.completion"), `chat_chunk(delta,
  finish_reason)` ("chat.completion.chunk", one choice), `usage_chunk(usage)` (empty `choices`);
- completions: `text_completion(...)` / `text_chunk(...)` ("text_completion");
every chunk carries id, object, created, model and choices (strict parsers require them).
`usage(prompt_tokens, completion_tokens)` is the usage object; `model_list(model_id, extra)` is
GET /v1/models; `sse(data)` formats one server-sent event (`data: ...\\n\\n`), `SSE_DONE` ends a stream.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_list(model_id: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "minigpt4-local", **extra}
        ],
    }


@dataclass(frozen=True)
class ResponseIds:
    id: str
    created: int
    model: str
    kind: str  # "chat" | "completion"

    @classmethod
    def new(cls, kind: str, model: str) -> ResponseIds:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model, kind)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ----- chat ---------------------------------------------------------------------------------

    def chat_completion(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        return {
            **self._head("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage_,
        }

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **self._head("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }

    # ----- completions ----------------------------------------------------------------------------

    def text_completion(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        return {
            **self._head("text_completion"),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_,
        }

    def text_chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {
            **self._head("text_completion"),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        }

    # ----- either ---------------------------------------------------------------------------------

    def complete(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        if self.kind == "chat":
            return self.chat_completion(text, finish_reason, usage_)
        return self.text_completion(text, finish_reason, usage_)

    def first_chunk(self) -> dict[str, Any] | None:
        """The opening chunk (chat announces the role); None for completions."""
        return self.chat_chunk({"role": "assistant", "content": ""}) if self.kind == "chat" else None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self.chat_chunk({"content": text}) if self.kind == "chat" else self.text_chunk(text)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return (
            self.chat_chunk({}, finish_reason) if self.kind == "chat" else self.text_chunk("", finish_reason)
        )

    def usage_chunk(self, usage_: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_}
