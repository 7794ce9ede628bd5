"""minigpt4-local: run MiniGPT-4 offline.

Importing this package is cheap and never imports torch: the PyTorch model lives in
`minigpt4_local.model` (the `torch` extra), the torch-free runtime pieces (image preprocessing,
prompts, tokenizers, ONNX Runtime vision, llama.cpp decoder) import only what they need, lazily.
It keeps the import-time log noise of libraries our backends pull in (torchao via transformers)
off the user's stderr (`import_noise`).
"""

from .import_noise import silence_import_noise

__version__ = "0.1.0"

silence_import_noise()
