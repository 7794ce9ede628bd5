"""The command-line flags of the Ray path (`describe --ray`, `train make-align-data --ray`); never imports ray.

Contract:
- `ray_options(f)` adds to a click command: `--ray auto|local|ADDRESS` (given alone: auto), `--actors N`,
  `--cpus-per-actor C`, `--gpus-per-actor F`, `--batch-size N`, and the outputs of a job: `--out DIR`,
  `--out-format parquet|jsonl`, `--image-column NAME`, `--id-column NAME`, `--rows-per-part N` (the
  engine's `--parallel`, slots per actor, is `describe`'s own flag). `ray_options(outputs=False,
  parallel=True)` leaves out the outputs and adds `--parallel` (for `train make-align-data`).
- `ray_requested(opts, also=()) -> bool`: True with `--ray`; a Ray-only flag (and the option names in
  `also`) without `--ray` is a `click.UsageError`.
- `--ray` values: `auto` (the cluster named by RAY_ADDRESS or started with `ray start` on this machine,
  else a new local one), `local` (always a new local Ray on this machine), or a cluster address
  (`HOST:PORT` of the head node); anything else is refused at once,
  so a path given right after a bare `--ray` is not taken for an address.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click

__all__ = ["RAY_ONLY_FLAGS", "ray_options", "ray_requested", "valid_address"]

_ADDRESS = re.compile(r"^[A-Za-z0-9_.\-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")

# option name → flag, for the "needs --ray" message.
RAY_ONLY_FLAGS = {
    "actors": "--actors",
    "cpus_per_actor": "--cpus-per-actor",
    "gpus_per_actor": "--gpus-per-actor",
    "batch_size": "--batch-size",
    "out": "--out",
    "out_format": "--out-format",
    "image_column": "--image-column",
    "id_column": "--id-column",
    "rows_per_part": "--rows-per-part",
}


def valid_address(value: str) -> bool:
    return value in ("auto", "local") or bool(_ADDRESS.match(value))


def _check_address(_ctx: Any, _param: Any, value: str | None) -> str | None:
    if value is not None and not valid_address(value):
        raise click.BadParameter(
            f"{value!r} is not auto, local or a cluster address (HOST:PORT of the head node)"
        )
    return value


def ray_options(f: Callable[..., Any] | None = None, *, outputs: bool = True, parallel: bool = False) -> Any:
    """Add the Ray flags to a click command (`@ray_options`, or `@ray_options(outputs=False, …)`)."""

    def add(func: Callable[..., Any]) -> Any:
        options = [
            click.option(
                "--ray",
                "ray",
                is_flag=False,
                flag_value="auto",
                metavar="auto|local|ADDRESS",
                callback=_check_address,
                help="Run on Ray: auto (a running cluster, else a local one), local, or HOST:PORT.",
            ),
            click.option("--actors", type=click.IntRange(1), help="--ray: actors (default: as many as fit)."),
            click.option(
                "--cpus-per-actor",
                type=click.FloatRange(0, min_open=True),
                help="--ray: CPUs each actor reserves (default 1; also its llama.cpp threads).",
            ),
            click.option(
                "--gpus-per-actor",
                type=click.FloatRange(0),
                help="--ray: GPUs each actor reserves, e.g. 1 or 0.5 to share one (default 0).",
            ),
            click.option("--batch-size", type=click.IntRange(1), help="--ray: images per actor call."),
        ]
        if parallel:
            options.append(click.option("--parallel", type=click.IntRange(1), help="Engine slots per actor."))
        if outputs:
            options += [
                click.option(
                    "--out", type=click.Path(file_okay=False), help="--ray: folder for the result parts."
                ),
                click.option(
                    "--out-format",
                    type=click.Choice(["parquet", "jsonl"]),
                    help="--ray: part file format (default parquet).",
                ),
                click.option("--image-column", help="--ray: Parquet column with image bytes or paths."),
                click.option("--id-column", help="--ray: Parquet column with a unique row key."),
                click.option(
                    "--rows-per-part",
                    type=click.IntRange(1),
                    help="--ray: rows per part file (default 1000).",
                ),
            ]
        for option in reversed(options):
            func = option(func)
        return func

    return add(f) if f is not None else add


def ray_requested(opts: dict[str, Any], also: tuple[str, ...] = ()) -> bool:
    """True when `--ray` was given; Ray-only flags without it are a usage error."""
    if opts.get("ray"):
        return True
    flags = {**RAY_ONLY_FLAGS, **{name: "--" + name.replace("_", "-") for name in also}}
    given = [flag for name, flag in flags.items() if opts.get(name) is not None]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise click.UsageError(f"{', '.join(given)} only {verb} with --ray")
    return False
