"""`minigpt4 train …` command wiring: shipped configs, overrides, a tiny stage-1 run, resume, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from minigpt4_local.errors import ConfigError
from minigpt4_local.train.cli import train_group
from minigpt4_local.train.report import read_log
from tests.support.train_data import make_tiny_model_dir, write_cc_sbu_align, write_wds_shards


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: str):
    return CliRunner().invoke(train_group, list(args))


def test_cli_module_imports_without_torch() -> None:
    code = "import sys, minigpt4_local.train.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_configs_and_print_config(tmp_path: Path) -> None:
    listing = invoke("configs")
    assert listing.exit_code == 0 and "vicuna7b-stage1" in listing.output and "tiny-stage2" in listing.output
    shown = invoke(
        "stage2",
        "--config",
        "vicuna7b-stage2",
        "optim.init_lr=5e-5",
        "--model",
        str(tmp_path),
        "--trainable",
        "projection,qformer",
        "--precision",
        "bf16",
        "--print-config",
    )
    assert shown.exit_code == 0, shown.output
    cfg = yaml.safe_load(shown.output)
    assert cfg["optim"]["init_lr"] == 5e-5 and cfg["optim"]["precision"] == "bf16"
    assert cfg["model"]["dir"] == str(tmp_path) and cfg["model"]["trainable"] == ["projection", "qformer"]
    wrong = invoke("stage1", "--config", "vicuna7b-stage2", "--print-config")
    assert isinstance(wrong.exception, ConfigError) and "stage2" in str(wrong.exception)
    bad = invoke("stage1", "--config", "tiny-stage1", "optim.nope=1", "--print-config")
    assert isinstance(bad.exception, ConfigError) and "optim.nope" in str(bad.exception)
    both = invoke("stage1", "--config", "tiny-stage1", "--resume", "--resume-from", "x.pt")
    assert both.exit_code == 2 and "not both" in both.output


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_run_through_the_cli_then_resume(tmp_path: Path, stage: int) -> None:
    model_dir = make_tiny_model_dir(tmp_path)
    if stage == 1:
        write_wds_shards(tmp_path / "wds", 2, 6)
        source = f"{{name: toy, kind: webdataset, path: '{tmp_path}/wds/shard-{{000..001}}.tar'}}"
    else:
        write_cc_sbu_align(tmp_path / "cc", 8)
        source = f"{{name: toy, kind: cc_sbu_align, path: '{tmp_path}/cc'}}"
    out = tmp_path / "run"
    common = [
        f"stage{stage}",
        "--config",
        f"tiny-stage{stage}",
        f"data.sources=[{source}]",
        "--model",
        str(model_dir),
        "--output",
        str(out),
        "--no-progress",
    ]
    first = invoke(*common, "--max-steps", "2")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["model_dir"] == str(out / "model")
    assert (out / "model" / "config.json").is_file() and (out / "train_config.yaml").is_file()
    again = invoke(*common, "--max-steps", "2")
    assert isinstance(again.exception, ConfigError) and "--resume" in str(again.exception)
    resumed = invoke(*common, "--max-steps", "4", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in read_log(out / "train_log.jsonl")] == [1, 2, 3, 4]
