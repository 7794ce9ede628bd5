"""Synthesize a MiniGPT-4 of a given shape in the ORIGINAL file formats, then build it with this project's code.

Contract (used by `gpu_suite.py`'s `synth` step; no download, deterministic for a seed and device):
- `suite_config(shape) -> MiniGPT4Config`: `7b` = the `minigpt4-vicuna-7b` preset (EVA ViT-g 39 × 1408,
  Q-Former 12 × 768 with 32 queries, Vicuna-7B 32 × 4096, vocabulary 32001); `mid` = the same
  architecture at a CPU-sized shape (ViT 2 × 256 at 224 px, Q-Former 2 × 256 with 32 queries, LLaMA
  4 × 256, vocabulary 2049). Both keep `vicuna_v0`; `stop_on_eos` is off and the stop sequence is three
  fixed ids in a row, so a timed greedy run of a random model generates exactly `max_new_tokens`.
- `write_sources(cfg, root, device, seed)` writes what a MiniGPT-4 user has: an HF BLIP-2 directory
  (vision tower + ln_vision + Q-Former + query tokens, fp32 safetensors, `config.json` model_type
  blip-2), the projection checkpoint `{"model": {"llama_proj.*"}}` (.pth), and an HF LLaMA directory
  (fp16 safetensors shards of at most ~2 GB + index, `config.json`, a sentencepiece `tokenizer.model`
  with exactly vocab_size - 1 pieces: Vicuna v0's extra row). Random values at a trained model's scale
  (matrices std 1/sqrt(fan_in), norm weights 1 + 0.1 N, biases 0.02 N, position/CLS/query embeddings
  0.5 N), drawn on `device` (cuda is far faster for 7B) and written tensor by tensor / shard by shard,
  so host memory stays at about one shard.
- `synthesize(shape, work, device, seed, say, before_llama_cpp)` → `SynthPaths`: `write_sources`, then the project's own
  tools: `checkpoints.model_dir.convert` (model directory), `export.vision_export.export_onnx` (fp16 graph,
  verified on the CPU), `quantize.gguf_bundle.export_gguf` (Q4_K_M through llama.cpp's quantizer), and
  `write_gptq_rtn` (a 4-bit group-128 GPTQ checkpoint of the same weights, round-to-nearest instead of
  GPTQ's Hessian search: GPTQModel needs calibration passes that do not fit a GPU loan at 7B). The
  sources are deleted once converted (disk). Each tool's time is returned in `SynthPaths.seconds`.
  `before_llama_cpp()` is called just before the first llama.cpp use (the GGUF quantizer), so that a
  llama-cpp-python build running meanwhile (gpu_suite.sh) overlaps the llama.cpp-free work.
- `write_gptq_rtn(model_dir, bundle_dir, bits=4, group_size=128, device)` writes `BUNDLE/llm-gptq/` in
  the standard GPTQ v1 layout GPTQModel loads (`qweight` int32 (K/8, N) packing 8 nibbles along the
  input dim, `qzeros` int32 (K/g, N/8) holding zero-1, fp16 `scales` (K/g, N), `g_idx`), symmetric:
  W ≈ scale · (q − 8), scale = 2·max|W_group| / 15. `rtn_dequantize` gives exactly that W for checks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt4_local.config import LLMConfig, MiniGPT4Config, QFormerConfig, VisionConfig, get_preset

Say = Callable[[str], None]
SHAPES = ("mid", "7b")
SHARD_BYTES = 2_000_000_000
TOKENIZER_DIR_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# Three ids in a row that a random model practically never emits: timed runs always reach max_new_tokens.
STOP_SEQUENCE = [3, 4, 5]
GPTQ_BITS, GPTQ_GROUP = 4, 128


def suite_config(shape: str) -> MiniGPT4Config:
    if shape == "7b":
        cfg = get_preset("minigpt4-vicuna-7b")
    elif shape == "mid":
        cfg = get_preset("minigpt4-vicuna-7b")
        cfg.vision = VisionConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)
        cfg.qformer = QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)
        # Widths are multiples of 256 so that Q4_K_M really uses k-quants (as at 7B) and of 128 for GPTQ.
        cfg.llm = LLMConfig(
            hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768, vocab_size=2049
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cfg.name = f"gpu-suite-{shape}"
    cfg.prompt.stop_sequences = [list(STOP_SEQUENCE)]
    cfg.prompt.stop_on_eos = False
    cfg.validate()
    return cfg


# ----- random tensors at a trained model's scale ------------------------------------------------------


class _Random:
    def __init__(self, seed: int, device: str) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def tensor(self, name: str, shape: tuple[int, ...]) -> Any:
        """One tensor (float32 on `device`) scaled by the role its name says."""
        noise = self.torch.randn(shape, generator=self.gen, device=self.device)
        lower = name.lower()
        if "norm" in lower and name.endswith("weight"):
            return noise.mul_(0.1).add_(1.0)
        if name.endswith("bias"):
            return noise.mul_(0.02)
        if name.endswith(("embedding", "query_tokens")):  # CLS, position embedding, queries
            return noise.mul_(0.5)
        if name.endswith("embed_tokens.weight"):
            return noise.mul_(0.02)
        if len(shape) >= 2:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            return noise.mul_(fan_in**-0.5)
        return noise.mul_(0.02)


def _shapes(cfg: MiniGPT4Config) -> dict[str, tuple[int, ...]]:
    from minigpt4_local.checkpoints.layout import expected_shapes

    return expected_shapes(cfg, with_llm=True)


# ----- the tokenizer ---------------------------------------------------------------------------------


def _pieces(n_normal: int) -> Iterator[str]:
    """Deterministic piece strings: '▁', printable ASCII, '▁'+char, then lowercase bigrams/trigrams."""
    chars = [chr(c) for c in range(33, 127)]
    yield from ["▁", *chars, *("▁" + c for c in chars), "##", "###", "▁###"]
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    count = 1 + 2 * len(chars) + 3
    for size in (2, 3, 4):
        for index in range(len(letters) ** size):
            word, rest = "", index
            for _ in range(size):
                word, rest = word + letters[rest % len(letters)], rest // len(letters)
            for piece in (word, "▁" + word):
                if count >= n_normal:
                    return
                count += 1
                yield piece


def write_tokenizer(out_dir: Path, n_pieces: int) -> None:
    """A LLaMA-style sentencepiece BPE model (unk 0, <s> 1, </s> 2, 256 byte pieces) with `n_pieces`."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    specials = [("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                ("</s>", pb.ModelProto.SentencePiece.CONTROL)]  # fmt: skip
    for piece, kind in specials:
        model.pieces.add(piece=piece, score=0.0, type=kind)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    n_normal = n_pieces - len(model.pieces)
    if n_normal < 200:
        raise ValueError(f"a vocabulary of {n_pieces} pieces is too small for the synthetic tokenizer")
    for rank, piece in enumerate(_pieces(n_normal)):
        model.pieces.add(piece=piece, score=-float(rank), type=pb.ModelProto.SentencePiece.NORMAL)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = n_pieces
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.SerializeToString())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
              "legacy": True, "model_max_length": 2048}  # fmt: skip
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# ----- source files ------------------------------------------------------------------------------------


