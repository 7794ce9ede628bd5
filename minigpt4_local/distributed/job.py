"""Captioning on Ray Data: the dataset API, the resumable job, and `minigpt4 describe --ray`.

Contract (imports ray; reached only through `--ray` or the public API of `minigpt4_local.distributed`):
- `connect(address="auto", num_cpus=None) -> bool`: joins or starts a Ray runtime (`auto`: the cluster in
  RAY_ADDRESS or started by `ray start` here, else a new local one; `local`: a new local one; else an
  address), quietly (no dashboard, no progress bars, worker logs kept off the terminal). Returns True when
  it initialised Ray (the caller then shuts it down), False when Ray was already initialised.
- `read_inputs(inputs, image_column=None, id_column=None, skip=(), rows_per_unit=16) -> (Dataset,
  InputPlan)`: a Ray Dataset of item rows (`id`, `path`, `image`, `error`; see inputs.py), one read unit
  per block, read by tasks that reserve no CPU, ids in `skip` left out.
- `describe_dataset(data, model, *, question, greedy, sampling, load_options, parallel, actors,
  cpus_per_actor, gpus_per_actor, batch_size, continue_prompt, continue_below, json_schema,
  image_cache_mb) -> Dataset`: `data` is a list of inputs for `read_inputs`, or a Dataset of your own
  with an `id` (or `path`) column and the image as `image` (encoded bytes, or a decoded array as
  `ray.data.read_images` gives) or `path`; an actor takes a whole block per call, so such a Dataset
  should come in blocks of about `batch_size` rows. Lazily maps the rows through a pool of `actors`
  `CaptionWorker`s (worker.py: each loads the model once and runs the engine with `parallel` slots) and
  returns the result Dataset (`result_schema` columns). Actors restart and their tasks are retried when
  they die (Ray Data's defaults for actor pools, `max_restarts=-1`, `max_task_retries=-1`), so a killed
  actor loses no rows and repeats none. llama.cpp threads default to the CPUs an actor reserves.
- `run_describe_job(inputs, out, *, fmt, …, progress) -> JobSummary`: exactly-once results in `out`:
  stale temporary parts are removed, ids already committed are skipped, results stream to the driver
  and are committed as atomically renamed part files (parts.py), and an id reaching the driver twice is
  committed once. Killing the driver loses at most the uncommitted rows; a re-run completes the job.
  `progress(summary, rows)` is called after each batch that reaches the driver.
- `run_ray_describe(images, question, opts, load_options)`: the `describe --ray` command (flags in options.py); prints
  progress lines on stderr and a JSON summary on stdout. Bad images are error rows and exit status 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DependencyError, MiniGPT4Error
from ..image import DEFAULT_MAX_FILE_BYTES
from ..loader import LoadOptions
from .inputs import InputPlan, plan_inputs, read_unit
from .parts import PartWriter, committed_ids, remove_stale_temp
from .worker import DEFAULT_QUESTION, CaptionWorker, DescribeSpec

__all__ = [
    "JobSummary",
    "connect",
    "describe_dataset",
    "read_inputs",
    "run_describe_job",
    "run_ray_describe",
]

DEFAULT_BATCH_PER_SLOT = 2  # rows per actor call = slots × this: slots stay full while results are written


def _ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise DependencyError(
            'the Ray path needs Ray Data: pip install "minigpt4-local[ray]" (or "ray[data]")'
        ) from None
    return ray


def _quiet_ray_data() -> None:
    import ray.data

    # Ray Data logs a failed job's traceback before raising it; the caller gets the exception (the CLI
    # makes it one line), so its own logging stays quiet.
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False


def connect(address: str = "auto", num_cpus: int | None = None) -> bool:
    """Join or start a Ray runtime (see the module docstring)."""
    ray = _ray()
    if ray.is_initialized():
        _quiet_ray_data()
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address == "local":
        kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus)
    elif address != "auto":
        kwargs["address"] = address
    elif not (os.environ.get("RAY_ADDRESS") or _local_cluster_running()):
        kwargs.update(address="local", include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = kwargs.get("address") or "auto"
        raise MiniGPT4Error(f"cannot start or join Ray ({where}): {' '.join(str(err).split())}") from None
    _quiet_ray_data()
    return True


def _local_cluster_running() -> bool:
    """Whether `ray start` left a cluster address on this machine (where ray.init looks for it)."""
    try:
        from ray._private.services import get_ray_address_from_environment

        return bool(get_ray_address_from_environment("auto", None))
    except Exception:  # no running cluster (ConnectionError) or a Ray version without this helper
        return False


# ----- reading ---------------------------------------------------------------------------------------

_SKIP_CACHE: dict[str, frozenset[str]] = {}


def _skip_set(skip: Any) -> Collection[str]:
    """The skip set behind an object reference, fetched once per worker process."""
    if skip is None:
        return ()
    import ray

    key = skip.hex()
    if key not in _SKIP_CACHE:
        _SKIP_CACHE.clear()  # one job's set at a time
        _SKIP_CACHE[key] = ray.get(skip)
    return _SKIP_CACHE[key]


def _read_rows(batch: dict[str, Any], skip: Any = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Any:
    """Reader task: one read unit → its item rows (one block, so one actor call)."""
    import pyarrow as pa

    skip_set = _skip_set(skip)
    rows = [row for unit in batch["unit"] for row in read_unit(str(unit), skip_set, max_file_bytes)]
    return pa.Table.from_pylist(rows, schema=_item_schema())


def _item_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("path", pa.string()), ("image", pa.binary()), ("error", pa.string())]
    )


def read_inputs(
    inputs: Sequence[str | os.PathLike],
    *,
    image_column: str | None = None,
    id_column: str | None = None,
    skip: Collection[str] = (),
    rows_per_unit: int = 16,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[Any, InputPlan]:
    """A Ray Dataset of item rows from image folders/globs, shards and Parquet tables (plus its plan).

    Each block holds one read unit (at most `rows_per_unit` items) and is read by a task that reserves no
    CPU: the actors may hold every CPU of the cluster (a reading stage that needed one would wait forever),
    and decoding happens in the actors anyway."""
    ray = _ray()
    plan = plan_inputs(inputs, image_column, id_column, skip, rows_per_unit)
    units = [{"unit": json.dumps(u)} for u in plan.units]
    dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    # Only table rows keyed by an id column are left out on the workers; everything else was on the driver.
    needs_skip = bool(skip) and any(u.get("id_column") for u in plan.units)
    skip_ref = ray.put(frozenset(skip)) if needs_skip else None
    dataset = dataset.map_batches(
        _read_rows,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"skip": skip_ref, "max_file_bytes": max_file_bytes},
        num_cpus=0,
    )
    return dataset, plan


# ----- describing ------------------------------------------------------------------------------------


def default_actors(cpus_per_actor: float, gpus_per_actor: float) -> int:
    """As many actors as the cluster's CPUs (or GPUs, when actors take GPUs) hold."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cpus_per_actor))


