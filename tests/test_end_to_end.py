"""The whole toolkit on a tiny model: train stage 2 → model directory → `export onnx` + `quantize gguf`
→ `describe --model BUNDLE`; the bundle answers with the trained projection, like the torch backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from minigpt4_local.cli import cli, main
from tests.support.images import gradient_rgb, write_image
from tests.support.train_data import make_tiny_model_dir, write_cc_sbu_align


def _main(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:
        assert not exc.code, f"minigpt4 {' '.join(args)} exited {exc.code}"


@pytest.mark.slow
def test_train_export_quantize_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.numpy import load_file

    base = make_tiny_model_dir(tmp_path / "base")
    write_cc_sbu_align(tmp_path / "cc", 8)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "stage2",
            "--config",
            "tiny-stage2",
            f"data.sources=[{{name: toy, kind: cc_sbu_align, path: '{tmp_path}/cc'}}]",
            "--model",
            str(base),
            "--output",
            str(run),
            "--max-steps",
            "3",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    trained = run / "model"
    before = load_file(str(base / "vision.safetensors"))["llama_proj.weight"]
    after = load_file(str(trained / "vision.safetensors"))["llama_proj.weight"]
    assert abs(after - before).max() > 0  # the projection really trained

    bundle = tmp_path / "bundle"
    _main("export", "onnx", str(trained), "--out", str(bundle), "--verify-images", "2")
    _main("quantize", "gguf", str(trained), "--out", str(bundle), "--type", "f32", "--agreement-tokens", "0")
    capsys.readouterr()

    image = write_image(tmp_path / "photo.png", gradient_rgb(48, 36, seed=7))
    args = ["--greedy", "--max-new-tokens", "6", "--repetition-penalty", "1.0", "--json", str(image)]
    _main("describe", "-m", str(trained), *args)
    reference = json.loads(capsys.readouterr().out)
    _main("describe", "-m", str(bundle), *args)
    ours = json.loads(capsys.readouterr().out)
    assert ours["token_ids"] == reference["token_ids"] and ours["token_ids"]
