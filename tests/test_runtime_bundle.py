"""The torch-free runtime end to end: model dir → `export onnx` → `quantize gguf` → `describe --model BUNDLE`
in a process where importing torch fails; greedy tokens equal the PyTorch backend's (fp32 ONNX + f32 GGUF)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from minigpt4_local.cli import main
from tests.support.images import gradient_rgb, write_image
from tests.support.torch_free import run_torch_free_cli


def _cli(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exc:
        assert not exc.code, f"minigpt4 {' '.join(args)} exited {exc.code}"


def _torch_free(tmp: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return run_torch_free_cli(tmp, *args, stdin=stdin)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir) -> tuple[Path, Path]:
    model = tiny_model_dir("tiny-vicuna-7b")
    out = tmp_path_factory.mktemp("bundle") / "b"
    _cli("export", "onnx", str(model), "--out", str(out), "--precision", "fp32", "--verify-images", "2")
    _cli("quantize", "gguf", str(model), "--out", str(out), "--type", "f32", "--agreement-tokens", "0")
    return model, out


def test_bundle_describes_like_torch_without_torch(bundle, tmp_path: Path, capsys) -> None:
    model, out = bundle
    images = [write_image(tmp_path / f"{i}.png", gradient_rgb(50 + i, 40, seed=i)) for i in range(2)]
    args = ["--greedy", "--max-new-tokens", "8", "--repetition-penalty", "1.0", "--json", *map(str, images)]
    _cli("describe", "-m", str(model), *args)
    torch_records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    proc = _torch_free(tmp_path, "describe", "-m", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    ours = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["token_ids"] for r in ours] == [r["token_ids"] for r in torch_records]
    assert [r["answer"] for r in ours] == [r["answer"] for r in torch_records]
    assert all(r["token_ids"] for r in ours)


def test_bundle_chat_without_torch(bundle, tmp_path: Path) -> None:
    _, out = bundle
    image = write_image(tmp_path / "a.png", gradient_rgb(30, 30))
    proc = _torch_free(
        tmp_path,
        "chat",
        "-m",
        str(out),
        "--greedy",
        "--max-new-tokens",
        "4",
        str(image),
        stdin=f"What is it?\n/image {image}\nAnd now?\n/quit\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "damage",
    ["truncate_gguf", "corrupt_onnx", "manifest_dims", "drop_vision"],
)
def test_broken_bundles_are_refused_in_one_line(bundle, tmp_path: Path, damage: str) -> None:
    _, out = bundle
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    manifest = json.loads((broken / "minigpt4.json").read_text())
    if damage == "truncate_gguf":
        gguf = broken / "llm.gguf"
        gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])
    elif damage == "corrupt_onnx":
        onnx = broken / "vision.onnx"
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\x00" * 64
        onnx.write_bytes(bytes(data))
    elif damage == "manifest_dims":
        manifest["parts"]["vision"]["hidden"] = 999
        (broken / "minigpt4.json").write_text(json.dumps(manifest))
    else:
        (broken / "vision.onnx").unlink()
    image = write_image(tmp_path / "a.png", gradient_rgb(30, 30))
    proc = _torch_free(
        tmp_path, "describe", "-m", str(broken), "--greedy", "--max-new-tokens", "2", str(image)
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minigpt4: error:"), proc.stderr


def test_prompt_longer_than_context_is_one_line(bundle, tmp_path: Path) -> None:
    _, out = bundle
    image = write_image(tmp_path / "a.png", gradient_rgb(30, 30))
    proc = _torch_free(
        tmp_path, "describe", "-m", str(out), "--max-new-tokens", "500", "--greedy", str(image)
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "context" in lines[0], proc.stderr


def test_model_dir_with_onnx_vision_matches_torch_vision(bundle, tmp_path: Path, capsys) -> None:
    model, out = bundle
    image = write_image(tmp_path / "a.png", gradient_rgb(50, 40, seed=5))
    args = ["-m", str(model), "--greedy", "--max-new-tokens", "8", "--json", str(image)]
    _cli("describe", *args)
    torch_vision = json.loads(capsys.readouterr().out)
    _cli("describe", *args, "--vision", "onnx", "--vision-bundle", str(out))
    onnx_vision = json.loads(capsys.readouterr().out)
    assert onnx_vision["token_ids"] == torch_vision["token_ids"]
    # Without --vision-bundle: the graph `export onnx` recorded in the model directory.
    _cli("describe", *args, "--vision", "onnx")
    assert json.loads(capsys.readouterr().out)["token_ids"] == torch_vision["token_ids"]
