"""Writers of tiny checkpoint files in each REAL format the converter reads (tests only).

Contract:
- `lavis_weights(cfg, seed=0, extra_blocks=1)` is the ground truth: one LAVIS-named fp32 state dict
  (`visual_encoder.*` with cfg.vision.num_layers + extra_blocks blocks, `ln_vision.*`, `Qformer.bert.*`
  incl. the text-side parts MiniGPT-4 never uses, `Qformer.cls.*`, `query_tokens`, `t5_proj.*`,
  `llama_proj.*`). EVERY tensor is random (q_bias/v_bias and LayerNorm weights/biases too, never 1/0),
  the ViT part already rounded through fp16 like the real `eva_vit_g.pth`. Same seed → same tensors,
  so files written by different writers with one seed are parts of one model. For a config without a
  Q-Former (Llama-2 variant) a small default Q-Former is still generated (for files that carry one).
- `write_lavis_eva(path, cfg, extra_blocks=1, seed=0, prefix=False)`: `eva_vit_g.pth` = raw fp16 state
  dict (no `visual_encoder.` prefix unless `prefix`).
- `write_lavis_blip2(path, cfg, seed=0, with_visual_encoder=False)`: `blip2_pretrained_flant5xxl.pth` =
  `{"model": {...}}` with t5_proj and the other leftovers.
- `write_hf_blip2_dir(directory, cfg, n_shards=3, seed=0, split_qkv_bias=False)`: an HF BLIP-2 directory
  (`config.json`, `model.safetensors.index.json`, shards); the LAST shard holds only `language_model.*`
  and `language_projection.*` (the part a converter must never open). `n_shards=1` writes a single
  `model.safetensors` instead.
- `write_minigpt4_proj(path, cfg, seed=0, with_ln_vision=False, module_prefix=False)`: a MiniGPT-4
  projection checkpoint `{"model": {"llama_proj.*"}, "optimizer", "scaler", "config", "epoch"}`;
  returns only the tensors it wrote (`llama_proj.*`, and its own `ln_vision.*` when asked).
- `write_hf_llama_dir(directory, cfg, tokenizer_dir, vicuna_quirks=True, bin_format=False, n_shards=2,
  seed=0)`: an HF LLaMA directory with fp16 weights; Vicuna v0 quirks = config/generation_config with
  bos 0 / eos 1 / pad -1, the old `LLaMAForCausalLM` name, and `rotary_emb.inv_freq` buffers.
- `write_lavis_sources(root, preset, seed=0, proj_ln_vision=False) -> Sources`: all of the above that a
  LAVIS-format conversion needs (EVA with one extra block, BLIP-2 for Vicuna presets, projection, HF
  LLaMA dir with Vicuna quirks for the Vicuna presets, tokenizer) plus the truth the result must match.
All writers return the LAVIS-named (or, for the LLM, HF-named) tensors they wrote, upcast to fp32
(LLM: as stored), for independent reference computations. The HF-name mapping below is written
separately from the package's converters on purpose.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from minigpt4_local.config import MiniGPT4Config, QFormerConfig

from .tiny_tokenizer import make_tiny_sentencepiece

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _Rand:
    """Deterministic random tensors with sizes that keep activations O(1)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std + mean

    def linear(
        self, out_f: int, in_f: int, prefix: str, bias: bool = True, gain: float = 1.0
    ) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": self.normal(out_f, in_f, std=gain * in_f**-0.5)}
        if bias:
            out[f"{prefix}.bias"] = self.normal(out_f, std=0.1 * gain)
        return out

    def norm(self, dim: int, prefix: str, bias: bool = True) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.weight": self.normal(dim, std=0.1, mean=1.0)}
        if bias:
            out[f"{prefix}.bias"] = self.normal(dim, std=0.1)
        return out


_SMALL = 0.01  # gain of the layers that write into the ViT's residual stream (see _eva)


def _sub(seed: int, tag: str) -> _Rand:
    """An independent stream per part, so e.g. extra EVA blocks do not shift the Q-Former's values."""
    return _Rand(zlib.crc32(f"{seed}:{tag}".encode()))


def _qformer_cfg(cfg: MiniGPT4Config) -> QFormerConfig:
    return cfg.qformer or QFormerConfig(
        num_query_tokens=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
    )


