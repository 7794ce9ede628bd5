"""Backend-agnostic describe/chat logic (torch-free).

Contract: a `Pipeline` joins a vision encoder (images → list of (n_img, hidden) arrays), a decoder
(stitch plan + image embeddings → generated ids) and a tokenizer, following the original demo:
conversation template → `<ImageHere>` split → per-segment tokenization (BOS on the first segment) →
left truncation to `max_context - max_new_tokens` → generation with the `###`/EOS stop rules →
decode → post-processing. `ChatSession` keeps the conversation and the images' embeddings across
turns; a decoder that keeps a KV cache (llama.cpp) reuses it for the unchanged prefix.
Any backend fits by implementing the two small protocols below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import MiniGPT4Config
from .errors import PromptError
from .prompts import StopChecker, new_conversation, postprocess
from .sampling import SamplingOptions
from .stitching import StitchPlan, plan_prompt
from .streaming import TextStream


class VisionEncoder(Protocol):
    name: str

    def encode_images(self, images: Sequence[Any]) -> Any:
        """PIL images → one (n_img, hidden) array per image (a list, or one (B, n_img, hidden) array;
        numpy or torch)."""


class Decoder(Protocol):
    name: str

    def generate(
        self,
        plan: StitchPlan,
        image_embeds: Sequence[Any],
        options: SamplingOptions,
        stop: StopChecker,
        on_token: Callable[[int], None] | None,
    ) -> list[int]:
        """Prefill the stitched sequence, decode, return generated ids without the stop sequence."""


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (EOS / stop sequence) | "length" | "cancelled"


class Pipeline:
    def __init__(
        self,
        config: MiniGPT4Config,
        tokenizer: Any,
        vision: VisionEncoder,
        decoder: Decoder,
        stop_sequences: list[list[int]],
        name: str = "",
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vision = vision
        self.decoder = decoder
        self.stop = StopChecker(stop_sequences, tokenizer.eos_id, config.prompt.stop_on_eos)
        self.name = name or config.name

    def sampling(self, greedy: bool = False, **overrides: object) -> SamplingOptions:
        return SamplingOptions.from_defaults(self.config.generation, greedy=greedy, **overrides)

    def session(self) -> ChatSession:
        return ChatSession(self)

    def describe(
        self,
        image: Any,
        question: str,
        options: SamplingOptions,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        chat = self.session()
        chat.add_image(image)
        return chat.ask(question, options, on_text)


class ChatSession:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.conversation = new_conversation(pipeline.config.prompt)
        self.image_embeds: list[Any] = []
        self.encode_seconds = 0.0

    def add_image(self, image: Any) -> None:
        start = time.perf_counter()
        (embeds,) = self.pipeline.vision.encode_images([image])
        self.encode_seconds += time.perf_counter() - start
        self.image_embeds.append(embeds)
        self.conversation.add_image()

    def add_image_embeds(self, embeds: Any) -> None:
        self.image_embeds.append(embeds)
        self.conversation.add_image()

    def reset(self) -> None:
        self.conversation.reset()
        self.image_embeds = []
        self.encode_seconds = 0.0

    def ask(
        self,
        question: str,
        options: SamplingOptions,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        p = self.pipeline
        if not question.strip():
            raise PromptError("the question is empty")
        self.conversation.ask(question)
        plan = plan_prompt(self.conversation.prompt(), p.tokenizer, p.config, options.max_new_tokens)
        stream = TextStream(p.tokenizer.decode) if on_text is not None else None
        on_token = _text_forwarder(stream, on_text) if stream is not None and on_text is not None else None
        start = time.perf_counter()
        ids = p.decoder.generate(plan, self.image_embeds, options, p.stop, on_token)
        elapsed = time.perf_counter() - start
        if stream is not None and on_text is not None:
            tail = stream.finish()
            if tail:
                on_text(tail)
        text = postprocess(p.tokenizer.decode(ids))
        self.conversation.add_answer(text)
        timings = {
            "encode_s": round(self.encode_seconds, 4),
            "generate_s": round(elapsed, 4),
            "new_tokens": len(ids),
            "tokens_per_s": round(len(ids) / elapsed, 2) if elapsed > 0 else 0.0,
        }
        self.encode_seconds = 0.0
        return Answer(text=text, token_ids=ids, timings=timings, prompt_tokens=plan.total_length)


def _text_forwarder(stream: TextStream, on_text: Callable[[str], None]) -> Callable[[int], None]:
    """Token ids → the text they complete (streaming rules of `TextStream`) → `on_text`."""

    def on_token(token_id: int) -> None:
        chunk = stream.push(token_id)
        if chunk:
            on_text(chunk)

    return on_token
