"""Polishers for stage-2 data generation: the paper's fix-up prompt sent to an LLM (docs/numerics.md §15, step 3).

Contract:
- `FIXUP_PROMPT` is the paper's instruction; `fixup_message(paragraph)` is the user message sent
  (instruction, blank line, paragraph).
- `OpenAIPolisher(url, model, api_key=None, timeout=60, retries=3, backoff=1.0, temperature=0.0,
  max_tokens=1024)`: POSTs an OpenAI-compatible `/v1/chat/completions` request with the standard library
  (`urllib`); `url` may be the server root, the `/v1` base or the full endpoint. Connection errors,
  timeouts, HTTP 408/409/429 and 5xx are retried up to `retries` times with exponential back-off; other
  HTTP errors and malformed replies raise `PolishError` at once (one line). Every request has a timeout.
- `LlamaCppPolisher(gguf_path, chat_format="auto", max_tokens=1024, n_ctx=None, n_gpu_layers=-1)`: a local
  GGUF model through our llama.cpp runtime (`LlamaCppDecoder`), greedy decoding; the chat wrapping comes
  from `CHAT_FORMATS` (`auto` reads the GGUF's `tokenizer.chat_template`: ChatML, Llama-2, Llama-3, else
  the Vicuna `###Human:` style).
- Both have `name` and `polish(paragraph) -> str` (stripped text).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Protocol

from minigpt4_local.errors import MiniGPT4Error

FIXUP_PROMPT = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not English "
    "sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return directly the "
    "results without explanation. Return directly the input paragraph if it is already correct without "
    "explanation."
)
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

# chat format → (prompt wrapper with {prompt}, text that ends the reply)
CHAT_FORMATS: dict[str, tuple[str, str]] = {
    "chatml": ("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "llama2": ("[INST] {prompt} [/INST]", "</s>"),
    "llama3": (
        "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "vicuna": ("###Human: {prompt}###Assistant: ", "###"),
}
# marker in a GGUF chat template → chat format
_TEMPLATE_MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2"))


class PolishError(MiniGPT4Error):
    """The polishing LLM could not be reached or gave an unusable reply."""


class Polisher(Protocol):
    name: str

    def polish(self, paragraph: str) -> str: ...


def fixup_message(paragraph: str) -> str:
    return f"{FIXUP_PROMPT}\n\n{paragraph.strip()}"


def chat_endpoint(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if base.endswith("/v1"):
        return base + "/chat/completions"
    return base + "/v1/chat/completions"


class OpenAIPolisher:
    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int = 1024,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise PolishError(f"--polish-url must be an http(s) URL, got {url!r}")
        self.endpoint = chat_endpoint(url)
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = max(retries, 0)
        self.backoff = backoff
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.name = f"{model} at {self.endpoint}"

    def _request(self, paragraph: str) -> urllib.request.Request:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": fixup_message(paragraph)}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return urllib.request.Request(self.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")

    @staticmethod
    def _content(raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolishError(
                f"the polishing endpoint sent a reply without choices[0].message.content: {raw[:120]!r}"
            ) from None
        if not isinstance(content, str):
            raise PolishError("the polishing endpoint's message content is not text")
        return content.strip()

    def polish(self, paragraph: str) -> str:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self._request(paragraph), timeout=self.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} {exc.reason}"
                if exc.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                problem = str(getattr(exc, "reason", exc)) or type(exc).__name__
        raise PolishError(
            f"polishing request to {self.endpoint} failed after {attempt + 1} attempt(s): {problem}"
        )


def detect_chat_format(metadata: dict[str, Any]) -> str:
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        for marker, name in _TEMPLATE_MARKERS:
            if marker in template:
                return name
    return "vicuna"


class LlamaCppPolisher:
    def __init__(
        self,
        gguf_path: str,
        chat_format: str = "auto",
        max_tokens: int = 1024,
        n_ctx: int | None = None,
        n_gpu_layers: int = -1,
    ) -> None:
        from minigpt4_local.backends.llamacpp import LlamaCppDecoder

        if chat_format != "auto" and chat_format not in CHAT_FORMATS:
            raise PolishError(
                f"unknown chat format {chat_format!r}; choose auto or {', '.join(CHAT_FORMATS)}"
            )
        self.decoder = LlamaCppDecoder(gguf_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
        self.chat_format = detect_chat_format(self.decoder.metadata) if chat_format == "auto" else chat_format
        self.max_tokens = max_tokens
        self.name = f"{gguf_path} (llama.cpp, {self.chat_format})"

    def polish(self, paragraph: str) -> str:
        from minigpt4_local.prompts import StopChecker
        from minigpt4_local.sampling import SamplingOptions

        wrapper, end = CHAT_FORMATS[self.chat_format]
        dec = self.decoder
        ids = dec.tokenize(wrapper.format(prompt=fixup_message(paragraph)), add_bos=True, special=True)
        room = dec.n_ctx - len(ids) - 1
        if room < 16:
            raise PolishError(
                f"the paragraph ({len(ids)} tokens) does not fit the polisher's context ({dec.n_ctx})"
            )
        dec.reset()
        dec.prefill([ids])
        stop = StopChecker([dec.tokenize(end, add_bos=False, special=True)], dec.eos_id, True)
        options = SamplingOptions(
            max_new_tokens=min(self.max_tokens, room),
            do_sample=False,
            repetition_penalty=1.0,
            top_k=0,
            top_p=1.0,
        )
        return dec.detokenize(dec.generate(options, stop)).strip()

    def close(self) -> None:
        self.decoder.close()