def describe_dataset(
    data: Any,
    model: str | os.PathLike | None = None,
    *,
    question: str = DEFAULT_QUESTION,
    greedy: bool = False,
    sampling: dict[str, Any] | None = None,
    load_options: LoadOptions | None = None,
    parallel: int | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int | None = None,
    continue_prompt: str | None = None,
    continue_below: int = 0,
    json_schema: dict[str, Any] | None = None,
    image_cache_mb: float = 0.0,
) -> Any:
    """The result Dataset of describing every row of `data` (see the module docstring)."""
    ray = _ray()
    if not isinstance(data, ray.data.Dataset):
        data, _plan = read_inputs(data, rows_per_unit=batch_size or default_batch_size(parallel))
    options = load_options or LoadOptions()
    if options.threads is None:  # llama.cpp should not use more cores than the actor reserved
        options = replace(options, threads=max(1, int(cpus_per_actor)))
    spec = DescribeSpec(
        model=None if model is None else os.fspath(model),
        load_options=options,
        parallel=parallel,
        question=question,
        sampling={"greedy": greedy, **(sampling or {})},
        continue_prompt=continue_prompt,
        continue_below=continue_below,
        json_schema=json_schema,
        image_cache_mb=image_cache_mb,
    )
    size = actors or default_actors(cpus_per_actor, gpus_per_actor)
    rows = batch_size or default_batch_size(parallel)
    # Ray Data's actor pools restart dead actors and retry their tasks by default (max_restarts=-1,
    # max_task_retries=-1); tests/test_distributed_ray.py kills an actor mid-run to hold it to that.
    return data.map_batches(
        CaptionWorker,
        fn_constructor_args=(spec,),
        batch_size=rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )


