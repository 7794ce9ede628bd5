"""fp32 ONNX graph → fp16 or int8 graph (onnxruntime's converters), with the fixes they need here.

Contract:
- `convert_fp16(src, dst, block_ops=FP16_BLOCK_OPS)` converts with onnxruntime's float16 converter,
  keeping `block_ops` (LayerNorm, Softmax and the ops a decomposed LayerNorm is made of) and their weights
  in fp32 and the graph I/O in float32 so callers do not change; initializers shared between blocked and
  converted consumers are unshared first, duplicate nodes dropped, nodes sorted topologically (TensorRT).
- `quantize_int8(src, dst, per_channel)` quantizes MatMul weights with
  `onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantized at run time).
Both return whether the result's weights went to external data (`onnx_graph.save_onnx`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .onnx_graph import EXTERNAL_DATA_BYTES, load_with_shapes, quiet_exporter, save_onnx

if TYPE_CHECKING:
    import onnx

# Ops kept in fp32 by the fp16 conversion: normalisations and softmax (their reductions overflow or
# lose the mean in fp16), plus the ops a decomposed LayerNorm is made of.
FP16_BLOCK_OPS = ("LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal")
INT8_OP_TYPES = ("MatMul",)


def _unshare_initializers(model: onnx.ModelProto, block_ops: Sequence[str]) -> None:
    """Give blocked (fp32) consumers their own copy of an initializer that fp16 consumers also use.

    The exporter deduplicates equal constants (e.g. every all-ones LayerNorm weight of a freshly
    initialised model); the float16 converter would then round the shared tensor to fp16 and add one
    identically named Cast per blocked consumer, which is both lossy and an invalid graph.
    """
    from onnx import TensorProto

    floats = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in floats:
                consumers.setdefault(name, []).append((node, i))
    for name, uses in consumers.items():
        blocked = [(n, i) for n, i in uses if n.op_type in block_ops]
        if not blocked or len(blocked) == len(uses):
            continue
        copy = model.graph.initializer.add()
        copy.CopyFrom(floats[name])
        copy.name = f"{name}__fp32"
        for node, i in blocked:
            node.input[i] = copy.name


def _dedupe_and_sort(model: onnx.ModelProto) -> None:
    """Drop exact duplicate nodes and value_infos, then order nodes topologically (TensorRT needs it)."""
    nodes, seen = [], set()
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    infos = {vi.name: vi for vi in model.graph.value_info}
    ordered = _toposort(model, nodes)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos.values())


def _toposort(model: onnx.ModelProto, nodes: list[Any]) -> list[Any]:
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a dangling input at node {rest[0].name}")
        pending = rest
    return ordered


def convert_fp16(
    src: Path, dst: Path, block_ops: Sequence[str] = FP16_BLOCK_OPS, external_data: bool | None = None
) -> bool:
    """fp32 graph → fp16 graph with float32 I/O and `block_ops` kept in fp32. Returns whether external."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_with_shapes(src)
    _unshare_initializers(model, block_ops)
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(block_ops), disable_shape_infer=True
    )
    _dedupe_and_sort(model)
    return save_onnx(model, dst, external_data)


def quantize_int8(src: Path, dst: Path, per_channel: bool, external_data: bool | None = None) -> bool:
    """Dynamic int8 quantization of MatMul weights (activations quantized at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    raw = dst.with_name("raw-" + dst.name)
    large = sum(p.stat().st_size for p in src.parent.glob(src.name + "*")) > EXTERNAL_DATA_BYTES
    with quiet_exporter():
        quantize_dynamic(
            src,
            raw,
            op_types_to_quantize=list(INT8_OP_TYPES),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=large,
        )
    model = onnx.load(str(raw))
    external = save_onnx(model, dst, external_data)
    for leftover in raw.parent.glob(raw.name + "*"):
        leftover.unlink()
    return external
