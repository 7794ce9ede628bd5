"""torch → ONNX: the fp32 graph of MiniGPT-4's vision side, and saving/loading ONNX models.

Contract:
- One graph `pixel_values (B, 3, S, S) float32 → image_embeds (B, n_img, llm_hidden) float32` =
  `MiniGPT4.encode_image` (ViT + ln_vision + Q-Former + llama_proj, or ViT + concat-4 + llama_proj for
  the Llama-2 variant). Batch is dynamic; H = W = `image_size` are fixed (the original never resizes to
  anything else). `export_fp32_graph` uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`) at
  opset `ONNX_OPSET`, from an example batch of 2 (a batch-1 example gets specialised), and strips the
  exporter's per-node stack traces (bulky, and they leak local paths).
- `save_onnx` writes weights to `<name>.data` (external data) when the graph passes `EXTERNAL_DATA_BYTES`
  (ViT-g fp32 ≈ 4 GB, fp16 ≈ 2.1 GB) or when asked; `load_with_shapes` loads a (possibly > 2 GB) model
  with inferred value types. `require_export_deps()` is the one-line `DependencyError` for a missing
  torch/onnx/onnxscript/onnxruntime; `quiet_exporter()` silences the exporter's and quantizer's chatter.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt4_local.errors import DependencyError

if TYPE_CHECKING:
    import onnx
    import torch

    from minigpt4_local.model import MiniGPT4

ONNX_OPSET = 20  # has LayerNormalization and Gelu as ops; supported by onnxruntime ≥ 1.17 and TensorRT 10
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_900_000_000


def require_export_deps() -> None:
    missing = [
        m for m in ("torch", "onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise DependencyError(
            f"ONNX export needs {', '.join(missing)}: pip install 'minigpt4-local[torch,export,onnx]'"
        )


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's and quantizer's chatter (torchvision op registry, pre-processing hints)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _graph_module(model: MiniGPT4) -> torch.nn.Module:
    """A thin module whose forward is `encode_image`, with the input named `pixel_values`."""
    import torch

    class VisionEncoderGraph(torch.nn.Module):
        def __init__(self, inner: MiniGPT4) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner.encode_image(pixel_values)  # (B, n_img, llm_hidden)

    return VisionEncoderGraph(model).eval()


def _check_exportable(model: MiniGPT4) -> None:
    import torch

    if model.autocast_dtype is not None or any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError(
            "export needs the fp32 model (set_precision(torch.float32)); fp16/int8 are made from it"
        )


def export_fp32_graph(
    model: MiniGPT4, path: Path, opset: int = ONNX_OPSET, external_data: bool | None = None
) -> None:
    """torch.onnx.export (dynamo) of `encode_image` to `path` (+ `path.data` when large or asked)."""
    import torch

    _check_exportable(model)
    size = model.config.vision.image_size
    example = torch.zeros(2, 3, size, size)  # batch ≥ 2, or the exporter specialises it to 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            _graph_module(model).cpu(),
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            verbose=False,
        )
    _strip_metadata(program.model)
    program.save(str(path), external_data=bool(external_data))


def _strip_metadata(model: Any) -> None:
    """Drop the exporter's per-node stack traces and source paths: bulky, and they leak local paths."""
    import onnx_ir as ir

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()
    model.graph.metadata_props.clear()


def _initializer_bytes(model: onnx.ModelProto) -> int:
    from onnx import helper

    total = 0
    for tensor in model.graph.initializer:
        n = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += n * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_onnx(model: onnx.ModelProto, path: Path, external_data: bool | None = None) -> bool:
    """Save `model` to `path`; weights to `<name>.data` when large (None) or asked. Returns whether external."""
    import onnx

    external = _initializer_bytes(model) > EXTERNAL_DATA_BYTES if external_data is None else external_data
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return external


def load_with_shapes(path: Path) -> onnx.ModelProto:
    """Load a (possibly > 2 GB, external-data) model with inferred value types for every tensor."""
    import onnx

    inferred = path.with_name("inferred-" + path.name)
    # infer_shapes_path works on files, so it also handles graphs over the 2 GB protobuf limit.
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    model = onnx.load(str(inferred))  # external data resolves relative to the same folder
    inferred.unlink()
    return model
