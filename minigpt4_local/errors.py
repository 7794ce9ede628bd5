"""User-facing errors.

Contract: every failure caused by the user's input (paths, images, checkpoints, configs, bundles,
prompts) is raised as a `MiniGPT4Error` subclass whose message is one complete line that says what
is wrong and, where possible, what to do. The CLI prints that line to stderr and exits non-zero;
anything else that escapes is a bug.
"""

from __future__ import annotations


class MiniGPT4Error(Exception):
    """Base class: an error the user can act on. `str(err)` is a single line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep the message on one line: the CLI promises one line on stderr.
        super().__init__(" ".join(str(message).split()))


class ConfigError(MiniGPT4Error):
    """A config file or preset is unknown, malformed or inconsistent."""


class CheckpointError(MiniGPT4Error):
    """A checkpoint is missing, unreadable, has wrong keys or wrong shapes."""


class ImageError(MiniGPT4Error):
    """An image path is missing, not a regular file, not an image, truncated or too large."""


class TokenizerError(MiniGPT4Error):
    """A tokenizer is missing or does not match the language model."""


class PromptError(MiniGPT4Error):
    """A prompt or conversation cannot be built (image count mismatch, too long for the context)."""


class ModelDirError(MiniGPT4Error):
    """A model directory is missing parts, truncated or inconsistent (base of `BundleError`)."""


class BundleError(ModelDirError):
    """A bundle (manifest, listed files, parts) is missing, truncated, corrupted or inconsistent."""


class DependencyError(MiniGPT4Error):
    """An optional dependency needed for the requested feature is not installed."""

    exit_code = 3
