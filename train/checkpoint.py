"""Resumable training state, atomic writes, and exports of the trained weights.

Contract:
- `atomic_torch_save(obj, path)`: `torch.save` to a temporary file in the same folder, fsync, then
  `os.replace` (and fsync of the folder): a crash at any moment leaves either the old file or the new
  one, never a truncated one.
- `save_train_state(path, state)` / `load_train_state(path)`: the resumable state (`STATE_FORMAT`):
  trainable weights, optimizer, scheduler step, GradScaler, step/epoch, every rank's RNG states and data
  position, the config. Loading uses `torch.load(weights_only=True)`; a foreign or corrupt file raises
  `CheckpointError`.
- `capture_rng(device)` / `restore_rng(state, device)`: Python, NumPy, torch CPU and CUDA generators, as
  plain lists/tensors (loadable with `weights_only=True`).
- `export_original_checkpoint(trainable, path, epoch)`: the original's interchange layout,
  `{"model": {"llama_proj.weight", "llama_proj.bias"}, "epoch": …}`, readable by `minigpt4 convert --proj`.
- `export_model_dir(model, source_dir, out, trained_parts)`: a model directory that `minigpt4 describe`,
  `export` and `quantize` accept. With a frozen LLM, the source directory's `config.json` is copied,
  `vision.safetensors` is the source file with the trained vision-side tensors replaced (frozen ones keep
  their stored dtype), and `llm/` is hard-linked (or copied) from the source; with a trained LLM the whole
  model is written by `save_model_dir`. Written to a temporary sibling and renamed into place.
- `load_projection_init(path, in_features, out_features)`: `llama_proj.*` from an original `.pth`
  projection checkpoint or from one of our `train_state.pt` files.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt4_local.checkpoints.model_dir import replace_dir
from minigpt4_local.errors import CheckpointError

STATE_FORMAT = "minigpt4-local/train-state"
STATE_VERSION = 1
STATE_FILE = "train_state.pt"
PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
# Vision-side tensor prefixes stored in vision.safetensors (everything except the LLM).
VISION_SIDE = ("vision_model.", "qformer.", "query_tokens", "llama_proj.")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_torch_save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training state to resume at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle needing arbitrary code, ...
        raise CheckpointError(
            f"{path}: not a readable training state ({' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training state of this tool")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path}: training state version {state.get('version')!r}; this release reads {STATE_VERSION}"
        )
    return state


# ----- RNG ------------------------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----- exports -----------------------------------------------------------------------------------------------


def export_original_checkpoint(trainable: dict[str, torch.Tensor], path: str | Path, epoch: int) -> None:
    """`{"model": {"llama_proj.weight", "llama_proj.bias"}, "epoch"}` (the original's interchange layout)."""
    model = {k: trainable[k].detach().float().cpu().clone() for k in PROJ_KEYS if k in trainable}
    atomic_torch_save({"model": model, "epoch": epoch}, path)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    for item in sorted(src.rglob("*")):
        target = dst / item.relative_to(src)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, target)  # a frozen 7B LLM need not be copied
        except OSError:
            shutil.copy2(item, target)


def export_model_dir(
    model: Any, source_dir: str | Path, out: str | Path, trained_parts: Iterable[str]
) -> Path:
    """Model directory with the trained weights (see module docstring)."""
    from minigpt4_local.checkpoints.model_dir import CONFIG_FILE, LLM_DIR, VISION_FILE, save_model_dir
    from minigpt4_local.checkpoints.safe_load import load_safetensors, save_safetensors

    source, out = Path(source_dir), Path(out)
    if "llm" in set(trained_parts):
        return save_model_dir(model, source / LLM_DIR, out, overwrite=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shutil.copyfile(source / CONFIG_FILE, tmp / CONFIG_FILE)
        tensors = load_safetensors(source / VISION_FILE)
        trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith(VISION_SIDE)}
        state = model.state_dict()
        for name in trained:
            tensors[name] = state[name].detach().float().cpu()
        save_safetensors(dict(sorted(tensors.items())), tmp / VISION_FILE)
        _link_or_copy_tree(source / LLM_DIR, tmp / LLM_DIR)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_projection_init(path: str | Path, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    """llama_proj.* from an original projection checkpoint or from a train_state.pt (shape-checked)."""
    from minigpt4_local.checkpoints.minigpt4_proj import check_projection_shape, load_projection
    from minigpt4_local.checkpoints.safe_load import load_torch_checkpoint

    path = Path(path)
    raw = load_torch_checkpoint(path)
    if isinstance(raw, dict) and raw.get("format") == STATE_FORMAT:
        proj = {k: v for k, v in raw["trainable"].items() if k in PROJ_KEYS}
        if len(proj) != len(PROJ_KEYS):
            raise CheckpointError(f"{path}: this training state did not train the projection")
    else:
        proj = {k: v for k, v in load_projection(path).items() if k in PROJ_KEYS}
    check_projection_shape(proj, in_features, out_features, str(path))
    return proj