def _save_shard(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_blip2_dir(cfg: MiniGPT4Config, shapes: dict, rand: _Random, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model_type": "blip-2", "architectures": ["Blip2Model"]}))
    names = [k for k in shapes if not k.startswith(("llm.", "llama_proj."))]
    _save_shard({k: rand.tensor(k, shapes[k]) for k in names}, out / "model.safetensors")


def _write_projection(shapes: dict, rand: _Random, path: Path) -> None:
    import torch

    state = {k: rand.tensor(k, shapes[k]).cpu() for k in shapes if k.startswith("llama_proj.")}
    torch.save({"model": state, "epoch": 0}, path)


def _llama_config(cfg: MiniGPT4Config) -> dict[str, Any]:
    from transformers import LlamaConfig

    llm = cfg.llm
    hf = LlamaConfig(
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        intermediate_size=llm.intermediate_size,
        vocab_size=llm.vocab_size,
        rms_norm_eps=llm.rms_norm_eps,
        rope_theta=llm.rope_theta,
        max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=llm.tie_word_embeddings,
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
    )
    data = hf.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["dtype"] = "float16"
    return data


def _write_llama_dir(cfg: MiniGPT4Config, shapes: dict, rand: _Random, out: Path) -> None:
    out.mkdir(parents=True)
    write_tokenizer(out, cfg.llm.vocab_size - 1)  # Vicuna v0: one embedding row more than pieces
    (out / "config.json").write_text(json.dumps(_llama_config(cfg), indent=2))
    llm = {k.removeprefix("llm."): v for k, v in shapes.items() if k.startswith("llm.")}
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in llm.items():
        n = 2
        for d in shape:
            n *= d
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        filename = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {k: rand.tensor(k, llm[k]).half() for k in names}
        total += sum(t.numel() * 2 for t in shard.values())
        _save_shard(shard, out / filename)
        del shard
        weight_map.update(dict.fromkeys(names, filename))
    index_data = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2))


@dataclass
class SourcePaths:
    blip2: Path
    proj: Path
    llm: Path
    config: Path


