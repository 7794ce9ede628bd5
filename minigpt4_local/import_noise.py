"""Keep other libraries' import-time log noise out of a library user's stdout/stderr.

Contract: `silence_import_noise()` (called once by `import minigpt4_local`; stdlib only, cheap) makes
sure that importing what our backends import prints nothing in a process that has not configured
logging:
- torchao, which transformers imports whenever it is installed (GPTQModel installs it), logs at import
  that its CUDA extensions failed to load and that Triton is missing. A `NullHandler` on the `torchao`
  logger stops Python's last-resort handler from printing those records; a process that configured
  logging (a root handler) still receives them.
- torchao's import registers enums with torch's pytree, which warns through torch's own handler that
  this is deprecated; a filter on `torch.utils._pytree` drops exactly that message.
Real failures still surface as exceptions; nothing else is filtered.
"""

from __future__ import annotations

import logging

__all__ = ["silence_import_noise"]

PYTREE_LOGGER = "torch.utils._pytree"
PYTREE_ENUM_WARNING = "register_constant() on Enum subclasses is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_import_noise() -> None:
    """Install the handler and filter described in the module docstring (idempotent)."""
    torchao = logging.getLogger("torchao")
    if not any(isinstance(h, logging.NullHandler) for h in torchao.handlers):
        torchao.addHandler(logging.NullHandler())
    pytree = logging.getLogger(PYTREE_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in pytree.filters):
        pytree.addFilter(_DropMessage(PYTREE_ENUM_WARNING))
