"""4-bit GPTQ quantization of the MiniGPT-4 decoder (GPTQModel), calibrated on what the decoder sees.

Contract:
- `quantize_gptq(model_dir, out, calibration, settings=GptqSettings(), eval_text=None,
  eval_images=None, progress=None, overwrite=False) -> GptqResult` quantizes `MODEL_DIR/llm` and
  writes `llm-gptq/` into the bundle `out` (created when missing, reopened when it holds the same
  model): a standard GPTQ checkpoint (`config.json` with the weights, `quantize_config.json`, the
  source's tokenizer files) that GPTQModel and transformers (+optimum) load. The bundle manifest
  gets the `llm_gptq` part (directory part, every file hashed) with bits, group size, desc_act,
  the kernel the evaluation ran on, the calibration summary and the quality numbers; a bundle
  without a tokenizer part gets one (`tokenizer/`). The directory is built next to its final place
  and moved in only when everything succeeded; an existing GPTQ part needs `overwrite=True`.
- Calibration (`calibration` path, see `gptq_calibration.source_kind`):
    text   → token windows of `seq_len` (BOS first); the tail (`eval_fraction`) is held out for
             the perplexity check and never calibrated on;
    jsonl  → captions: plain captions are text as above; rows with an `image` become MiniGPT-4
             samples (image prompt + the caption as the assistant's answer);
    images → each image in the model's real stitched prompt (template, `<ImageHere>` rows from the
             model's own vision encoder), followed by the full-precision model's greedy answer
             (`answer_tokens`, the runtime's stop rule), so the decoder is calibrated on the
             activations it will see when answering. Held-out images are never calibrated on.
  GPTQModel takes calibration as token ids and runs the model's embedding layer itself, so image
  samples carry content-derived filler ids at their image rows and a forward hook on the embedding
  layer replaces, for exactly those id sequences, the embedding output by the stitched embeddings
  (`StitchedEmbeddingHook`). Everything after the embedding (the first decoder layer's captured
  inputs, hence every layer's Hessian) then sees the stitched activations; the hook counts its hits
  and a run where image samples did not reach the decoder fails loudly.
- Quality (`gptq_eval`): before quantizing, the full-precision model's perplexity on the held-out
  text (or `eval_text`; else the held-out image prompts' text) and its greedy continuations of
  stitched image prompts (held-out calibration images, else `eval_images`, else synthetic images);
  after saving, the checkpoint is reloaded through the runtime loader (`load_gptq_llm`, the kernel
  the GPTQ backend would use) and measured on the same inputs. Results: `GptqResult.quality`.
- `progress(message)` gets one line per step and per quantized layer. GPTQModel's own console
  output is swallowed (MINIGPT4_DEBUG=1 shows it), so `progress` must write to a stream captured
  before the call (the CLI does).
- Bad inputs (missing model dir, bad source, group size that does not divide a layer width,
  GPTQModel missing) are one-line `MiniGPT4Error`s; a failure inside GPTQModel is a `GptqError`.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt4_local.backends.gptq_checkpoint import GPTQ_DIR, GPTQ_PART
from minigpt4_local.backends.gptq_runtime import load_gptq_llm, quiet_gptqmodel, require_gptq_runtime
from minigpt4_local.config import LLMConfig, MiniGPT4Config
from minigpt4_local.devices import default_precision, resolve_device, torch_dtype
from minigpt4_local.errors import ConfigError, MiniGPT4Error, ModelDirError

from .gptq_calibration import (
    QUESTIONS,
    PromptBuilder,
    Sample,
    image_paths,
    read_jsonl,
    read_text,
    source_kind,
    split_items,
    split_tokens,
    windows,
)
from .gptq_eval import Quality, StitchedText, compare, reference_run

__all__ = ["GptqError", "GptqResult", "GptqSettings", "StitchedEmbeddingHook", "quantize_gptq"]

Progress = Callable[[str], None]
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)
MIN_EVAL_TOKENS = 32  # the held-out text is at least this long
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class GptqError(MiniGPT4Error):
    """GPTQModel failed while quantizing or saving."""


@dataclass
class GptqSettings:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.05
    max_samples: int = 128  # calibration samples (windows / image prompts)
    seq_len: int = 512  # positions per calibration sample and perplexity window
    eval_fraction: float = 0.1  # share of the source held out for the quality check
    eval_prompts: int = 4  # stitched image prompts for the agreement check
    eval_new_tokens: int = 32  # greedy tokens compared per prompt
    answer_tokens: int = 48  # reference answer appended to each calibration image prompt (0: none)
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # default: fp16 on cuda, fp32 on cpu
    kernel: str = "auto"  # kernel of the post-quantization evaluation (what the runtime picks)

    def check(self, llm: LLMConfig) -> None:
        """Refuse settings GPTQ or the model's layer widths cannot take (one line, with a fix)."""
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits {self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUPS:
            raise ConfigError(
                f"--group-size {self.group_size} is not supported; choose one of {SUPPORTED_GROUPS}"
            )
        widths = {"hidden size": llm.hidden_size, "FFN width": llm.intermediate_size}
        for what, width in widths.items():
            if self.group_size > 0 and width % self.group_size:
                fits = [g for g in SUPPORTED_GROUPS if g > 0 and all(w % g == 0 for w in widths.values())]
                raise ConfigError(
                    f"--group-size {self.group_size} does not divide the decoder's {what} ({width}); "
                    f"use {max(fits) if fits else -1}"
                )
        if self.max_samples < 1 or self.seq_len < 16 or not 0 <= self.eval_fraction < 1:
            raise ConfigError("need max_samples >= 1, seq_len >= 16 and 0 <= eval_fraction < 1")
        if self.seq_len > llm.max_position_embeddings:
            # GPTQModel would cut longer samples, and a cut stitched sample no longer matches its embeddings.
            raise ConfigError(
                f"--seq-len {self.seq_len} exceeds the decoder's context ({llm.max_position_embeddings})"
            )


@dataclass
class GptqResult:
    bundle: Path
    gptq_dir: Path
    part: dict[str, Any]  # what the manifest records under `llm_gptq`
    quality: Quality
    kernel: str
    seconds: dict[str, float] = field(default_factory=dict)


# ----- the embedding hook ----------------------------------------------------------------------------


class StitchedEmbeddingHook:
    """Forward hook on the embedding layer: id sequences of stitched samples → their stitched embeddings."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.table = {tuple(s.ids): s.embeds for s in samples if s.embeds is not None}
        self.hits = 0

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any) -> Any:
        ids = args[0] if args else None
        if ids is None or not self.table or getattr(ids, "ndim", 0) != 2:
            return None
        replaced = output
        for row in range(ids.shape[0]):
            embeds = self.table.get(tuple(ids[row].tolist()))
            if embeds is None:
                continue
            if replaced is output:
                replaced = output.clone()
            replaced[row] = embeds.to(device=output.device, dtype=output.dtype)  # (T, hidden)
            self.hits += 1
        return None if replaced is output else replaced


# ----- the job ---------------------------------------------------------------------------------------


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


@dataclass
class _EvalSet:
    windows: list[list[int]] = field(default_factory=list)  # held-out token windows (perplexity)
    stitched: list[StitchedText] = field(default_factory=list)  # held-out stitched text (perplexity)
    prompts: list[Any] = field(default_factory=list)  # (T, hidden) open image prompts (agreement)
    ppl_on: str = ""
    prompts_on: str = ""


class _Job:
    """State shared by the steps of one quantization run."""

    def __init__(self, model_dir: Path, settings: GptqSettings, progress: Progress | None) -> None:
        from minigpt4_local.checkpoints.model_dir import read_model_config
        from minigpt4_local.tokenizer import check_vocab, load_tokenizer, stop_sequences_for

        self.model_dir = model_dir
        self.llm_dir = model_dir / "llm"
        if not self.llm_dir.is_dir():
            raise ModelDirError(
                f"{model_dir}: missing llm/ (the HF LLaMA directory); is this a model directory?"
            )
        self.config: MiniGPT4Config = read_model_config(model_dir)
        self.settings = settings
        self.progress = progress
        settings.check(self.config.llm)
        self.tokenizer = load_tokenizer(self.llm_dir)
        check_vocab(self.tokenizer, self.config.llm.vocab_size)
        self.stops = stop_sequences_for(self.config.prompt, self.tokenizer)
        self.torch, self.gptqmodel = require_gptq_runtime()
        self.device = resolve_device(settings.device)
        self.dtype = torch_dtype(settings.dtype or default_precision(self.device))
        self.qmodel: Any = None
        self._vision: Any = None

    # ----- models -------------------------------------------------------------------------------
    def load_reference(self) -> None:
        s = self.settings
        qcfg = {"bits": s.bits, "group_size": s.group_size, "desc_act": s.desc_act, "sym": s.sym}
        qcfg.update(damp_percent=s.damp_percent, offload_to_disk=False)
        if s.desc_act or s.group_size <= 0:
            # GPTQModel's group-aware reordering excludes desc_act and needs groups (7.6 refuses
            # group_size -1 with it on: "act_group_aware=True requires group_size > 0").
            qcfg["act_group_aware"] = False
        with quiet_gptqmodel():
            quant_config = self.gptqmodel.QuantizeConfig(**qcfg)
            self.qmodel = self.gptqmodel.GPTQModel.load(
                str(self.llm_dir), quant_config, device=self.device, dtype=self.dtype
            )
        self.qmodel.model.eval()

    @property
    def llm(self) -> Any:
        return self.qmodel.model

    def embed_tokens(self, ids: list[int]) -> Any:
        table = self.llm.get_input_embeddings()
        with self.torch.inference_mode():
            return table(self.torch.tensor(ids, dtype=self.torch.long, device=table.weight.device))

    def encode_images(self, images: Sequence[Any]) -> list[Any]:
        """PIL images → (n_img, hidden) embeddings from the model directory's own vision encoder."""
        from minigpt4_local.checkpoints.model_dir import load_model_dir
        from minigpt4_local.image import preprocess

        if self._vision is None:
            self._vision = load_model_dir(self.model_dir, device=self.device, with_llm=False)
        v = self.config.vision
        out = []
        for start in range(0, len(images), 8):
            pixels = preprocess(list(images[start : start + 8]), v.image_size, v.image_mean, v.image_std)
            with self.torch.inference_mode():
                embeds = self._vision.encode_image(self.torch.from_numpy(pixels).to(self.device))
            out.extend(e.to(self.dtype) for e in embeds.unbind(0))  # each (n_img, hidden)
        return out

    def drop_vision(self) -> None:
        self._vision = None
        gc.collect()

    def answer(self, sample: Sample) -> list[int]:
        """The full-precision model's greedy answer to an open prompt (the runtime's stop rule)."""
        from minigpt4_local.backends.torch_generation import generate_from_embeds
        from minigpt4_local.prompts import StopChecker
        from minigpt4_local.sampling import SamplingOptions

        options = SamplingOptions.from_defaults(
            self.config.generation, greedy=True, max_new_tokens=self.settings.answer_tokens
        )
        stop = StopChecker(self.stops, self.tokenizer.eos_id, self.config.prompt.stop_on_eos)
        return generate_from_embeds(self.llm, sample.embeds[None].to(self.dtype), options, stop)

    def builder(self) -> PromptBuilder:
        return PromptBuilder(self.config, self.tokenizer, self.embed_tokens, self.settings.seq_len)


def _question(index: int) -> str:
    return QUESTIONS[index % len(QUESTIONS)]


def _synthetic_images(n: int, size: int = 224) -> list[Any]:
    """Deterministic smooth-gradient + noise RGB images, for an agreement check without a data set."""
    import numpy as np
    from PIL import Image

    out = []
    for seed in range(n):
        rng = np.random.default_rng(1000 + seed)
        yy, xx = np.mgrid[0:size, 0:size]
        base = np.stack([xx * 255 / (size - 1), yy * 255 / (size - 1), (xx * (seed + 1) + yy) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 16, size=base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(noisy, mode="RGB"))
    return out


def _load_images(paths: Sequence[Path]) -> list[Any]:
    from minigpt4_local.image import load_image

    return [load_image(p) for p in paths]


# ----- calibration sets ------------------------------------------------------------------------------


def _text_samples(job: _Job, text: str, hold_out: bool) -> tuple[list[Sample], list[list[int]]]:
    """Calibration windows and (when `hold_out`) the held-out evaluation windows of a text."""
    from .gguf_eval import eval_windows

    s = job.settings
    ids = job.tokenizer.encode(text)
    fraction = s.eval_fraction if hold_out else 0.0
    cal, held = split_tokens(ids, fraction, MIN_EVAL_TOKENS if fraction else 0)
    bos = job.tokenizer.bos_id
    cal_windows = [w for w in windows(cal, s.seq_len, bos) if len(w) >= 4][: s.max_samples]
    if not cal_windows:
        raise ConfigError("the calibration text tokenizes to nothing usable; give more text")
    samples = [Sample(w, list(w)) for w in cal_windows]
    return samples, (eval_windows(held, s.seq_len, bos) if held else [])


def _image_samples(job: _Job, images: Sequence[Any], with_answers: bool) -> list[Sample]:
    builder = job.builder()
    samples = []
    for index, embeds in enumerate(job.encode_images(images)):
        sample = builder.prompt(embeds, _question(index))
        if with_answers and job.settings.answer_tokens > 0:
            sample = builder.with_answer(sample, job.answer(sample))
        samples.append(sample)
    return samples


def _agreement_prompts(job: _Job, eval_images: Path | None) -> tuple[list[Any], str]:
    n = job.settings.eval_prompts
    if n <= 0:
        return [], ""
    if eval_images is not None:
        paths = image_paths(eval_images)[:n]
        images, label = _load_images(paths), f"{len(paths)} image(s) from {eval_images}"
    else:
        images, label = _synthetic_images(n), f"{n} synthetic image(s)"
    return [s.embeds for s in _image_samples(job, images, with_answers=False)], label


def _calibration(
    job: _Job, source: Path, eval_text: Path | None, eval_images: Path | None
) -> tuple[list[Sample], _EvalSet, dict[str, Any]]:
    """Calibration samples, the held-out evaluation set, and a summary for the manifest."""
    s = job.settings
    kind = source_kind(source)
    ev = _EvalSet()
    samples: list[Sample] = []
    summary: dict[str, Any] = {"source": kind, "path": source.name}
    if kind == "text":
        samples, ev.windows = _text_samples(job, read_text(source), hold_out=eval_text is None)
        ev.ppl_on = f"held-out tail of {source.name}"
    elif kind == "jsonl":
        rows = read_jsonl(source)
        plain = [r.caption for r in rows if r.image is None]
        pictured = [r for r in rows if r.image is not None]
        if plain:
            samples, ev.windows = _text_samples(job, "\n".join(plain), hold_out=eval_text is None)
            ev.ppl_on = f"held-out captions of {source.name}"
        if pictured:
            cal_rows, held_rows, overlap = split_items(pictured, s.eval_fraction)
            builder = job.builder()
            embeds = job.encode_images(_load_images([r.image for r in cal_rows + held_rows]))
            for index, (row, emb) in enumerate(zip(cal_rows + held_rows, embeds, strict=True)):
                question = row.question or _question(index)
                held = index >= len(cal_rows)
                captioned = builder.captioned(emb, question, row.caption)
                if not held or overlap:
                    samples.append(captioned)
                if held:
                    ev.stitched.append(StitchedText(captioned.embeds, captioned.targets))
                    ev.prompts.append(builder.prompt(emb, question).embeds)
            ev.ppl_on = ", ".join(
                x for x in (ev.ppl_on, f"captions of held-out images of {source.name}") if x
            )
            ev.prompts_on = f"{len(held_rows)} held-out captioned image(s)" + (
                " (also calibrated on)" if overlap else ""
            )
    else:
        paths = image_paths(source)[: s.max_samples + max(1, s.eval_prompts)]
        cal_paths, held_paths, overlap = split_items(paths, s.eval_fraction)
        held_paths = held_paths[: max(1, s.eval_prompts)]
        _say(
            job.progress,
            f"encoding {len(cal_paths)} calibration image(s) and answering them with the reference",
        )
        samples = _image_samples(job, _load_images(cal_paths), with_answers=True)
        held = _image_samples(job, _load_images(held_paths), with_answers=False)
        ev.prompts = [h.embeds for h in held]
        ev.prompts_on = f"{len(held)} held-out image(s)" + (" (also calibrated on)" if overlap else "")
        if eval_text is None:
            ev.stitched = [StitchedText(h.embeds, h.targets) for h in held]
            ev.ppl_on = "text of the held-out image prompts"
    if eval_text is not None:
        from .gguf_eval import eval_windows

        ev.windows = eval_windows(job.tokenizer.encode(read_text(eval_text)), s.seq_len, job.tokenizer.bos_id)
        ev.ppl_on = f"{eval_text.name}"
    if not ev.prompts:
        ev.prompts, ev.prompts_on = _agreement_prompts(job, eval_images)
    job.drop_vision()
    samples = samples[: s.max_samples]
    summary.update(
        samples=len(samples),
        image_samples=sum(1 for x in samples if x.embeds is not None),
        tokens=sum(len(x) for x in samples),
        seq_len=s.seq_len,
        answer_tokens=s.answer_tokens if kind == "images" else 0,
    )
    return samples, ev, summary


# ----- quantize, save, register ----------------------------------------------------------------------


def _run_gptq(job: _Job, samples: Sequence[Sample]) -> None:
    n_layers = job.config.llm.num_layers
    start = time.perf_counter()
    seen: set[int] = set()

    def on_layer(layer_idx: int, submodule_finalized: bool) -> None:
        if layer_idx not in seen:  # GPTQModel reports each layer twice (solved, then packed)
            seen.add(layer_idx)
            _say(
                job.progress,
                f"layer {layer_idx + 1}/{n_layers} quantized ({time.perf_counter() - start:.1f} s)",
            )

    hook = StitchedEmbeddingHook(samples)
    handle = job.llm.get_input_embeddings().register_forward_hook(hook)
    job.qmodel.layer_callback = on_layer
    calibration = [{"input_ids": list(s.ids)} for s in samples]
    try:
        with quiet_gptqmodel():
            job.qmodel.quantize(calibration, batch_size=1, calibration_data_min_length=2)
    except MiniGPT4Error:
        raise
    except (ValueError, RuntimeError, TypeError, IndexError, KeyError, OSError) as exc:
        raise GptqError(f"GPTQModel failed while quantizing: {' '.join(str(exc).split())[:300]}") from exc
    finally:
        handle.remove()
        job.qmodel.layer_callback = None
    if len(hook.table) and hook.hits < len(hook.table):
        raise GptqError(
            f"only {hook.hits} of {len(hook.table)} stitched image samples reached the decoder during calibration "
            "(GPTQModel changed how it feeds calibration data); calibrate on a text source instead"
        )


def _save(job: _Job, target: Path) -> None:
    try:
        with quiet_gptqmodel():
            job.qmodel.save(str(target))
    except (ValueError, RuntimeError, OSError) as exc:
        raise GptqError(
            f"GPTQModel failed to save the checkpoint: {' '.join(str(exc).split())[:300]}"
        ) from exc
    # Ship the source's own tokenizer files (GPTQModel re-serialises the tokenizer; LLaMA's
    # sentencepiece model would otherwise be replaced by a converted tokenizer.json).
    for name in TOKENIZER_FILES:
        (target / name).unlink(missing_ok=True)
        if (job.llm_dir / name).is_file():
            shutil.copyfile(job.llm_dir / name, target / name)


def _free(job: _Job) -> None:
    job.qmodel = None
    gc.collect()
    if job.torch.cuda.is_available():
        job.torch.cuda.empty_cache()


def _ensure_tokenizer_part(bundle: Any, job: _Job) -> None:
    if bundle.has_part("tokenizer"):
        return
    folder = bundle.root / "tokenizer"
    folder.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (job.llm_dir / name).is_file():
            shutil.copyfile(job.llm_dir / name, folder / name)
    bundle.add_file("tokenizer", role="tokenizer")
    bundle.set_part("tokenizer", {"dir": "tokenizer"})


def _part_info(
    job: _Job, runtime: dict[str, Any], quality: Quality, summary: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    s, llm = job.settings, job.config.llm
    return {
        "dir": GPTQ_DIR,
        "format": "gptq",
        "quantizer": f"gptqmodel {getattr(job.gptqmodel, '__version__', '?')}",
        "bits": s.bits,
        "group_size": s.group_size,
        "desc_act": s.desc_act,
        "sym": s.sym,
        "hidden": llm.hidden_size,
        "vocab_size": llm.vocab_size,
        "num_layers": llm.num_layers,
        "kernel": runtime["kernel"],
        "evaluated_on": {"device": runtime["device"], "dtype": runtime["dtype"]},
        "calibration": summary,
        "quality": quality.to_dict(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def quantize_gptq(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    calibration: str | os.PathLike,
    settings: GptqSettings | None = None,
    eval_text: str | os.PathLike | None = None,
    eval_images: str | os.PathLike | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> GptqResult:
    """Quantize MODEL_DIR's decoder into BUNDLE/llm-gptq (see the module docstring)."""
    from minigpt4_local.bundle import Bundle

    settings = settings or GptqSettings()
    model_dir, out, source = Path(model_dir), Path(out), Path(calibration)
    job = _Job(model_dir, settings, progress)
    bundle = Bundle.create(out, job.config)  # refuses a bundle of another model before any work
    if bundle.has_part(GPTQ_PART) and not overwrite:
        raise ModelDirError(f"bundle {out} already has a GPTQ decoder; allow overwriting to replace it")
    source_kind(source)
    seconds: dict[str, float] = {}

    tick = time.perf_counter()
    _say(progress, f"loading {job.llm_dir} on {job.device} ({str(job.dtype).removeprefix('torch.')})")
    job.load_reference()
    samples, ev, summary = _calibration(
        job, source, Path(eval_text) if eval_text else None, Path(eval_images) if eval_images else None
    )
    _say(
        progress,
        f"calibration: {summary['samples']} sample(s), {summary['tokens']} tokens ({summary['source']})",
    )
    reference = reference_run(
        job.llm, ev.windows, ev.stitched, ev.prompts, settings.eval_new_tokens, settings.seq_len
    )
    seconds["prepare"] = time.perf_counter() - tick

    tick = time.perf_counter()
    _say(
        progress,
        f"GPTQ {settings.bits}-bit, group {settings.group_size}, desc_act {settings.desc_act}: "
        f"{job.config.llm.num_layers} layers",
    )
    _run_gptq(job, samples)
    seconds["quantize"] = time.perf_counter() - tick

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{GPTQ_DIR}.partial-", dir=out))
    try:
        _save(job, staging)
        _free(job)
        tick = time.perf_counter()
        _say(progress, "reloading the checkpoint with the runtime loader and measuring quality")
        runtime = load_gptq_llm(
            staging, device=job.device, kernel=settings.kernel, dtype=settings.dtype, llm=job.config.llm
        )
        quality = compare(runtime.model, reference, ev.windows, ev.stitched, ev.prompts, settings.seq_len)
        quality.ppl_on, quality.prompts_on = ev.ppl_on, ev.prompts_on
        seconds["evaluate"] = time.perf_counter() - tick
        loaded = runtime.describe()
        del runtime
        gc.collect()
        bundle.drop_part(GPTQ_PART)
        final = out / GPTQ_DIR
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    bundle.add_file(GPTQ_DIR, role=GPTQ_PART)
    bundle.set_part(GPTQ_PART, _part_info(job, loaded, quality, summary, seconds))
    info = bundle.part(GPTQ_PART)  # as recorded, with its file list
    _ensure_tokenizer_part(bundle, job)
    bundle.save()
    _say(progress, quality.summary())
    return GptqResult(out, final, info, quality, loaded["kernel"], seconds)
