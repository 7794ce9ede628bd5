"""PyTorch MiniGPT-4: vision encoder, Q-Former, projection and LLaMA decoder (needs the `torch` extra)."""

from .minigpt4 import MiniGPT4

__all__ = ["MiniGPT4"]
