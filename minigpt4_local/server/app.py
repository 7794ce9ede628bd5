"""The FastAPI application: OpenAI-compatible endpoints and the chat page, on one engine.

Contract: `create_app(settings, open_engine, on_load_failed=None) -> FastAPI`. At startup a thread calls
`open_engine()` (the model loads while the server already answers: /health is 503 "loading", then 200);
if it raises, `on_load_failed(message)` is called (the runner stops the server). `app.state.server` is
the `ServerState` (status, engine, model id; `begin_draining()` makes every API call 503 "draining").
At shutdown the engine is drained (`settings.drain_timeout_s`) and closed.

Endpoints: POST /v1/chat/completions, POST /v1/completions (text only: the prompt is used without the
template), GET /v1/models (+ /v1/models/{id}), GET /health, GET / (the chat page) and /static/*.
/v1/* needs `Authorization: Bearer KEY` when a key is set (compared with hmac.compare_digest). Bodies
larger than `max_body_bytes` get 413 (from Content-Length before reading, else while reading), bodies
not complete within `body_timeout_s` get 408. Every error, including unknown routes and internal
errors, is OpenAI's error object; no traceback text is ever sent. A streamed answer is SSE
(`data: {chunk}` ... `data: [DONE]`); a client that disconnects cancels its job at once (the
disconnect is watched for the whole response, whatever the ASGI spec version).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from .errors import APIError, invalid_request, not_found, too_large, unauthorized, unavailable
from .generation import Generation, Outcome, prepare
from .images import resolve_image_url
from .responses import SSE_DONE, ResponseIds, model_list, sse, usage
from .schemas import GenerationRequest, parse_chat_request, parse_completion_request, parse_json_body
from .settings import ServerSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("minigpt4.server")


@dataclass
class ServerState:
    settings: ServerSettings
    status: str = "loading"  # loading | ready | draining | failed
    engine: Any = None
    model_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    error: str = ""

    def begin_draining(self) -> None:
        if self.status in ("loading", "ready"):
            self.status = "draining"

    def ready_engine(self) -> Any:
        """The engine, or 503 while loading / draining."""
        if self.status == "ready" and self.engine is not None:
            return self.engine
        if self.status == "draining":
            raise unavailable("the server is shutting down", "draining")
        if self.status == "failed":
            raise unavailable(f"the model failed to load: {self.error}", "load_failed")
        raise unavailable("the model is still loading; retry in a moment", "loading")


# ----- request plumbing -------------------------------------------------------------------------------


def _check_key(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # Compare bytes in constant time; a wrong scheme still costs one comparison.
    given = token.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, settings.api_key.encode("utf-8")):
        raise unauthorized()


async def _read_body(request: Request, settings: ServerSettings) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid_request("invalid Content-Length header")
        if int(declared) > settings.max_body_bytes:
            raise too_large(f"the request body is larger than the limit of {settings.max_body_bytes} bytes")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise too_large(
                    f"the request body is larger than the limit of {settings.max_body_bytes} bytes"
                )
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), settings.body_timeout_s)
    except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        raise APIError(
            408,
            f"the request body did not arrive within {settings.body_timeout_s:g} s",
            code="request_timeout",
        ) from None
    return b"".join(chunks)


async def _wait_for_disconnect(receive: Callable[[], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(StreamingResponse):
    """SSE that ends as soon as the client disconnects; `on_close` runs however it ended (even when the
    client left before the first event, when the generator's own cleanup never runs)."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await _wait_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.on_close()


def _error_response(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ----- the application --------------------------------------------------------------------------------


def create_app(
    settings: ServerSettings,
    open_engine: Callable[[], Any],
    on_load_failed: Callable[[str], None] | None = None,
) -> FastAPI:
    state = ServerState(settings)

    def load() -> None:
        try:
            engine = open_engine()
        except Exception as err:  # reported as one line by the runner; the server then stops
            state.status, state.error = "failed", " ".join(str(err).split()) or type(err).__name__
            log.debug("model load failed", exc_info=True)
            if on_load_failed is not None:
                on_load_failed(state.error)
            return
        state.engine, state.model_id = engine, engine.config.name
        if state.status == "loading":
            state.status = "ready"

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load, name="minigpt4-load", daemon=True)
        loader.start()
        yield
        state.begin_draining()
        engine = state.engine
        if engine is not None:
            finished = await asyncio.to_thread(engine.drain, settings.drain_timeout_s)
            if not finished:
                log.warning(
                    "minigpt4: answers still running after %.0f s were cancelled", settings.drain_timeout_s
                )
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="minigpt4-local", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(APIError(err.status_code, str(err.detail), code=kind))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:
        log.error("internal error: %s: %s", type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
        return _error_response(
            APIError(500, "internal server error", type="server_error", code="internal_error")
        )

    # ----- pages and health -----

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.status != "ready":
            err = APIError(503, f"status: {state.status}", type="server_error", code=state.status)
            return JSONResponse({"status": state.status, **err.body()}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_id, **state.engine.stats()})

    # ----- models -----

    def model_extra(engine: Any) -> dict[str, Any]:
        defaults = engine.sampling()
        return {
            "name": engine.name,
            "context_length": engine.n_ctx,
            "parallel": engine.parallel,
            "json_schema": bool(engine.can_constrain),
            "defaults": {
                "max_tokens": defaults.max_new_tokens,
                "temperature": defaults.temperature if defaults.do_sample else 0.0,
                "top_p": defaults.top_p,
            },
        }

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_key(request, settings)
        engine = state.ready_engine()
        return JSONResponse(model_list(state.model_id, state.created, model_extra(engine)))

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        _check_key(request, settings)
        engine = state.ready_engine()
        if model_id != state.model_id:
            raise not_found(
                f"model {model_id!r} does not exist (this server has {state.model_id!r})",
                code="model_not_found",
            )
        return JSONResponse(model_list(state.model_id, state.created, model_extra(engine))["data"][0])

    # ----- generation -----

    async def generate(
        request: Request, parse: Callable[[dict[str, Any], Any], GenerationRequest]
    ) -> Response:
        _check_key(request, settings)
        engine = state.ready_engine()
        body = parse_json_body(await _read_body(request, settings))
        parsed = parse(body, engine)
        if parsed.model is not None and parsed.model != state.model_id:
            raise not_found(
                f"model {parsed.model!r} does not exist (this server has {state.model_id!r})",
                param="model",
                code="model_not_found",
            )

        def decode_and_prepare() -> Any:
            images = [resolve_image_url(ref.url, ref.label, settings) for ref in parsed.images]
            return prepare(engine, parsed, images)

        prepared = await asyncio.to_thread(decode_and_prepare)
        ids = ResponseIds.new(parsed.kind, state.model_id)
        generation = await Generation.start(engine, prepared)
        if parsed.stream:
            return _EventStream(
                _sse_events(generation, ids, parsed.include_usage),
                on_close=generation.cancel,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await _complete(request, generation, ids)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(
            request, lambda body, engine: parse_chat_request(body, engine.config.prompt, settings)
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, lambda body, _engine: parse_completion_request(body, settings))

    return app


async def _complete(request: Request, generation: Generation, ids: ResponseIds) -> Response:
    """Wait for the whole answer; a client that goes away cancels the job."""
    finish = asyncio.ensure_future(generation.finish())
    watch = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({finish, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not finish.done():
            generation.cancel()
            finish.cancel()
    if finish.cancelled():
        return Response(status_code=499)  # nobody is listening any more
    outcome: Outcome = finish.result()
    return JSONResponse(
        ids.complete(
            outcome.text, outcome.finish_reason, usage(outcome.prompt_tokens, outcome.completion_tokens)
        )
    )


async def _sse_events(generation: Generation, ids: ResponseIds, include_usage: bool) -> AsyncIterator[bytes]:
    try:
        first = ids.first_chunk()
        if first is not None:
            yield sse(first)
        async for text in generation.stream():
            yield sse(ids.delta_chunk(text))
        outcome = await generation.finish()
        yield sse(ids.final_chunk(outcome.finish_reason))
        if include_usage:
            yield sse(ids.usage_chunk(usage(outcome.prompt_tokens, outcome.completion_tokens)))
    except APIError as err:
        yield sse(err.body())
    finally:
        generation.cancel()  # a no-op when the job ended; frees the slot when the client left mid-answer
    yield SSE_DONE