def default_batch_size(parallel: int | None) -> int:
    """Rows per actor call: twice the engine's slots, so the slots stay full across a batch's tail."""
    from ..engine import DEFAULT_PARALLEL

    return DEFAULT_BATCH_PER_SLOT * (parallel or DEFAULT_PARALLEL)


# ----- the resumable job -----------------------------------------------------------------------------


@dataclass
class JobSummary:
    out: str
    format: str
    described: int = 0  # rows committed by this run (errors included)
    errors: int = 0
    already_done: int = 0  # ids committed by earlier runs
    duplicates: int = 0  # rows dropped because their id was already committed
    parts: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    actors: int = 0
    inputs: dict[str, int] = field(default_factory=dict)
    total: int | None = None  # items in the inputs, when known without reading shards

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[JobSummary, Any], None]  # (the counts so far, the rows just committed or buffered)


def run_describe_job(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    fmt: str = "parquet",
    image_column: str | None = None,
    id_column: str | None = None,
    rows_per_part: int = 1000,
    seconds_per_part: float = 60.0,
    progress: Progress | None = None,
    **describe: Any,
) -> JobSummary:
    """Describe `inputs` into `out` exactly once per id, resuming earlier runs (see the module docstring).

    `describe` takes the keyword arguments of `describe_dataset`. Ray must be initialised (`connect`)."""
    _ray()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out)
    done = committed_ids(out)
    started = time.perf_counter()
    summary = JobSummary(out=str(out), format=fmt, already_done=len(done))
    rows = describe.get("batch_size") or default_batch_size(describe.get("parallel"))
    dataset, plan = read_inputs(
        inputs, image_column=image_column, id_column=id_column, skip=done, rows_per_unit=rows
    )
    summary.inputs, summary.total = plan.kinds, plan.total
    if not plan.units:
        return summary
    actors = describe.pop("actors", None) or default_actors(
        describe.get("cpus_per_actor", 1.0), describe.get("gpus_per_actor", 0.0)
    )
    actors = min(actors, len(plan.units))  # an actor without a block to work on would only load the model
    summary.actors = actors
    results = describe_dataset(dataset, actors=actors, **describe)
    writer = PartWriter(out, fmt, rows_per_part=rows_per_part, seconds_per_part=seconds_per_part, seen=done)
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            kept = writer.add(batch)
            summary.described += kept.num_rows
            summary.errors += kept.num_rows - kept.column("error").null_count
            summary.duplicates, summary.parts = writer.duplicates, len(writer.parts)
            _timing(summary, started)
            if progress is not None:
                progress(summary, kept)
    except Exception as err:
        raise _one_line(err) from None
    finally:
        writer.close()  # what arrived is complete: commit it even when the job fails or is interrupted
        summary.parts = len(writer.parts)
    _timing(summary, started)
    return summary


def _all_text(err: BaseException) -> str:
    texts, seen, stack = [], set(), [err]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        texts.append(str(current))
        stack += [e for e in (getattr(current, "cause", None), current.__cause__, current.__context__) if e]
    return "\n".join(texts)


def _timing(summary: JobSummary, started: float) -> None:
    summary.seconds = round(time.perf_counter() - started, 2)
    summary.images_per_s = round(summary.described / summary.seconds, 3) if summary.seconds else 0.0


_RAISED_ON_WORKER = re.compile(r"minigpt4_local\.errors\.(\w+): (.+)")


