"""What a MiniGPT4Config implies about the weights, and what the weights say about the config.

Contract:
- `expected_shapes(cfg, with_llm=False)` = `{key: shape}` of `MiniGPT4(cfg)`'s state dict, built on
  the meta device (no memory, no init cost even for 13B).
- `check_state(state, expected, source)` raises `CheckpointError` naming the first missing key,
  unexpected key, or wrong shape (expected vs found).
- `vision_dims(state)` reads from our-naming tensors the dimensions the weights determine:
  vision width/depth/patch/image size (from the pos-embed)/FFN, Q-Former width/depth/queries/FFN/
  cross-attention layers, projection in/out. Each entry is `key: (value, tensor it was read from)`.
- `config_dims(cfg)` gives the same keys from a config; `mismatches(found, cfg)` compares them
  (`vision.num_layers` may be larger in the weights: extra EVA blocks are unused).
- `merge_dims(*parts)` unions dims from several sources (projection out vs LLM hidden must agree).
- `choose_config(found, cfg, label)` returns the config to use: `cfg` if the weights agree (else
  `CheckpointError` "llm.hidden_size: weights say 5120 (...), preset X says 4096 — use --preset Y"),
  or, with `cfg=None`, the first preset (in `config.PRESETS` order) whose dimensions all match.
The LLM's rms_norm_eps / rope_theta are not compared: `model_dir.convert` takes them from the LLM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .hf_llama import LLM_DIM_KEYS
from .names import count_layers, layer_index

if TYPE_CHECKING:
    import torch

    from ..config import MiniGPT4Config

Dims = dict[str, tuple[Any, str]]

VISION_LAYERS = "vision_model.encoder.layers."
QFORMER_LAYERS = "qformer.encoder.layer."
# Keys where the weights may have MORE than the config uses (EVA-CLIP-g: 40 blocks, 39 built).
AT_LEAST = frozenset({"vision.num_layers"})


def expected_shapes(cfg: MiniGPT4Config, with_llm: bool = False) -> dict[str, tuple[int, ...]]:
    import torch

    from ..model import MiniGPT4

    with torch.device("meta"):
        model = MiniGPT4(cfg, with_llm=with_llm)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state(
    state: Mapping[str, torch.Tensor | tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    source: str,
    allow_missing: frozenset[str] = frozenset(),
) -> None:
    missing = [k for k in expected if k not in state and k not in allow_missing]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing {missing[0]}{more}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected {unexpected[0]}{more}")
    for key, want in expected.items():
        if key not in state:
            continue
        value = state[key]
        got = tuple(value) if isinstance(value, tuple) else tuple(value.shape)
        if got != tuple(want):
            raise CheckpointError(f"{source}: {key} has shape {got}, expected {tuple(want)}")


def _cross_layers(keys: list[str]) -> tuple[int, ...]:
    layers = {layer_index(k, QFORMER_LAYERS) for k in keys if ".crossattention." in k}
    return tuple(sorted(i for i in layers if i is not None))


def vision_dims(state: Mapping[str, torch.Tensor]) -> Dims:
    """Dimensions fixed by our-naming vision/Q-Former/projection tensors present in `state`."""
    dims: Dims = {}
    pos = state.get("vision_model.embeddings.position_embedding")
    patch = state.get("vision_model.embeddings.patch_embedding.weight")
    if pos is not None and patch is not None:
        grid = round((pos.shape[1] - 1) ** 0.5)
        src_pos = "vision_model.embeddings.position_embedding (EVA pos_embed)"
        dims["vision.hidden_size"] = (pos.shape[-1], src_pos)
        dims["vision.patch_size"] = (patch.shape[-1], "vision_model.embeddings.patch_embedding.weight")
        dims["vision.image_size"] = (grid * patch.shape[-1], src_pos)
        dims["vision.num_layers"] = (count_layers(state, VISION_LAYERS), "vision_model.encoder.layers.*")
        fc1 = state.get(f"{VISION_LAYERS}0.mlp.fc1.weight")
        if fc1 is not None:
            dims["vision.intermediate_size"] = (fc1.shape[0], f"{VISION_LAYERS}0.mlp.fc1.weight")
    query = state.get("query_tokens")
    if query is not None:
        dims["qformer.num_query_tokens"] = (query.shape[1], "query_tokens")
        dims["qformer.hidden_size"] = (query.shape[-1], "query_tokens")
        dims["qformer.num_layers"] = (count_layers(state, QFORMER_LAYERS), "qformer.encoder.layer.*")
        ffn = state.get(f"{QFORMER_LAYERS}0.intermediate_query.dense.weight")
        if ffn is not None:
            dims["qformer.intermediate_size"] = (
                ffn.shape[0],
                f"{QFORMER_LAYERS}0.intermediate_query.dense.weight",
            )
        dims["qformer.cross_attention_layers"] = (_cross_layers(list(state)), "qformer.*.crossattention.*")
    proj = state.get("llama_proj.weight")
    if proj is not None:
        dims["projector.in_features"] = (proj.shape[1], "llama_proj.weight")
        dims["llm.hidden_size"] = (proj.shape[0], "llama_proj.weight")
    return dims


def config_dims(cfg: MiniGPT4Config) -> dict[str, Any]:
    v, q, llm = cfg.vision, cfg.qformer, cfg.llm
    dims: dict[str, Any] = {
        "vision.hidden_size": v.hidden_size,
        "vision.patch_size": v.patch_size,
        "vision.image_size": v.image_size,
        "vision.num_layers": v.num_layers,
        "vision.intermediate_size": v.intermediate_size,
        "projector.in_features": cfg.projector_in_features,
    }
    if q is not None:
        dims.update(
            {
                "qformer.num_query_tokens": q.num_query_tokens,
                "qformer.hidden_size": q.hidden_size,
                "qformer.num_layers": q.num_layers,
                "qformer.intermediate_size": q.intermediate_size,
                "qformer.cross_attention_layers": tuple(range(0, q.num_layers, q.cross_attention_frequency)),
            }
        )
    for key in LLM_DIM_KEYS:
        dims[f"llm.{key}"] = getattr(llm, key)
    return dims


def _agrees(key: str, found: Any, want: Any) -> bool:
    if key in AT_LEAST:
        return found >= want
    if isinstance(want, float):
        return abs(float(found) - want) <= 1e-9 * max(1.0, abs(want))
    return found == want


def mismatches(found: Dims, cfg: MiniGPT4Config) -> list[tuple[str, Any, str, Any]]:
    """[(key, value in weights, where read, value in config)] for every disagreement."""
    want = config_dims(cfg)
    return [(k, v, src, want[k]) for k, (v, src) in found.items() if k in want and not _agrees(k, v, want[k])]


def matching_presets(found: Dims) -> list[str]:
    from ..config import get_preset, preset_names

    return [name for name in preset_names() if not mismatches(found, get_preset(name))]


def merge_dims(*parts: Dims) -> Dims:
    """Union of dims from several sources; two sources disagreeing on one key is an error."""
    out: Dims = {}
    for part in parts:
        for key, (value, src) in part.items():
            if key in out and out[key][0] != value:
                raise CheckpointError(f"{key}: {out[key][1]} says {out[key][0]} but {src} says {value}")
            out.setdefault(key, (value, src))
    return out


def choose_config(found: Dims, cfg: MiniGPT4Config | None, label: str | None) -> MiniGPT4Config:
    """The config to convert with (see module docstring). `label` names cfg in messages."""
    from ..config import get_preset

    fits = matching_presets(found)
    if cfg is None:
        if not fits:
            summary = ", ".join(f"{k} {v}" for k, (v, _) in found.items() if k.endswith("hidden_size"))
            raise CheckpointError(
                f"no preset matches these weights ({summary}); write a config and pass --config"
            )
        return get_preset(fits[0])
    bad = mismatches(found, cfg)
    if bad:
        key, value, src, want = bad[0]
        hint = f" — use --preset {fits[0]}" if fits else ""
        said = (
            f"{src} says {value}"
            if src.endswith(".json") or "tokenizer" in src
            else f"weights say {value} ({src})"
        )
        raise CheckpointError(f"{key}: {said}, {label} says {want}{hint}")
    return cfg
