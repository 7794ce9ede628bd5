"""What a running server allows: addresses, the key, and every limit on a request (plain data).

Contract: `ServerSettings` holds the values `minigpt4 serve` was started with. Defaults are safe for a
machine on a network: loopback only, 32 MiB bodies, 16 images per request of at most 20 MiB and
25 megapixels each, bodies that must arrive within 30 s, 30 s to finish answers on SIGTERM.
`allow_local_files` is None (file:// and plain paths refused) or a directory whose regular files
may be named. `LOOPBACK_HOSTS` are the bind addresses that need no API key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_local_files: Path | None = None
    max_body_bytes: int = 32 * 2**20
    max_images: int = 16  # per request, over the whole conversation
    max_image_bytes: int = 20 * 2**20  # one decoded (base64-free) image file
    max_image_pixels: int = 25_000_000  # declared width x height, checked before decoding
    max_tokens: int | None = None  # cap on max_tokens (None: the context decides)
    body_timeout_s: float = 30.0  # a body not complete by then is refused (slow-loris)
    drain_timeout_s: float = 30.0  # SIGTERM: how long running answers may take to finish

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS
