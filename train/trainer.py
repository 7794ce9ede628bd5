"""The training loop for both stages: model setup, DDP, AMP, accumulation, checkpoints, resume, exports.

Contract:
- `run_training(config, resume=None, echo=print) -> TrainResult` trains `config` (a `TrainConfig`) in
  this process; under `torchrun` every process calls it and they form one DDP job (NCCL on GPU, gloo on
  CPU). Only rank 0 writes logs, checkpoints and exports.
- Model: `load_model_dir(model.dir)`; `model.trainable` picks what trains (`projection` = llama_proj,
  `qformer` = Q-Former + query tokens, `vision` = ViT + ln_vision, `llm` = the whole decoder, no LoRA);
  everything else has `requires_grad=False` and stays bit-identical, in eval mode. `init_projection`:
  `model` (keep), `random` (fresh nn.Linear init, same seed on every rank) or a checkpoint path.
- Step (docs/numerics.md §14): sequences from `layout.layout_sample` (one instruction per global batch in stage
  2 — all ranks and accumulation micro-batches of a step — drawn from the prompt list with an RNG seeded by
  the step), image rows scattered into the token
  embeddings, the decoder run under autocast (fp16 + GradScaler, or bf16) with the projection in fp32,
  cross-entropy summed over supervised positions. `optim.loss_average`: `global_tokens` divides by the
  supervised-token count of the whole global batch (all ranks and accumulation steps), so N processes ×
  batch b equal 1 process × batch N·b; `per_batch` averages each micro-batch's token mean (the
  original's DDP behaviour). `accum_steps` micro-batches per optimizer step (DDP `no_sync` between).
  The lr is set from `optim.lr_at` before each optimizer step.
- Checkpoints (`output.dir/train_state.pt`, atomic): every `checkpoint_every` steps, at every epoch end
  (`iters_per_epoch` steps) and at the end; each epoch end also writes `checkpoint_{epoch}.pth` in the
  original layout. The end writes `checkpoint_last.pth` and, unless disabled, `output.dir/model/` (a model
  directory for describe/export/quantize). `resume` (a path, or "latest") restores weights, optimizer,
  scaler, step, RNG and data position; the continued run matches an uninterrupted one. A run refuses
  to start over an output folder holding a training state unless resuming.
- `--cache-features` (`output.cache_features`): the frozen vision side's outputs are computed once
  (`features.py`) and training reads them; random crops are then off.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minigpt4_local.errors import CheckpointError, ConfigError

from .captions import process_caption
from .checkpoint import (
    STATE_FILE,
    capture_rng,
    export_model_dir,
    export_original_checkpoint,
    load_projection_init,
    load_train_state,
    restore_rng,
    save_train_state,
)
from .config import TrainConfig, dump_yaml
from .data import (
    READERS,
    DataError,
    ImageSpec,
    IndexedData,
    Record,
    RecordDataset,
    Stage1Decoder,
    StreamingData,
    StreamSource,
    expand_shards,
)
from .distributed import DistContext, setup
from .layout import IGNORE, IMAGE_SLOT, LayoutSpec, layout_sample, pad_batch, pad_token_id
from .optim import build_optimizer, lr_at, set_lr
from .report import Reporter, read_log, truncate_log

TRAINABLE_PREFIXES: dict[str, tuple[str, ...]] = {
    "projection": ("llama_proj.",),
    "qformer": ("qformer.", "query_tokens"),
    "vision": ("vision_model.",),
    "llm": ("llm.",),
}
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LOG_FILE = "train_log.jsonl"
CONFIG_COPY = "train_config.yaml"
MODEL_EXPORT = "model"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # this process's view of every logged step
    skipped: dict[str, int] = field(default_factory=dict)
    samples_per_s: float = 0.0
    model_dir: Path | None = None
    trainable: list[str] = field(default_factory=list)


# ----- model ----------------------------------------------------------------------------------------


# Which submodule each trainable part is (put in train mode; the rest stays in eval mode).
PART_MODULES = {"projection": "llama_proj", "qformer": "qformer", "vision": "vision_model", "llm": "llm"}
SKIP_KINDS = ("tar", "image", "caption", "record", "cache", "layout")


def mark_trainable(model: Any, parts: list[str]) -> list[str]:
    """Freeze everything, then unfreeze the chosen parts; returns the trainable parameter names."""
    if "qformer" in parts and model.qformer is None:
        raise ConfigError("model.trainable 'qformer': this model has no Q-Former (Llama-2 variant)")
    prefixes = tuple(p for part in parts for p in TRAINABLE_PREFIXES[part])
    model.requires_grad_(False)
    model.eval()  # frozen parts stay in eval mode (docs/numerics.md §14)
    names = []
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(True)
            names.append(name)
    for part in parts:
        getattr(model, PART_MODULES[part]).train()
    return names


def _reset_projection(model: Any, seed: int) -> None:
    """Fresh nn.Linear init from a seed shared by every rank (DDP then starts in agreement)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cpu = nn.Linear(model.llama_proj.in_features, model.llama_proj.out_features)
    with torch.no_grad():
        model.llama_proj.weight.copy_(cpu.weight)
        model.llama_proj.bias.copy_(cpu.bias)


