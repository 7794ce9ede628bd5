"""ONNX Runtime vision encoder for a bundle (torch-free: numpy, Pillow, onnxruntime).

Contract:
- `OnnxVisionEncoder(bundle_or_path, providers=None, verify=True)` opens the bundle (checksums unless
  `verify=False`), loads `vision.onnx` and checks the graph against the manifest: one float input
  named as recorded, rank 4, dims (batch, 3, S, S) with a dynamic batch; one float output, rank 3,
  dims (batch, n_img, hidden) equal to the manifest and the architecture. Any mismatch, and a
  truncated or corrupted graph that onnxruntime refuses, raise `BundleError` in one line.
- Providers: by default TensorRT → CUDA → CPU, keeping those this onnxruntime build offers AND whose
  native libraries are present (onnxruntime-gpu lists CUDA even on a machine without a GPU); an int8
  bundle defaults to CPU only (its MatMulInteger/DynamicQuantizeLinear nodes have no GPU kernels).
  `providers=[...]` overrides (full names or short aliases `tensorrt`/`trt`, `cuda`, `cpu`, …);
  an unknown or unavailable name, or an explicitly requested provider that fails to initialise, raises
  `DependencyError` listing what is available.
- `encode(pixels (B, 3, S, S) float32) -> (B, n_img, hidden) float32 numpy`, run in chunks of at most
  `max_batch` images per session call (default 8; 1 for int8, whose dynamic activation quantization
  uses one scale per batch), so an image's embedding never depends on the other images passed along.
- `encode_images(images)` preprocesses PIL images exactly as the bundle says
  (`minigpt4_local.image.preprocess`: bicubic resize, CLIP mean/std) and encodes them in one batch.
- `encode_ortvalue(pixels)`: on a CUDA/TensorRT session the output stays on the GPU (IO binding) and an
  `onnxruntime.OrtValue` is returned, for a decoder that can read device memory (`.data_ptr()`,
  `.shape()`); elsewhere it returns the numpy array of `encode`. Decoders that only take host memory
  (llama.cpp's embedding batch) should call `encode`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import Bundle
from ..errors import BundleError, DependencyError
from ..files import cache_dir

if TYPE_CHECKING:
    import onnxruntime
    from PIL import Image

__all__ = ["DEFAULT_PROVIDERS", "OnnxVisionEncoder", "resolve_providers"]

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (TRT, CUDA, CPU)
GPU_PROVIDERS = frozenset({TRT, CUDA})

# Short names accepted by --providers.
PROVIDER_ALIASES = {
    "tensorrt": TRT,
    "trt": TRT,
    "cuda": CUDA,
    "cpu": CPU,
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

# Default provider order per bundle precision (an int8 graph only has CPU kernels for its integer ops).
PRECISION_DEFAULTS = {"int8": (CPU,)}

# Native libraries a GPU provider loads at session creation; without them onnxruntime logs an error
# and silently falls back, so the default choice skips such providers up front.
_PROVIDER_LIBS: dict[str, tuple[str, ...]] = {
    CUDA: ("libcuda.so.1", "nvcuda.dll"),
    TRT: ("libnvinfer.so.10", "libnvinfer.so", "nvinfer_10.dll"),
}
_PROVIDER_NEEDS = {TRT: (CUDA,)}

DEFAULT_MAX_BATCH = 8
# Images per session run by precision. int8 graphs quantize activations with ONE scale per tensor
# (DynamicQuantizeLinear), so an image's embedding would depend on the other images in its batch;
# one image per run keeps results per-image (and batching gains nothing on CPU for int8, measured).
PRECISION_MAX_BATCH = {"int8": 1}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise DependencyError(
            "onnxruntime is not installed: pip install 'minigpt4-local[onnx]' (onnxruntime-gpu or onnxruntime)"
        ) from None
    return onnxruntime


def _library_loads(names: Sequence[str]) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def provider_usable(provider: str) -> bool:
    """Whether a provider's native libraries load here (CPU and providers we know nothing about: yes)."""
    needs = _PROVIDER_NEEDS.get(provider, ())
    libs = _PROVIDER_LIBS.get(provider, ())
    return all(provider_usable(dep) for dep in needs) and (not libs or _library_loads(libs))


def resolve_providers(requested: Sequence[str] | None = None, precision: str = "fp32") -> list[str]:
    """The execution providers to ask onnxruntime for, in priority order (see module docstring)."""
    available = list(_ort().get_available_providers())
    if requested:
        chosen = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in requested if p.strip()]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise DependencyError(
                f"ONNX Runtime execution provider {missing[0]!r} is not available in this onnxruntime "
                f"build; available: {', '.join(available)}"
            )
        return list(dict.fromkeys(chosen))
    order = PRECISION_DEFAULTS.get(precision, DEFAULT_PROVIDERS)
    chosen = [p for p in order if p in available and provider_usable(p)]
    return chosen or [CPU]


def _provider_options(
    provider: str, part: dict[str, Any], graph_sha256: str, image_size: int, max_batch: int
) -> dict[str, Any]:
    """Per-provider options: TensorRT gets a batch profile and an engine cache keyed by the graph hash."""
    if provider == TRT:
        name = part["inputs"][0]["name"]
        shape = f"3x{image_size}x{image_size}"
        cache = cache_dir() / "tensorrt" / graph_sha256[:16]
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "trt_fp16_enable": part.get("precision") == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": f"{name}:1x{shape}",
            "trt_profile_opt_shapes": f"{name}:{max_batch}x{shape}",
            "trt_profile_max_shapes": f"{name}:{max_batch}x{shape}",
        }
    if provider == CUDA:
        return {"device_id": 0}
    return {}


