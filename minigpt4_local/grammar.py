"""Structured output: a JSON schema becomes a llama.cpp grammar that constrains decoding (torch-free).

Contract:
- `ANY_JSON_OBJECT` is the schema `--format json` stands for: any JSON object.
- `load_schema(path) -> dict` reads a JSON-schema file (`ConfigError` in one line when it is missing,
  not JSON, or not an object).
- `schema_grammar(schema) -> str` converts the schema with llama-cpp-python's own converter
  (`llama_cpp.llama_grammar.json_schema_to_gbnf`) into GBNF text whose language is exactly the JSON
  documents the schema accepts (as far as the converter supports the schema's keywords); a schema it
  cannot convert raises `ConfigError` naming the problem. The converter's string character rule lets raw
  control characters (newlines, tabs) into strings, which JSON forbids; they are excluded. The engine hands the text to
  `llama_sampler_init_grammar` (see backends/llama_ctx.grammar_sampler).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError, DependencyError
from .files import read_json_object

__all__ = ["ANY_JSON_OBJECT", "load_schema", "schema_grammar"]

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}

# llama-cpp-python 0.3.x writes `char ::= [^"\\] | ...`: JSON strings may not hold U+0000..U+001F raw.
_LOOSE_CHAR = r'char ::= [^"\\]'
_JSON_CHAR = r'char ::= [^"\\\x00-\x1F\x7F]'


def load_schema(path: str | Path) -> dict[str, Any]:
    return read_json_object(path, ConfigError, missing=f"the JSON schema {path} does not exist")


def schema_grammar(schema: dict[str, Any]) -> str:
    if not isinstance(schema, dict):
        raise ConfigError("a JSON schema must be a JSON object (a dict)")
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError as err:
        raise DependencyError(
            f"JSON-schema output needs llama-cpp-python (`pip install 'minigpt4-local[gguf]'`): {err}"
        ) from None
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises plain ValueError/KeyError/... on schemas it cannot take
        raise ConfigError(
            f"cannot turn the JSON schema into a grammar: {type(exc).__name__}: {exc}"
        ) from None
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)