def _eva(seed: int, cfg: MiniGPT4Config, blocks: int) -> dict[str, torch.Tensor]:
    v = cfg.vision
    r = _sub(seed, "eva-embeddings")
    d, p = v.hidden_size, v.patch_size
    # The ViT's residual stream is kept small (std ~0.01, variance ~1e-4) so that the LayerNorm eps
    # values (1e-6 in the blocks, 1e-5 for ln_vision) change the outputs by whole percents: a parity
    # test with the wrong eps fails.
    sd = {
        "cls_token": r.normal(1, 1, d, std=0.01),
        "pos_embed": r.normal(1, v.num_tokens, d, std=0.01),
        "patch_embed.proj.weight": r.normal(d, 3, p, p, std=_SMALL * (3 * p * p) ** -0.5),
        "patch_embed.proj.bias": r.normal(d, std=0.1 * _SMALL),
    }
    for i in range(blocks):
        r = _sub(seed, f"eva-block-{i}")
        b = f"blocks.{i}"
        sd.update(r.norm(d, f"{b}.norm1"))
        sd.update(r.linear(3 * d, d, f"{b}.attn.qkv", bias=False))
        sd[f"{b}.attn.q_bias"] = r.normal(d, std=0.1)
        sd[f"{b}.attn.v_bias"] = r.normal(d, std=0.1)
        sd.update(r.linear(d, d, f"{b}.attn.proj", gain=_SMALL))
        sd.update(r.norm(d, f"{b}.norm2"))
        sd.update(r.linear(v.intermediate_size, d, f"{b}.mlp.fc1"))
        sd.update(r.linear(d, v.intermediate_size, f"{b}.mlp.fc2", gain=_SMALL))
    # Rounded through fp16 like the real file, so fp16 files and the truth agree exactly.
    return {f"visual_encoder.{k}": t.half().float() for k, t in sd.items()}


def _qformer(seed: int, cfg: MiniGPT4Config) -> dict[str, torch.Tensor]:
    r = _sub(seed, "qformer")
    q = _qformer_cfg(cfg)
    h, vis = q.hidden_size, cfg.vision.hidden_size
    pre = "Qformer.bert"
    sd = {
        # Tiny queries (variance ~1e-5): the embeddings.LayerNorm eps (1e-12) is then visible.
        "query_tokens": r.normal(1, q.num_query_tokens, h, std=0.003),
        f"{pre}.embeddings.word_embeddings.weight": r.normal(50, h),
        f"{pre}.embeddings.position_embeddings.weight": r.normal(16, h),
        f"{pre}.embeddings.position_ids": torch.arange(16).unsqueeze(0),
    }
    sd.update(r.norm(h, f"{pre}.embeddings.LayerNorm"))
    for i in range(q.num_layers):
        layer = f"{pre}.encoder.layer.{i}"
        kinds = ["attention"] + (["crossattention"] if i % q.cross_attention_frequency == 0 else [])
        for kind in kinds:
            kv_in = vis if kind == "crossattention" else h
            sd.update(r.linear(h, h, f"{layer}.{kind}.self.query"))
            sd.update(r.linear(h, kv_in, f"{layer}.{kind}.self.key"))
            sd.update(r.linear(h, kv_in, f"{layer}.{kind}.self.value"))
            sd.update(r.linear(h, h, f"{layer}.{kind}.output.dense"))
            sd.update(r.norm(h, f"{layer}.{kind}.output.LayerNorm"))
        for suffix in ("", "_query"):  # text FFN (unused by MiniGPT-4) and query FFN
            sd.update(r.linear(q.intermediate_size, h, f"{layer}.intermediate{suffix}.dense"))
            sd.update(r.linear(h, q.intermediate_size, f"{layer}.output{suffix}.dense"))
            sd.update(r.norm(h, f"{layer}.output{suffix}.LayerNorm"))
    sd.update(r.linear(50, h, "Qformer.cls.predictions.decoder"))
    sd.update(r.norm(h, "Qformer.cls.predictions.transform.LayerNorm"))
    sd.update(r.linear(24, h, "t5_proj"))  # BLIP-2's projection into flan-t5 (unused)
    return sd


def lavis_weights(cfg: MiniGPT4Config, seed: int = 0, extra_blocks: int = 1) -> dict[str, torch.Tensor]:
    """The LAVIS-named ground truth of one tiny MiniGPT-4 (see module docstring)."""
    sd = _eva(seed, cfg, cfg.vision.num_layers + extra_blocks)
    sd.update(_sub(seed, "ln_vision").norm(cfg.vision.hidden_size, "ln_vision"))
    sd.update(_qformer(seed, cfg))
    sd.update(_sub(seed, "llama_proj").linear(cfg.llm.hidden_size, cfg.projector_in_features, "llama_proj"))
    return sd


def _select(sd: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def write_lavis_eva(
    path: str | Path, cfg: MiniGPT4Config, extra_blocks: int = 1, seed: int = 0, prefix: bool = False
) -> dict[str, torch.Tensor]:
    truth = lavis_weights(cfg, seed, extra_blocks)
    vit = _select(truth, "visual_encoder.")
    raw = {(k if prefix else k[len("visual_encoder.") :]): v.half() for k, v in vit.items()}
    torch.save(raw, path)
    return truth


def write_lavis_blip2(
    path: str | Path, cfg: MiniGPT4Config, seed: int = 0, with_visual_encoder: bool = False
) -> dict[str, torch.Tensor]:
    truth = lavis_weights(cfg, seed, extra_blocks=0)
    parts = ["ln_vision.", "Qformer.", "query_tokens", "t5_proj."]
    if with_visual_encoder:
        parts.append("visual_encoder.")
    torch.save({"model": _select(truth, *parts)}, path)
    return truth


# ----- HF BLIP-2 ------------------------------------------------------------------------------


def lavis_to_hf_blip2(
    truth: dict[str, torch.Tensor], split_qkv_bias: bool = False
) -> dict[str, torch.Tensor]:
    """HF `Blip2ForConditionalGeneration` names for the vision/Q-Former parts of `truth`."""
    out: dict[str, torch.Tensor] = {}
    emb = "vision_model.embeddings"
    for key, t in truth.items():
        if key == "visual_encoder.cls_token":
            out[f"{emb}.class_embedding"] = t
        elif key == "visual_encoder.pos_embed":
            out[f"{emb}.position_embedding"] = t
        elif key.startswith("visual_encoder.patch_embed.proj."):
            out[f"{emb}.patch_embedding.{key.rsplit('.', 1)[1]}"] = t
        elif key.startswith("visual_encoder.blocks."):
            _, _, i, *rest = key.split(".")
            name = ".".join(rest)
            layer = f"vision_model.encoder.layers.{i}"
            simple = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection"}
            stem, leaf = name.rsplit(".", 1) if "." in name else (name, "")
            if stem in simple:
                out[f"{layer}.{simple[stem]}.{leaf}"] = t
            elif stem.startswith("mlp."):
                out[f"{layer}.{name}"] = t
            elif name == "attn.qkv.weight":
                out[f"{layer}.self_attn.qkv.weight"] = t
            elif name == "attn.q_bias":
                if split_qkv_bias:
                    out[f"{layer}.self_attn.q_bias"] = t
                    out[f"{layer}.self_attn.v_bias"] = truth[key.replace("q_bias", "v_bias")]
                else:
                    v_bias = truth[key.replace("q_bias", "v_bias")]
                    out[f"{layer}.self_attn.qkv.bias"] = torch.cat([t, torch.zeros_like(t), v_bias])
        elif key.startswith("ln_vision."):
            out[f"vision_model.post_layernorm.{key.rsplit('.', 1)[1]}"] = t
        elif key == "query_tokens":
            out[key] = t
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out[f"qformer.layernorm.{key.rsplit('.', 1)[1]}"] = t
        elif key.startswith("Qformer.bert.encoder."):
            name = key[len("Qformer.bert.") :]
            if ".intermediate." in name or (".output." in name and "attention.output" not in name):
                continue  # HF's BLIP-2 Q-Former has no text FFN
            out["qformer." + name.replace(".self.", ".attention.")] = t
    return out


def write_hf_blip2_dir(
    directory: str | Path, cfg: MiniGPT4Config, n_shards: int = 3, seed: int = 0, split_qkv_bias: bool = False
) -> dict[str, torch.Tensor]:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    truth = lavis_weights(cfg, seed, extra_blocks=0)
    hf = lavis_to_hf_blip2(truth, split_qkv_bias)
    r = _sub(seed, "t5")
    lm = {
        "language_model.shared.weight": r.normal(40, 16).half(),
        "language_model.encoder.block.0.layer.0.SelfAttention.q.weight": r.normal(16, 16).half(),
        "language_projection.weight": r.normal(16, _qformer_cfg(cfg).hidden_size),
        "language_projection.bias": r.normal(16),
    }
    # EVA ViT in fp16 on disk (exact: its truth is fp16-rounded), ln_vision and Q-Former in fp32.
    stored = {
        k: (v.half() if k.startswith("vision_model.") and "post_layernorm" not in k else v)
        for k, v in hf.items()
    }
    config = {
        "model_type": "blip-2",
        "num_query_tokens": _qformer_cfg(cfg).num_query_tokens,
        "text_config": {"model_type": "t5"},
    }
    (root / "config.json").write_text(json.dumps(config))
    if n_shards == 1:
        save_file({**stored, **lm}, str(root / "model.safetensors"))
        return truth
    keys = sorted(stored)
    groups = [keys[i :: n_shards - 1] for i in range(n_shards - 1)]
    weight_map: dict[str, str] = {}
    for i, group in enumerate([*groups, None]):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = lm if group is None else {k: stored[k] for k in group}
        save_file(tensors, str(root / name))
        weight_map.update(dict.fromkeys(tensors, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return truth


# ----- MiniGPT-4 projection -------------------------------------------------------------------


def write_minigpt4_proj(
    path: str | Path,
    cfg: MiniGPT4Config,
    seed: int = 0,
    with_ln_vision: bool = False,
    module_prefix: bool = False,
) -> dict[str, torch.Tensor]:
    model = _select(lavis_weights(cfg, seed, extra_blocks=0), "llama_proj.")
    if with_ln_vision:  # its own values, different from BLIP-2's ln_vision
        model.update(_sub(seed, "proj-ln_vision").norm(cfg.vision.hidden_size, "ln_vision"))
    truth = dict(model)
    if module_prefix:
        model = {f"module.{k}": v for k, v in model.items()}
    weight = model[("module." if module_prefix else "") + "llama_proj.weight"]
    checkpoint = {
        "model": model,
        "optimizer": {
            "state": {
                0: {
                    "step": torch.tensor(5.0),
                    "exp_avg": torch.zeros_like(weight),
                    "exp_avg_sq": torch.zeros_like(weight),
                }
            },
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0, 1]}],
        },
        "scaler": {
            "scale": 65536.0,
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 2000,
            "_growth_tracker": 7,
        },
        "config": {"model": {"arch": "mini_gpt4", "max_txt_len": 160}, "run": {"iters_per_epoch": 200}},
        "epoch": 3,
    }
    torch.save(checkpoint, path)
    return truth


