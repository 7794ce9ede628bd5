"""The model directory everything loads, and the conversion that produces it.

Layout:
    MODEL_DIR/config.json          MiniGPT4Config JSON (config.save_config / load_config)
    MODEL_DIR/vision.safetensors   vision_model.*, qformer.*, query_tokens, llama_proj.* in their source
                                   dtype (EVA's fp16 stays fp16: lossless); loaded upcast to fp32
    MODEL_DIR/llm/                 HF LlamaForCausalLM directory incl. tokenizer (bos/eos = tokenizer's)

Contract:
- `convert(vit, qformer=None, proj, llm, out, preset=None, config_path=None, progress=None) -> Path`:
  `vit` is `eva_vit_g.pth` or an HF BLIP-2 directory (which then also provides the Q-Former and
  ln_vision); `qformer` is `blip2_pretrained_flant5xxl.pth` or an HF BLIP-2 directory; `proj` a
  MiniGPT-4 projection checkpoint; `llm` an HF LLaMA directory. Dimensions fixed by the weights are read
  from their shapes and checked against the preset/config (mismatch → `CheckpointError` naming the key
  and the preset that would fit); with neither given, the first preset whose dimensions all match is
  used. Heads, eps and template come from the preset/config, except the LLM's RMSNorm eps and RoPE
  theta, which follow the LLM directory's config.json as in the original (reported when they differ).
  An explicit `qformer` overrides the Q-Former an HF BLIP-2 `vit` directory would provide.
  Load order follows the original (EVA, then the BLIP-2 checkpoint, then the projection checkpoint,
  each overriding what it carries): a `visual_encoder.*` inside the BLIP-2 file wins over EVA's, an
  `ln_vision.*` inside the projection file wins over BLIP-2's.
  Llama-2 variant (no Q-Former): an explicit `qformer` is REFUSED (`CheckpointError`: the original
  never loads one, so passing it is a mistake); from an HF BLIP-2 `vit` only the ViT is taken, and
  ln_vision stays identity (weight 1, bias 0) unless the projection file carries one (docs/numerics.md §6).
  The directory is written to a temporary sibling and renamed into place: an interrupted conversion
  leaves no half directory. `out` must not exist unless `overwrite=True`.
- `load_model_dir(path, device="cpu", dtype=torch.float32, with_llm=True) -> MiniGPT4` checks the
  files, the config and every key and shape (missing/unexpected/mis-shaped → one-line
  `ModelDirError`/`CheckpointError`), builds the model on the meta device and assigns the tensors
  (no random init of a 7B model); vision side in fp32 (then `set_precision(dtype)`), the LLM in `dtype`.
- `save_model_dir(model, tokenizer_src_dir, out, overwrite=False) -> Path` writes a model built in
  memory (tests, training) in the same layout, atomically.
- `read_model_config(path) -> MiniGPT4Config` reads only config.json (torch-free).
Importing this module does not import torch (converters import it when called).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import MiniGPT4Config, get_preset, load_config, save_config
from ..errors import CheckpointError, ConfigError, ModelDirError
from .hf_blip2 import read_hf_blip2
from .hf_llama import SAFETENSORS_INDEX, TOKENIZER_FILES, LLMDims, copy_llm_dir, inspect_llm_dir
from .lavis import convert_blip2_lavis, convert_eva_vit
from .layout import check_state, choose_config, expected_shapes, merge_dims, vision_dims
from .minigpt4_proj import check_projection_shape, load_projection
from .names import count_layers, drop_layers_from
from .safe_load import load_safetensors, load_torch_checkpoint, save_safetensors

if TYPE_CHECKING:
    import torch

    from ..model import MiniGPT4

CONFIG_FILE = "config.json"
VISION_FILE = "vision.safetensors"
LLM_DIR = "llm"
VISION_LAYERS = "vision_model.encoder.layers."
LN_VISION = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")
QFORMER_KEYS = ("qformer.", "query_tokens")

Progress = Callable[[str], None]


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message)


# ----- reading the sources --------------------------------------------------------------------


def _read_vit(vit: Path, progress: Progress | None) -> dict[str, torch.Tensor]:
    """vision_model.* (all blocks; + ln_vision/Q-Former when `vit` is an HF BLIP-2 directory)."""
    if vit.is_dir():
        return read_hf_blip2(vit, progress=progress)
    _say(progress, f"reading EVA ViT {vit.name}")
    if vit.suffix == ".safetensors":
        return convert_eva_vit(load_safetensors(vit), upcast=False)
    return convert_eva_vit(load_torch_checkpoint(vit), upcast=False)


def _read_qformer(qformer: Path, progress: Progress | None) -> dict[str, torch.Tensor]:
    """qformer.*, query_tokens, ln_vision (+ vision_model.* if a LAVIS file carries visual_encoder.*)."""
    if qformer.is_dir():
        return read_hf_blip2(qformer, parts=("ln_vision", "qformer"), progress=progress)
    _say(progress, f"reading BLIP-2 Q-Former {qformer.name}")
    return convert_blip2_lavis(load_torch_checkpoint(qformer), upcast=False)


def _exists(path: str | Path | None, what: str) -> Path:
    if path is None:
        raise CheckpointError(f"missing input: {what}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    return path


def _requested_config(
    preset: str | None, config_path: str | Path | None
) -> tuple[MiniGPT4Config | None, str | None]:
    if preset is not None and config_path is not None:
        raise ConfigError("give either a preset or a config file, not both")
    if preset is not None:
        return get_preset(preset), f"preset {preset}"
    if config_path is not None:
        return load_config(config_path), f"config {config_path}"
    return None, None


def _is_qformer_key(key: str) -> bool:
    return key.startswith(QFORMER_KEYS)


def _assemble(
    cfg: MiniGPT4Config,
    vit_state: dict[str, torch.Tensor],
    qformer_state: dict[str, torch.Tensor] | None,
    proj_state: dict[str, torch.Tensor],
    progress: Progress | None,
) -> dict[str, torch.Tensor]:
    """The vision.safetensors tensors for `cfg`, in the original's load order."""
    import torch

    state = dict(vit_state)
    if qformer_state:
        overridden = [k for k in qformer_state if k.startswith(VISION_LAYERS) and k in vit_state]
        if overridden:
            _say(
                progress,
                "the BLIP-2 checkpoint carries visual_encoder weights: they override EVA's (as in the original)",
            )
        state.update(qformer_state)
    if cfg.qformer is None:
        # Llama-2 variant: no Q-Former, and BLIP-2's ln_vision is never loaded (docs/numerics.md §6).
        state = {k: v for k, v in state.items() if not _is_qformer_key(k) and k not in LN_VISION}
        width = cfg.vision.hidden_size
        state[LN_VISION[0]] = torch.ones(width)
        state[LN_VISION[1]] = torch.zeros(width)
    elif "query_tokens" not in state:
        raise CheckpointError(
            f"preset/config {cfg.name} has a Q-Former: pass its weights (blip2_pretrained_flant5xxl.pth or an HF BLIP-2 dir)"
        )
    if LN_VISION[0] in proj_state:
        _say(progress, "ln_vision taken from the projection checkpoint")
    state.update(proj_state)
    available = count_layers(state, VISION_LAYERS)
    if available > cfg.vision.num_layers:
        _say(
            progress,
            f"ignoring {available - cfg.vision.num_layers} ViT block(s) beyond the {cfg.vision.num_layers} used",
        )
        state = drop_layers_from(state, VISION_LAYERS, cfg.vision.num_layers)
    check_state(state, expected_shapes(cfg), "converted vision weights")
    return state


