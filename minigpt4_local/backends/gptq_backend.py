"""GPTQ decoder backend: a 4-bit GPTQ checkpoint (`llm-gptq/`) run through GPTQModel's kernels.

Contract:
- `read_gptq_dir(path, llm=None) -> GptqInfo` (torch-free) reads `config.json` and the GPTQ settings
  (`quantize_config.json`, or `quantization_config` inside `config.json`), refuses anything that is
  not a GPTQ checkpoint, and — given the bundle's `LLMConfig` — refuses a checkpoint whose hidden
  size, layers, heads, KV heads, FFN width or vocabulary differ (`ModelDirError`, one line).
- `require_gptq_runtime()` imports torch and GPTQModel; a missing one is a one-line
  `DependencyError` that says what to install.
- `load_gptq_llm(path, device=None, kernel="auto", dtype=None, llm=None) -> GptqLLM` loads the
  checkpoint with `GPTQModel.load`. Device: CUDA when available, else CPU. Precision: fp16 on CUDA
  (what Marlin/ExLlama take), fp32 on CPU (GPTQModel's fused CPU kernel runs in fp32). `kernel`
  is one of `KERNELS` ("auto" lets GPTQModel pick the fastest kernel that fits: Marlin-class on
  recent NVIDIA GPUs, TorchFused/ATen on CPU); a GPU-only kernel on a machine without CUDA, or a
  kernel GPTQModel cannot start, is a one-line `DependencyError`. `GptqLLM.kernel` names the kernel
  actually in use, read from the loaded modules (e.g. "marlin", "torch_fused").
- `GptqDecoder(llm)` implements `pipeline.Decoder`: it stitches text-token embeddings (the
  checkpoint's own, unquantized embedding table) and image embeddings (numpy from ONNX Runtime, or
  torch) with `stitching.stitch`, then decodes with `torch_generation.generate_from_embeds`, i.e. exactly
  the sampling and stop rules of the torch backend, streaming through `on_token`. KV cache reuse:
  the decoder remembers what its cache holds (a token id per text position, a content digest per
  image row, then the generated ids); the next call keeps the longest common prefix (at least one
  position is always recomputed, for its logits) and prefills only the rest. Beam search runs
  without the cache (beams rewrite it). `last_reused`, `last_first_token_s` and `last_stitch_s`
  describe the last call; `reset()` forgets the cache.
- `build_gptq_decoder(source, options)` is the `gptq` entry of `loader.DECODERS`: a bundle's `llm_gptq`
  part (its tokenizer: the bundle's, else the checkpoint's). `torch_vision_for(model_dir)` is the
  full-precision torch vision encoder of a model directory, to pass as `LoadOptions.vision_override`.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import LLMConfig
from ..devices import resolve_device
from ..errors import DependencyError, ModelDirError, PromptError
from ..files import read_json_object
from ..prefix_cache import PositionKey, PrefixCache, position_keys
from ..stitching import StitchPlan, stitch

if TYPE_CHECKING:
    import torch

    from ..pipeline import VisionEncoder
    from ..prompts import StopChecker
    from ..sampling import SamplingOptions

__all__ = [
    "GPTQ_INSTALL_HINT",
    "GPTQ_PART",
    "KERNELS",
    "GptqDecoder",
    "GptqInfo",
    "GptqLLM",
    "build_gptq_decoder",
    "kernel_label",
    "load_gptq_llm",
    "read_gptq_dir",
    "require_gptq_runtime",
    "torch_vision_for",
]

GPTQ_PART = "llm_gptq"  # bundle part name; its directory is `llm-gptq/`
GPTQ_DIR = "llm-gptq"
GPTQ_INSTALL_HINT = (
    "pip install 'minigpt4-local[torch,gptq]' (that is: torch first, then `pip install gptqmodel optimum`)"
)
QUANTIZE_CONFIG = "quantize_config.json"

# User-facing kernel name → GPTQModel BACKEND value.
KERNELS: dict[str, str] = {
    "auto": "auto",
    "marlin": "gptq_marlin",
    "exllama_v2": "gptq_exllama_v2",
    "machete": "gptq_machete",
    "triton": "gptq_triton",
    "bitblas": "gptq_bitblas",
    "torch": "gptq_torch",
    "torch_fused": "gptq_torch_fused",
    "torch_int8": "gptq_torch_int8",
    "aten": "gptq_torch_aten",
}
# Kernels that only exist on CUDA: asking for one without a GPU is refused before loading anything.
CUDA_ONLY_KERNELS = frozenset({"marlin", "exllama_v2", "machete", "triton", "bitblas"})
# CPU kernels that only take fp16/bf16 activations.
CPU_HALF_ONLY_KERNELS = frozenset({"aten", "torch"})
# GPTQModel's quantized-linear classes → the kernel names above.
_KERNEL_CLASSES: dict[str, str] = {
    "MarlinLinear": "marlin",
    "ExllamaV2Linear": "exllama_v2",
    "MacheteLinear": "machete",
    "TritonV2Linear": "triton",
    "BitblasLinear": "bitblas",
    "TorchLinear": "torch",
    "TorchFusedLinear": "torch_fused",
    "TorchInt8Linear": "torch_int8",
    "TorchAtenLinear": "aten",
}
# HF config key → (our LLMConfig field, what to call it in a message).
_DIM_KEYS: dict[str, tuple[str, str]] = {
    "hidden_size": ("hidden_size", "hidden size"),
    "num_hidden_layers": ("num_layers", "layers"),
    "num_attention_heads": ("num_heads", "attention heads"),
    "num_key_value_heads": ("num_kv_heads", "KV heads"),
    "intermediate_size": ("intermediate_size", "FFN width"),
    "vocab_size": ("vocab_size", "vocabulary rows"),
}


# ----- checkpoint inspection (torch-free) ----------------------------------------------------------


@dataclass(frozen=True)
class GptqInfo:
    path: Path
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    dims: dict[str, int]  # HF config names: hidden_size, num_hidden_layers, vocab_size, …


def _gptq_json(path: Path) -> dict[str, Any]:
    hint = f"{path.parent}: missing {path.name}; is this a GPTQ checkpoint (llm-gptq/)?"
    return read_json_object(path, ModelDirError, missing=hint)


def _quant_settings(root: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """GPTQModel writes quantize_config.json; transformers/optimum keep it in config.json."""
    if (root / QUANTIZE_CONFIG).is_file():
        return _gptq_json(root / QUANTIZE_CONFIG)
    inline = hf_config.get("quantization_config")
    if isinstance(inline, dict):
        return inline
    raise ModelDirError(f"{root}: no {QUANTIZE_CONFIG} and no quantization_config: not a GPTQ checkpoint")


def read_gptq_dir(path: str | os.PathLike, llm: LLMConfig | None = None) -> GptqInfo:
    """Read and check a GPTQ checkpoint directory (see the module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelDirError(f"GPTQ checkpoint not found: {root} is not a directory")
    hf = _gptq_json(root / "config.json")
    quant = _quant_settings(root, hf)
    method = str(quant.get("quant_method", quant.get("method", ""))).lower()
    if method != "gptq":
        raise ModelDirError(f"{root}: quantization method is {method or 'unknown'!r}, expected 'gptq'")
    try:
        bits, group = int(quant["bits"]), int(quant.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise ModelDirError(f"{root}: the GPTQ settings lack a valid 'bits'") from None
    dims = {k: int(hf[k]) for k in _DIM_KEYS if isinstance(hf.get(k), int)}
    dims.setdefault("num_key_value_heads", dims.get("num_attention_heads", 0))
    info = GptqInfo(root, bits, group, bool(quant.get("desc_act", False)), bool(quant.get("sym", True)), dims)
    if llm is not None:
        check_dims(info, llm)
    return info


def check_dims(info: GptqInfo, llm: LLMConfig) -> None:
    """Refuse a checkpoint whose shape differs from the bundle's language model."""
    for hf_key, (ours, what) in _DIM_KEYS.items():
        want = getattr(llm, ours)
        got = info.dims.get(hf_key)
        if got != want:
            raise ModelDirError(
                f"{info.path}: {what} {got} != the bundle architecture's {want} "
                f"(llm.{ours}): this GPTQ checkpoint belongs to another model (mismatched dims)"
            )


# ----- runtime --------------------------------------------------------------------------------------


def _debug() -> bool:
    return os.environ.get("MINIGPT4_DEBUG", "") not in ("", "0")


@contextlib.contextmanager
def quiet_gptqmodel() -> Iterator[io.StringIO]:
    """GPTQModel prints a banner, tables and progress bars on stdout; keep our stdout clean.

    What it printed is kept in the yielded buffer. MINIGPT4_DEBUG=1 lets everything through.
    """
    buffer = io.StringIO()
    if _debug():
        yield buffer
        return
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def _set_worker_default() -> None:
    # GPTQModel sizes its CPU pool as (cores + 1) // 2: one worker on a 1-2 core machine, where its
    # model-loader pool (which asks for two) then fails ("Virtual pool 'model_loader:cpu' requests 2
    # workers but parent 'cpu' only has 1"). Two workers work there; an explicit setting is kept.
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def _require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise DependencyError(f"the GPTQ decoder needs PyTorch: {GPTQ_INSTALL_HINT}") from None
    return torch


def require_gptq_runtime() -> tuple[Any, Any]:
    """(torch, gptqmodel) or a one-line DependencyError saying what to install."""
    torch = _require_torch()
    _set_worker_default()
    try:
        with quiet_gptqmodel():
            import gptqmodel
    except ImportError as exc:
        raise DependencyError(
            f"the GPTQ decoder needs GPTQModel ({exc.name or exc}): {GPTQ_INSTALL_HINT}"
        ) from None
    return torch, gptqmodel


def _is_quant_linear(module: Any) -> bool:
    try:
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    except ImportError:  # another GPTQModel layout: fall back to the class names we know
        return type(module).__name__ in _KERNEL_CLASSES
    return isinstance(module, BaseQuantLinear)


def kernel_label(model: Any) -> str:
    """The GPTQ kernel(s) the loaded model's quantized layers run on, e.g. 'marlin'."""
    names = {
        _KERNEL_CLASSES.get(type(m).__name__, type(m).__name__)
        for m in model.modules()
        if _is_quant_linear(m)
    }
    return "+".join(sorted(names)) if names else "none"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _resolve_kernel(kernel: str, device: str) -> str:
    name = kernel.lower().replace("-", "_")
    if name not in KERNELS:
        raise DependencyError(f"unknown GPTQ kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
    if name in CUDA_ONLY_KERNELS and not device.startswith("cuda"):
        raise DependencyError(
            f"GPTQ kernel {name} needs a CUDA GPU; on {device} use kernel auto (CPU kernels: torch_fused, aten, torch_int8, torch)"
        )
    return name


def _default_dtype(device: str, kernel: str) -> str:
    # CUDA kernels (Marlin, ExLlama) take fp16. On CPU the fused kernel takes fp32 activations (and
    # keeps the unquantized embeddings/norms exact); the ATen and plain torch kernels need a half type.
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if kernel in CPU_HALF_ONLY_KERNELS else "fp32"


@dataclass
class GptqLLM:
    """A loaded GPTQ language model: the HF causal LM with GPTQModel's quantized linears."""

    model: Any  # transformers LlamaForCausalLM (quantized layers inside)
    device: Any  # torch.device
    dtype: Any  # torch.dtype of activations / embeddings
    kernel: str
    info: GptqInfo
    wrapper: Any = field(default=None, repr=False)  # GPTQModel's BaseQModel (kept alive with the model)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.info.path),
            "bits": self.info.bits,
            "group_size": self.info.group_size,
            "desc_act": self.info.desc_act,
            "kernel": self.kernel,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def load_gptq_llm(
    path: str | os.PathLike,
    device: str | None = None,
    kernel: str = "auto",
    dtype: str | None = None,
    llm: LLMConfig | None = None,
) -> GptqLLM:
    """Load `llm-gptq/` with GPTQModel (see the module docstring)."""
    info = read_gptq_dir(path, llm)
    torch = _require_torch()
    dev = resolve_device(device)
    name = _resolve_kernel(kernel, dev)  # refused before the (slow) GPTQModel import
    _, gptqmodel = require_gptq_runtime()
    # Without an explicit dtype, a CPU checkpoint the fp32 kernels cannot take (e.g. 3-bit) gets bf16.
    tries = [dtype] if dtype else [_default_dtype(dev, name), *([] if dev.startswith("cuda") else ["bf16"])]
    wrapper, chosen = _load_first(gptqmodel, info, dev, name, list(dict.fromkeys(tries)))
    model = wrapper.model.eval()
    return GptqLLM(model, torch.device(dev), chosen, kernel_label(model), info, wrapper)


def _load_first(
    gptqmodel: Any, info: GptqInfo, device: str, kernel: str, dtypes: list[str]
) -> tuple[Any, Any]:
    """GPTQModel.load with the first dtype that works → (wrapper, torch dtype); else one DependencyError."""
    import torch

    by_name = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    backend = gptqmodel.BACKEND(KERNELS[kernel])
    failure: BaseException = RuntimeError("no dtype tried")
    for name in dtypes:
        try:
            with quiet_gptqmodel():
                return gptqmodel.GPTQModel.load(
                    str(info.path), device=device, backend=backend, dtype=by_name[name]
                ), by_name[name]
        except (ValueError, RuntimeError, NotImplementedError, ImportError, TypeError, OSError) as exc:
            failure = exc
    raise DependencyError(
        f"GPTQModel cannot run {info.path.name} ({info.bits}-bit, group {info.group_size}) with kernel "
        f"{kernel} on {device} in {'/'.join(dtypes)}: {_one_line(failure)}"
    )


# ----- decoder --------------------------------------------------------------------------------------


class _CachedGenerate:
    """Stands in for the HF model inside `generate_from_embeds`: adds the KV cache to `generate`
    and keeps the raw output (the generated ids before the stop sequence is stripped)."""

    def __init__(self, model: Any, cache: Any | None) -> None:
        self.model = model
        self.cache = cache
        self.output: Any = None

    def generate(self, **kwargs: Any) -> Any:
        if self.cache is not None:
            kwargs["past_key_values"] = self.cache
        self.output = self.model.generate(**kwargs)
        return self.output


class GptqDecoder:
    """`pipeline.Decoder` on a GPTQ model, with KV-cache prefix reuse across chat turns."""

    name = "gptq"

    def __init__(self, llm: GptqLLM) -> None:
        self.llm = llm
        self.model = llm.model
        self.device = llm.device
        self._cache: Any = None
        self.prefix = PrefixCache()  # keys of what `_cache` holds
        self.last_reused = 0
        self.last_stitch_s = 0.0
        self.last_first_token_s = 0.0

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def reset(self) -> None:
        self._cache = None
        self.prefix.clear()

    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        """(len(ids), hidden) rows of the checkpoint's embedding table."""
        import torch

        table = self.model.get_input_embeddings()
        with torch.inference_mode():
            return table(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def stitch(self, plan: StitchPlan, image_embeds: Sequence[Any]) -> torch.Tensor:
        """(T, hidden) stitched embeddings on the model's device, in its dtype."""
        import torch

        images = []
        for index, emb in enumerate(image_embeds):
            tensor = emb if isinstance(emb, torch.Tensor) else torch.as_tensor(_host_array(emb))
            if tensor.ndim == 2 and tensor.shape[-1] != self.hidden_size:
                raise PromptError(
                    f"image {index} embedding has hidden size {tensor.shape[-1]}, the GPTQ decoder expects "
                    f"{self.hidden_size} (vision and decoder come from different models)"
                )
            images.append(tensor.to(device=self.device, dtype=self.llm.dtype))
        return stitch(plan, self.embed_tokens, images, torch.cat)

    def _reuse(self, keys: list[PositionKey], beams: int) -> Any:
        """The cache to continue from (cut to the shared prefix), or None for beam search."""
        from transformers import DynamicCache

        if beams > 1:
            self.reset()  # beam search expands and reorders the cache: nothing reusable remains
            self.last_reused = 0
            return None
        keep = self.prefix.reusable(keys) if self._cache is not None else 0
        if keep <= 0 or self._cache is None:
            self._cache = DynamicCache(config=self.model.config)
            keep = 0
        else:
            held = self._cache.get_seq_length()
            if held > keep:
                self._cache.crop(keep - held)  # transformers 5: a negative count drops that many positions
        self.last_reused = keep
        return self._cache

    def generate(
        self,
        plan: StitchPlan,
        image_embeds: Sequence[Any],
        options: SamplingOptions,
        stop: StopChecker,
        on_token: Callable[[int], None] | None,
    ) -> list[int]:
        from .torch_generation import generate_from_embeds

        start = time.perf_counter()
        embeds = self.stitch(plan, image_embeds).unsqueeze(0)  # (1, T, hidden)
        keys = position_keys(plan, image_embeds)
        self.last_stitch_s = time.perf_counter() - start
        cache = self._reuse(keys, options.num_beams)
        runner = _CachedGenerate(self.model, cache)
        first: list[float] = []

        def forward_token(token: int) -> None:
            if not first:
                first.append(time.perf_counter() - start)
            if on_token is not None:
                on_token(token)

        try:
            ids = generate_from_embeds(runner, embeds, options, stop, forward_token)
        except BaseException:
            self.reset()  # a half-written cache must not be reused
            raise
        self.last_first_token_s = first[0] if first else time.perf_counter() - start
        if cache is not None and runner.output is not None:
            raw = [int(t) for t in runner.output[0].tolist()]
            self.prefix.keys = [*keys, *raw][: cache.get_seq_length()]
        return ids


def _host_array(x: Any) -> Any:
    """numpy view of an ONNX Runtime output (numpy already, or an OrtValue on the host)."""
    import numpy as np

    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return x.numpy()
    return np.asarray(x)


# ----- pipeline -------------------------------------------------------------------------------------


def build_gptq_decoder(source: Any, options: Any) -> Any:
    """`loader.DECODERS["gptq"]`: a bundle's `llm-gptq/` through GPTQModel (see `loader.load_pipeline`)."""
    from ..loader import DecoderBuild
    from ..tokenizer import load_tokenizer

    gptq_dir = source.bundle.part_path(GPTQ_PART)
    info = read_gptq_dir(gptq_dir, source.config.llm)  # cheap checks before torch/GPTQModel load
    own_tokenizer = None if source.bundle.has_part("tokenizer") else load_tokenizer(gptq_dir)
    llm = load_gptq_llm(
        gptq_dir,
        device=options.device,
        kernel=options.gptq_kernel,
        dtype=options.dtype,
        llm=source.config.llm,
    )
    label = f"gptq {info.bits}-bit g{info.group_size}, {llm.kernel} kernel on {llm.device.type}"
    decoder = GptqDecoder(llm)
    return DecoderBuild(decoder, decoder.hidden_size, source.config.llm.vocab_size, label, own_tokenizer)


def torch_vision_for(model_dir: str | os.PathLike, device: str | None = None) -> VisionEncoder:
    """The full-precision torch vision encoder of a model directory (to pair with a GPTQ decoder)."""
    from ..checkpoints.model_dir import load_model_dir
    from .torch_backend import TorchVision, pick_device

    dev = pick_device(device)
    model = load_model_dir(model_dir, device=str(dev), with_llm=False)
    return TorchVision(model, dev)
