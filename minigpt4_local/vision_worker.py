"""The engine's vision side: one thread that turns images into embeddings in batches, through the cache.

Contract:
- `VisionWorker(encoder, cache, max_batch=None)` starts a daemon thread. `submit(images, done)` queues a
  request (PIL images, or (n_img, hidden) arrays that pass through untouched) and returns at once;
  `done(embeds, error, seconds)` is called later on the worker thread with one embedding per image (or
  the `MiniGPT4Error`/exception that failed the request, and no embeddings).
- Each round takes every queued request up to `max_batch` images in all (the encoder's own `max_batch`,
  default 8), looks each image up in the cache (`image_cache.image_key`: decoded pixels + the encoder's
  identity), and encodes the misses together: preprocess -> one batched ONNX run (`encoder.preprocess` +
  `encoder.encode` when the encoder has them, else `encoder.encode_images`). Identical images in one
  round are encoded once. ONNX Runtime's CPU kernels give every image in a batch the same bits as alone
  (checked in tests/test_engine.py), so batching never changes answers. A request whose images fail
  fails alone; the rest of the round still gets its embeddings.
- `encoder_calls` counts encoder runs, `images_encoded` the images they held (the tests read them).
- `encode(images)` is the synchronous form (submit + wait). `close()` stops the thread (idempotent).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .image_cache import EmbeddingCache, image_key, vision_identity

__all__ = ["VisionWorker"]

Done = Callable[[list[Any] | None, BaseException | None, float], None]


@dataclass
class _Request:
    images: Sequence[Any]
    done: Done
    submitted: float


class VisionWorker:
    def __init__(self, encoder: Any, cache: EmbeddingCache, max_batch: int | None = None) -> None:
        self.encoder = encoder
        self.cache = cache
        self.identity = vision_identity(encoder)
        self.max_batch = max(1, int(max_batch or getattr(encoder, "max_batch", None) or 8))
        self.encoder_calls = 0
        self.images_encoded = 0
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="minigpt4-vision", daemon=True)
        self._thread.start()

    def submit(self, images: Sequence[Any], done: Done) -> None:
        if self._closed:
            raise RuntimeError("the vision worker is closed")
        self._queue.put(_Request(list(images), done, time.perf_counter()))

    def encode(self, images: Sequence[Any]) -> list[Any]:
        box: dict[str, Any] = {}
        ready = threading.Event()

        def done(embeds: list[Any] | None, error: BaseException | None, _s: float) -> None:
            box["embeds"], box["error"] = embeds, error
            ready.set()

        self.submit(images, done)
        ready.wait()
        if box["error"] is not None:
            raise box["error"]
        return box["embeds"]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join()

    # ----- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, count = [first], self._pil_count(first)
            while count < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this round, then stop
                    break
                batch.append(nxt)
                count += self._pil_count(nxt)
            self._round(batch)

    @staticmethod
    def _pil_count(request: _Request) -> int:
        return sum(not isinstance(im, np.ndarray) for im in request.images)

    def _round(self, requests: list[_Request]) -> None:
        keys: dict[int, list[bytes | None]] = {}
        found: dict[bytes, Any] = {}
        misses: dict[bytes, Any] = {}
        failed: dict[int, BaseException] = {}
        for n, request in enumerate(requests):
            try:
                row: list[bytes | None] = []
                for image in request.images:
                    if isinstance(image, np.ndarray):
                        row.append(None)
                        continue
                    key = image_key(image, self.identity)
                    row.append(key)
                    if key in found or key in misses:
                        continue
                    hit = self.cache.get(key)
                    if hit is not None:
                        found[key] = hit
                    else:
                        misses[key] = image
                keys[n] = row
            except Exception as exc:
                failed[n] = exc
        if misses:
            try:
                for key, embed in zip(misses, self._encode(list(misses.values())), strict=True):
                    found[key] = embed
                    self.cache.put(key, embed)
            except Exception as exc:  # the encoder failed: every request of this round that needed it fails
                for n, needed in keys.items():
                    if any(k in misses for k in needed if k is not None):
                        failed[n] = exc
        now = time.perf_counter()
        for n, request in enumerate(requests):
            seconds = now - request.submitted
            if n in failed:
                request.done(None, failed[n], seconds)
                continue
            embeds = [
                image if key is None else found[key]
                for image, key in zip(request.images, keys[n], strict=True)
            ]
            request.done(embeds, None, seconds)

    def _encode(self, images: list[Any]) -> list[Any]:
        self.encoder_calls += 1
        self.images_encoded += len(images)
        enc = self.encoder
        if hasattr(enc, "preprocess") and hasattr(enc, "encode"):
            out = enc.encode(enc.preprocess(images))
        else:
            out = enc.encode_images(images)
        return [out[i] for i in range(len(images))]
