"""Exporting a model's vision side into a bundle: fp32/fp16/int8 graph, verification, manifest part.

Contract:
- `export_vision_model(model, out_bundle_dir, precision, ...)` works from an in-memory `MiniGPT4`: the
  fp32 graph (`onnx_graph`), the precision's candidates (`onnx_precision`: fp16, or int8 per-tensor and
  per-channel — the one with the higher minimum cosine is kept and both results are recorded), the
  verification (`onnx_verify`), then `vision.onnx` (+ `.data`) moved into the bundle and the `vision` part
  written into its manifest (dims, I/O, precision settings, exporter versions, the measured errors).
- `export_onnx(model_dir, out_bundle, precision, ...)` loads a model directory (vision side only), copies
  the tokenizer files into `BUNDLE/tokenizer/` (`copy_tokenizer`), exports, and records the bundle in the
  model directory (`loader.record_export`) so `--vision onnx` finds it. Both report steps through
  `progress(description, completed, total)`. User errors raise `MiniGPT4Error`s in one line.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt4_local.backends.onnx_vision import PRECISION_MAX_BATCH
from minigpt4_local.bundle import Bundle
from minigpt4_local.errors import ModelDirError

from .onnx_graph import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_fp32_graph, require_export_deps, save_onnx
from .onnx_precision import FP16_BLOCK_OPS, INT8_OP_TYPES, convert_fp16, quantize_int8
from .onnx_verify import torch_reference, verification_pixels, verify_graph

if TYPE_CHECKING:
    from minigpt4_local.model import MiniGPT4

__all__ = ["PRECISIONS", "copy_tokenizer", "export_onnx", "export_vision_model", "vision_steps"]

Progress = Callable[[str, int, int], None]

PRECISIONS = ("fp32", "fp16", "int8")
VISION_FILE = "vision.onnx"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _Steps:
    """Reports `progress(description, completed, total)` for a fixed list of steps."""

    def __init__(self, names: Sequence[str], progress: Progress | None) -> None:
        self.names, self.progress, self.done = list(names), progress, 0

    def start(self, name: str) -> None:
        if name in self.names:
            self.done = self.names.index(name)
        if self.progress is not None:
            self.progress(name, self.done, len(self.names))

    def finish(self) -> None:
        self.done = len(self.names)
        if self.progress is not None:
            self.progress("done", self.done, len(self.names))


_PRECISION_STEPS = {
    "fp32": [],
    "fp16": ["converting to fp16 (norms and softmax stay fp32)"],
    "int8": ["quantizing MatMul weights to int8 (per-tensor and per-channel)"],
}
EXPORT_STEP = "exporting the torch graph to ONNX"
VERIFY_STEP = "verifying against torch"
HASH_STEP = "hashing files and writing the manifest"


def vision_steps(precision: str) -> list[str]:
    """The progress steps of `export_vision_model` for `precision`, in order."""
    return [EXPORT_STEP, *_PRECISION_STEPS[precision], VERIFY_STEP, HASH_STEP]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _make_candidates(
    precision: str, fp32: Path, stage: Path, external_data: bool | None
) -> list[tuple[dict[str, Any], Path, bool]]:
    """Build the graph(s) for `precision` in `stage`; returns [(settings, path, external)]."""
    if precision == "fp32":
        return [({}, fp32, fp32.with_name(fp32.name + ".data").exists())]
    if precision == "fp16":
        out = stage / "fp16" / VISION_FILE
        out.parent.mkdir()
        external = convert_fp16(fp32, out, FP16_BLOCK_OPS, external_data)
        return [({"fp16": {"block_ops": list(FP16_BLOCK_OPS), "io": "float32"}}, out, external)]
    candidates = []
    for per_channel in (False, True):
        out = stage / ("int8-per-channel" if per_channel else "int8-per-tensor") / VISION_FILE
        out.parent.mkdir()
        external = quantize_int8(fp32, out, per_channel, external_data)
        settings = {
            "int8": {
                "weights": "int8",
                "activations": "dynamic uint8",
                "op_types": list(INT8_OP_TYPES),
                "per_channel": per_channel,
            }
        }
        candidates.append((settings, out, external))
    return candidates


def _copy_graph(src: Path, dst: Path, external_data: bool | None) -> None:
    """Copy a graph; re-save it when its weights must move to (or from) `dst`'s external data file."""
    import onnx

    if not src.is_file():
        raise ModelDirError(f"fp32 graph not found: {src}")
    header = onnx.load(str(src), load_external_data=False)
    has_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    if external_data is None and not has_external:
        shutil.copyfile(src, dst)
    else:
        save_onnx(onnx.load(str(src)), dst, external_data)


def _install(src: Path, bundle: Bundle) -> list[str]:
    """Move `src` (+ its external data) into the bundle root as vision.onnx; returns the relpaths."""
    rels = []
    for name in (VISION_FILE, VISION_FILE + ".data"):
        part = src.with_name(name)
        if part.exists():
            os.replace(part, bundle.root / name)
            rels.append(name)
    return rels