def write_sources(cfg: MiniGPT4Config, root: Path, device: str = "cpu", seed: int = 0) -> SourcePaths:
    from minigpt4_local.config import save_config

    root.mkdir(parents=True, exist_ok=True)
    shapes = _shapes(cfg)
    rand = _Random(seed, device)
    paths = SourcePaths(root / "blip2", root / "minigpt4_proj.pth", root / "llm", root / "config.json")
    save_config(cfg, paths.config)
    _write_blip2_dir(cfg, shapes, rand, paths.blip2)
    _write_projection(shapes, rand, paths.proj)
    _write_llama_dir(cfg, shapes, rand, paths.llm)
    return paths


# ----- GPTQ checkpoint (round-to-nearest, standard GPTQ v1 packing) ----------------------------------


def _to_int32(packed: Any) -> Any:
    """int64 holding 32 unsigned bits → the same bits as int32."""
    import torch

    return (packed & 0xFFFFFFFF).sub_((packed & 0x80000000) << 1).to(torch.int32)


def rtn_quantize(weight: Any, bits: int = GPTQ_BITS, group_size: int = GPTQ_GROUP) -> dict[str, Any]:
    """(N, K) weight → GPTQ v1 tensors {qweight, qzeros, scales, g_idx} (symmetric, round-to-nearest)."""
    import torch

    n_out, n_in = weight.shape
    maxq = 2**bits - 1
    zero = (maxq + 1) // 2
    per = 32 // bits
    w = weight.float().reshape(n_out, n_in // group_size, group_size)
    scale = (2 * w.abs().amax(-1) / maxq).clamp_(min=1e-8)  # (N, G)
    scale = scale.half().float()  # stored in fp16: quantize against the scale the kernel will read
    q = torch.clamp(torch.round(w / scale[..., None]) + zero, 0, maxq).to(torch.int64)
    q = q.reshape(n_out, n_in).t().contiguous()  # (K, N)
    shifts = (torch.arange(per, device=weight.device, dtype=torch.int64) * bits).view(1, per, 1)
    qweight = (q.view(n_in // per, per, n_out) << shifts).sum(1)
    zeros = torch.full((n_in // group_size, n_out), zero - 1, dtype=torch.int64, device=weight.device)
    qzeros = (zeros.view(n_in // group_size, n_out // per, per) << shifts.view(1, 1, per)).sum(2)
    return {
        "qweight": _to_int32(qweight),
        "qzeros": _to_int32(qzeros),
        "scales": scale.t().contiguous().half(),
        "g_idx": (torch.arange(n_in, device=weight.device) // group_size).to(torch.int32),
    }


def rtn_dequantize(weight: Any, bits: int = GPTQ_BITS, group_size: int = GPTQ_GROUP) -> Any:
    """The (N, K) float32 weight a GPTQ kernel computes with for `rtn_quantize(weight)`."""
    import torch

    n_out, n_in = weight.shape
    maxq = 2**bits - 1
    w = weight.float().reshape(n_out, n_in // group_size, group_size)
    scale = (2 * w.abs().amax(-1) / maxq).clamp_(min=1e-8).half().float()
    q = torch.clamp(torch.round(w / scale[..., None]) + (maxq + 1) // 2, 0, maxq)
    return ((q - (maxq + 1) // 2) * scale[..., None]).reshape(n_out, n_in)


QUANTIZED_SUFFIXES = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)  # fmt: skip


def _gptq_settings(bits: int, group_size: int) -> dict[str, Any]:
    return {"bits": bits, "group_size": group_size, "desc_act": False, "sym": True, "lm_head": False,
            "method": "gptq", "quant_method": "gptq", "format": "gptq", "checkpoint_format": "gptq",
            "pack_dtype": "int32", "meta": {"quantizer": ["minigpt4-local gpu_suite rtn"]}}  # fmt: skip


def write_gptq_rtn(
    model_dir: Path,
    bundle_dir: Path,
    bits: int = GPTQ_BITS,
    group_size: int = GPTQ_GROUP,
    device: str = "cpu",
) -> dict[str, Any]:
    """BUNDLE/llm-gptq/ from MODEL_DIR/llm (see module docstring); returns the manifest part."""
    from safetensors import safe_open

    from minigpt4_local.backends.gptq_checkpoint import GPTQ_DIR, GPTQ_PART
    from minigpt4_local.bundle import Bundle
    from minigpt4_local.checkpoints.model_dir import read_model_config

    cfg = read_model_config(model_dir)
    llm_dir = model_dir / "llm"
    bundle = Bundle.create(bundle_dir, cfg)
    staging = bundle_dir / f".{GPTQ_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    index_file = llm_dir / "model.safetensors.index.json"
    shards = (
        sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        if index_file.is_file()
        else ["model.safetensors"]
    )
    weight_map: dict[str, str] = {}
    for shard in shards:
        out: dict[str, Any] = {}
        with safe_open(str(llm_dir / shard), framework="pt", device=device) as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(key)
                if key.endswith(QUANTIZED_SUFFIXES):
                    stem = key.removesuffix(".weight")
                    for name, value in rtn_quantize(tensor, bits, group_size).items():
                        out[f"{stem}.{name}"] = value
                else:
                    out[key] = tensor.half()
        _save_shard(out, staging / shard)
        weight_map.update(dict.fromkeys(out, shard))
        del out
    (staging / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    settings = _gptq_settings(bits, group_size)
    hf_config = json.loads((llm_dir / "config.json").read_text())
    hf_config["quantization_config"] = settings
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    (staging / "quantize_config.json").write_text(json.dumps(settings, indent=2))
    for name in TOKENIZER_DIR_FILES:
        if (llm_dir / name).is_file():
            shutil.copyfile(llm_dir / name, staging / name)
    final = bundle_dir / GPTQ_DIR
    bundle.drop_part(GPTQ_PART)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    bundle.add_file(GPTQ_DIR, role=GPTQ_PART)
    llm = cfg.llm
    bundle.set_part(GPTQ_PART, {
        "dir": GPTQ_DIR, "format": "gptq", "quantizer": "round-to-nearest (gpu_suite synthetic checkpoint)",
        "bits": bits, "group_size": group_size, "desc_act": False, "sym": True,
        "hidden": llm.hidden_size, "vocab_size": llm.vocab_size, "num_layers": llm.num_layers,
    })  # fmt: skip
    bundle.save()
    return bundle.part(GPTQ_PART)


# ----- the whole synthesis ------------------------------------------------------------------------------


@dataclass
class SynthPaths:
    work: Path
    model_dir: Path
    bundle: Path
    seconds: dict[str, float] = field(default_factory=dict)
    sizes_mb: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"work": str(self.work), "model_dir": str(self.model_dir), "bundle": str(self.bundle),
                "seconds": self.seconds, "sizes_mb": self.sizes_mb}  # fmt: skip


def _du_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def synthesize(
    shape: str,
    work: Path,
    device: str = "cpu",
    seed: int = 0,
    say: Say | None = None,
    before_llama_cpp: Callable[[], None] | None = None,
) -> SynthPaths:
    """Sources → model directory → bundle (fp16 ONNX + Q4_K_M GGUF + GPTQ 4-bit); see module docstring."""
    from minigpt4_local.checkpoints.model_dir import convert
    from minigpt4_local.export.vision_export import export_onnx
    from minigpt4_local.quantize.gguf_bundle import export_gguf

    say = say or (lambda _message: None)
    cfg = suite_config(shape)
    paths = SynthPaths(work, work / "model", work / "bundle")
    for stale in (paths.model_dir, paths.bundle, work / "sources"):
        shutil.rmtree(stale, ignore_errors=True)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        say(f"synth: {name} ...")
        start = time.perf_counter()
        result = fn()
        paths.seconds[name] = round(time.perf_counter() - start, 2)
        say(f"synth: {name} done in {paths.seconds[name]:.1f} s")
        return result

    sources = timed("write_sources", lambda: write_sources(cfg, work / "sources", device, seed))
    paths.sizes_mb["sources"] = _du_mb(work / "sources")
    timed("convert", lambda: convert(vit=sources.blip2, proj=sources.proj, llm=sources.llm,
                                     out=paths.model_dir, config_path=sources.config))  # fmt: skip
    shutil.rmtree(work / "sources", ignore_errors=True)
    timed("export_onnx_fp16", lambda: export_onnx(paths.model_dir, paths.bundle, "fp16", n_verify=2))
    if before_llama_cpp is not None:  # gpu_suite.sh builds llama-cpp-python meanwhile
        timed("wait_for_llama_cpp", before_llama_cpp)
    timed("quantize_gguf_q4_k_m", lambda: export_gguf(paths.model_dir, paths.bundle, "Q4_K_M"))
    timed("write_gptq_rtn", lambda: write_gptq_rtn(paths.model_dir, paths.bundle, device=device))
    paths.sizes_mb.update({"model_dir": _du_mb(paths.model_dir), "vision.onnx": _du_mb(paths.bundle / "vision.onnx")
                           + (_du_mb(paths.bundle / "vision.onnx.data") if (paths.bundle / "vision.onnx.data").exists() else 0),
                           "llm.gguf": _du_mb(paths.bundle / "llm.gguf"), "llm-gptq": _du_mb(paths.bundle / "llm-gptq")})  # fmt: skip
    return paths
