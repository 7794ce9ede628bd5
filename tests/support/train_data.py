"""Tiny models and training data written on the fly for the training tests (no downloads).

Contract:
- `make_tiny_model_dir(root, preset="tiny-vicuna-7b", seed=0) -> Path`: a model directory (`save_model_dir`)
  of a tiny preset with a deterministic, well-scaled random init (HF's BLIP-2 vision init is ~1e-10, which
  would make every image look the same) and the tiny sentencepiece tokenizer. Cached per (preset, seed)
  in `root/_cache` and copied, so tests can call it cheaply.
- Toy task: `COLORS` maps a colour name to an RGB value and `CAPTIONS` to its caption; `toy_image(color,
  seed)` is a noisy solid-colour PNG/JPEG-able image. A frozen tiny model can learn these captions through
  its projection alone, so the loss must fall clearly.
- `write_wds_shards(folder, shards, per_shard, seed=0, corrupt=())` writes `shard-{i:03d}.tar` files with
  `{key}.jpg` + `{key}.json` samples (every 3rd sample uses `.png` + `.txt` instead); `corrupt` lists
  sample keys whose image bytes are garbage. Returns the shard paths.
- `write_cc_sbu_align(folder, n, seed=0, corrupt=())` writes `filter_cap.json` + `image/{id}.jpg`.
- `write_jsonl(path, n, seed=0)` writes a JSONL file mixing caption and conversation records.
- `tiny_config(stage, model_dir, data_path, out, kind=None, **sections)` returns a training-config dict for the tiny runs.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .tiny_tokenizer import make_tiny_sentencepiece

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (230, 220, 40)}
CAPTIONS = {
    "red": "A red car on the street.",
    "blue": "The blue sky with white clouds!",
    "green": "A green tree in the park.",
    "yellow": "A yellow banana on a wooden table.",
}


def _init_weights(model: Any, seed: int) -> None:
    """N(0, 1/fan_in) matrices, N(0, 1) query tokens, small token embeddings (so the image rows can steer the
    frozen decoder), norm scales 1, small biases."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                if "embed_tokens" in name:
                    std = 0.1
                elif "query_tokens" in name:
                    std = 1.0
                else:
                    std = 1 / math.sqrt(math.prod(param.shape[1:]))
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def make_tiny_model_dir(root: str | Path, preset: str = "tiny-vicuna-7b", seed: int = 0) -> Path:
    """A saved tiny model directory (see module docstring)."""
    import torch

    from minigpt4_local.checkpoints.model_dir import save_model_dir
    from minigpt4_local.config import get_preset
    from minigpt4_local.model import MiniGPT4

    root = Path(root)
    cached = root / "_cache" / f"{preset}-{seed}"
    if not cached.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MiniGPT4(get_preset(preset))
        _init_weights(model, seed)
        tok = make_tiny_sentencepiece(root / "_cache" / "tokenizer")
        save_model_dir(model, tok, cached)
    out = root / f"model-{preset}-{seed}"
    if not out.exists():
        shutil.copytree(cached, out)
    return out


def toy_image(color: str, seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLORS[color], dtype=np.float32)
    pixels = base + rng.normal(0, 18, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _color_of(i: int) -> str:
    return list(COLORS)[i % len(COLORS)]


def write_wds_shards(
    folder: str | Path, shards: int, per_shard: int, seed: int = 0, corrupt: Iterable[str] = ()
) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bad = set(corrupt)
    paths = []
    for s in range(shards):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:03d}{j:05d}"
                color = _color_of(i * 7 + seed)
                image = toy_image(color, seed * 100_000 + i)
                if i % 3 == 2:
                    _add(tar, f"{key}.png", b"not a png" if key in bad else _encode(image, "PNG"))
                    _add(tar, f"{key}.txt", CAPTIONS[color].encode())
                else:
                    _add(tar, f"{key}.jpg", b"\xff\xd8garbage" if key in bad else _encode(image, "JPEG"))
                    _add(tar, f"{key}.json", json.dumps({"caption": CAPTIONS[color]}).encode())
        paths.append(path)
    return paths


def write_cc_sbu_align(folder: str | Path, n: int, seed: int = 0, corrupt: Iterable[int] = ()) -> Path:
    folder = Path(folder)
    (folder / "image").mkdir(parents=True, exist_ok=True)
    bad = set(corrupt)
    annotations = []
    for i in range(n):
        color = _color_of(i * 5 + seed)
        path = folder / "image" / f"{i}.jpg"
        if i in bad:
            path.write_bytes(b"\xff\xd8 truncated")
        else:
            toy_image(color, seed * 100_000 + i).save(path, format="JPEG")
        annotations.append({"image_id": str(i), "caption": CAPTIONS[color]})
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
    return folder


def write_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    path = Path(path)
    images = path.parent / "jsonl_images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        color = _color_of(i + seed)
        name = f"img{i}.png"
        toy_image(color, seed * 100_000 + i).save(images / name)
        if i % 2:
            conv = [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": CAPTIONS[color]},
            ]
            lines.append(json.dumps({"image": f"jsonl_images/{name}", "conversations": conv}))
        else:
            lines.append(json.dumps({"image": str(images / name), "caption": CAPTIONS[color]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(
    stage: int,
    model_dir: str | Path,
    data_path: str | Path,
    out: str | Path,
    kind: str | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A small, fast training config (fp32, CPU, no workers, no crops) for the tests."""
    kind = kind or ("webdataset" if stage == 1 else "cc_sbu_align")
    config: dict[str, Any] = {
        "stage": stage,
        "model": {"dir": str(model_dir)},
        "data": {
            "sources": [{"name": "toy", "kind": kind, "path": str(data_path), "ratio": 1}],
            "batch_size": 4,
            "num_workers": 0,
            "shuffle_buffer": 8,
            "shuffle_initial": 4,
            "augment": "none",
        },
        "optim": {
            "epochs": 1,
            "iters_per_epoch": 10,
            "init_lr": 1e-2,
            "min_lr": 1e-3,
            "warmup_lr": 1e-3,
            "warmup_steps": 2,
            "precision": "fp32",
            "device": "cpu",
            "log_every": 100,
        },
        "output": {"dir": str(out), "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