def _declared(part: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """The single tensor the manifest declares under `inputs`/`outputs` (must have a name)."""
    entries = part.get(key)
    if (
        not isinstance(entries, list)
        or len(entries) != 1
        or not isinstance(entries[0], dict)
        or "name" not in entries[0]
    ):
        raise BundleError(f"{where}: the manifest's vision {key} must list exactly one named tensor")
    return entries[0]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")


class OnnxVisionEncoder:
    name = "onnxruntime"
    """pixels → image embeddings with ONNX Runtime, from a bundle's `vision.onnx`."""

    def __init__(
        self,
        bundle_or_path: Bundle | str | os.PathLike,
        providers: Sequence[str] | None = None,
        verify: bool = True,
        threads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        self.bundle = (
            bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.open(bundle_or_path, verify)
        )
        self.part = self.bundle.part("vision")
        config = self.bundle.config
        self.image_size = self.bundle.image_size
        self.mean = self.bundle.image_mean
        self.std = self.bundle.image_std
        self.n_img = config.num_image_tokens
        self.hidden = config.llm.hidden_size
        self.precision = str(self.part.get("precision", "fp32"))
        default_batch = PRECISION_MAX_BATCH.get(self.precision, DEFAULT_MAX_BATCH)
        self.max_batch = max(1, int(max_batch or default_batch))
        self.session = self._load_session(providers, threads)
        self.providers = list(self.session.get_providers())
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        self.input_name, self.output_name = self._check_graph()

    # ----- loading --------------------------------------------------------------------------
    def _load_session(
        self, providers: Sequence[str] | None, threads: int | None
    ) -> onnxruntime.InferenceSession:
        ort = _ort()
        chosen = resolve_providers(providers, self.precision)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: fallbacks are reported by us, not as warnings
        if threads:
            options.intra_op_num_threads = int(threads)
        path = self.bundle.part_path("vision")
        sha = str(self.bundle.files().get(self.part.get("file", ""), {}).get("sha256", "graph"))
        provider_args = [
            (p, _provider_options(p, self.part, sha, self.image_size, self.max_batch)) for p in chosen
        ]
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own pybind classes (Fail, InvalidProtobuf, …)
            raise BundleError(f"cannot load {path}: {_one_line(exc)}") from None
        if providers and chosen[0] not in session.get_providers():
            raise DependencyError(
                f"ONNX Runtime could not start {chosen[0]} (missing GPU, driver or libraries); "
                f"running would fall back to {', '.join(session.get_providers())}"
            )
        return session

    def _check_graph(self) -> tuple[str, str]:
        """Graph I/O vs the manifest; returns (input name, output name)."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        where = f"{self.bundle.part_path('vision')}"
        want_in, want_out = _declared(self.part, "inputs", where), _declared(self.part, "outputs", where)
        checks = (
            ("input", inputs, want_in["name"], [3, self.image_size, self.image_size]),
            ("output", outputs, want_out["name"], [self.n_img, self.hidden]),
        )
        for (kind, got, name, static), want in zip(checks, (want_in, want_out), strict=True):
            declared = want.get("shape")
            if declared is not None and list(declared)[1:] != static:
                raise BundleError(
                    f"{where}: the manifest declares {kind} {name} as {declared}, the architecture needs "
                    f"[batch, {', '.join(map(str, static))}] (mismatched manifest)"
                )
            if len(got) != 1 or got[0].name != name:
                names = ", ".join(g.name for g in got)
                raise BundleError(f"{where}: graph {kind}s are [{names}], the manifest expects [{name}]")
            if got[0].type != "tensor(float)":
                raise BundleError(f"{where}: graph {kind} {name} is {got[0].type}, expected tensor(float)")
            shape = list(got[0].shape)
            if len(shape) != len(static) + 1 or shape[1:] != static:
                raise BundleError(
                    f"{where}: graph {kind} {name} has shape {shape}, the manifest expects [batch, "
                    f"{', '.join(map(str, static))}] (mismatched bundle)"
                )
            if isinstance(shape[0], int):
                raise BundleError(
                    f"{where}: graph {kind} {name} has a fixed batch of {shape[0]}; re-export it"
                )
        return inputs[0].name, outputs[0].name

    # ----- running --------------------------------------------------------------------------
    def _check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) normalised pixels → (B, n_img, hidden) float32 embeddings."""
        pixels = self._check_pixels(pixels)
        chunks = [
            self.session.run([self.output_name], {self.input_name: pixels[i : i + self.max_batch]})[0]
            for i in range(0, len(pixels), self.max_batch)
        ]  # each (b, n_img, hidden)
        if not chunks:
            return np.zeros((0, self.n_img, self.hidden), dtype=np.float32)
        return np.concatenate(chunks, axis=0) if len(chunks) > 1 else chunks[0]

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images → (B, 3, S, S) float32 with the bundle's size, mean and std."""
        from ..image import preprocess

        return preprocess(list(images), self.image_size, self.mean, self.std)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images → (B, n_img, hidden) float32 embeddings, one batched run."""
        return self.encode(self.preprocess(images))

    def encode_ortvalue(self, pixels: np.ndarray) -> Any:
        """Like `encode`, but on a GPU session the result stays in device memory (an `OrtValue`)."""
        if self.device != "cuda":
            return self.encode(pixels)
        ort = _ort()
        pixels = self._check_pixels(pixels)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]  # OrtValue (B, n_img, hidden) float32 on cuda:0

    def describe(self) -> dict[str, Any]:
        """Small summary for logs / `info`."""
        return {
            "file": str(self.bundle.part_path("vision")),
            "precision": self.precision,
            "providers": self.providers,
            "device": self.device,
            "image_size": self.image_size,
            "n_img": self.n_img,
            "hidden": self.hidden,
        }