def _adopt_llm_numerics(cfg: MiniGPT4Config, dims: LLMDims, progress: Progress | None) -> None:
    """RMSNorm eps and RoPE theta follow the LLM's own config.json: the original builds the LLM from it
    (`from_pretrained`), e.g. early Llama-2-chat downloads say eps 1e-6 where later ones say 1e-5."""
    for key in ("rms_norm_eps", "rope_theta"):
        ours, theirs = getattr(cfg.llm, key), getattr(dims, key)
        if ours != theirs:
            _say(
                progress, f"llm.{key}: using {theirs} from the LLM's config.json (preset/config said {ours})"
            )
            setattr(cfg.llm, key, theirs)


# ----- atomic directory writes ----------------------------------------------------------------


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing an existing `out` (renames only)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelDirError(f"{out} already exists; choose another output or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----- convert ----------------------------------------------------------------------------------


def convert(
    vit: str | Path,
    qformer: str | Path | None = None,
    proj: str | Path | None = None,
    llm: str | Path | None = None,
    out: str | Path | None = None,
    preset: str | None = None,
    config_path: str | Path | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> Path:
    """Build MODEL_DIR from the original checkpoints (see module docstring)."""
    vit_path = _exists(vit, "ViT checkpoint (eva_vit_g.pth or HF BLIP-2 directory)")
    proj_path = _exists(proj, "projection checkpoint (MiniGPT-4 .pth)")
    llm_path = _exists(llm, "LLM directory (HF LLaMA/Vicuna)")
    qformer_path = _exists(qformer, "Q-Former checkpoint") if qformer is not None else None
    if out is None:
        raise ModelDirError("missing output directory")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelDirError(f"{out} already exists; choose another output or allow overwriting")
    requested, label = _requested_config(preset, config_path)

    proj_state = load_projection(proj_path, progress=progress)
    llm_source = inspect_llm_dir(llm_path)
    vit_state = _read_vit(vit_path, progress)
    qformer_state = _read_qformer(qformer_path, progress) if qformer_path is not None else None

    combined = {**vit_state, **(qformer_state or {}), **proj_state}
    found = merge_dims(vision_dims(combined), llm_source.dims.as_dims())
    cfg = choose_config(found, requested, label)
    if requested is None:
        _say(progress, f"weights match preset {cfg.name}")
    _adopt_llm_numerics(cfg, llm_source.dims, progress)
    if cfg.qformer is None and qformer_path is not None:
        raise CheckpointError(
            f"{cfg.name} has no Q-Former (Llama-2 variant): the original never loads {qformer_path.name}; drop it"
        )
    check_projection_shape(proj_state, cfg.projector_in_features, cfg.llm.hidden_size, str(proj_path))
    state = _assemble(cfg, vit_state, qformer_state, proj_state, progress)

    with _atomic_dir(out, overwrite) as tmp:
        save_config(cfg, tmp / CONFIG_FILE)
        _say(progress, f"writing {VISION_FILE} ({len(state)} tensors)")
        save_safetensors(dict(sorted(state.items())), tmp / VISION_FILE)
        copy_llm_dir(llm_path, tmp / LLM_DIR, progress=progress)
    _say(progress, f"model directory written: {out}")
    return out


# ----- load / save --------------------------------------------------------------------------------


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelDirError(
            f"{path.parent}: missing {what} ({path.name}); is this a converted model directory?"
        )
    return path


def _llm_shards(llm_dir: Path) -> list[Path]:
    index = llm_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelDirError(f"{index}: unreadable index ({exc})") from None
        return [llm_dir / name for name in sorted(set(weight_map.values()))]
    return [_require(llm_dir / "model.safetensors", "LLM weights")]


def _assign(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=False, assign=True)


def _materialize_buffers(model: MiniGPT4, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in any file: rebuild them on `device`."""
    if model.llm is None:
        return
    rotary = model.llm.model.rotary_emb
    with device:
        model.llm.model.rotary_emb = type(rotary)(config=rotary.config)
    leftover = [n for n, b in model.named_buffers() if b.is_meta] + [
        n for n, p in model.named_parameters() if p.is_meta
    ]
    if leftover:
        raise ModelDirError(f"internal: {leftover[0]} was not loaded")


def load_model_dir(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    with_llm: bool = True,
) -> MiniGPT4:
    """Load MODEL_DIR into a `MiniGPT4` (see module docstring)."""
    import torch

    from ..model import MiniGPT4

    dtype = dtype or torch.float32
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"model directory not found: {root}")
    cfg = load_config(_require(root / CONFIG_FILE, "config"))
    vision = load_safetensors(_require(root / VISION_FILE, "vision weights"))
    check_state(vision, expected_shapes(cfg), f"{root / VISION_FILE}")
    with torch.device("meta"):
        model = MiniGPT4(cfg, with_llm=with_llm)
    device = torch.device(device)
    _assign(model, {k: v.to(device=device, dtype=torch.float32) for k, v in vision.items()})
    del vision
    if with_llm:
        _load_llm(model, _require(root / LLM_DIR, "LLM directory"), device, dtype)
    _materialize_buffers(model, device)
    if dtype != torch.float32:
        # The model's own mixed-precision layout for the vision side; the LLM is already in `dtype`
        # (detached meanwhile so set_precision's float() does not upcast a 7B model transiently).
        llm, model.llm = model.llm, None
        model.set_precision(dtype)
        model.llm = llm
    return model.eval()


def _load_llm(model: MiniGPT4, llm_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    expected = {
        k[len("llm.") :]: v
        for k, v in expected_shapes(model.config, with_llm=True).items()
        if k.startswith("llm.")
    }
    tied = model.config.llm.tie_word_embeddings
    allow_missing = frozenset({"lm_head.weight"}) if tied else frozenset()
    seen: dict[str, tuple[int, ...]] = {}
    for shard in _llm_shards(llm_dir):
        part = load_safetensors(_require(shard, "LLM weight shard"))
        # Unexpected keys and wrong shapes per shard; completeness once all shards are seen.
        check_state(part, {k: expected[k] for k in part if k in expected}, str(shard))
        seen.update({k: tuple(v.shape) for k, v in part.items()})
        _assign(model.llm, {k: v.to(device=device, dtype=dtype) for k, v in part.items()})
        del part
    check_state(seen, expected, f"{llm_dir}", allow_missing=allow_missing)
    if tied:
        model.llm.tie_weights()


def save_model_dir(
    model: MiniGPT4, tokenizer_src_dir: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write an in-memory MiniGPT4 as MODEL_DIR (same layout as `convert`), atomically."""
    if model.llm is None:
        raise ModelDirError("save_model_dir needs a model built with its language model")
    tok_dir = Path(tokenizer_src_dir)
    tokenizer_files = [tok_dir / n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    if not any(p.name in ("tokenizer.model", "tokenizer.json") for p in tokenizer_files):
        raise ModelDirError(f"{tok_dir}: no tokenizer.model or tokenizer.json to copy")
    out = Path(out)
    with _atomic_dir(out, overwrite) as tmp:
        save_config(model.config, tmp / CONFIG_FILE)
        save_safetensors(dict(sorted(model.vision_state_dict().items())), tmp / VISION_FILE)
        llm_dir = tmp / LLM_DIR
        model.llm.save_pretrained(llm_dir, safe_serialization=True)
        for path in tokenizer_files:
            shutil.copyfile(path, llm_dir / path.name)
    return out


def read_model_config(path: str | Path) -> MiniGPT4Config:
    """The MiniGPT4Config of a model directory (torch-free)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"model directory not found: {root}")
    return load_config(_require(root / CONFIG_FILE, "config"))
