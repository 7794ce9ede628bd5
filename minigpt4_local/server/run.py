"""Run the server: uvicorn, the model loading in the background, a graceful drain on SIGTERM.

Contract: `serve(settings, open_engine, echo) -> int` binds `settings.host:port` (warning through `echo`
when the address is not loopback and no API key is set), answers /health with 503 while
`open_engine()` runs, and returns the process exit status: 0 after SIGTERM or SIGINT (new connections
are refused and API calls on open connections get 503 "draining"; answers in flight finish within
`settings.drain_timeout_s`, then the engine is drained and closed), 1 when the model failed to load
(its one-line error went through `echo`). The signal is not re-raised after the drain (uvicorn's default),
so a supervisor sees a clean exit.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

from .settings import ServerSettings


def serve(settings: ServerSettings, open_engine: Callable[[], Any], echo: Callable[[str], None]) -> int:
    import uvicorn

    from .app import create_app

    if not settings.is_loopback and settings.api_key is None:
        echo(
            f"minigpt4: warning: serving on {settings.host} without --api-key: anyone who can reach this "
            "address can use the model"
        )
    failure: list[str] = []

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.server.begin_draining()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            with super().capture_signals():
                yield
                # The signal was handled as a graceful drain; uvicorn would re-raise it (exit by signal).
                self._captured_signals = [
                    s for s in self._captured_signals if s not in (signal.SIGTERM, signal.SIGINT)
                ]

    def load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    def open_and_announce() -> Any:
        engine = open_engine()
        echo(f"minigpt4: model ready: {engine.name} ({engine.parallel} slots, context {engine.n_ctx})")
        return engine

    app = create_app(settings, open_and_announce, on_load_failed=load_failed)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
    )
    server = Server(config)
    echo(
        f"minigpt4: serving on http://{_url_host(settings.host)}:{settings.port}/ (chat page; OpenAI API at /v1)"
    )
    server.run()
    if failure:
        echo(f"minigpt4: error: {failure[0]}")
        return 1
    return 0


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
