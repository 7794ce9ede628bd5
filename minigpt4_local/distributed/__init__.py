"""Captioning beyond one machine: image folders, webdataset shards and Parquet tables through Ray Data.

Public API (importing this package does not import ray; the names below load it on first use):
- `connect(address="auto", num_cpus=None)`: join or start a Ray runtime.
- `read_inputs(inputs, image_column=None, id_column=None, skip=())`: a Ray Dataset of item rows.
- `describe_dataset(data, model, *, question, greedy, sampling, load_options, parallel, actors,
  cpus_per_actor, gpus_per_actor, batch_size, continue_prompt, continue_below)`: the result Dataset
  (`id`, `answer`, `error`, `token_ids`, token counts, timings, `model`, `worker`).
- `run_describe_job(inputs, out, fmt=..., ...)`: exactly-once part files in `out`, resumable.
- `committed_ids(out)`, `read_results(out)`: what a job folder holds.
(`train make-align-data --ray` runs its describe stage through `describe_dataset`: train/align_ray.py.)
Modules: inputs.py (planning and reading items), worker.py (one actor), parts.py (the commit protocol),
job.py (Ray), options.py (CLI flags, Ray-free).
"""

from __future__ import annotations

import importlib
from typing import Any

from .parts import committed_ids, read_results

__all__ = [
    "committed_ids",
    "connect",
    "describe_dataset",
    "read_inputs",
    "read_results",
    "run_describe_job",
]

_LAZY = {
    "connect": "job",
    "describe_dataset": "job",
    "read_inputs": "job",
    "run_describe_job": "job",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
