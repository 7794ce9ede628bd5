"""Table-driven renaming of checkpoint keys (the converters' shared engine).

Contract:
- A converter is a table of `Rule(pattern, target)`: `pattern` is a regex matched against the whole
  source key; `target` is a `re` replacement template (`\\1` ...) giving our key, or `IGNORE` for keys
  that are documented as unused. The first matching rule wins.
- `rename(state, rules, source)` returns `{our_key: tensor}`; a key that matches no rule raises
  `CheckpointError` naming the first few such keys (so a wrong file is never silently half-loaded);
  two source keys mapping to one target is a bug in the table and raises too.
- `fuse_qkv_bias(state)` turns the EVA/old-HF pair `...self_attn.q_bias` + `...self_attn.v_bias` into
  `...self_attn.qkv.bias` = cat(q_bias, zeros, v_bias) (the key projection has no bias).
- `layer_index(key, prefix)` / `drop_layers_from(state, prefix, n)` handle "more blocks than used"
  (EVA-CLIP-g has 40 blocks; MiniGPT-4 builds 39).
Pure functions over dicts of tensors: no file I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

IGNORE = None  # target of a rule whose keys are deliberately dropped


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None

    def compiled(self) -> re.Pattern[str]:
        return _compile(self.pattern)


_CACHE: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    if pattern not in _CACHE:
        _CACHE[pattern] = re.compile(pattern)
    return _CACHE[pattern]


def map_key(key: str, rules: Iterable[Rule]) -> tuple[bool, str | None]:
    """(matched, target): target None means the key is ignored on purpose."""
    for rule in rules:
        match = rule.compiled().fullmatch(key)
        if match:
            return True, None if rule.target is None else match.expand(rule.target)
    return False, None


def _sample(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def rename(state: Mapping[str, Any], rules: Iterable[Rule], source: str) -> dict[str, Any]:
    """Apply a rule table to every key of `state` (see module docstring)."""
    rules = tuple(rules)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        matched, target = map_key(key, rules)
        if not matched:
            unknown.append(key)
            continue
        if target is None:
            continue
        if target in out:
            raise CheckpointError(f"{source}: keys {origin[target]} and {key} both map to {target}")
        out[target] = tensor
        origin[target] = key
    if unknown:
        raise CheckpointError(
            f"{source}: unexpected key(s) {_sample(sorted(unknown))}; is this the right file?"
        )
    return out


def fuse_qkv_bias(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Replace `X.q_bias` + `X.v_bias` by `X.qkv.bias` = cat(q_bias, 0, v_bias): (3·D,)."""
    import torch

    out = dict(state)
    for key in [k for k in state if k.endswith(".q_bias")]:
        stem = key[: -len(".q_bias")]
        v_key = f"{stem}.v_bias"
        if v_key not in state:
            raise CheckpointError(f"{source}: {key} has no matching {v_key}")
        q_bias, v_bias = out.pop(key), out.pop(v_key)
        out[f"{stem}.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    orphans = [k for k in out if k.endswith(".v_bias")]
    if orphans:
        raise CheckpointError(f"{source}: {orphans[0]} has no matching q_bias")
    return out


def layer_index(key: str, prefix: str) -> int | None:
    """Index N of `prefix.N.…` keys, else None."""
    if not key.startswith(prefix):
        return None
    head = key[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def count_layers(keys: Iterable[str], prefix: str) -> int:
    """Number of layers = 1 + the highest index seen under `prefix` (0 if none)."""
    indices = [i for i in (layer_index(k, prefix) for k in keys) if i is not None]
    return max(indices) + 1 if indices else 0


def drop_layers_from(state: Mapping[str, torch.Tensor], prefix: str, keep: int) -> dict[str, torch.Tensor]:
    """Drop `prefix.N.*` for N >= keep (blocks a checkpoint has but the model does not build)."""
    kept = {}
    for key, value in state.items():
        index = layer_index(key, prefix)
        if index is None or index < keep:
            kept[key] = value
    return kept
