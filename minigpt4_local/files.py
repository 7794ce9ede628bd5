"""File helpers every part shares (torch-free, standard library only).

Contract:
- `read_json_object(path, error=ConfigError, missing=None)` returns the JSON object in `path`. A missing
  file raises `error("{path}: missing")` — or, when `missing` is a string, `error(missing)` — unless
  `missing={}`-style `allow_missing=True`, which returns `{}`; unreadable bytes, invalid JSON and a value that
  is not an object each raise `error` with one line naming the file. `error` is a `MiniGPT4Error` subclass,
  so the CLI prints it as one line.
- `cache_dir(*parts)` is the one cache directory: `$MINIGPT4_CACHE`, else `$XDG_CACHE_HOME/minigpt4-local`,
  else `~/.cache/minigpt4-local`, joined with `parts` (not created).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, MiniGPT4Error

__all__ = ["cache_dir", "read_json_object"]


def read_json_object(
    path: str | os.PathLike,
    error: type[MiniGPT4Error] = ConfigError,
    missing: str | None = None,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """The JSON object stored in `path` (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if allow_missing:
            return {}
        raise error(missing or f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: unreadable ({exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def cache_dir(*parts: str) -> Path:
    """Where derived files are cached (see the module docstring)."""
    if os.environ.get("MINIGPT4_CACHE"):
        base = Path(os.environ["MINIGPT4_CACHE"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigpt4-local"
    return base.joinpath(*parts)
