"""The describe stage of stage-2 data generation (`minigpt4 train make-align-data --ray`) on Ray.

Contract: `describe_for_align(model, *, continue_below, load_options, sampling, actors, cpus_per_actor,
gpus_per_actor, parallel, batch_size)` returns a `DescribeMany` for `train.align_data.make_align_data`:
called with image paths, it runs them through `minigpt4_local.distributed.describe_dataset` with the detailed prompt and the
"Continue" rule (the same two turns `align_data.describe` asks, as one conversation per image), and
yields `(path, Description | MiniGPT4Error, None)` as results reach the driver, each path once (ids are
the resolved paths). Ray must be initialised (`minigpt4_local.distributed.connect`). Polishing, filtering and writing stay on the
driver, where review.jsonl is the commit log: a killed driver loses only the descriptions in flight, and
the re-run's resume logic describes exactly the images without a record.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minigpt4_local.distributed.job import default_batch_size, describe_dataset, read_inputs
from minigpt4_local.errors import ImageError, MiniGPT4Error
from minigpt4_local.loader import LoadOptions

from .align_data import CONTINUE_BELOW, CONTINUE_PROMPT, DETAIL_PROMPT, DescribeMany, Description

__all__ = ["describe_for_align"]


def _error(row: dict[str, Any]) -> MiniGPT4Error:
    kind = ImageError if row.get("error_type") == "ImageError" else MiniGPT4Error
    return kind(row["error"])


def describe_for_align(
    model: str | None,
    *,
    continue_below: int = CONTINUE_BELOW,
    load_options: LoadOptions | None = None,
    sampling: dict[str, Any] | None = None,
    greedy: bool = False,
    **describe: Any,
) -> DescribeMany:
    """A Ray-backed describe stage for `make_align_data` (see the module docstring)."""

    def run(paths: Sequence[Path]) -> Iterator[tuple[Path, Description | MiniGPT4Error, Any]]:
        if not paths:
            return
        rows = describe.get("batch_size") or default_batch_size(describe.get("parallel"))
        data, _plan = read_inputs(paths, rows_per_unit=rows)
        results = describe_dataset(
            data,
            model,
            question=DETAIL_PROMPT,
            greedy=greedy,
            sampling=sampling,
            load_options=load_options,
            continue_prompt=CONTINUE_PROMPT,
            continue_below=continue_below,
            **describe,
        )
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                path = Path(row["id"])
                if row["error"] is not None:
                    yield path, _error(row), None
                else:
                    yield path, Description(row["answer"], bool(row["continued"]), row["turn_tokens"]), None

    return run


@contextmanager
def ray_describe_stage(opts: dict[str, Any], continue_below: int) -> Iterator[DescribeMany]:
    """`make-align-data --ray …`: the model and sampling checked here, Ray joined, the stage, Ray left."""
    from minigpt4_local.distributed.job import check_sampling, connect, model_for_workers, sampling_overrides

    model = model_for_workers(opts.get("model"))
    greedy = bool(opts.get("greedy"))
    overrides = sampling_overrides(opts)
    check_sampling(model, greedy, overrides)
    started = connect(opts["ray"])
    try:
        yield describe_for_align(
            model,
            continue_below=continue_below,
            load_options=LoadOptions(
                device=opts.get("device"),
                dtype=opts.get("dtype"),
                n_gpu_layers=opts.get("n_gpu_layers"),
                threads=opts.get("threads"),
            ),
            sampling=overrides,
            greedy=greedy,
            parallel=opts.get("parallel"),
            actors=opts.get("actors"),
            cpus_per_actor=opts.get("cpus_per_actor") or 1.0,
            gpus_per_actor=opts.get("gpus_per_actor") or 0.0,
            batch_size=opts.get("batch_size"),
        )
    finally:
        if started:
            import ray

            ray.shutdown()
