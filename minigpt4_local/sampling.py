"""Decoding options shared by every backend (torch, llama.cpp, GPTQ).

Contract: `SamplingOptions` is plain data (no torch). `from_defaults(cfg.generation, **overrides)`
starts from a model's defaults (the original demo's: sampling, T=1.0, top_p 0.9, top_k 50,
repetition penalty 1.05, 300 new tokens) and applies user overrides; `greedy=True` turns sampling
off. `validate()` raises `ValueError` with the offending option's name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import GenerationDefaults


@dataclass
class SamplingOptions:
    max_new_tokens: int = 300
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.05
    num_beams: int = 1
    length_penalty: float = 1.0
    min_length: int = 1
    seed: int | None = None

    @classmethod
    def from_defaults(
        cls, defaults: GenerationDefaults, greedy: bool = False, **overrides: object
    ) -> SamplingOptions:
        base = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(defaults)
            if hasattr(cls, f.name) and getattr(defaults, f.name) is not None  # None: our own default
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        options = cls(**base)
        if greedy:
            options.do_sample = False
        options.validate()
        return options

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy decoding for a deterministic answer)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 1 <= self.num_beams <= 10:
            raise ValueError("num_beams must be in 1..10")
        if self.min_length < 0:
            raise ValueError("min_length must be >= 0")