def export_vision_model(
    model: MiniGPT4,
    out_bundle_dir: str | os.PathLike,
    precision: str = "fp32",
    *,
    n_verify: int = 4,
    seed: int = 0,
    opset: int = ONNX_OPSET,
    external_data: bool | None = None,
    progress: Progress | None = None,
    bundle: Bundle | None = None,
    fp32_graph: str | os.PathLike | None = None,
    extra_steps: Sequence[str] = (),
) -> dict[str, Any]:
    """Export, convert, verify and record `model`'s vision side into a bundle; returns the vision part.

    `external_data`: None = only when the graph passes 2 GB, True = always (tests), False = never.
    `bundle`: an already created/opened `Bundle` to add to (default: `Bundle.create(out_bundle_dir)`).
    `fp32_graph`: a graph `export_fp32_graph` already wrote for this same model (skips the torch
    export, e.g. to make several precisions from one export); it is copied, not moved.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    require_export_deps()
    config = model.config
    bundle = bundle or Bundle.create(out_bundle_dir, config)
    bundle.root.mkdir(parents=True, exist_ok=True)
    steps = _Steps([*extra_steps, *vision_steps(precision)], progress)
    with tempfile.TemporaryDirectory(prefix=".vision-export-", dir=bundle.root) as tmp:
        stage = Path(tmp)
        fp32 = stage / "fp32" / VISION_FILE
        fp32.parent.mkdir()
        steps.start(EXPORT_STEP)
        if fp32_graph is None:
            export_fp32_graph(model, fp32, opset, external_data)
        else:
            _copy_graph(Path(fp32_graph), fp32, external_data)
        for name in _PRECISION_STEPS[precision]:  # at most one conversion step
            steps.start(name)
        candidates = _make_candidates(precision, fp32, stage, external_data)
        steps.start(VERIFY_STEP)
        v = config.vision
        pixels = verification_pixels(n_verify, v.image_size, v.image_mean, v.image_std, seed)
        ref = torch_reference(model, pixels)
        per_image = PRECISION_MAX_BATCH.get(precision) == 1  # verify the way the runtime will feed it
        results = [
            (settings, path, external, verify_graph(path, pixels, ref, per_image_runs=per_image))
            for settings, path, external in candidates
        ]
        settings, path, external, verification = max(results, key=lambda r: r[3]["min_cosine"])
        if len(results) > 1:
            verification["alternatives"] = [
                {**s, **{k: r[k] for k in ("max_abs", "max_rel", "mean_cosine", "min_cosine")}}
                for s, _, _, r in results
            ]
        steps.start(HASH_STEP)
        bundle.drop_part("vision")
        files = _install(path, bundle)
        for rel in files:
            bundle.add_file(rel, role="vision")
        part = _vision_part(config, precision, opset, external, settings, verification, pixels, seed)
        bundle.set_part("vision", part, files=files)
        bundle.save()
    steps.finish()
    return bundle.part("vision")


def _vision_part(
    config: Any,
    precision: str,
    opset: int,
    external: bool,
    settings: dict[str, Any],
    verification: dict[str, Any],
    pixels: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    size, n_img, hidden = config.vision.image_size, config.num_image_tokens, config.llm.hidden_size
    verification = {
        "reference": "torch fp32 MiniGPT4.encode_image on CPU",
        "images": len(pixels),
        "seed": seed,
        "pixels": "seeded pseudo-images (smooth blobs + noise in [0, 1]) normalised with the bundle mean/std",
        **verification,
    }
    return {
        "file": VISION_FILE,
        "format": "onnx",
        "precision": precision,
        "opset": opset,
        "external_data": external,
        "inputs": [{"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": ["batch", n_img, hidden], "dtype": "float32"}],
        "image_size": size,
        "n_img": n_img,
        "hidden": hidden,
        **settings,
        "exporter": _versions(),
        "verification": verification,
    }


def copy_tokenizer(src_dir: Path, bundle: Bundle) -> list[str]:
    """Copy the tokenizer files found in `src_dir` into BUNDLE/tokenizer/ and list them (role tokenizer)."""
    found = [src_dir / n for n in TOKENIZER_FILES if (src_dir / n).is_file()]
    bundle.drop_part("tokenizer")
    if not found:
        return []
    target = bundle.root / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copyfile(path, target / path.name)
    files = [r for p in found for r in bundle.add_file(f"{TOKENIZER_DIR}/{p.name}", role="tokenizer")]
    bundle.set_part("tokenizer", {"dir": TOKENIZER_DIR}, files=files)
    return files


LOAD_STEP = "loading the model directory (vision side)"
TOKENIZER_STEP = "copying the tokenizer"


def export_onnx(
    model_dir: str | os.PathLike,
    out_bundle: str | os.PathLike,
    precision: str = "fp32",
    *,
    n_verify: int = 4,
    opset: int = ONNX_OPSET,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """`minigpt4 export onnx MODEL_DIR --out BUNDLE`: writes vision.onnx (+ tokenizer) into BUNDLE."""
    if precision not in PRECISIONS:
        raise ModelDirError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    require_export_deps()
    from minigpt4_local.checkpoints.model_dir import read_model_config

    src = Path(model_dir)
    config = read_model_config(src)  # fails fast, before the (slow) weight load
    bundle = Bundle.create(out_bundle, config, overwrite=overwrite)
    bundle.root.mkdir(parents=True, exist_ok=True)
    steps = _Steps([LOAD_STEP, TOKENIZER_STEP, *vision_steps(precision)], progress)
    steps.start(LOAD_STEP)
    from minigpt4_local.checkpoints.model_dir import load_model_dir

    model = load_model_dir(src, device="cpu", with_llm=False)
    steps.start(TOKENIZER_STEP)
    copy_tokenizer(src / "llm", bundle)
    bundle.save()
    export_vision_model(
        model,
        bundle.root,
        precision,
        n_verify=n_verify,
        opset=opset,
        progress=progress,
        bundle=bundle,
        extra_steps=[LOAD_STEP, TOKENIZER_STEP],
    )
    from minigpt4_local.loader import record_export

    record_export(src, bundle.root)  # so `describe -m MODEL_DIR --vision onnx` finds this graph
    return bundle.root
