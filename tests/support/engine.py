"""Helpers for the engine tests: pinned thread count and staggered (continuous) request arrival."""

from __future__ import annotations

import threading
import time

import numpy as np

THREADS = 1  # pinned: results are compared bit for bit (one thread also copes best with a busy machine)


def submit_waves(engine, prompts, images, options, seed: int = 0):
    """Submit in random bursts; each burst waits until the previous one is generating, so requests join
    a running batch (continuous admission), not one lockstep batch."""
    rng = np.random.default_rng(seed)
    jobs, i = [], 0
    while i < len(images):
        burst = int(rng.integers(1, 5))
        started = []
        for prompt, image in zip(prompts[i : i + burst], images[i : i + burst], strict=True):
            first = threading.Event()
            job = engine.submit(prompt, [image], options, on_text=lambda _t, e=first: e.set())
            started.append((job, first))
            jobs.append(job)
        i += burst
        job, first = started[0]
        while not (first.is_set() or job.done):
            time.sleep(0.002)
    return [job.result(timeout=600) for job in jobs]
