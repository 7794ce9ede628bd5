"""ONNX export of MiniGPT-4's vision side, its fp16/int8 variants, and their verification.

Contract:
- One graph `pixel_values (B, 3, S, S) float32 → image_embeds (B, n_img, llm_hidden) float32` =
  `MiniGPT4.encode_image` (ViT + ln_vision + Q-Former + llama_proj, or ViT + concat-4 + llama_proj for
  the Llama-2 variant). Batch is dynamic; H = W = `image_size` are fixed (the original never resizes to
  anything else; MiniGPT-v2-style 448 px would be a separate export). Exported with the dynamo
  exporter (`torch.onnx.export(..., dynamo=True)`) at opset `ONNX_OPSET`, from an example batch of 2
  (a batch-1 example gets specialised). Weights go to `vision.onnx.data` (external data) when the
  graph passes `EXTERNAL_DATA_BYTES` (ViT-g fp32 ≈ 4 GB, fp16 ≈ 2.1 GB) or when asked.
- Precisions: `fp32` as exported; `fp16` converts the graph with onnxruntime's float16 converter,
  keeping `FP16_BLOCK_OPS` (LayerNorm, Softmax and decomposed-norm ops) and their weights in fp32 and
  the graph I/O in float32 so callers do not change; `int8` quantizes MatMul weights with
  `onnxruntime.quantization.quantize_dynamic` (per-tensor and per-channel are both tried, the one with
  the higher minimum cosine is kept and both results are recorded).
- Every export is verified: torch fp32 (CPU) vs onnxruntime (CPUExecutionProvider) on `n_verify`
  seeded pseudo-random images in the normalised range, fed as the runtime feeds them (one batch; int8
  one image per run, see `backends.onnx_vision.PRECISION_MAX_BATCH`); max_abs, max_rel (= max_abs /
  max|ref|), per-image cosine (flattened embeddings), minimum per-token cosine and the batch-vs-single
  consistency are written into the bundle manifest's `parts.vision.verification`. Nothing is assumed:
  the numbers are what was measured.
- `export_vision_model(model, out_bundle_dir, precision, ...)` works from an in-memory `MiniGPT4`;
  `export_onnx(model_dir, out_bundle, precision, ...)` loads a model directory (vision side only),
  copies the tokenizer files into `BUNDLE/tokenizer/` and exports. Both report steps through
  `progress(description, completed, total)`. User errors raise `MiniGPT4Error`s in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from minigpt4_local.backends.onnx_vision import PRECISION_MAX_BATCH
from minigpt4_local.bundle import Bundle
from minigpt4_local.errors import DependencyError, ModelDirError

if TYPE_CHECKING:
    import onnx
    import torch

    from minigpt4_local.model import MiniGPT4

__all__ = [
    "FP16_BLOCK_OPS",
    "ONNX_OPSET",
    "PRECISIONS",
    "compare_outputs",
    "export_onnx",
    "export_vision_model",
    "verification_pixels",
]

Progress = Callable[[str, int, int], None]

PRECISIONS = ("fp32", "fp16", "int8")
ONNX_OPSET = 20  # has LayerNormalization and Gelu as ops; supported by onnxruntime ≥ 1.17 and TensorRT 10
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
VISION_FILE = "vision.onnx"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_900_000_000
# Ops kept in fp32 by the fp16 conversion: normalisations and softmax (their reductions overflow or
# lose the mean in fp16), plus the ops a decomposed LayerNorm is made of.
FP16_BLOCK_OPS = ("LayerNormalization", "Softmax", "Pow", "ReduceMean", "Sqrt", "Reciprocal")
INT8_OP_TYPES = ("MatMul",)


def _require_export_deps() -> None:
    missing = [m for m in ("torch", "onnx", "onnxscript", "onnxruntime") if _find(m) is None]
    if missing:
        raise DependencyError(
            f"ONNX export needs {', '.join(missing)}: pip install 'minigpt4-local[torch,export,onnx]'"
        )


def _find(module: str) -> Any:
    import importlib.util

    return importlib.util.find_spec(module)


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


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------
# torch → ONNX (fp32)
# ---------------------------------------------------------------------------------------------


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
    with _quiet_exporter(), torch.no_grad():
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


# ---------------------------------------------------------------------------------------------
# ONNX graph helpers
# ---------------------------------------------------------------------------------------------


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


def _load_with_shapes(path: Path) -> onnx.ModelProto:
    """Load a (possibly > 2 GB, external-data) model with inferred value types for every tensor."""
    import onnx

    inferred = path.with_name("inferred-" + path.name)
    # infer_shapes_path works on files, so it also handles graphs over the 2 GB protobuf limit.
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    model = onnx.load(str(inferred))  # external data resolves relative to the same folder
    inferred.unlink()
    return model


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

    model = _load_with_shapes(src)
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
    with _quiet_exporter():
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


# ---------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------


def verification_pixels(
    n: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0
) -> np.ndarray:
    """(n, 3, S, S) float32: seeded pseudo-images in [0, 1] (smooth blobs + fine noise), normalised."""
    rng = np.random.default_rng(seed)
    cells = max(2, image_size // 14)
    coarse = rng.uniform(0.0, 1.0, (n, 3, cells, cells))
    reps = -(-image_size // cells)
    smooth = np.repeat(np.repeat(coarse, reps, axis=2), reps, axis=3)[:, :, :image_size, :image_size]
    raw = np.clip(smooth + rng.normal(0.0, 0.15, smooth.shape), 0.0, 1.0)
    mean_ = np.asarray(mean, dtype=np.float64).reshape(1, 3, 1, 1)
    std_ = np.asarray(std, dtype=np.float64).reshape(1, 3, 1, 1)
    return ((raw - mean_) / std_).astype(np.float32)


def compare_outputs(out: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Error of `out` vs `ref`, both (B, n_img, hidden): abs, relative to max|ref|, cosines."""
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    diff = np.abs(out64 - ref64)
    ref_max = float(np.abs(ref64).max())
    flat_o, flat_r = out64.reshape(len(out64), -1), ref64.reshape(len(ref64), -1)
    image_cos = (flat_o * flat_r).sum(1) / (np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_r, axis=1))
    token_cos = (out64 * ref64).sum(-1) / (np.linalg.norm(out64, axis=-1) * np.linalg.norm(ref64, axis=-1))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float(diff.max() / ref_max) if ref_max else float(diff.max()),
        "ref_max_abs": ref_max,
        "mean_cosine": float(image_cos.mean()),
        "min_cosine": float(image_cos.min()),
        "min_token_cosine": float(token_cos.min()),
        "per_image": [
            {
                "max_abs": float(diff[i].max()),
                "max_rel": float(diff[i].max() / ref_max) if ref_max else float(diff[i].max()),
                "cosine": float(image_cos[i]),
            }
            for i in range(len(out64))
        ],
    }


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def verify_graph(
    path: Path, pixels: np.ndarray, ref: np.ndarray, per_image_runs: bool = False
) -> dict[str, Any]:
    """Run the graph on `pixels` in one batch and one image at a time; compare with `ref`.

    The recorded errors come from the way the runtime feeds this precision: one batch, or one image
    per run (`per_image_runs`, int8: its activation scale spans the whole batch).
    """
    import onnxruntime as ort

    session = _cpu_session(path)
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]  # (N, n_img, hidden)
    singles = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + 1]})[0] for i in range(len(pixels))]
    )
    if batched.shape != ref.shape:
        raise RuntimeError(f"exported graph returned {batched.shape}, torch {ref.shape}")
    result = {"runs": "one image per run" if per_image_runs else f"one batch of {len(pixels)}"}
    result.update(compare_outputs(singles if per_image_runs else batched, ref))
    result["batch_vs_single_max_abs"] = float(np.abs(batched - singles).max())
    result["runtime"] = f"onnxruntime {ort.__version__} CPUExecutionProvider"
    return result


def torch_reference(model: MiniGPT4, pixels: np.ndarray) -> np.ndarray:
    """The torch fp32 CPU embeddings the ONNX graph must reproduce: (N, n_img, hidden)."""
    import torch

    with torch.inference_mode():
        return model.encode_image(torch.from_numpy(pixels)).float().numpy()


# ---------------------------------------------------------------------------------------------
# export drivers
# ---------------------------------------------------------------------------------------------

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
    _require_export_deps()
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
    _require_export_deps()
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
