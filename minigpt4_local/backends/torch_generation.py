"""Text generation on the PyTorch decoder from stitched input embeddings.

Contract: `generate_from_embeds(llm, inputs_embeds (1, T, H), options, stop, on_token=None) -> list[int]`
returns the generated token ids with a trailing stop sequence / EOS removed. It drives transformers'
`generate` exactly the way the original demo does (inputs_embeds only, its sampling knobs, beam search,
a stopping criterion on the `###` encodings) with two fixes: EOS comes from the tokenizer (Vicuna v0's
HF config says 1), and `seed` makes sampling reproducible. `on_token(id)` streams each new token
(greedy/sampling only; beam search cannot stream because beams are rewritten until the end).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..prompts import StopChecker
from ..sampling import SamplingOptions


class _StopOnSequences(StoppingCriteria):
    """True for a row whose generated ids end with one of the stop sequences (or EOS)."""

    def __init__(self, stop: StopChecker) -> None:
        self.stop = stop

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object
    ) -> torch.BoolTensor:
        done = [self.stop.is_stop(row.tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class _TokenCallbackStreamer(BaseStreamer):
    """Forwards each generated token id to a callback (HF calls `put` with the prompt first: skipped)."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self.on_token = on_token
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True  # with inputs_embeds only, the first put is the (empty) prompt
            if value.numel() == 0 or value.ndim > 1:
                return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_from_embeds(
    llm: torch.nn.Module,
    inputs_embeds: torch.Tensor,
    options: SamplingOptions,
    stop: StopChecker,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    options.validate()
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be (1, T, H), got {tuple(inputs_embeds.shape)}")
    if options.seed is not None:
        torch.manual_seed(options.seed)
    eos = stop.eos_id if stop.stop_on_eos else None
    streamer = _TokenCallbackStreamer(on_token) if on_token is not None and options.num_beams == 1 else None
    attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    sampling = {"temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k}
    with warnings.catch_warnings():
        # With inputs_embeds only, the penalty applies to generated tokens alone: the original's behaviour too.
        warnings.filterwarnings("ignore", message=".*repetition_penalty.*inputs_embeds.*")
        out = llm.generate(  # type: ignore[operator]
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=options.max_new_tokens,
            do_sample=options.do_sample,
            num_beams=options.num_beams,
            length_penalty=options.length_penalty,
            min_length=options.min_length,
            repetition_penalty=options.repetition_penalty,
            stopping_criteria=StoppingCriteriaList([_StopOnSequences(stop)]),
            eos_token_id=eos,
            pad_token_id=stop.eos_id,
            streamer=streamer,
            **(sampling if options.do_sample else {}),
        )
    return stop.strip(out[0].tolist())
