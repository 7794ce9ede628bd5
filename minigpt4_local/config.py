"""Model configuration: dataclasses, presets, JSON round-trip and validation.

Contract:
- `MiniGPT4Config` describes one MiniGPT-4 variant completely: vision encoder, optional Q-Former,
  projection, LLaMA decoder, prompt template and generation defaults. It is pure data (no torch).
- `get_preset(name)` returns a fresh copy of a named preset (`minigpt4-vicuna-7b`,
  `minigpt4-vicuna-13b`, `minigpt4-llama2-7b` and their `tiny-*` test variants).
- `MiniGPT4Config.from_dict` / `load_config` reject unknown keys and inconsistent values with a
  `ConfigError` that names the offending key (e.g. `llm.hidden_size`).
- `save_config` writes the JSON that sits beside the weights in a model directory.
- Generation defaults are the Oct 2023 demo's, except that a config whose `prompt.template` is
  `vicuna_v0_april` gets the April 2023 demo's repetition penalty 1.0 unless it sets one.
Numbers come from docs/numerics.md (§2–13).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .prompts import TEMPLATES

CONFIG_FORMAT = "minigpt4-local/config"
CONFIG_VERSION = 1

# Image normalisation of the original (BLIP-2 / EVA-CLIP statistics), docs/numerics.md §2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Repetition penalty of each release's demo: the Oct 2023 one used 1.05, the April 2023 one 1.0.
DEFAULT_REPETITION_PENALTY = 1.05
TEMPLATE_REPETITION_PENALTY = {"vicuna_v0_april": 1.0}


def default_repetition_penalty(template: str) -> float:
    """The repetition penalty a config with this prompt template gets unless it sets one."""
    return TEMPLATE_REPETITION_PENALTY.get(template, DEFAULT_REPETITION_PENALTY)


@dataclass
class VisionConfig:
    """EVA ViT-g/14 as MiniGPT-4 builds it (39 blocks, no final norm) plus `ln_vision`."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # ln_vision is NOT 1e-6 (docs/numerics.md §4)
    hidden_act: str = "gelu"  # exact erf GELU
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1  # + CLS


@dataclass
class QFormerConfig:
    """BERT-base-shaped Q-Former with cross-attention every 2nd layer (docs/numerics.md §5)."""

    num_query_tokens: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12


@dataclass
class ProjectorConfig:
    """`llama_proj`: Linear(in_features → llm.hidden_size).

    merge_tokens = 1: the Q-Former output feeds the projection (Vicuna variants).
    merge_tokens = 4: no Q-Former; CLS dropped, 4 consecutive ViT tokens concatenated (Llama-2 variant).
    """

    merge_tokens: int = 1


@dataclass
class LLMConfig:
    """LLaMA-architecture decoder (Vicuna v0 / Llama-2-chat / SmolLM2)."""

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32001
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # Token ids as the *tokenizer* defines them (Vicuna v0's HF config says bos 0 / eos 1: wrong).
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass
class PromptConfig:
    """Prompt template, stop rules and context limit (docs/numerics.md §10–12)."""

    template: str = "vicuna_v0"
    # The text before the first turn; None keeps the template's own (the original demo's system message),
    # "" drops it (a model trained without it, like the original stage 2 and the bundled demo).
    system: str | None = None
    # Token-id sequences that end generation (the encodings of `###` in the LLaMA vocab).
    # Empty means: derive them from the tokenizer at load time.
    stop_sequences: list[list[int]] = field(default_factory=lambda: [[835], [2277, 29937]])
    stop_on_eos: bool = True
    max_context: int = 2000


@dataclass
class GenerationDefaults:
    """The original demo's decoding defaults (Oct 2023 release).

    `repetition_penalty` None means "the prompt template's": `MiniGPT4Config` resolves it on
    construction (`default_repetition_penalty`: 1.0 for `vicuna_v0_april`, else 1.05), so a config's
    `generation.repetition_penalty` is always a number.
    """

    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    min_length: int = 1