def _init_projection(model: Any, how: str, seed: int) -> None:
    if how == "model":
        return
    if how == "random":
        _reset_projection(model, seed)
        return
    proj = load_projection_init(how, model.llama_proj.in_features, model.llama_proj.out_features)
    with torch.no_grad():
        model.llama_proj.weight.copy_(proj["llama_proj.weight"])
        model.llama_proj.bias.copy_(proj["llama_proj.bias"])


class StepModule(nn.Module):
    """Forward of one micro-batch → (summed token loss, supervised-token count); DDP wraps this."""

    def __init__(
        self, model: Any, trainable: list[nn.Parameter], vision_grad: bool, half: torch.dtype | None
    ) -> None:
        super().__init__()
        self.model = model
        self._trainable = trainable
        self.vision_grad = vision_grad
        self.half = half

    def forward(
        self,
        pixels: torch.Tensor | None,
        features: torch.Tensor | None,
        ids: torch.Tensor,
        labels: torch.Tensor,
        attention: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[0] == 0:  # every record of this micro-batch was unusable: zero loss, zero grads
            zero = sum(p.sum() for p in self._trainable) * 0.0
            return zero, torch.zeros((), dtype=torch.long, device=ids.device)
        model = self.model
        with torch.set_grad_enabled(self.vision_grad and torch.is_grad_enabled()):
            feats = features if features is not None else model.vision_features(pixels)
        image = model.project_features(feats)  # (B, n_img, H) fp32
        tokens = model.embed_tokens(ids.clamp(min=0))  # (B, T, H)
        slots = (ids == IMAGE_SLOT).unsqueeze(-1).expand_as(tokens)
        # fp32 image rows promote the sequence (the original concatenates under autocast).
        embeds = tokens.to(image.dtype).masked_scatter(slots, image)  # (B, T, H)
        target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        keep = target != IGNORE
        autocast = torch.autocast(ids.device.type, dtype=self.half) if self.half else contextlib.nullcontext()
        with autocast:
            hidden = model.llm.model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
            logits = model.llm.lm_head(hidden[:, :-1][keep])  # (N, V): only supervised positions
        loss_sum = F.cross_entropy(logits.float(), target[keep], reduction="sum")
        return loss_sum, keep.sum()


# ----- batches ------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    pixels: torch.Tensor | None
    features: torch.Tensor | None
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    attention: torch.Tensor  # (B, T)
    samples: int
    tokens: int
    bad: int = 0


def prepare_batch(
    batch: dict[str, Any], instruction: str | None, tokenizer: Any, spec: LayoutSpec, device: torch.device
) -> Prepared:
    """Tokenize and pad one data batch; samples whose prompt cannot be laid out are dropped (counted)."""
    layouts, keep = [], []
    for i, turns in enumerate(batch["turns"]):
        try:
            layouts.append(layout_sample(turns, instruction, tokenizer, spec))
            keep.append(i)
        except ValueError:
            continue
    bad = len(batch["turns"]) - len(keep)
    if not layouts:
        empty = torch.zeros((0, 1), dtype=torch.long, device=device)
        return Prepared(None, None, empty, empty, empty, 0, 0, bad)
    padded = pad_batch(layouts, spec.pad_id)

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x = x if len(keep) == x.shape[0] else x[keep]
        return x.to(device, non_blocking=True)

    def long(v: list[list[int]]) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)

    return Prepared(
        rows(batch["pixels"]),
        rows(batch["features"]),
        long(padded.ids),
        long(padded.labels),
        long(padded.attention),
        len(layouts),
        padded.supervised,
        bad,
    )


# ----- the run ------------------------------------------------------------------------------------------


