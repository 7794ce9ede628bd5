"""ONNX export of the vision side and the ONNX Runtime vision backend, on tiny random models (CPU).

Tolerances (tiny presets, every weight random incl. LayerNorms; fresh pixels, not the export's own
verification images):
- fp32: ORT vs torch max abs ≤ 1e-4 (measured ~3e-6).
- fp16 (norms/softmax kept fp32, I/O fp32): max abs ≤ 2e-2 · max|ref| and per-image cosine ≥ 0.9999
  (measured max_rel ~1.3e-3, cosine ~0.999999).
- int8 (dynamic, MatMul weights): per-image cosine ≥ 0.99 (measured ~0.9998 per-tensor); the manifest
  must hold both the per-tensor and the per-channel measurement and keep the better one.
- batch 3 vs 1-by-1 through the same session: max abs ≤ 1e-5 for fp32 and fp16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from minigpt4_local.backends.onnx_vision import (
    CPU,
    CUDA,
    DEFAULT_PROVIDERS,
    OnnxVisionEncoder,
    provider_usable,
    resolve_providers,
)
from minigpt4_local.bundle import MANIFEST_NAME, Bundle, sha256_file
from minigpt4_local.config import get_preset
from minigpt4_local.errors import DependencyError, MiniGPT4Error, ModelDirError
from minigpt4_local.export.onnx_graph import export_fp32_graph
from minigpt4_local.export.onnx_precision import FP16_BLOCK_OPS
from minigpt4_local.export.onnx_verify import compare_outputs
from minigpt4_local.export.vision_export import export_vision_model
from minigpt4_local.model import MiniGPT4
from tests.conftest import randomize_

PRESETS = ("tiny-vicuna-7b", "tiny-vicuna-13b", "tiny-llama2-7b")
FP32_ABS_TOL = 1e-4
FP16_REL_TOL = 2e-2
FP16_MIN_COS = 0.9999
INT8_MIN_COS = 0.99
BATCH_TOL = 1e-5


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
    """Fresh pixels in the normalised range (not the exporter's verification images)."""
    return np.random.default_rng(1000 + seed).uniform(-1.8, 2.1, (n, 3, size, size)).astype(np.float32)


def _torch(model: MiniGPT4, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.encode_image(torch.from_numpy(pixels)).numpy()


@pytest.fixture(scope="module")
def models() -> dict[str, MiniGPT4]:
    out = {}
    for i, preset in enumerate(PRESETS):
        torch.manual_seed(i)
        model = MiniGPT4(get_preset(preset), with_llm=False)
        randomize_(model, seed=10 + i)
        out[preset] = model
    return out


class _Graphs(dict):
    """preset → fp32 graph path; one dynamo export per preset, made on first use (spreads the cost)."""

    def __init__(self, models: dict[str, MiniGPT4], factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.models, self.factory = models, factory

    def __missing__(self, preset: str) -> Path:
        path = self.factory.mktemp(f"graph-{preset}") / "vision.onnx"
        export_fp32_graph(self.models[preset], path)
        self[preset] = path
        return path


@pytest.fixture(scope="module")
def fp32_graphs(models: dict[str, MiniGPT4], tmp_path_factory: pytest.TempPathFactory) -> _Graphs:
    """Dynamo exports reused by the fp32/fp16 bundle builds below."""
    return _Graphs(models, tmp_path_factory)


@pytest.fixture(scope="module")
def bundles(models, fp32_graphs, tmp_path_factory):
    """`bundles(preset, precision)` → bundle dir (built once per pair)."""
    cache: dict[tuple[str, str], Path] = {}

    def build(preset: str, precision: str) -> Path:
        key = (preset, precision)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"bundle-{preset}-{precision}")
            export_vision_model(models[preset], out, precision, fp32_graph=fp32_graphs[preset])
            cache[key] = out
        return cache[key]

    return build


# ----- export + parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_export_matches_torch(models, bundles, preset: str, precision: str) -> None:
    model, root = models[preset], bundles(preset, precision)
    config = model.config
    bundle = Bundle.open(root)
    part = bundle.part("vision")
    assert part["precision"] == precision
    assert part["n_img"] == config.num_image_tokens and part["hidden"] == config.llm.hidden_size
    assert part["inputs"][0]["shape"] == ["batch", 3, config.vision.image_size, config.vision.image_size]
    assert bundle.files()["vision.onnx"]["sha256"] == sha256_file(root / "vision.onnx")

    encoder = OnnxVisionEncoder(root, providers=["cpu"])
    pixels = _pixels(3, config.vision.image_size, seed=PRESETS.index(preset))
    out, ref = encoder.encode(pixels), _torch(model, pixels)
    assert out.shape == ref.shape == (3, config.num_image_tokens, config.llm.hidden_size)
    assert out.dtype == np.float32
    err = compare_outputs(out, ref)
    recorded = part["verification"]
    if precision == "fp32":
        assert err["max_abs"] <= FP32_ABS_TOL
        assert recorded["max_abs"] <= FP32_ABS_TOL
    else:
        assert err["max_abs"] <= FP16_REL_TOL * np.abs(ref).max()
        assert err["min_cosine"] >= FP16_MIN_COS
        assert recorded["min_cosine"] >= FP16_MIN_COS
        # fp16 must really change the numbers (else the conversion did nothing) …
        assert recorded["max_abs"] > 1e-6
    # … and the manifest holds what was measured, per image, on the stated number of images.
    assert recorded["images"] == len(recorded["per_image"]) == 4
    assert recorded["max_abs"] == pytest.approx(max(p["max_abs"] for p in recorded["per_image"]))
    assert 0 < recorded["max_rel"] < 1 and recorded["mean_cosine"] <= 1 + 1e-12


@pytest.mark.parametrize("preset", PRESETS)
def test_fp16_graph_keeps_norms_fp32_and_io_float32(bundles, preset: str) -> None:
    graph = onnx.load(str(bundles(preset, "fp16") / "vision.onnx"))
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert graph.graph.input[0].type.tensor_type.elem_type == float32
    assert graph.graph.output[0].type.tensor_type.elem_type == float32
    inits = {t.name: t.data_type for t in graph.graph.initializer}
    norms = [n for n in graph.graph.node if n.op_type == "LayerNormalization"]
    assert norms, "the exported graph should use LayerNormalization ops"
    assert "LayerNormalization" in FP16_BLOCK_OPS
    for node in norms:
        for name in node.input[1:]:
            if name in inits:
                assert inits[name] == float32, f"{node.name} weight {name} was rounded to fp16"
    matmul_weights = [
        inits[i] for n in graph.graph.node if n.op_type == "MatMul" for i in n.input if i in inits
    ]
    assert matmul_weights and all(t == float16 for t in matmul_weights)
    onnx.checker.check_model(graph)  # also: topologically sorted, no duplicate names


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_dynamic_batch_same_per_image(bundles, preset: str, precision: str) -> None:
    encoder = OnnxVisionEncoder(bundles(preset, precision), providers=["CPUExecutionProvider"])
    pixels = _pixels(3, encoder.image_size, seed=7)
    batched = encoder.encode(pixels)
    singles = np.concatenate([encoder.encode(pixels[i : i + 1]) for i in range(3)])
    assert np.abs(batched - singles).max() <= BATCH_TOL
    # chunking inside encode (max_batch) gives the same per-image results too
    encoder.max_batch = 2
    assert np.abs(encoder.encode(pixels) - batched).max() <= BATCH_TOL


def test_int8_full_export_records_both_quantizations(models, tmp_path: Path) -> None:
    model = models["tiny-llama2-7b"]
    part = export_vision_model(model, tmp_path / "b", "int8")  # the full path: torch export included
    alternatives = part["verification"]["alternatives"]
    assert sorted(a["int8"]["per_channel"] for a in alternatives) == [False, True]
    best = max(alternatives, key=lambda a: a["min_cosine"])
    assert part["int8"]["per_channel"] == best["int8"]["per_channel"]
    assert part["verification"]["min_cosine"] == best["min_cosine"]
    graph = onnx.load(str(tmp_path / "b" / "vision.onnx"))
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.graph.node)

    encoder = OnnxVisionEncoder(tmp_path / "b")
    assert encoder.providers == [CPU]  # int8 graphs default to CPU: no GPU kernels for their integer ops
    pixels = _pixels(3, encoder.image_size, seed=3)
    out = encoder.encode(pixels)
    err = compare_outputs(out, _torch(model, pixels))
    assert err["min_cosine"] >= INT8_MIN_COS
    # one activation scale per run: the encoder runs int8 one image at a time, so results are per-image
    assert encoder.max_batch == 1
    assert np.array_equal(out[1:2], encoder.encode(pixels[1:2]))


def test_external_data_bundle_and_reexport_replaces_files(models, fp32_graphs, tmp_path: Path) -> None:
    model, root = models["tiny-vicuna-13b"], tmp_path / "b"
    export_vision_model(model, root, "fp32", fp32_graph=fp32_graphs["tiny-vicuna-13b"], external_data=True)
    bundle = Bundle.open(root)
    assert bundle.part("vision")["external_data"] is True
    assert bundle.part("vision")["files"] == ["vision.onnx", "vision.onnx.data"]
    assert bundle.files()["vision.onnx.data"]["role"] == "vision"
    pixels = _pixels(2, model.config.vision.image_size, seed=5)
    ref = _torch(model, pixels)
    assert np.abs(OnnxVisionEncoder(root).encode(pixels) - ref).max() <= FP32_ABS_TOL

    # A changed data file is caught by the checksum …
    data = root / "vision.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelDirError, match=r"vision\.onnx\.data fails its sha256"):
        OnnxVisionEncoder(root)

    # … and re-exporting at another precision removes the stale data file from disk and manifest.
    export_vision_model(model, root, "fp16", fp32_graph=fp32_graphs["tiny-vicuna-13b"])
    bundle = Bundle.open(root)
    assert not data.exists() and "vision.onnx.data" not in bundle.files()
    assert bundle.part("vision")["precision"] == "fp16"
    assert not list(root.glob(".vision-export-*")), "staging folder left behind"


def test_export_onnx_from_model_dir_via_cli(tiny_model_dir, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from minigpt4_local.checkpoints.model_dir import load_model_dir
    from minigpt4_local.export.cli import export_group

    model_dir = tiny_model_dir("tiny-vicuna-7b")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(
        export_group, ["onnx", str(model_dir), "--out", str(out), "--verify-images", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "max_abs" in result.output
    bundle = Bundle.open(out)
    assert {f for f, e in bundle.files().items() if e["role"] == "tokenizer"} >= {"tokenizer/tokenizer.model"}
    assert bundle.part("tokenizer")["dir"] == "tokenizer"
    assert bundle.part("vision")["verification"]["images"] == 2
    assert bundle.config.to_dict() == load_model_dir(model_dir, with_llm=False).config.to_dict()
    model = load_model_dir(model_dir, with_llm=False)
    pixels = _pixels(2, model.config.vision.image_size, seed=9)
    assert np.abs(OnnxVisionEncoder(out).encode(pixels) - _torch(model, pixels)).max() <= FP32_ABS_TOL


def test_bundle_for_another_model_is_refused(bundles) -> None:
    root = bundles("tiny-vicuna-7b", "fp32")
    with pytest.raises(ModelDirError, match="different model"):
        Bundle.create(root, get_preset("tiny-llama2-7b"))
    assert Bundle.create(root, get_preset("tiny-vicuna-7b")).has_part("vision")  # same model: reopened


# ----- runtime: validation on load ----------------------------------------------------------------


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def test_corrupted_graph_is_refused(bundles, tmp_path: Path) -> None:
    root = _copy_bundle(bundles("tiny-vicuna-7b", "fp32"), tmp_path / "b")
    graph = root / "vision.onnx"
    size = graph.stat().st_size
    graph.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))  # same size, not a model
    with pytest.raises(ModelDirError, match="sha256"):
        OnnxVisionEncoder(root)
    with pytest.raises(ModelDirError, match="cannot load") as info:  # checksum skipped: ORT refuses it
        OnnxVisionEncoder(root, verify=False)
    assert str(graph) in _one_line(info)


def test_truncated_graph_is_refused_even_without_checksums(bundles, tmp_path: Path) -> None:
    root = _copy_bundle(bundles("tiny-llama2-7b", "fp32"), tmp_path / "b")
    graph = root / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    with pytest.raises(ModelDirError, match="truncated") as info:
        OnnxVisionEncoder(root, verify=False)
    _one_line(info)
    # With the manifest updated to the truncated size (a stale manifest), onnxruntime still refuses it.
    _edit_manifest(root, lambda m: m["files"]["vision.onnx"].update(bytes=graph.stat().st_size))
    with pytest.raises(ModelDirError, match="cannot load"):
        OnnxVisionEncoder(root, verify=False)


def test_manifest_dim_mismatch_is_refused(bundles, tmp_path: Path) -> None:
    root = _copy_bundle(bundles("tiny-vicuna-7b", "fp32"), tmp_path / "b")

    # architecture disagrees with the vision part → refused by the bundle itself
    _edit_manifest(root, lambda m: m["architecture"]["llm"].update(hidden_size=128))
    with pytest.raises(ModelDirError, match=r"vision hidden 64 != architecture llm.hidden_size 128") as info:
        OnnxVisionEncoder(root, verify=False)
    _one_line(info)

    # manifest consistent with itself but not with the graph → refused when the graph is checked
    def consistent_128(m: dict) -> None:
        m["parts"]["vision"]["hidden"] = 128
        m["parts"]["vision"]["outputs"][0]["shape"][2] = 128

    _edit_manifest(root, consistent_128)
    with pytest.raises(ModelDirError, match=r"image_embeds has shape \['batch', 4, 64\]") as info:
        OnnxVisionEncoder(root, verify=False)
    _one_line(info)

    # the declared output shape disagrees with the part's dims
    _edit_manifest(root, lambda m: m["parts"]["vision"]["outputs"][0]["shape"].__setitem__(1, 32))
    with pytest.raises(ModelDirError, match=r"declares output image_embeds as \['batch', 32, 128\]"):
        OnnxVisionEncoder(root, verify=False)


def test_graph_io_name_mismatch_is_refused(bundles, tmp_path: Path) -> None:
    root = _copy_bundle(bundles("tiny-vicuna-7b", "fp32"), tmp_path / "b")
    _edit_manifest(root, lambda m: m["parts"]["vision"]["inputs"][0].update(name="images"))
    with pytest.raises(
        ModelDirError, match=r"graph inputs are \[pixel_values\], the manifest expects \[images\]"
    ):
        OnnxVisionEncoder(root)


# ----- runtime: providers, images, device outputs -------------------------------------------------


def test_provider_selection() -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    default = resolve_providers()
    assert default[-1] == CPU and all(p in available for p in default)
    assert default == [p for p in DEFAULT_PROVIDERS if p in available and provider_usable(p)]
    if not provider_usable(CUDA):  # e.g. onnxruntime-gpu on a machine without a GPU: never try CUDA
        assert default == [CPU]
    assert resolve_providers(["cpu"]) == [CPU]
    assert resolve_providers(["CPUExecutionProvider", "cpu"]) == [CPU]
    assert resolve_providers(None, precision="int8") == [CPU]
    with pytest.raises(
        DependencyError, match=r"'NoSuchExecutionProvider' is not available.*available: "
    ) as info:
        resolve_providers(["NoSuchExecutionProvider"])
    assert CPU in _one_line(info)


@pytest.mark.skipif(provider_usable(CUDA), reason="checks the CPU-only fallback behaviour")
def test_explicit_gpu_provider_without_gpu_is_a_clear_error(bundles) -> None:
    with pytest.raises(MiniGPT4Error, match="CUDAExecutionProvider") as info:
        OnnxVisionEncoder(bundles("tiny-vicuna-7b", "fp32"), providers=["cuda"])
    _one_line(info)


def test_encode_images_uses_bundle_preprocessing(models, bundles) -> None:
    from PIL import Image

    from minigpt4_local.image import preprocess
    from tests.support.images import gradient_rgb

    encoder = OnnxVisionEncoder(bundles("tiny-vicuna-7b", "fp32"))
    images = [
        gradient_rgb(90, 70, seed=1),
        gradient_rgb(40, 64, seed=2).convert("L"),
        Image.new("RGB", (56, 56)),
    ]
    pixels = preprocess(images, 56, encoder.mean, encoder.std)
    out = encoder.encode_images(images)
    assert np.array_equal(out, encoder.encode(pixels))
    assert np.abs(out - _torch(models["tiny-vicuna-7b"], pixels)).max() <= FP32_ABS_TOL


def test_encode_ortvalue_on_cpu_returns_host_array(bundles) -> None:
    encoder = OnnxVisionEncoder(bundles("tiny-vicuna-7b", "fp32"), providers=["cpu"])
    pixels = _pixels(2, encoder.image_size, seed=4)
    assert encoder.device == "cpu"
    assert np.array_equal(encoder.encode_ortvalue(pixels), encoder.encode(pixels))
    with pytest.raises(ValueError, match=r"\(B, 3, 56, 56\)"):
        encoder.encode(pixels[:, :, :28])


@pytest.mark.gpu
def test_encode_ortvalue_stays_on_gpu(bundles) -> None:
    encoder = OnnxVisionEncoder(bundles("tiny-vicuna-7b", "fp32"), providers=["cuda", "cpu"])
    pixels = _pixels(2, encoder.image_size, seed=4)
    value = encoder.encode_ortvalue(pixels)
    assert value.device_name().lower() == "cuda"
    assert value.shape() == [2, encoder.n_img, encoder.hidden]
    assert np.abs(value.numpy() - encoder.encode(pixels)).max() <= 1e-3