def _one_line(err: BaseException) -> BaseException:
    """A Ray failure as one line: the MiniGPT4Error a worker raised, else the innermost message."""
    if isinstance(err, MiniGPT4Error) and type(err).__module__.startswith("minigpt4_local"):
        return err
    found = _RAISED_ON_WORKER.findall(_all_text(err))
    if found:  # Ray passes a worker's exception on as text inside its own
        return MiniGPT4Error(f"on a Ray worker: {found[-1][1]}")
    seen: set[int] = set()
    stack: list[BaseException] = [err]
    innermost = err
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        innermost = current
        cause = getattr(current, "cause", None)
        for nxt in (cause, current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                if isinstance(nxt, MiniGPT4Error) and type(nxt).__module__.startswith("minigpt4_local"):
                    return MiniGPT4Error(f"on a Ray worker: {nxt}")
                stack.append(nxt)
    if isinstance(err, KeyboardInterrupt):
        return err
    lines = [line for line in str(innermost).splitlines() if line.strip()]
    return MiniGPT4Error(f"the Ray job failed: {type(innermost).__name__}: {lines[-1] if lines else ''}")


# ----- the command -------------------------------------------------------------------------------------


def model_for_workers(model: str | None) -> str:
    """What actors open: `demo`, or the model's absolute path (every node must be able to read it)."""
    import click

    from ..demo import demo_bundle_path
    from ..loader import resolve_model

    path = resolve_model(model, announce=lambda line: click.echo(line, err=True))
    if path.resolve() == demo_bundle_path().resolve():
        return "demo"
    return str(path.resolve())


def sampling_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "seed")
    return {name: opts[name] for name in names if opts.get(name) is not None}


def check_sampling(
    model: str, greedy: bool, overrides: dict[str, Any], load_options: LoadOptions | None = None
) -> None:
    """Refuse what the driver can see is wrong (the decoder choice, sampling), before any actor starts."""
    import click

    from ..loader import open_model, pick_decoder, resolve_model
    from ..sampling import SamplingOptions

    source = open_model(resolve_model(model), verify=False)
    pick_decoder(source, (load_options or LoadOptions()).decoder)
    config = source.config
    try:
        SamplingOptions.from_defaults(config.generation, greedy=greedy, **overrides).validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


class _ProgressLines:
    """A progress line on stderr at most every `every` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last = time.perf_counter()

    def __call__(self, s: JobSummary, _rows: Any = None) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        of = f" of {s.total - s.already_done}" if s.total is not None else ""
        print(
            f"minigpt4: {s.described}{of} described ({s.errors} errors), {s.images_per_s:.2f} images/s, "
            f"{s.parts} parts written",
            file=sys.stderr,
            flush=True,
        )


def run_ray_describe(
    images: Sequence[str], question: str, opts: dict[str, Any], load_options: LoadOptions
) -> None:
    """`minigpt4 describe --ray …` (see options.py for the flags; `load_options` from the model flags)."""
    import click

    if not opts.get("out"):
        raise click.UsageError("--ray needs --out DIR (the folder for the result parts)")
    for flag, name in (("--json", "as_json"), ("--jsonl", "jsonl_path"), ("--stream", "stream")):
        if opts.get(name):
            raise click.UsageError(f"{flag} does not apply with --ray (results go to --out)")
    model = model_for_workers(opts.get("model"))
    overrides = sampling_overrides(opts)
    check_sampling(model, bool(opts.get("greedy")), overrides, load_options)
    cpus = opts.get("cpus_per_actor") or 1.0
    started_ray = connect(opts["ray"])
    try:
        summary = run_describe_job(
            images,
            opts["out"],
            fmt=opts.get("out_format") or "parquet",
            image_column=opts.get("image_column"),
            id_column=opts.get("id_column"),
            rows_per_part=opts.get("rows_per_part") or 1000,
            progress=_ProgressLines(),
            model=model,
            question=question,
            greedy=bool(opts.get("greedy")),
            sampling=overrides,
            load_options=load_options,
            parallel=opts.get("parallel"),
            json_schema=opts.get("json_schema"),
            image_cache_mb=opts.get("image_cache_mb") or 0.0,
            actors=opts.get("actors"),
            cpus_per_actor=cpus,
            gpus_per_actor=opts.get("gpus_per_actor") or 0.0,
            batch_size=opts.get("batch_size"),
        )
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if summary.errors:
        click.echo(
            f"minigpt4: {summary.errors} images could not be described (their rows in {summary.out} "
            "carry the error)",
            err=True,
        )
    click.echo(json.dumps(summary.to_json()))
