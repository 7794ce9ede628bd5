"""OpenAI request bodies → validated generation requests (no web framework, no model needed).

Contract:
- `parse_json_body(raw)` → the decoded JSON object, or `APIError` 400 (invalid UTF-8 or JSON, NaN or
  Infinity, nesting too deep, not an object).
- `parse_chat_request(body, prompt_config, settings)` → `GenerationRequest` for POST /v1/chat/completions;
  `parse_completion_request(body, settings)` for the text-only POST /v1/completions (the prompt is used as
  is, without the chat template). Any problem is `APIError` 400 naming the parameter (`param`), with code
  `unsupported_parameter` for OpenAI parameters this server does not implement (only their neutral values
  are accepted: n=1, logprobs false, penalties 0, no tools, ...). Unknown parameters are refused too.
- Messages map onto the MiniGPT-4 template (`prompts.Conversation`), in order: a user message's parts
  are walked in order, each image part is `add_image()` and each run of text parts is joined with "\\n"
  and `ask()`-ed (so `[image, text]` renders exactly as `minigpt4 describe`, and a text-only user message
  that follows an image-only one joins that image's turn); an assistant message is `add_answer(text)`.
  System (and `developer`) messages are allowed only before the first user message; their text (joined
  with "\\n") replaces the template's system text. The last message must be the user's. Text containing
  the image placeholder `<ImageHere>` is refused. Images are only counted and labelled here (at most
  `settings.max_images`); decoding them is `images.resolve_image_url`'s job.
- Sampling: `temperature` 0 means greedy, > 0 samples at that temperature; absent parameters keep the
  model's defaults. `max_completion_tokens` wins over `max_tokens`. `top_k` and `repetition_penalty` are
  accepted as extensions (llama.cpp's server has them too). `response_format` json_object →
  `json_schema = {"type": "object"}`, json_schema → its `schema` (constrained decoding in the engine).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..prompts import IMAGE_PLACEHOLDER, Conversation, get_template
from .errors import APIError, invalid_request
from .settings import ServerSettings

MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**32 - 1

# Parameters accepted and ignored (they change nothing about the answer).
_IGNORED = frozenset({"user", "metadata", "parallel_tool_calls", "service_tier"})
# OpenAI parameters not implemented: only the listed neutral values are accepted.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "store": (None, False),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "audio": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}
_COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
}
_SAMPLING_KEYS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "stop",
        "n",
    }
)
_CHAT_KEYS = _SAMPLING_KEYS | {"messages", "max_completion_tokens", "response_format"}
_COMPLETION_KEYS = _SAMPLING_KEYS | {"prompt"}


@dataclass
class ImageRef:
    url: str
    label: str  # where it sits in the request, e.g. "messages[0].content[1].image_url"


@dataclass
class GenerationRequest:
    kind: str  # "chat" | "completion"
    model: str | None
    prompt: str  # rendered template with one <ImageHere> per image (completions: the raw prompt)
    images: list[ImageRef]
    max_tokens: int | None  # None: the model's default, within the context
    sampling: dict[str, Any] = field(default_factory=dict)  # engine.sampling(**sampling)
    stop: list[str] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    stream: bool = False
    include_usage: bool = False


# ----- JSON ---------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise invalid_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise invalid_request("the request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise invalid_request("the request body is nested too deeply", code="invalid_json") from None
    except ValueError as err:
        raise invalid_request(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid_request("the request body must be a JSON object", code="invalid_json")
    return body


# ----- typed getters --------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise invalid_request(f"{key} must be an integer, got {_type_name(value)}", param=key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise invalid_request(f"{key} must be {bound}, got {value}", param=key)
    return value


def _number(body: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_number(value):
        raise invalid_request(f"{key} must be a number, got {_type_name(value)}", param=key)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise invalid_request(f"{key} must be in {interval}, got {value}", param=key)
    return float(value)


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_request(f"{key} must be a boolean, got {_type_name(value)}", param=key)
    return value


def _check_keys(body: dict[str, Any], known: frozenset[str], neutral: dict[str, tuple[Any, ...]]) -> None:
    for key, value in body.items():
        if key in known or key in _IGNORED:
            continue
        if key in neutral:
            if any(value == ok and type(value) is type(ok) for ok in neutral[key]) or value is None:
                continue
            raise invalid_request(
                f"{key}={json.dumps(value)[:60]} is not supported by this server",
                param=key,
                code="unsupported_parameter",
            )
        raise invalid_request(f"unknown parameter {key!r}", param=key, code="unsupported_parameter")


# ----- shared sampling parameters ------------------------------------------------------------------


def _stop(body: dict[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid_request("stop must be a string or an array of strings", param="stop")
    if len(items) > MAX_STOP_SEQUENCES:
        raise invalid_request(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    if any(not s for s in items):
        raise invalid_request("stop sequences must not be empty", param="stop")
    return items


def _common(
    body: dict[str, Any], settings: ServerSettings, kind: str, max_tokens_keys: tuple[str, ...]
) -> dict[str, Any]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid_request(f"model must be a string, got {_type_name(model)}", param="model")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise invalid_request("n must be 1 (one answer per request)", param="n", code="unsupported_parameter")
    stream = _bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid_request("stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance(options, dict):
            raise invalid_request("stream_options must be an object", param="stream_options")
        unknown = set(options) - {"include_usage", "include_obfuscation"}
        if unknown:
            raise invalid_request(
                f"unknown stream_options key {sorted(unknown)[0]!r}",
                param="stream_options",
                code="unsupported_parameter",
            )
        include_usage = _bool(options, "include_usage")
    max_tokens = None
    for key in max_tokens_keys:  # the first given wins (max_completion_tokens before max_tokens)
        value = _int(body, key, 1, settings.max_tokens)
        if value is not None and max_tokens is None:
            max_tokens = value
    sampling: dict[str, Any] = {}
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        if temperature == 0:
            sampling["greedy"] = True
        else:
            sampling.update(temperature=temperature, do_sample=True)
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        sampling["top_p"] = top_p
    top_k = _int(body, "top_k", 0)
    if top_k is not None:
        sampling["top_k"] = top_k
    penalty = _number(body, "repetition_penalty", 0.0, 10.0, low_open=True)
    if penalty is not None:
        sampling["repetition_penalty"] = penalty
    seed = _int(body, "seed", 0, MAX_SEED)
    if seed is not None:
        sampling["seed"] = seed
    return {
        "kind": kind,
        "model": model,
        "max_tokens": max_tokens,
        "sampling": sampling,
        "stop": _stop(body),
        "stream": stream,
        "include_usage": include_usage,
    }


# ----- chat ----------------------------------------------------------------------------------------


def _checked_text(text: str, param: str) -> str:
    if IMAGE_PLACEHOLDER in text:
        raise invalid_request(f"{param}: the text must not contain {IMAGE_PLACEHOLDER}", param=param)
    return text


def _text_only(content: Any, param: str) -> str:
    """A system or assistant message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return _checked_text(content, param)
    if not isinstance(content, list):
        raise invalid_request(f"{param} must be a string or an array of text parts", param=param)
    texts = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid_request(f"{where} must be a text part {{'type': 'text', 'text': ...}}", param=where)
        texts.append(_checked_text(part["text"], where))
    return "\n".join(texts)


