"""Shared fixtures: a tiny LLaMA-like sentencepiece tokenizer and tiny model directories per preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.tiny_tokenizer import make_tiny_sentencepiece


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("tokenizer"))


def randomize_(model: object, seed: int = 0, std: float = 0.2) -> None:
    """Random values in every tensor (norm weights too), so parity tests cannot pass by symmetry."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # type: ignore[attr-defined]
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "LayerNorm.weight")):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(std * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> Callable[[str], Path]:
    """`tiny_model_dir("tiny-vicuna-7b")` → a model directory with random weights (built once per preset)."""
    cache: dict[str, Path] = {}

    def build(preset: str) -> Path:
        if preset not in cache:
            import torch

            from minigpt4_local.checkpoints.model_dir import save_model_dir
            from minigpt4_local.config import get_preset
            from minigpt4_local.model import MiniGPT4

            torch.manual_seed(0)
            model = MiniGPT4(get_preset(preset))
            randomize_(model, seed=1)
            cache[preset] = save_model_dir(
                model, tiny_tokenizer_dir, tmp_path_factory.mktemp(preset) / "model"
            )
        return cache[preset]

    return build
