"""`minigpt4 quantize …` commands (registered on the main CLI as the `quantize` group).

Contract: `quantize_group` is a click group. `minigpt4 quantize gguf MODEL_DIR --out BUNDLE
[--type Q4_K_M] [--imatrix FILE] [--eval TEXTFILE] [--keep-f16] [--intermediate auto|f32|f16|bf16]
[--threads N] [--overwrite]` converts MODEL_DIR/llm to GGUF, quantizes it with llama.cpp into
BUNDLE/llm.gguf, optionally measures quality, and records the `llm` part in the bundle manifest
(`gguf_bundle.export_gguf`). Progress goes to stderr; the last stdout line is the part as JSON.
Heavy libraries load only when a command runs; errors are `MiniGPT4Error`s (one line in the main CLI).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# Kept in sync with gguf_quantize.QUANT_TYPES (not imported here so `--help` stays instant).
TYPE_CHOICES = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "F16", "BF16", "F32",
)  # fmt: skip


@click.group("quantize")
def quantize_group() -> None:
    """Quantize the language model for the torch-free runtime (llama.cpp GGUF, …)."""


@quantize_group.command("gguf")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Bundle directory.",
)
@click.option(
    "--type", "-t", "qtype", default="Q4_K_M", show_default=True,
    type=click.Choice(TYPE_CHOICES, case_sensitive=False), help="llama.cpp quantization type.",
)  # fmt: skip
@click.option(
    "--imatrix",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Importance matrix (llama-imatrix output).",
)
@click.option("--eval", "eval_text", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Text file: perplexity vs the unquantized GGUF, plus greedy agreement with torch.")  # fmt: skip
@click.option(
    "--eval-window",
    type=click.IntRange(16, 8192),
    default=512,
    show_default=True,
    help="Perplexity window (tokens).",
)
@click.option(
    "--eval-max-tokens",
    type=click.IntRange(32),
    default=4096,
    show_default=True,
    help="Tokens of the text used.",
)
@click.option("--agreement-tokens", type=click.IntRange(0, 512), default=32, show_default=True,
              help="Greedy tokens compared with torch per stitched prompt (0 = skip).")  # fmt: skip
@click.option(
    "--keep-f16",
    "keep_reference",
    is_flag=True,
    help="Keep the unquantized GGUF in the bundle (llm-<type>.gguf).",
)
@click.option("--intermediate", type=click.Choice(("auto", "f32", "f16", "bf16")), default="auto", show_default=True,
              help="Unquantized type quantized from (auto: f32 below 1B parameters, else f16).")  # fmt: skip
@click.option("--threads", type=click.IntRange(1), help="CPU threads for llama.cpp (default: all available).")
@click.option("--overwrite", is_flag=True, help="Replace a bundle made for a different model.")
def gguf_command(
    model_dir: Path,
    out: Path,
    qtype: str,
    imatrix: Path | None,
    eval_text: Path | None,
    eval_window: int,
    eval_max_tokens: int,
    agreement_tokens: int,
    keep_reference: bool,
    intermediate: str,
    threads: int | None,
    overwrite: bool,
) -> None:
    """Convert MODEL_DIR's LLaMA to GGUF and quantize it into BUNDLE/llm.gguf."""
    from .gguf_bundle import export_gguf

    def say(message: str) -> None:
        click.echo(f"  {message}", err=True)

    def progress(done: int, total: int, name: str) -> None:
        if done == total or done % 50 == 0:
            click.echo(f"  tensors {done}/{total}", err=True)

    part = export_gguf(
        model_dir, out, qtype=qtype, imatrix=imatrix, eval_text=eval_text, keep_reference=keep_reference,
        intermediate=intermediate, eval_window=eval_window, eval_max_tokens=eval_max_tokens,
        agreement_tokens=agreement_tokens, n_threads=threads, overwrite=overwrite, say=say, progress=progress,
    )  # fmt: skip
    size = (out / part["file"]).stat().st_size
    click.echo(f"wrote {out / part['file']} ({part['quant_type']}, {size / 2**20:.1f} MiB)", err=True)
    quality = part.get("quality")
    if quality:
        click.echo(
            f"perplexity {quality['ppl']:.4f} vs {quality['reference_type']} {quality['ppl_reference']:.4f} "
            f"({quality['ppl_delta']:+.4f}) on {quality['tokens']} tokens",
            err=True,
        )
    click.echo(json.dumps(part))


def _register_gptq() -> None:
    # The GPTQ command lives in its own module (its heavy imports are lazy too).
    from .gptq_cli import gptq_command

    quantize_group.add_command(gptq_command, "gptq")


_register_gptq()