# ----- HF LLaMA ---------------------------------------------------------------------------------


def llama_weights(cfg: MiniGPT4Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM tensors (fp16) for cfg.llm."""
    llm = cfg.llm
    r = _sub(seed, "llama")
    h, head_dim = llm.hidden_size, llm.hidden_size // llm.num_heads
    kv = llm.num_kv_heads * head_dim
    sd = {"model.embed_tokens.weight": r.normal(llm.vocab_size, h)}
    for i in range(llm.num_layers):
        p = f"model.layers.{i}"
        for name, (o, n) in {
            "self_attn.q_proj": (h, h),
            "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (llm.intermediate_size, h),
            "mlp.up_proj": (llm.intermediate_size, h),
            "mlp.down_proj": (h, llm.intermediate_size),
        }.items():
            sd.update(r.linear(o, n, f"{p}.{name}", bias=False))
        sd.update(r.norm(h, f"{p}.input_layernorm", bias=False))
        sd.update(r.norm(h, f"{p}.post_attention_layernorm", bias=False))
    sd.update(r.norm(h, "model.norm", bias=False))
    if not llm.tie_word_embeddings:
        sd.update(r.linear(llm.vocab_size, h, "lm_head", bias=False))
    return {k: v.half() for k, v in sd.items()}


def _llama_config(cfg: MiniGPT4Config, vicuna_quirks: bool) -> tuple[dict, dict]:
    llm = cfg.llm
    config = {
        "hidden_act": "silu",
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "initializer_range": 0.02,
        "model_type": "llama",
        "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers,
        "rms_norm_eps": llm.rms_norm_eps,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": llm.vocab_size,
    }
    if vicuna_quirks:  # what the Vicuna v0 HF conversion wrote
        config.update(architectures=["LLaMAForCausalLM"], bos_token_id=0, eos_token_id=1, pad_token_id=-1)
        config["max_sequence_length"] = llm.max_position_embeddings
        generation = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": -1}
    else:
        config.update(
            architectures=["LlamaForCausalLM"],
            bos_token_id=1,
            eos_token_id=2,
            num_key_value_heads=llm.num_kv_heads,
            max_position_embeddings=llm.max_position_embeddings,
            rope_theta=llm.rope_theta,
            tie_word_embeddings=llm.tie_word_embeddings,
        )
        generation = {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        }
    return config, generation


def write_hf_llama_dir(
    directory: str | Path,
    cfg: MiniGPT4Config,
    tokenizer_dir: str | Path,
    vicuna_quirks: bool = True,
    bin_format: bool = False,
    n_shards: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    weights = llama_weights(cfg, seed)
    stored = dict(weights)
    if vicuna_quirks:
        head_dim = cfg.llm.hidden_size // cfg.llm.num_heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        for i in range(cfg.llm.num_layers):
            stored[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    config, generation = _llama_config(cfg, vicuna_quirks)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, root / name)
    stem, ext = ("pytorch_model", "bin") if bin_format else ("model", "safetensors")
    keys = list(stored)
    groups = [keys[i * len(keys) // n_shards : (i + 1) * len(keys) // n_shards] for i in range(n_shards)]
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        name = f"{stem}.{ext}" if n_shards == 1 else f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        shard = {k: stored[k] for k in group}
        if bin_format:
            torch.save(shard, root / name)
        else:
            save_file(shard, str(root / name))
        weight_map.update(dict.fromkeys(shard, name))
    if n_shards > 1:
        (root / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weights


# ----- everything a conversion needs ------------------------------------------------------------


@dataclass
class Sources:
    """Files of one tiny MiniGPT-4 in the original formats, and their LAVIS-named ground truth."""

    cfg: MiniGPT4Config
    eva: Path
    blip2: Path | None
    proj: Path
    llm: Path
    tokenizer: Path
    truth: dict[str, torch.Tensor]  # what the converted model must compute with (ln_vision as the original)
    llm_weights: dict[str, torch.Tensor]


def write_lavis_sources(
    root: str | Path, preset: str, seed: int = 0, proj_ln_vision: bool = False
) -> Sources:
    """eva_vit_g.pth (+1 extra block), blip2 .pth (Vicuna presets), projection .pth, HF LLaMA dir."""
    from minigpt4_local.config import get_preset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(preset)
    tokenizer = make_tiny_sentencepiece(root / "tokenizer", vocab_size=1000)
    truth = write_lavis_eva(root / "eva_vit_g.pth", cfg, extra_blocks=1, seed=seed)
    blip2 = None
    if cfg.qformer is not None:
        blip2 = root / "blip2_pretrained_flant5xxl.pth"
        write_lavis_blip2(blip2, cfg, seed=seed)
    else:
        truth.pop("ln_vision.weight"), truth.pop("ln_vision.bias")  # Llama-2: ln_vision never loaded
    proj_truth = write_minigpt4_proj(
        root / "pretrained_minigpt4.pth", cfg, seed=seed, with_ln_vision=proj_ln_vision
    )
    truth.update(proj_truth)
    vicuna = cfg.llm.vocab_size > 1000  # the tiny Vicuna presets carry v0's extra row
    llm_weights = write_hf_llama_dir(root / "llm", cfg, tokenizer, vicuna_quirks=vicuna, seed=seed)
    return Sources(
        cfg,
        root / "eva_vit_g.pth",
        blip2,
        root / "pretrained_minigpt4.pth",
        root / "llm",
        tokenizer,
        truth,
        llm_weights,
    )