def training_bos_id(tokenizer: Any) -> int | None:
    """BOS exactly when the runtime's stitch puts one first (`encode(first segment, add_bos=True)`): LLaMA's
    tokenizer adds it, as the original's training does; one that never adds BOS (SmolLM2) gets none, so a
    model trained here sees at run time the sequence it was trained on."""
    probe = tokenizer.encode("a", add_bos=True)
    bos = tokenizer.bos_id
    return bos if bos is not None and probe and probe[0] == bos else None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: DistContext, echo: Callable[[str], None]) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.echo = echo if ctx.is_main else (lambda _msg: None)
        self.out = Path(cfg.output.dir)
        self.parts = list(dict.fromkeys(cfg.model.trainable))
        self.cached = bool(cfg.output.cache_features)
        if self.cached and set(self.parts) & {"vision", "qformer"}:
            raise ConfigError(
                "--cache-features needs a frozen vision side; model.trainable includes vision/qformer"
            )
        self.half = HALF_DTYPES.get(cfg.optim.precision)
        self.bad_layouts = 0
        self.global_skips: dict[str, int] = {}

    # -- setup --
    def build_model(self) -> None:
        from minigpt4_local.checkpoints.model_dir import LLM_DIR, load_model_dir
        from minigpt4_local.tokenizer import check_vocab, load_tokenizer

        cfg, device = self.cfg, self.ctx.device
        model = load_model_dir(cfg.model.dir, device=device, dtype=self.half or torch.float32)
        if self.half and "llm" in self.parts:
            model.llm.float()  # fp32 master weights for a trained decoder; autocast does the half math
        if self.half and "vision" in self.parts:
            model.vision_model.float()
        _init_projection(model, cfg.model.init_projection, cfg.optim.seed)
        self.names = mark_trainable(model, self.parts)
        self.model = model
        self.tokenizer = load_tokenizer(Path(cfg.model.dir) / LLM_DIR)
        check_vocab(self.tokenizer, model.config.llm.vocab_size)
        mc = model.config
        self.spec = LayoutSpec(
            bos_id=training_bos_id(self.tokenizer),
            pad_id=pad_token_id(self.tokenizer, cfg.model.release),
            num_image_tokens=mc.num_image_tokens,
            end_sym=cfg.model.end_sym,
            max_txt_len=cfg.model.max_txt_len,
            template=cfg.model.prompt_template,
            max_length=min(mc.prompt.max_context, mc.llm.max_position_embeddings),
        )
        self.prompts = cfg.instruction_prompts if cfg.stage == 2 else []

    def image_spec(self) -> ImageSpec:
        v, d = self.model.config.vision, self.cfg.data
        augment = "none" if self.cached else d.augment
        if self.cached and d.augment != "none":
            self.echo(
                "note: random crops are off with --cache-features (each image's features are computed once)"
            )
        return ImageSpec(v.image_size, tuple(v.image_mean), tuple(v.image_std), augment, tuple(d.crop_scale))

    def _feature_cache(self, image: ImageSpec) -> Any:
        from .features import FeatureCache, vision_fingerprint

        fingerprint = vision_fingerprint(self.model, image) + f":{self.cfg.optim.precision}"
        cache = FeatureCache(self.cfg.output.cache_features, fingerprint, self.cfg.output.cache_dtype)
        cache.prepare(self.ctx.is_main, self.ctx.barrier)
        return cache

    def build_data(self, state: dict[str, Any] | None, salt: int) -> None:
        cfg, ctx, d = self.cfg, self.ctx, self.cfg.data
        image = self.image_spec()
        pin = ctx.device.type == "cuda"
        if cfg.stage == 1:
            sources = [StreamSource(s.name, tuple(expand_shards(s.path)), s.ratio) for s in d.sources]
            if self.cached:
                from .features import cache_webdataset

                sources = cache_webdataset(
                    self.model,
                    sources,
                    self._feature_cache(image),
                    image,
                    ctx.rank,
                    ctx.world,
                    ctx.barrier,
                    ctx.device,
                    log=self.echo,
                )
            decoder = Stage1Decoder(image, d.caption_processor, d.max_words, cfg.optim.seed)
            self.data = StreamingData(
                sources,
                decoder,
                d.batch_size,
                ctx.rank,
                ctx.world,
                d.num_workers,
                cfg.optim.seed,
                d.shuffle_buffer,
                d.shuffle_initial,
                state,
                salt,
                pin,
            )
        else:
            source = d.sources[0]
            records, counts = READERS[source.kind](source.path)
            if not records:
                raise DataError(f"source {source.name}: no usable record in {source.path}")
            if d.caption_processor:
                records = [
                    Record(r.image, [(q, process_caption(a, d.max_words)) for q, a in r.turns])
                    for r in records
                ]
            features = None
            if self.cached:
                from .features import cache_records

                features = cache_records(
                    self.model,
                    source.name,
                    records,
                    self._feature_cache(image),
                    image,
                    ctx.rank,
                    ctx.world,
                    ctx.barrier,
                    ctx.device,
                    log=self.echo,
                )
            dataset = RecordDataset(records, image, cfg.optim.seed, features)
            self.data = IndexedData(
                dataset,
                d.batch_size,
                ctx.rank,
                ctx.world,
                d.num_workers,
                cfg.optim.seed,
                state,
                counts,
                salt,
                pin,
            )
        if self.data.restarted:
            self.echo(
                "warning: the checkpoint was written with another world size or worker count; "
                "the data stream restarts with a fresh order"
            )

    def build_optimizer(self) -> None:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        self.optimizer = build_optimizer(named, self.cfg.optim)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.cfg.optim.precision == "fp16")
        vision_grad = bool(set(self.parts) & {"vision", "qformer"})
        self.step_module = StepModule(self.model, self.trainable, vision_grad, self.half)
        self.forward: nn.Module = self.step_module

    def wrap_ddp(self) -> None:
        if not self.ctx.distributed:
            return
        from torch.nn.parallel import DistributedDataParallel

        for p in self.trainable:  # DDP's own start-up broadcast would also send the frozen 7B decoder
            self.ctx.broadcast_(p.data)
        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.forward = DistributedDataParallel(
            self.step_module, device_ids=ids, broadcast_buffers=False, init_sync=False
        )

    # -- resume --
    def load_resume(self, resume: str | None) -> tuple[int, dict[str, Any] | None]:
        state_file = self.out / STATE_FILE
        if resume is None:
            if state_file.exists():
                raise ConfigError(
                    f"{self.out} already holds a training state: pass --resume to continue it, "
                    "or choose another output.dir"
                )
            return 0, None
        path = state_file if resume == "latest" else Path(resume)
        state = load_train_state(path)
        if state["trainable_names"] != self.names:
            raise CheckpointError(
                f"{path} trained {len(state['trainable_names'])} tensors "
                f"({state['trainable_names'][0]}…); this run trains other parameters"
            )
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for name in self.names:
                params[name].copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        same_world = state.get("world") == self.ctx.world
        if same_world:
            restore_rng(state["rng"][self.ctx.rank], self.ctx.device)
        self.echo(f"resumed from {path} at step {state['step']}")
        return int(state["step"]), (state["data"][self.ctx.rank] if same_world else {"kind": "other"})

    # -- checkpoints --
    def trainable_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.names}

    def save(self, step: int) -> None:
        rng = self.ctx.gather(capture_rng(self.ctx.device))
        data = self.ctx.gather(self.data.state_dict())
        if not self.ctx.is_main:
            return
        state = {
            "step": step,
            "epoch": step // self.cfg.optim.iters_per_epoch,
            "trainable_names": self.names,
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"kind": "linear_warmup_cosine", "step": step, "total_steps": self.cfg.total_steps},
            "rng": rng,
            "data": data,
            "world": self.ctx.world,
            "config": self.cfg.to_dict(),
        }
        save_train_state(self.out / STATE_FILE, state)

    def instruction(self, step: int) -> str | None:
        """The global batch's instruction: drawn from the prompt list with the step as seed, so every rank and
        every accumulation micro-batch of a step uses the same one (one instruction per batch)."""
        if not self.prompts:
            return None
        rng = random.Random(f"{self.cfg.optim.seed}:prompt:{step}")
        return self.prompts[rng.randrange(len(self.prompts))]

    # -- one optimizer step --
    def train_step(self, step: int) -> dict[str, Any]:
        o, ctx = self.cfg.optim, self.ctx
        set_lr(self.optimizer, lr_at(step, o, self.cfg.total_steps))
        instruction = self.instruction(step)
        micro = [
            prepare_batch(self.data.next_batch(), instruction, self.tokenizer, self.spec, ctx.device)
            for _ in range(o.accum_steps)
        ]
        local_skips = self.skipped(sum(m.bad for m in micro))
        totals = ctx.sum(
            [sum(m.tokens for m in micro), sum(m.samples for m in micro)]
            + [local_skips.get(k, 0) for k in SKIP_KINDS]
        )
        tokens, samples = totals[0], totals[1]
        self.global_skips = {k: int(v) for k, v in zip(SKIP_KINDS, totals[2:], strict=True) if v}
        loss_total = 0.0
        for i, m in enumerate(micro):
            sync = i == len(micro) - 1 or not ctx.distributed
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                loss_sum, count = self.forward(m.pixels, m.features, m.ids, m.labels, m.attention)
                if o.loss_average == "global_tokens":
                    scale = ctx.world / max(tokens, 1.0)
                else:
                    scale = 1.0 / (max(int(count), 1) * len(micro))
                self.scaler.scale(loss_sum * scale).backward()
            loss_total += float(loss_sum.detach())
        if tokens > 0:
            if o.max_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.trainable, o.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_all,) = ctx.sum([loss_total])
        self.bad_layouts += sum(m.bad for m in micro)
        return {
            "loss": loss_all / max(tokens, 1.0),
            "tokens": int(tokens),
            "samples": int(samples),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    # -- the loop --
    def run(self, resume: str | None) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        _seed_everything(cfg.optim.seed + ctx.rank)
        self.build_model()
        self.build_optimizer()
        start, data_state = self.load_resume(resume)
        self.wrap_ddp()
        self.build_data(data_state, salt=start)
        total = cfg.total_steps
        log_path = self.out / LOG_FILE
        reporter = None
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG_COPY).write_text(dump_yaml(cfg), encoding="utf-8")
            if start:
                truncate_log(log_path, start)
            elif log_path.exists():
                log_path.unlink()
            reporter = Reporter(log_path, total, start, cfg.optim.log_every, cfg.output.progress, self.echo)
            self.echo(
                f"training {len(self.names)} tensors ({sum(p.numel() for p in self.trainable)} parameters: "
                f"{', '.join(self.parts)}) for {total} steps on {ctx.world} process(es), {ctx.device}"
            )
        result = TrainResult(self.out, start, trainable=list(self.names))
        began, samples_seen = time.perf_counter(), 0
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                stats = self.train_step(step)
                elapsed = time.perf_counter() - t0
                done = step + 1
                samples_seen += stats["samples"]
                result.losses.append(stats["loss"])
                record = {
                    "step": done,
                    "epoch": step // cfg.optim.iters_per_epoch,
                    "loss": stats["loss"],
                    "lr": stats["lr"],
                    "samples": stats["samples"],
                    "tokens": stats["tokens"],
                    "samples_per_s": stats["samples"] / max(elapsed, 1e-9),
                    "skipped": self.global_skips,
                }
                if reporter:
                    reporter.step(record)
                self.after_step(done)
        finally:
            if reporter:
                reporter.close()
        result.steps = total
        result.samples_per_s = samples_seen / max(time.perf_counter() - began, 1e-9)
        result.skipped = dict(self.global_skips)
        self.finish(result)
        return result

    def skipped(self, pending_bad: int = 0) -> dict[str, int]:
        """This rank's cumulative skip counts (data records + samples whose layout failed)."""
        counts = Counter(self.data.skipped)
        if self.bad_layouts + pending_bad:
            counts["layout"] += self.bad_layouts + pending_bad
        return dict(counts)

    def after_step(self, done: int) -> None:
        o = self.cfg.optim
        epoch_end = done % o.iters_per_epoch == 0
        periodic = o.checkpoint_every and done % o.checkpoint_every == 0
        if epoch_end or periodic or done == self.cfg.total_steps:
            self.save(done)
        if epoch_end and self.ctx.is_main:
            epoch = done // o.iters_per_epoch - 1
            export_original_checkpoint(self.trainable_state(), self.out / f"checkpoint_{epoch}.pth", epoch)

    def finish(self, result: TrainResult) -> None:
        ctx = self.ctx
        if ctx.is_main:
            epoch = (self.cfg.total_steps - 1) // self.cfg.optim.iters_per_epoch
            export_original_checkpoint(self.trainable_state(), self.out / "checkpoint_last.pth", epoch)
            if self.cfg.output.export_model_dir:
                result.model_dir = export_model_dir(
                    self.model, self.cfg.model.dir, self.out / MODEL_EXPORT, self.parts
                )
                self.echo(f"model directory written: {result.model_dir}")
        ctx.barrier()


def run_training(
    config: TrainConfig, resume: str | None = None, echo: Callable[[str], None] = print
) -> TrainResult:
    """Train in this process (one rank of a torchrun job, or alone); see module docstring."""
    ctx = setup(config.optim.device)
    try:
        return Trainer(config, ctx, echo).run(resume)
    finally:
        ctx.close()


def logged_losses(output_dir: str | Path) -> list[float]:
    """The per-step losses recorded in a run's train_log.jsonl."""
    return [r["loss"] for r in read_log(Path(output_dir) / LOG_FILE)]
