"""`minigpt4 train …` commands (registered by the main CLI as the `train` group); imports torch lazily.

Commands:
- `stage1` / `stage2 --config FILE.yaml|NAME [section.key=value …]`: train (see trainer.py). Options map to
  config keys: `--model` model.dir, `--output` output.dir, `--trainable a,b` model.trainable,
  `--precision`, `--device`, `--max-steps`, `--cache-features DIR`; `--resume` continues the run in the
  output folder, `--resume-from FILE` from a given train_state.pt. Under `torchrun` each process runs the
  same command. `--print-config` shows the resolved config and exits.
- `configs`: lists the shipped YAML configs.
- `make-align-data IMAGES… --out DIR --model M`: stage-2 data generation (align_data.py) with a polisher
  given by `--polish-url URL [--polish-model NAME] [--polish-api-key-env VAR]` (OpenAI-compatible) or
  `--polish-gguf FILE` (local llama.cpp), or `--no-polish`. `--ray auto|local|ADDRESS` (with `--actors`,
  `--cpus-per-actor`, `--gpus-per-actor`, `--parallel`, `--batch-size`) runs the describe stage on Ray
  (align_ray.py); polishing, filtering and writing stay in this process.
Failures are `MiniGPT4Error`s (one line, handled by the main CLI).
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from minigpt4_local.distributed.options import ray_options, ray_requested
from minigpt4_local.errors import ConfigError

TRAINABLE_HELP = "What trains, comma-separated: projection (default), qformer, vision, llm."


def _overrides_from_options(opts: dict[str, Any]) -> list[str]:
    """CLI options → dotted overrides (JSON values are valid YAML)."""
    mapping = {
        "model": "model.dir",
        "output": "output.dir",
        "precision": "optim.precision",
        "device": "optim.device",
        "max_steps": "optim.max_steps",
        "cache_features": "output.cache_features",
    }
    out = [f"{key}={json.dumps(opts[name])}" for name, key in mapping.items() if opts.get(name) is not None]
    if opts.get("trainable"):
        parts = [p.strip() for p in opts["trainable"].split(",") if p.strip()]
        out.append(f"model.trainable={json.dumps(parts)}")
    if opts.get("no_progress"):
        out.append("output.progress=false")
    return out


def _train_command(stage: int) -> click.Command:
    @click.command(name=f"stage{stage}", context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--config",
        "-c",
        "config_path",
        required=True,
        help="Training YAML, or a shipped config name (see `minigpt4 train configs`).",
    )
    @click.argument("overrides", nargs=-1)
    @click.option("--model", "-m", help="Model directory to train (model.dir).")
    @click.option(
        "--output", "-o", help="Run folder for logs, checkpoints and the exported model (output.dir)."
    )
    @click.option("--trainable", help=TRAINABLE_HELP)
    @click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="fp16 = AMP + GradScaler.")
    @click.option("--device", help="auto, cpu, cuda, cuda:1 … (torchrun: one GPU per process).")
    @click.option("--max-steps", type=click.IntRange(1), help="Stop after this many optimizer steps.")
    @click.option(
        "--cache-features",
        type=click.Path(file_okay=False),
        help="Compute the frozen vision side's outputs once into DIR and train from them.",
    )
    @click.option("--resume", is_flag=True, help="Continue the run in the output folder (train_state.pt).")
    @click.option("--resume-from", type=click.Path(dir_okay=False), help="Continue from this train_state.pt.")
    @click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
    @click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
    def command(
        config_path: str,
        overrides: tuple[str, ...],
        resume: bool,
        resume_from: str | None,
        print_config: bool,
        **opts: Any,
    ) -> None:
        from .config import dump_yaml, load_train_config

        if resume and resume_from:
            raise click.UsageError("give --resume or --resume-from, not both")
        config = load_train_config(config_path, [*overrides, *_overrides_from_options(opts)], stage=stage)
        if print_config:
            click.echo(dump_yaml(config), nl=False)
            return
        from .trainer import run_training

        result = run_training(
            config, resume_from or ("latest" if resume else None), echo=lambda msg: click.echo(msg, err=True)
        )
        if int(os.environ.get("RANK", "0")) == 0:
            summary = {
                "output": str(result.output_dir),
                "steps": result.steps,
                "final_loss": result.losses[-1] if result.losses else None,
                "samples_per_s": round(result.samples_per_s, 2),
                "skipped": result.skipped,
                "model_dir": str(result.model_dir) if result.model_dir else None,
            }
            click.echo(json.dumps(summary))

    command.help = (
        f"Train MiniGPT-4 stage {stage} "
        + (
            "(image-caption pairs from webdataset shards)."
            if stage == 1
            else "(cc_sbu_align folder or JSONL, instruction template)."
        )
        + " OVERRIDES are section.key=value pairs, e.g. optim.init_lr=3e-5 data.batch_size=8."
    )
    return command


@click.group(name="train", context_settings={"help_option_names": ["-h", "--help"]})
def train_group() -> None:
    """Train MiniGPT-4 (stage 1, stage 2) and generate stage-2 alignment data."""


train_group.add_command(_train_command(1))
train_group.add_command(_train_command(2))


@train_group.command(name="configs")
def list_configs() -> None:
    """List the shipped training configs (use the name with --config)."""
    from .config import resolve_config_path, shipped_configs

    for name in shipped_configs():
        click.echo(f"{name}\t{resolve_config_path(name)}")


def _polisher(opts: dict[str, Any]) -> Any:
    from .polish import LlamaCppPolisher, OpenAIPolisher

    chosen = [k for k in ("polish_url", "polish_gguf") if opts.get(k)] + (
        ["no_polish"] if opts["no_polish"] else []
    )
    if len(chosen) != 1:
        raise click.UsageError("choose one polisher: --polish-url URL, --polish-gguf FILE, or --no-polish")
    if opts["no_polish"]:
        return None
    if opts.get("polish_url"):
        key_env = opts["polish_api_key_env"]
        return OpenAIPolisher(
            opts["polish_url"],
            opts["polish_model"],
            api_key=os.environ.get(key_env),
            timeout=opts["polish_timeout"],
            retries=opts["polish_retries"],
        )
    return LlamaCppPolisher(opts["polish_gguf"], chat_format=opts["polish_format"])


@train_group.command(name="make-align-data", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--out", "-o", required=True, type=click.Path(file_okay=False), help="cc_sbu_align folder to write."
)
@click.option(
    "--model", "-m", help="Describing model: a model directory or a bundle (default: $MINIGPT4_MODEL)."
)
@click.option("--device", help="torch backend device.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), help="torch backend precision.")
@click.option("--n-gpu-layers", type=int, help="llama.cpp layers to offload (bundles).")
@click.option("--threads", type=int, help="CPU threads for llama.cpp (bundles).")
@click.option("--greedy", is_flag=True, help="Greedy decoding (default: the model's sampling settings).")
@click.option("--max-new-tokens", type=click.IntRange(1), help="Tokens per answer (default: the model's).")
@click.option("--seed", type=int, help="Sampling seed.")
@click.option(
    "--continue-below",
    type=click.IntRange(0),
    default=80,
    show_default=True,
    help="Ask 'Continue' when an answer has at most this many tokens.",
)
@click.option(
    "--polish-url", help="OpenAI-compatible server (…/v1/chat/completions) that polishes each answer."
)
@click.option(
    "--polish-model", default="gpt-3.5-turbo", show_default=True, help="Model name sent to the server."
)
@click.option(
    "--polish-api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="Environment variable holding the API key (if the server needs one).",
)
@click.option(
    "--polish-timeout", type=click.FloatRange(1), default=60.0, show_default=True, help="Seconds per request."
)
@click.option("--polish-retries", type=click.IntRange(0, 10), default=3, show_default=True)
@click.option(
    "--polish-gguf", type=click.Path(dir_okay=False), help="Polish with a local GGUF model (llama.cpp)."
)
@click.option(
    "--polish-format",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "chatml", "llama2", "llama3", "vicuna"]),
    help="Chat format of --polish-gguf.",
)
@click.option("--no-polish", is_flag=True, help="Keep the raw descriptions (still filtered).")
@ray_options(outputs=False, parallel=True)
def make_align_data_command(
    images: tuple[str, ...],
    out: str,
    greedy: bool,
    max_new_tokens: int | None,
    seed: int | None,
    continue_below: int,
    **opts: Any,
) -> None:
    """Describe IMAGES with the paper's detailed prompt, polish and filter: a cc_sbu_align folder + review."""
    from minigpt4_local.image import expand_image_inputs

    from .align_data import make_align_data

    paths = expand_image_inputs(images)
    polisher = _polisher(opts)

    def progress(record: Any) -> None:
        status = "kept" if record.kept else f"dropped ({record.reason})"
        click.echo(f"{record.image_id}: {status}", err=True)

    if ray_requested(opts, also=("parallel",)):  # the describe stage on Ray; polishing and writing stay here
        from .align_ray import ray_describe_stage

        with ray_describe_stage(
            {**opts, "greedy": greedy, "max_new_tokens": max_new_tokens, "seed": seed}, continue_below
        ) as stage:
            summary = make_align_data(paths, None, polisher, out, None, continue_below, progress, stage)
        _print_align_summary(summary)
        return
    from minigpt4_local.loader import LoadOptions, load_pipeline, resolve_model

    pipeline = load_pipeline(
        resolve_model(opts.get("model"), announce=lambda line: click.echo(line, err=True)),
        LoadOptions(
            device=opts.get("device"),
            dtype=opts.get("dtype"),
            n_gpu_layers=opts.get("n_gpu_layers"),
            threads=opts.get("threads"),
        ),
    )
    try:
        options = pipeline.sampling(greedy=greedy, max_new_tokens=max_new_tokens, seed=seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = make_align_data(paths, pipeline, polisher, out, options, continue_below, progress)
    _print_align_summary(summary)


def _print_align_summary(summary: Any) -> None:
    click.echo(
        json.dumps(
            {
                "out": summary.out,
                "images": summary.total,
                "already_done": summary.skipped_done,
                "kept": summary.kept,
                "dropped": summary.dropped,
            }
        )
    )


def _add_demo_commands() -> None:
    # The demo recipe's preparation and export steps live beside the demo code.
    from .demo.cli import demo_export_command, demo_prepare_command

    train_group.add_command(demo_prepare_command)
    train_group.add_command(demo_export_command)


_add_demo_commands()
