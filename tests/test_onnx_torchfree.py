"""The bundle runtime works where torch cannot be imported.

A subprocess gets a `sitecustomize` whose meta-path hook raises ImportError for `torch` and
`transformers` (and anything under them). In it: `import minigpt4_local`, open the bundle with
checksums, encode a pixel batch and a list of PIL images with `OnnxVisionEncoder`. The parent (which
has torch) computed the expected embeddings with the torch model; the child's must match them to
1e-4 and the child must report that torch never entered `sys.modules`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

BLOCKER = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        BLOCKED = ("torch", "transformers")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np

    try:
        import torch  # noqa: F401
        raise SystemExit("the torch blocker is not active")
    except ImportError:
        pass

    import minigpt4_local
    from minigpt4_local.backends.onnx_vision import OnnxVisionEncoder
    from minigpt4_local.bundle import Bundle
    from PIL import Image

    bundle_dir, data = sys.argv[1], np.load(sys.argv[2])
    encoder = OnnxVisionEncoder(Bundle.open(bundle_dir, verify=True))
    out = encoder.encode(data["pixels"])
    images = [Image.fromarray(a) for a in data["images"]]
    out_images = encoder.encode_images(images)
    np.save(sys.argv[3], out)
    np.save(sys.argv[4], out_images)
    loaded = sorted({m.split(".")[0] for m in sys.modules})
    print(json.dumps({"shape": list(out.shape), "providers": encoder.providers,
                      "heavy": [m for m in loaded if m in ("torch", "transformers", "onnx")]}))
    """
)


def test_bundle_runs_without_torch(tmp_path: Path) -> None:
    import torch

    from minigpt4_local.config import get_preset
    from minigpt4_local.export.vision_export import export_vision_model
    from minigpt4_local.image import preprocess
    from minigpt4_local.model import MiniGPT4
    from tests.conftest import randomize_

    torch.manual_seed(0)
    model = MiniGPT4(get_preset("tiny-llama2-7b"), with_llm=False)
    randomize_(model, seed=3)
    bundle_dir = tmp_path / "bundle"
    export_vision_model(model, bundle_dir, "fp32", n_verify=2)

    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1.5, 2.0, (3, 3, 56, 56)).astype(np.float32)
    images = rng.integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    from PIL import Image

    image_pixels = preprocess(
        [Image.fromarray(a) for a in images],
        56,
        model.config.vision.image_mean,
        model.config.vision.image_std,
    )
    with torch.inference_mode():
        expected = model.encode_image(torch.from_numpy(pixels)).numpy()
        expected_images = model.encode_image(torch.from_numpy(image_pixels)).numpy()
    np.savez(tmp_path / "in.npz", pixels=pixels, images=images)

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [
            sys.executable,
            str(tmp_path / "child.py"),
            str(bundle_dir),
            str(tmp_path / "in.npz"),
            str(tmp_path / "out.npy"),
            str(tmp_path / "out_images.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [3, 4, 64]
    assert report["heavy"] == [], f"torch-free runtime imported {report['heavy']}"
    assert report["providers"][-1] == "CPUExecutionProvider"
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-4
    assert np.abs(np.load(tmp_path / "out_images.npy") - expected_images).max() <= 1e-4


def test_blocker_really_blocks_torch(tmp_path: Path) -> None:
    """Guard against a vacuous pass: under the blocker, `import torch` must fail."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "blocked in this test" in result.stderr


@pytest.mark.parametrize(
    "module", ["minigpt4_local", "minigpt4_local.bundle", "minigpt4_local.backends.onnx_vision"]
)
def test_runtime_modules_import_without_torch(tmp_path: Path, module: str) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = f"import {module}, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
