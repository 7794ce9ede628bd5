"""`minigpt4 quantize gptq …`: GPTQ-quantize MODEL_DIR's decoder into a bundle's `llm-gptq/`.

Contract: `gptq_command` is a click command, registered by the lead on the `quantize` group:
`minigpt4 quantize gptq MODEL_DIR --out BUNDLE --calibration SOURCE [--bits 4] [--group-size 128]
[--desc-act] [--samples N] [--seq-len L] [--answer-tokens N] [--eval-text FILE] [--eval-images DIR]
[--eval-prompts N] [--device D] [--dtype T] [--kernel K] [--overwrite]`.
SOURCE is a text file, a JSONL of captions, or a folder of images (run through the model's stitched
prompts). Progress (one line per step and per quantized layer) and the quality summary go to
stderr; the last stdout line is the manifest's `llm_gptq` part as JSON. Heavy libraries load only
when the command runs; errors are `MiniGPT4Error`s (one line in the main CLI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

# Kept in sync with gptq_runtime.KERNELS (not imported here so `--help` stays instant).
KERNEL_CHOICES = (
    "auto", "marlin", "exllama_v2", "machete", "triton", "bitblas", "torch", "torch_fused", "torch_int8", "aten",
)  # fmt: skip


@click.command("gptq")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Bundle directory.",
)
@click.option("--calibration", "-c", required=True, type=click.Path(path_type=Path),
              help="Text file, JSONL of captions, or a folder of images (MiniGPT-4 stitched prompts).")  # fmt: skip
@click.option("--bits", type=click.Choice(("2", "3", "4", "8")), default="4", show_default=True)
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Columns sharing one scale (-1: one per row); must divide the decoder's widths.")  # fmt: skip
@click.option(
    "--desc-act/--no-desc-act", default=False, show_default=True, help="Quantize columns by activation order."
)
@click.option(
    "--samples", type=click.IntRange(1), default=128, show_default=True, help="Calibration samples at most."
)
@click.option(
    "--seq-len",
    type=click.IntRange(16, 8192),
    default=512,
    show_default=True,
    help="Tokens per sample / window.",
)
@click.option("--answer-tokens", type=click.IntRange(0, 1024), default=48, show_default=True,
              help="Image folders: tokens of the reference model's answer appended to each prompt.")  # fmt: skip
@click.option("--eval-text", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Held-out text for the perplexity check (default: the tail of the calibration source).")  # fmt: skip
@click.option("--eval-images", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Images for the greedy-agreement check (default: held-out calibration images, else synthetic).")  # fmt: skip
@click.option(
    "--eval-prompts",
    type=click.IntRange(0, 64),
    default=4,
    show_default=True,
    help="Stitched prompts compared.",
)
@click.option(
    "--eval-tokens",
    type=click.IntRange(1, 512),
    default=32,
    show_default=True,
    help="Greedy tokens per prompt.",
)
@click.option("--device", help="Where to quantize: cpu, cuda, cuda:1 … (default: cuda if available).")
@click.option(
    "--dtype", type=click.Choice(("fp32", "fp16", "bf16")), help="Default: fp16 on CUDA, fp32 on CPU."
)
@click.option("--kernel", type=click.Choice(KERNEL_CHOICES), default="auto", show_default=True,
              help="GPTQ kernel for the post-quantization check.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace the bundle's existing GPTQ decoder.")
def gptq_command(
    model_dir: Path,
    out: Path,
    calibration: Path,
    bits: str,
    group_size: int,
    desc_act: bool,
    samples: int,
    seq_len: int,
    answer_tokens: int,
    eval_text: Path | None,
    eval_images: Path | None,
    eval_prompts: int,
    eval_tokens: int,
    device: str | None,
    dtype: str | None,
    kernel: str,
    overwrite: bool,
) -> None:
    """GPTQ-quantize MODEL_DIR's LLaMA into BUNDLE/llm-gptq (GPTQModel)."""
    from .gptq import GptqSettings, quantize_gptq

    stream = sys.stderr  # captured now: GPTQModel's console output is redirected while it runs

    def say(message: str) -> None:
        print(f"  {message}", file=stream, flush=True)

    settings = GptqSettings(
        bits=int(bits), group_size=group_size, desc_act=desc_act, max_samples=samples, seq_len=seq_len,
        answer_tokens=answer_tokens, eval_prompts=eval_prompts, eval_new_tokens=eval_tokens,
        device=device, dtype=dtype, kernel=kernel,
    )  # fmt: skip
    result = quantize_gptq(
        model_dir, out, calibration, settings, eval_text=eval_text, eval_images=eval_images, progress=say,
        overwrite=overwrite,
    )  # fmt: skip
    size = sum(p.stat().st_size for p in result.gptq_dir.rglob("*") if p.is_file())
    click.echo(
        f"wrote {result.gptq_dir} ({bits}-bit, group {group_size}, {size / 2**20:.1f} MiB, kernel {result.kernel})",
        err=True,
    )
    click.echo(json.dumps(result.part, sort_keys=True))