def _user_parts(content: Any, param: str) -> list[tuple[str, Any]]:
    """A user message's content → [("text", str) | ("image", url)], in order."""
    if isinstance(content, str):
        return [("text", _checked_text(content, param))]
    if not isinstance(content, list):
        raise invalid_request(f"{param} must be a string or an array of content parts", param=param)
    parts: list[tuple[str, Any]] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise invalid_request(f"{where} must be an object", param=where)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid_request(f"{where}.text must be a string", param=f"{where}.text")
            parts.append(("text", _checked_text(part["text"], where)))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid_request(
                    f"{where}.image_url must be {{'url': 'data:image/png;base64,...'}}",
                    param=f"{where}.image_url",
                )
            parts.append(("image", ImageRef(url, f"{where}.image_url")))
        else:
            raise invalid_request(
                f"{where}: unsupported content part type {kind!r} (text and image_url are supported)",
                param=f"{where}.type",
                code="unsupported_parameter",
            )
    return parts


def parse_chat_request(
    body: dict[str, Any], prompt_config: Any, settings: ServerSettings
) -> GenerationRequest:
    _check_keys(body, _CHAT_KEYS, _NEUTRAL)
    common = _common(body, settings, "chat", ("max_completion_tokens", "max_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_request("messages must be a non-empty array", param="messages")
    system_texts: list[str] = []
    turns: list[tuple[str, Any, str]] = []  # (role, parsed content, param)
    images: list[ImageRef] = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid_request(f"{param} must be an object", param=param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if turns:
                raise invalid_request(
                    f"{param}: a system message must come before the first user message", param=param
                )
            system_texts.append(_text_only(content, f"{param}.content"))
        elif role == "user":
            parts = _user_parts(content, f"{param}.content")
            if not any(kind == "image" or value.strip() for kind, value in parts):
                raise invalid_request(f"{param}: the user message is empty", param=f"{param}.content")
            images.extend(value for kind, value in parts if kind == "image")
            turns.append(("user", parts, param))
        elif role == "assistant":
            if message.get("tool_calls") or message.get("function_call"):
                raise invalid_request(
                    f"{param}: tool calls are not supported", param=param, code="unsupported_parameter"
                )
            # An empty answer is kept: the template renders it like the original demo does.
            text = _text_only(content, f"{param}.content") if content is not None else ""
            turns.append(("assistant", text, param))
        elif role in ("tool", "function"):
            raise invalid_request(
                f"{param}: {role} messages are not supported",
                param=f"{param}.role",
                code="unsupported_parameter",
            )
        else:
            raise invalid_request(
                f"{param}.role must be system, user or assistant, got {json.dumps(role)[:40]}",
                param=f"{param}.role",
            )
        if len(images) > settings.max_images:
            raise invalid_request(
                f"too many images: at most {settings.max_images} per request",
                param="messages",
                code="too_many_images",
            )
    if not turns or turns[-1][0] != "user":
        raise invalid_request("the last message must be the user's", param="messages")
    system = "\n".join(system_texts) if system_texts else prompt_config.system
    conversation = Conversation(get_template(prompt_config.template, system))
    for role, value, param in turns:
        if role == "assistant":
            if not conversation.messages or conversation.messages[-1][0] != 0:
                raise invalid_request(
                    f"{param}: an assistant message must follow a user message", param=param
                )
            conversation.add_answer(value)
            continue
        pending: list[str] = []
        for kind, item in value:
            if kind == "text":
                pending.append(item)
                continue
            if pending:
                conversation.ask("\n".join(pending))
                pending = []
            conversation.add_image()
        if pending and "\n".join(pending).strip():
            conversation.ask("\n".join(pending))
    return GenerationRequest(
        prompt=conversation.prompt(),
        images=images,
        json_schema=_response_format(body.get("response_format")),
        **common,
    )


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_request("response_format must be an object", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid_request(
                "response_format.json_schema must be an object with a schema",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise invalid_request(
                "response_format.json_schema.schema must be an object",
                param="response_format.json_schema.schema",
            )
        return schema
    raise invalid_request(
        "response_format.type must be text, json_object or json_schema", param="response_format.type"
    )


# ----- completions ---------------------------------------------------------------------------------


def parse_completion_request(body: dict[str, Any], settings: ServerSettings) -> GenerationRequest:
    _check_keys(body, _COMPLETION_KEYS, _COMPLETION_NEUTRAL)
    common = _common(body, settings, "completion", ("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid_request("prompt must be a string (one prompt per request)", param="prompt")
    if not prompt.strip():
        raise invalid_request("prompt is empty", param="prompt")
    return GenerationRequest(prompt=_checked_text(prompt, "prompt"), images=[], **common)


__all__ = [
    "APIError",
    "GenerationRequest",
    "ImageRef",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json_body",
]
