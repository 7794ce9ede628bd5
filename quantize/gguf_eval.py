"""Quality numbers for a GGUF decoder: perplexity vs a reference, greedy agreement with the torch model.

Contract:
- `eval_windows(ids, window, bos_id)` cuts a token stream into consecutive windows; each window is
  evaluated from an empty cache, starts with BOS when `bos_id` is given, and scores every token it
  predicts (all content tokens with BOS, all but the first without). The same windows feed llama.cpp
  and torch, so the two perplexities are on identical token ids.
- `gguf_perplexity(gguf_path, ids, window=512, ...)` runs llama.cpp (logits for every position);
  `torch_perplexity(llm, ids, window, bos_id)` runs an HF `LlamaForCausalLM` (or a path to one; needs
  the torch extra). Both return a `Perplexity` (ppl = exp(mean NLL), counts).
- `tokenize_for_eval(gguf_path, text)` tokenizes with the GGUF's own vocabulary (no BOS).
- `agreement(reference, candidate)`: position-wise equality rate over the reference length and the
  length of the identical prefix; `top1_agreement(ref_logits, cand_logits)`: teacher-forced argmax
  agreement on one input. `llamacpp_greedy(decoder, parts, n)` / `torch_greedy(llm, embeds, n)`
  produce n greedy tokens (no stop rule) after a stitched prefill (token ids and embedding rows).
- `stitched_prompt_agreement(model_dir, gguf_path, n_new, questions)` builds real MiniGPT-4 prompts
  (the model dir's template and tokenizer, image embeddings from its vision encoder on synthetic
  images) and compares greedy tokens of llama.cpp on the GGUF with the torch model (torch extra).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4_local.errors import PromptError

DEFAULT_QUESTIONS = ("Describe this image in detail.", "What is in the picture?")


@dataclass
class Perplexity:
    ppl: float
    mean_nll: float
    n_scored: int
    n_windows: int
    window: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Agreement:
    rate: float  # equal positions / reference length
    prefix: int  # identical leading tokens
    n: int  # reference length

    def to_dict(self) -> dict[str, Any]:
        return {"rate": round(self.rate, 4), "prefix": self.prefix, "n": self.n}


def eval_windows(ids: Sequence[int], window: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive evaluation windows of at most `window` positions (BOS included when given)."""
    if window < 2:
        raise PromptError("the perplexity window must hold at least 2 tokens")
    step = window - 1 if bos_id is not None else window
    head = [bos_id] if bos_id is not None else []
    out = [head + list(ids[i : i + step]) for i in range(0, len(ids), step)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise PromptError("the evaluation text is too short (needs at least 2 tokens)")
    return out


def nll_of_window(logits: np.ndarray, window: Sequence[int]) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) over t = 1..len-1; logits is (len, n_vocab)."""
    x = logits[:-1].astype(np.float64)
    targets = np.asarray(window[1:])
    peak = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - peak).sum(axis=1)) + peak[:, 0]
    return float((log_z - x[np.arange(len(targets)), targets]).sum()), len(targets)


def _perplexity(nlls: list[tuple[float, int]], window: int) -> Perplexity:
    total = sum(n for n, _ in nlls)
    count = sum(c for _, c in nlls)
    mean = total / count
    return Perplexity(ppl=math.exp(mean), mean_nll=mean, n_scored=count, n_windows=len(nlls), window=window)


def tokenize_for_eval(gguf_path: str | Path, text: str) -> list[int]:
    from minigpt4_local.backends.llamacpp import LlamaCppDecoder

    with LlamaCppDecoder(gguf_path, n_ctx=64, n_batch=32) as dec:
        return dec.tokenize(text, add_bos=False, special=False)


def gguf_perplexity(
    gguf_path: str | Path,
    ids: Sequence[int],
    window: int = 512,
    bos_id: int | None = None,
    n_threads: int | None = None,
    n_gpu_layers: int = -1,
    **decoder_options: Any,
) -> Perplexity:
    """Perplexity of `ids` under the GGUF model, window by window (llama.cpp).

    `decoder_options` go to `LlamaCppDecoder` (e.g. kv_type="f32", flash_attn=False for fp32 parity).
    """
    from minigpt4_local.backends.llamacpp import LlamaCppDecoder

    windows = eval_windows(ids, window, bos_id)
    nlls = []
    with LlamaCppDecoder(
        gguf_path,
        n_ctx=window,
        n_batch=min(window, 512),
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        **decoder_options,
    ) as dec:
        for w in windows:
            dec.reset()
            logits = dec.prefill([w], all_logits=True)  # (len(w), n_vocab)
            nlls.append(nll_of_window(logits, w))
    return _perplexity(nlls, window)


def _load_torch_llm(llm: Any) -> Any:
    if isinstance(llm, (str, Path)):
        import torch
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM.from_pretrained(str(llm), dtype=torch.float32).eval()
    return llm


def torch_perplexity(
    llm: Any, ids: Sequence[int], window: int = 512, bos_id: int | None = None
) -> Perplexity:
    """Perplexity of `ids` under an HF LLaMA model on the same windows as `gguf_perplexity`."""
    import torch

    model = _load_torch_llm(llm)
    nlls = []
    with torch.inference_mode():
        for w in eval_windows(ids, window, bos_id):
            logits = model(torch.tensor([w])).logits[0].float().numpy()
            nlls.append(nll_of_window(logits, w))
    return _perplexity(nlls, window)


def agreement(reference: Sequence[int], candidate: Sequence[int]) -> Agreement:
    n = len(reference)
    equal = [a == b for a, b in zip(reference, candidate, strict=False)]
    prefix = next((i for i, same in enumerate(equal) if not same), len(equal))
    return Agreement(rate=sum(equal) / n if n else 1.0, prefix=prefix, n=n)


def top1_agreement(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Teacher-forced agreement: share of positions whose next-token argmax is the same.

    Both are (T, n_vocab) logits over the same input; unlike free-running greedy decoding, one early
    divergence does not make every later position disagree.
    """
    return float((reference_logits.argmax(axis=-1) == candidate_logits.argmax(axis=-1)).mean())


