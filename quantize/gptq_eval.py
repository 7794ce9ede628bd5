"""Quality of a GPTQ decoder against its full-precision reference (torch, any device).

The definitions are those of the GGUF tools (`gguf_eval`), so the two formats' numbers compare:
- Perplexity = exp(mean NLL) over the same evaluation windows (`gguf_eval.eval_windows`: BOS first
  when the tokenizer has one, every other token scored), plus optional stitched samples (image rows
  are inputs only; every text position after the first is scored).
- Greedy agreement (`gguf_eval.agreement`): both models decode `n_new` greedy tokens (no stop rule,
  no repetition penalty) after the same stitched prompt; rate = equal positions / n_new, prefix =
  identical leading tokens. `teacher_forced` adds a steadier number: the candidate is fed the
  reference continuation and its argmax compared at every position (one forward pass).

Contract:
- `window_nll(model, window)`, `stitched_nll(model, embeds, targets)` → (sum of NLL, count).
- `perplexity(model, windows, stitched=()) -> gguf_eval.Perplexity`.
- `greedy(model, embeds, n_new) -> list[int]`; `teacher_forced(model, embeds, reference) -> float`.
- `ReferenceRun` holds what the full-precision model produced (ppl, continuations) so that the
  model can be quantized in place afterwards; `compare(model, reference, windows, stitched, prompts)`
  evaluates the quantized model on the same inputs and returns a `Quality`.
`model` is an HF causal LM (plain or with GPTQ layers); embeddings may live anywhere, they are moved
to the model's device and dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gguf_eval import Agreement, Perplexity, agreement, nll_of_window

__all__ = [
    "Quality",
    "ReferenceRun",
    "StitchedText",
    "compare",
    "greedy",
    "perplexity",
    "reference_run",
    "stitched_nll",
    "teacher_forced",
    "window_nll",
]


@dataclass
class StitchedText:
    """A stitched sequence with its text targets: embeds (T, hidden), targets[t] = token id or None."""

    embeds: Any
    targets: list[int | None]


def _device_dtype(model: Any) -> tuple[Any, Any]:
    table = model.get_input_embeddings().weight
    return table.device, table.dtype


def _to_model(model: Any, embeds: Any) -> Any:
    import torch

    device, dtype = _device_dtype(model)
    x = embeds if isinstance(embeds, torch.Tensor) else torch.as_tensor(np.asarray(embeds))
    return x.to(device=device, dtype=dtype)


def window_nll(model: Any, window: Sequence[int]) -> tuple[float, int]:
    """NLL of a token window (every token after the first), via input ids."""
    import torch

    device, _ = _device_dtype(model)
    with torch.inference_mode():
        logits = model(torch.tensor([list(window)], device=device)).logits[0]  # (len, vocab)
    return nll_of_window(logits.float().cpu().numpy(), window)


def stitched_nll(model: Any, embeds: Any, targets: Sequence[int | None]) -> tuple[float, int]:
    """NLL of the text targets of a stitched sequence (positions t >= 1 whose target is a token)."""
    import torch

    x = _to_model(model, embeds)[None]  # (1, T, hidden)
    with torch.inference_mode():
        logp = torch.log_softmax(model(inputs_embeds=x).logits[0].float(), dim=-1).cpu()  # (T, vocab)
    picked = [(t - 1, tok) for t, tok in enumerate(targets) if t >= 1 and tok is not None]
    if not picked:
        return 0.0, 0
    rows = torch.tensor([r for r, _ in picked])
    cols = torch.tensor([c for _, c in picked])
    return float(-logp[rows, cols].double().sum()), len(picked)


def perplexity(
    model: Any, windows: Sequence[Sequence[int]], stitched: Sequence[StitchedText] = (), window: int = 0
) -> Perplexity:
    """Perplexity over token windows and stitched samples together."""
    nlls = [window_nll(model, w) for w in windows]
    nlls += [stitched_nll(model, s.embeds, s.targets) for s in stitched]
    total = sum(n for n, _ in nlls)
    count = sum(c for _, c in nlls)
    if count == 0:
        raise ValueError("nothing to score: the evaluation set is empty")
    mean = total / count
    size = window or max((len(w) for w in windows), default=0)
    return Perplexity(ppl=math.exp(mean), mean_nll=mean, n_scored=count, n_windows=len(nlls), window=size)


def greedy(model: Any, embeds: Any, n_new: int) -> list[int]:
    """n_new greedy tokens after (T, hidden) stitched embeddings (no stop rule, no penalty)."""
    import torch

    x = _to_model(model, embeds)[None]
    with torch.inference_mode():
        out = model.generate(
            inputs_embeds=x,
            attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [int(t) for t in out[0].tolist()]


def teacher_forced(model: Any, embeds: Any, reference: Sequence[int]) -> float:
    """Share of positions where the model's argmax equals the reference continuation, fed that continuation."""
    import torch

    if not reference:
        return 1.0
    x = _to_model(model, embeds)  # (T, hidden)
    with torch.inference_mode():
        ref = torch.tensor(list(reference)[:-1], dtype=torch.long, device=x.device)
        fed = torch.cat([x, model.get_input_embeddings()(ref).to(x.dtype)], dim=0)[None]  # (1, T+n-1, hidden)
        logits = model(inputs_embeds=fed).logits[
            0, x.shape[0] - 1 :
        ]  # (n, vocab): predictions of each ref token
        hits = (logits.argmax(-1).cpu() == torch.tensor(list(reference))).float()
    return float(hits.mean())


