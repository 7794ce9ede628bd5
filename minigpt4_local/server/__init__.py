"""`minigpt4 serve`: an OpenAI-compatible HTTP server and a chat page on the inference engine.

Contract: importing this package is cheap (no FastAPI, uvicorn or model code). The parts:
- `settings.ServerSettings`: every limit and switch of a running server (plain data).
- `errors.APIError`: an error answered as OpenAI's error object with an HTTP status.
- `images.resolve_image_url`: an `image_url` (data: URI, or a local file under `--allow-local-files`) →
  a decoded RGB image through `minigpt4_local.image`'s checks.
- `requests.parse_chat_request` / `parse_completion_request`: a JSON body → a validated request
  (prompt in the model's template, images, sampling options, constraints) or an `APIError`.
- `responses`: OpenAI response objects and stream chunks.
- `generation.Generation`: one engine job seen from asyncio (deltas, stop strings, cancel on disconnect).
- `app.create_app(settings, open_engine)`: the FastAPI application (endpoints, chat page, key check).
- `run.serve(...)`: uvicorn with loading in the background, a drain on SIGTERM and exit status 0.
- `cli.build_serve_command(...)`: the click command the main CLI registers as `serve`.
"""