class _NeverStop:
    def is_stop(self, ids: Sequence[int]) -> bool:
        return False


def llamacpp_greedy(decoder: Any, parts: Sequence[Any], n_new: int) -> list[int]:
    """n greedy tokens after prefilling `parts` from an empty cache (no stop rule, no penalty)."""
    from minigpt4_local.sampling import SamplingOptions

    decoder.reset()
    decoder.prefill(parts)
    options = SamplingOptions(max_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
    return decoder.generate(options, _NeverStop())


def torch_greedy(llm: Any, embeds: Any, n_new: int) -> list[int]:
    """n greedy tokens of an HF LLaMA after the (T, hidden) stitched embeddings (no stop rule).

    A plain KV-cached argmax loop (what `generate(do_sample=False)` does without logits processors),
    without `generate`'s first-call setup cost.
    """
    import torch

    model = _load_torch_llm(llm)
    table = model.get_input_embeddings()
    x = torch.as_tensor(np.asarray(embeds, dtype=np.float32))[None].to(table.weight.dtype)  # (1, T, hidden)
    out_ids: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(n_new):
            out = model(inputs_embeds=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            out_ids.append(token)
            x = table(torch.tensor([[token]]))
    return out_ids


def stitched_prompt_agreement(
    model_dir: str | Path,
    gguf_path: str | Path,
    n_new: int = 32,
    questions: Sequence[str] = DEFAULT_QUESTIONS,
    n_threads: int | None = None,
) -> list[Agreement]:
    """Greedy agreement, llama.cpp on `gguf_path` vs torch, on real stitched MiniGPT-4 prompts."""
    import torch

    from minigpt4_local.backends.llamacpp import LlamaCppDecoder
    from minigpt4_local.checkpoints.model_dir import load_model_dir
    from minigpt4_local.config import load_config
    from minigpt4_local.image import preprocess
    from minigpt4_local.prompts import image_prompt
    from minigpt4_local.stitching import build_plan, plan_segments, stitch
    from minigpt4_local.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    cfg = load_config(model_dir / "config.json")
    tokenizer = load_tokenizer(model_dir / "llm")
    model = load_model_dir(model_dir, with_llm=True).eval()
    images = [_synthetic_image(seed) for seed in range(len(questions))]
    v = cfg.vision
    with torch.inference_mode():
        pixels = torch.from_numpy(preprocess(images, v.image_size, v.image_mean, v.image_std))
        image_embeds = [e.float().numpy() for e in model.encode_image(pixels)]  # each (n_img, hidden)
    results = []
    with LlamaCppDecoder(gguf_path, n_ctx=cfg.prompt.max_context + n_new, n_threads=n_threads) as dec:
        for question, emb in zip(questions, image_embeds, strict=True):
            plan = build_plan(image_prompt(cfg.prompt, question), tokenizer, cfg.num_image_tokens)
            parts = plan_segments(plan, [emb])
            with torch.inference_mode():
                embeds = stitch(
                    plan, lambda ids: model.embed_tokens(torch.tensor(ids)).float().numpy(), [emb]
                )
            reference = torch_greedy(model.llm, embeds, n_new)
            results.append(agreement(reference, llamacpp_greedy(dec, parts, n_new)))
    return results


def _synthetic_image(seed: int) -> Any:
    """A deterministic smooth-gradient RGB image (no data set is needed for an agreement check)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224]
    base = np.stack([xx * 255 / 223, yy * 255 / 223, (xx + yy + 60 * seed) % 256], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, mode="RGB")