@dataclass
class ReferenceRun:
    """What the full-precision model produced on the evaluation inputs."""

    ppl: Perplexity | None
    continuations: list[list[int]] = field(default_factory=list)


def reference_run(
    model: Any,
    windows: Sequence[Sequence[int]],
    stitched: Sequence[StitchedText],
    prompts: Sequence[Any],
    n_new: int,
    window: int = 0,
) -> ReferenceRun:
    ppl = perplexity(model, windows, stitched, window) if (windows or stitched) else None
    return ReferenceRun(ppl, [greedy(model, p, n_new) for p in prompts])


@dataclass
class Quality:
    reference_ppl: Perplexity | None
    gptq_ppl: Perplexity | None
    agreements: list[Agreement]
    teacher_forced: list[float]
    ppl_on: str = ""
    prompts_on: str = ""

    @property
    def ppl_ratio(self) -> float | None:
        if self.reference_ppl is None or self.gptq_ppl is None:
            return None
        return self.gptq_ppl.ppl / self.reference_ppl.ppl

    @property
    def agreement_rate(self) -> float | None:
        return sum(a.rate for a in self.agreements) / len(self.agreements) if self.agreements else None

    @property
    def teacher_forced_rate(self) -> float | None:
        return sum(self.teacher_forced) / len(self.teacher_forced) if self.teacher_forced else None

    def to_dict(self) -> dict[str, Any]:
        def rounded(x: float | None, digits: int = 4) -> float | None:
            return None if x is None else round(x, digits)

        return {
            "perplexity": {
                "reference": rounded(self.reference_ppl.ppl if self.reference_ppl else None),
                "gptq": rounded(self.gptq_ppl.ppl if self.gptq_ppl else None),
                "ratio": rounded(self.ppl_ratio),
                "scored_tokens": self.gptq_ppl.n_scored if self.gptq_ppl else 0,
                "on": self.ppl_on,
            },
            "agreement": {
                "greedy_rate": rounded(self.agreement_rate),
                "greedy_prefix_mean": rounded(
                    sum(a.prefix for a in self.agreements) / len(self.agreements)
                    if self.agreements
                    else None,
                    2,
                ),
                "teacher_forced_rate": rounded(self.teacher_forced_rate),
                "new_tokens": self.agreements[0].n if self.agreements else 0,
                "prompts": len(self.agreements),
                "on": self.prompts_on,
            },
        }

    def summary(self) -> str:
        parts = []
        if self.reference_ppl and self.gptq_ppl:
            parts.append(
                f"perplexity {self.reference_ppl.ppl:.3f} (reference) -> {self.gptq_ppl.ppl:.3f} (gptq), "
                f"x{self.ppl_ratio:.3f} on {self.gptq_ppl.n_scored} tokens"
            )
        if self.agreements:
            parts.append(
                f"greedy agreement {self.agreement_rate:.1%} (teacher-forced {self.teacher_forced_rate:.1%}) "
                f"on {len(self.agreements)} stitched image prompt(s)"
            )
        return "; ".join(parts) or "no quality numbers (empty evaluation set)"


def compare(
    model: Any,
    reference: ReferenceRun,
    windows: Sequence[Sequence[int]],
    stitched: Sequence[StitchedText],
    prompts: Sequence[Any],
    window: int = 0,
) -> Quality:
    """Evaluate `model` (the quantized one) on the inputs `reference` was computed on."""
    ppl = perplexity(model, windows, stitched, window) if reference.ppl is not None else None
    n_new = len(reference.continuations[0]) if reference.continuations else 0
    agreements, forced = [], []
    for prompt, want in zip(prompts, reference.continuations, strict=True):
        agreements.append(agreement(want, greedy(model, prompt, n_new)))
        forced.append(teacher_forced(model, prompt, want))
    return Quality(reference.ppl, ppl, agreements, forced)
