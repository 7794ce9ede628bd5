"""Loading a GPTQ checkpoint onto GPTQModel's kernels (imports torch and GPTQModel when called).

Contract:
- `require_gptq_runtime()` imports torch and GPTQModel; a missing one is a one-line `DependencyError`
  that says what to install. `quiet_gptqmodel()` keeps GPTQModel's banners and progress bars off stdout.
- `load_gptq_llm(path, device=None, kernel="auto", dtype=None, llm=None) -> GptqLLM` loads the checkpoint
  with `GPTQModel.load`. Device: `devices.resolve_device` (CUDA when available, else CPU). Precision: fp16
  on CUDA (what Marlin/ExLlama take), fp32 on CPU (GPTQModel's fused CPU kernel runs in fp32). `kernel` is
  one of `KERNELS` ("auto" lets GPTQModel pick the fastest kernel that fits: Marlin-class on recent NVIDIA
  GPUs, TorchFused/ATen on CPU); a GPU-only kernel on a machine without CUDA, or a kernel GPTQModel cannot
  start, is a one-line `DependencyError`. `GptqLLM.kernel` names the kernel actually in use, read from the
  loaded modules (`kernel_label`, e.g. "marlin", "torch_fused"). Asymmetric (sym=False) checkpoints never
  run on a kernel that drops zero points (`SYMMETRIC_ONLY_KERNELS`: asked for, it is a one-line error;
  "auto" on CPU takes `ASYMMETRIC_CPU_KERNEL`); per-channel ones (group size -1) run on
  `PER_CHANNEL_CPU_KERNEL` on CPU.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import LLMConfig
from ..devices import resolve_device
from ..errors import DependencyError
from .gptq_checkpoint import GptqInfo, read_gptq_dir

__all__ = [
    "GPTQ_INSTALL_HINT",
    "KERNELS",
    "GptqLLM",
    "kernel_label",
    "load_gptq_llm",
    "quiet_gptqmodel",
    "require_gptq_runtime",
]

GPTQ_INSTALL_HINT = (
    "pip install 'minigpt4-local[torch,gptq]' (that is: torch first, then `pip install gptqmodel optimum`)"
)

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
# Kernels that ignore a checkpoint's zero points: GPTQModel 7.6's TorchFused CPU path replaces them by
# the symmetric midpoint, so a sym=False checkpoint computes garbage (SmolLM2 g32: perplexity 28.9 →
# 38 million). Asymmetric checkpoints run on a kernel that reads the zero points (measured: 30.9).
SYMMETRIC_ONLY_KERNELS = frozenset({"torch_fused"})
ASYMMETRIC_CPU_KERNEL = "torch_int8"
# Per-channel checkpoints (group size -1): of GPTQModel 7.6's CPU kernels only the plain torch one takes
# them at any width (TorchFused needs group sizes 32-256 and output widths divisible by 16, ATen groups
# of 16-128, TorchInt8 mis-pads widths such as 172).
PER_CHANNEL_CPU_KERNEL = "torch"
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


def _zero_point_kernel(name: str, device: str, info: GptqInfo) -> str:
    """The kernel for this checkpoint: an asymmetric one never runs on a kernel that drops zero points,
    a per-channel one (group size -1) on CPU runs on the kernel that takes it."""
    cpu = not device.startswith("cuda")
    if not info.sym and name in SYMMETRIC_ONLY_KERNELS:
        raise DependencyError(
            f"GPTQ kernel {name} ignores the zero points of asymmetric (sym=False) checkpoints such as "
            f"{info.path.name}; use kernel auto, {ASYMMETRIC_CPU_KERNEL} or aten"
        )
    if info.group_size <= 0 and cpu and name in ("auto", "torch_fused"):
        if name == "torch_fused":  # it would fail only at the first forward pass, inside generation
            raise DependencyError(
                f"GPTQ kernel torch_fused cannot run per-channel (group size -1) checkpoints such as "
                f"{info.path.name}; use kernel auto or {PER_CHANNEL_CPU_KERNEL}"
            )
        return PER_CHANNEL_CPU_KERNEL
    if not info.sym and name == "auto" and cpu:
        return ASYMMETRIC_CPU_KERNEL  # GPTQModel's own CPU pick would be TorchFused
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
    name = _zero_point_kernel(_resolve_kernel(kernel, dev), dev, info)  # refused before the (slow) import
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
