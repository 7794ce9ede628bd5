"""The `minigpt4 serve` command (built here, registered by the main CLI in one line).

Contract: `serve_command` is the click command; the main CLI's command table imports this module only
when `serve` runs or `--help` lists it. It takes the shared model flags (`--model`, `--threads`, ...),
parses the server flags into `ServerSettings`, resolves the model before binding (a wrong path or a
missing demo is one error line) and runs `run.serve` with `Engine.open(...)` as the loader; it exits
with serve's status. FastAPI, uvicorn and the engine are imported only when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..cli import _model_options, load_options
from ..errors import DependencyError


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--parallel", type=click.IntRange(1, 256), help="Requests decoded together (default: the engine's)."
)
@click.option(
    "--api-key",
    envvar="MINIGPT4_API_KEY",
    help="Require Authorization: Bearer KEY on /v1 (env MINIGPT4_API_KEY).",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(0),
    help="Requests waiting for a slot before 429.",
)
@click.option(
    "--allow-local-files",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Let image_url name files (file:// or a path) inside this directory.",
)
@click.option("--ctx", type=click.IntRange(16), help="Context per request (default: the model's).")
@click.option(
    "--max-tokens", "max_tokens_cap", type=click.IntRange(1), help="Largest max_tokens a request may ask."
)
@click.option(
    "--max-images", default=16, show_default=True, type=click.IntRange(1), help="Images per request."
)
@click.option(
    "--max-body-mb",
    default=32.0,
    show_default=True,
    type=click.FloatRange(0.001),
    help="Request body limit.",
)
@click.option(
    "--max-image-pixels",
    default=25_000_000,
    show_default=True,
    type=click.IntRange(1),
    help="Declared pixels per image.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.1),
    help="Seconds a request body may take to arrive.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds answers may take to finish on SIGTERM.",
)
@click.option(
    "--image-cache-mb",
    default=256.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Image-embedding cache (0 disables).",
)
@_model_options
def serve_command(**opts: Any) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a chat page at /."""
    from .settings import ServerSettings

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DependencyError(
            'minigpt4 serve needs FastAPI and uvicorn: pip install "minigpt4-local[serve]"'
        ) from None
    settings = ServerSettings(
        host=opts["host"],
        port=opts["port"],
        api_key=opts["api_key"] or None,
        allow_local_files=opts["allow_local_files"],
        max_body_bytes=int(opts["max_body_mb"] * 2**20),
        max_images=opts["max_images"],
        max_image_pixels=opts["max_image_pixels"],
        max_tokens=opts["max_tokens_cap"],
        body_timeout_s=opts["body_timeout"],
        drain_timeout_s=opts["drain_timeout"],
    )
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    # Resolve the model now: a wrong path or a missing demo is reported before the port is bound.
    from ..loader import resolve_model

    model_path = resolve_model(opts.get("model"), announce=echo)
    options = load_options(opts)

    def open_engine() -> Any:
        from ..engine import DEFAULT_PARALLEL, Engine

        return Engine.open(
            model_path,
            options,
            parallel=opts["parallel"] or DEFAULT_PARALLEL,
            ctx=opts["ctx"],
            image_cache_mb=opts["image_cache_mb"],
            max_queue=opts["max_queue"],
        )

    from .run import serve as run_server

    status = run_server(settings, open_engine, echo)
    if status:
        sys.exit(status)
