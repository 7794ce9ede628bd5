"""`minigpt4 export …` commands (registered on the main CLI as the `export` group).

Contract: `export_group` is a click group; `minigpt4 export onnx MODEL_DIR --out BUNDLE
[--precision fp32|fp16|int8] [--verify-images N] [--overwrite]` writes `vision.onnx` (and the tokenizer)
into BUNDLE with a rich progress display on stderr, then prints the measured error vs torch. Heavy
libraries (torch, onnx, onnxruntime) are imported only when a command runs. Errors are
`MiniGPT4Error`s, which the main CLI prints as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

PRECISION_CHOICES = ("fp32", "fp16", "int8")


@click.group("export")
def export_group() -> None:
    """Export a model directory to a torch-free bundle (ONNX vision encoder, …)."""


@export_group.command("onnx")
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
    "--precision",
    type=click.Choice(PRECISION_CHOICES),
    default="fp32",
    show_default=True,
    help="fp32 as exported; fp16 with norms/softmax kept fp32 (GPU); int8 MatMul weights (CPU).",
)
@click.option(
    "--verify-images",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Images compared with torch.",
)
@click.option("--opset", type=click.IntRange(18, 23), default=20, show_default=True, help="ONNX opset.")
@click.option("--overwrite", is_flag=True, help="Replace a bundle made for a different model.")
def onnx_command(
    model_dir: Path, out: Path, precision: str, verify_images: int, opset: int, overwrite: bool
) -> None:
    """Export MODEL_DIR's vision encoder to BUNDLE/vision.onnx, verified against torch."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from .vision_export import export_onnx

    console = Console(stderr=True)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:  # the summary line stays
        task = bar.add_task(f"export {precision}", total=None)

        def progress(description: str, completed: int, total: int) -> None:
            bar.update(task, description=description, completed=completed, total=total)

        root = export_onnx(
            model_dir,
            out,
            precision,
            n_verify=verify_images,
            opset=opset,
            overwrite=overwrite,
            progress=progress,
        )
    _report(console, root)


def _report(console: Any, root: Path) -> None:
    from minigpt4_local.bundle import Bundle

    bundle = Bundle.open(root, verify=False)
    part = bundle.part("vision")
    v = part["verification"]
    size = sum(bundle.files()[f]["bytes"] for f in part["files"])
    console.print(
        f"wrote {root / part['file']} ({part['precision']}, {size / 2**20:.1f} MiB, opset {part['opset']}): "
        f"vs torch on {v['images']} images max_abs {v['max_abs']:.3g}, max_rel {v['max_rel']:.3g}, "
        f"min cosine {v['min_cosine']:.6f}"
    )