@dataclass
class MiniGPT4Config:
    name: str = "minigpt4-vicuna-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig | None = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)

    def __post_init__(self) -> None:
        if self.generation.repetition_penalty is None:  # not set: the template's release default
            penalty = default_repetition_penalty(self.prompt.template)
            self.generation = dataclasses.replace(self.generation, repetition_penalty=penalty)

    # ----- derived dimensions -------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        """Image embeddings stitched into the prompt per image (32 or 64 for the real presets)."""
        if self.qformer is not None:
            return self.qformer.num_query_tokens
        return self.vision.num_patches // self.projector.merge_tokens

    @property
    def projector_in_features(self) -> int:
        if self.qformer is not None:
            return self.qformer.hidden_size
        return self.vision.hidden_size * self.projector.merge_tokens

    # ----- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["vision"]["image_mean"] = list(self.vision.image_mean)
        data["vision"]["image_std"] = list(self.vision.image_std)
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniGPT4Config:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        data = dict(data)
        fmt = data.pop("format", CONFIG_FORMAT)
        if fmt != CONFIG_FORMAT:
            raise ConfigError(f"config key 'format' is {fmt!r}, expected {CONFIG_FORMAT!r}")
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigError(f"config key 'version' is {version!r}; this release reads {CONFIG_VERSION}")
        config = _build(cls, data, prefix="")
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent key."""
        v, llm = self.vision, self.llm
        _positive(self, "vision", ["image_size", "patch_size", "hidden_size", "num_layers", "num_heads"])
        _positive(self, "llm", ["hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"])
        if v.image_size % v.patch_size:
            raise ConfigError(
                f"vision.image_size ({v.image_size}) is not a multiple of vision.patch_size ({v.patch_size})"
            )
        if v.hidden_size % v.num_heads:
            raise ConfigError(
                f"vision.num_heads ({v.num_heads}) does not divide vision.hidden_size ({v.hidden_size})"
            )
        if v.hidden_act not in ("gelu",):
            raise ConfigError(f"vision.hidden_act must be 'gelu' (exact GELU), got {v.hidden_act!r}")
        if len(v.image_mean) != 3 or len(v.image_std) != 3 or any(s <= 0 for s in v.image_std):
            raise ConfigError("vision.image_mean/vision.image_std must be 3 numbers (std > 0)")
        if llm.hidden_size % llm.num_heads:
            raise ConfigError(
                f"llm.num_heads ({llm.num_heads}) does not divide llm.hidden_size ({llm.hidden_size})"
            )
        if llm.num_heads % llm.num_kv_heads:
            raise ConfigError(
                f"llm.num_kv_heads ({llm.num_kv_heads}) does not divide llm.num_heads ({llm.num_heads})"
            )
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(llm, key)
            if not 0 <= value < llm.vocab_size:
                raise ConfigError(f"llm.{key} ({value}) is outside the vocabulary (size {llm.vocab_size})")
        q = self.qformer
        merge = self.projector.merge_tokens
        if q is not None:
            _positive(self, "qformer", ["num_query_tokens", "hidden_size", "num_layers", "num_heads"])
            if q.hidden_size % q.num_heads:
                raise ConfigError(
                    f"qformer.num_heads ({q.num_heads}) does not divide qformer.hidden_size ({q.hidden_size})"
                )
            if merge != 1:
                raise ConfigError("projector.merge_tokens must be 1 when a Q-Former is present")
        else:
            if merge < 1 or v.num_patches % merge:
                raise ConfigError(
                    f"projector.merge_tokens ({merge}) must divide the {v.num_patches} ViT patches"
                )
        if self.prompt.template not in TEMPLATES:
            raise ConfigError(
                f"prompt.template {self.prompt.template!r} is not one of {', '.join(TEMPLATES)}"
            )
        for seq in self.prompt.stop_sequences:
            if not seq or any((not isinstance(t, int)) or t < 0 or t >= llm.vocab_size for t in seq):
                raise ConfigError(f"prompt.stop_sequences entry {seq!r} is empty or outside the vocabulary")
        if self.prompt.system is not None and not isinstance(self.prompt.system, str):
            raise ConfigError("prompt.system must be a string or null")
        if self.prompt.max_context <= 0:
            raise ConfigError("prompt.max_context must be positive")
        g = self.generation
        if g.max_new_tokens <= 0 or g.max_new_tokens >= self.prompt.max_context:
            raise ConfigError(
                f"generation.max_new_tokens ({g.max_new_tokens}) must be in 1..prompt.max_context-1"
            )
        if g.num_beams < 1:
            raise ConfigError("generation.num_beams must be >= 1")

    def copy(self) -> MiniGPT4Config:
        return copy.deepcopy(self)


def _positive(config: MiniGPT4Config, section: str, keys: list[str]) -> None:
    part = getattr(config, section)
    for key in keys:
        value = getattr(part, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")


_NESTED = {
    "vision": VisionConfig,
    "qformer": QFormerConfig,
    "projector": ProjectorConfig,
    "llm": LLMConfig,
    "prompt": PromptConfig,
    "generation": GenerationDefaults,
}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Construct dataclass `cls` from `data`, rejecting unknown keys and wrong types by full key path."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {path!r}")
        if cls is MiniGPT4Config and key in _NESTED:
            if value is None and key == "qformer":
                kwargs[key] = None
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} must be an object")
            kwargs[key] = _build(_NESTED[key], value, prefix=f"{path}.")
            continue
        default: Any = known[key].default
        if cls is GenerationDefaults and key == "repetition_penalty":
            default = DEFAULT_REPETITION_PENALTY  # a number, or null for the template's default
            if value is None:
                kwargs[key] = None
                continue
        factory = known[key].default_factory
        if default is dataclasses.MISSING and callable(factory):
            default = factory()
        kwargs[key] = _coerce(path, value, default)
    return cls(**kwargs)


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default; ints are accepted for floats."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {path!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {path!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key {path!r} must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) for x in value):
            raise ConfigError(f"config key {path!r} must be a list of numbers, got {value!r}")
        return tuple(float(x) for x in value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(s, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in s)
            for s in value
        ):
            raise ConfigError(f"config key {path!r} must be a list of integer lists, got {value!r}")
        return [list(s) for s in value]
    return value


# ----- presets ------------------------------------------------------------------------------

LLAMA_STOPS = [[835], [2277, 29937]]


def _vicuna_7b() -> MiniGPT4Config:
    return MiniGPT4Config(name="minigpt4-vicuna-7b")


def _vicuna_13b() -> MiniGPT4Config:
    return MiniGPT4Config(
        name="minigpt4-vicuna-13b",
        llm=LLMConfig(
            hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824
        ),
    )


def _llama2_7b() -> MiniGPT4Config:
    return MiniGPT4Config(
        name="minigpt4-llama2-7b",
        qformer=None,
        projector=ProjectorConfig(merge_tokens=4),
        llm=LLMConfig(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096),
        prompt=PromptConfig(template="llama2"),
    )


def _tiny_vision() -> VisionConfig:
    # 56 px / 14 = 4×4 grid: 16 patches, divisible by 4 for the concat-4 variant.
    return VisionConfig(
        image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )


def _tiny_llm(vocab_size: int) -> LLMConfig:
    return LLMConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=512,
    )


TINY_VOCAB = 1000  # the tests' on-the-fly sentencepiece tokenizer has exactly this many pieces


def _tiny(name: str, template: str, qformer: bool, vocab_extra: int) -> MiniGPT4Config:
    return MiniGPT4Config(
        name=name,
        vision=_tiny_vision(),
        qformer=QFormerConfig(
            num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
        )
        if qformer
        else None,
        projector=ProjectorConfig(merge_tokens=1 if qformer else 4),
        llm=_tiny_llm(TINY_VOCAB + vocab_extra),
        # Tiny tokenizers have their own ids for `###`: derived at load time.
        prompt=PromptConfig(template=template, stop_sequences=[], max_context=400),
        generation=GenerationDefaults(max_new_tokens=20),
    )


PRESETS = {
    "minigpt4-vicuna-7b": _vicuna_7b,
    "minigpt4-vicuna-13b": _vicuna_13b,
    "minigpt4-llama2-7b": _llama2_7b,
    # Vicuna v0 has one extra (pad) row: vocab = tokenizer + 1, mirrored by the tiny variants.
    "tiny-vicuna-7b": lambda: _tiny("tiny-vicuna-7b", "vicuna_v0", qformer=True, vocab_extra=1),
    "tiny-vicuna-13b": lambda: _tiny("tiny-vicuna-13b", "vicuna_v0", qformer=True, vocab_extra=1),
    "tiny-llama2-7b": lambda: _tiny("tiny-llama2-7b", "llama2", qformer=False, vocab_extra=0),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> MiniGPT4Config:
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    config = factory()
    config.validate()
    return config


def load_config(path: str | Path) -> MiniGPT4Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
    return MiniGPT4Config.from_dict(data)


def save_config(config: MiniGPT4Config, path: str | Path) -> None:
    config.validate()
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
