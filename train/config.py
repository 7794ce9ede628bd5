"""Training configuration: dataclasses, YAML loading, `key=value` overrides, stage defaults (torch-free).

Contract:
- `TrainConfig` holds everything a run needs: `stage` (1 or 2), `model` (model directory, what trains,
  sequence layout), `data` (sources, batch, workers, augmentation), `optim` (schedule, AdamW, precision,
  accumulation, seed), `output` (run directory, feature cache, exports).
- `load_train_config(path_or_name, overrides=(), stage=None)` reads a YAML file (or the name of a shipped
  config in `train/configs/`, e.g. `vicuna7b-stage1`), fills the stage's defaults for keys the file does not
  set, applies dotted overrides (`optim.init_lr=3e-5`, `data.batch_size=4`; values parsed as YAML), and
  validates. Unknown keys, wrong types and inconsistent values raise `ConfigError` naming the key.
- Numbers written like `1e-4` (which YAML 1.1 reads as a string) are accepted for float fields.
- `TrainConfig.to_dict()` round-trips through `train_config_from_dict`.
Defaults follow the original recipes (docs/numerics.md §14): stage 1 max_txt_len 32, end_sym `\\n`, no prompt,
caption processor on; stage 2 max_txt_len 160, end_sym `###`, template `###Human: {} ###Assistant: `,
the four alignment prompts, raw captions.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from minigpt4_local.errors import ConfigError

from .captions import ALIGNMENT_PROMPTS, STAGE2_TEMPLATES

SOURCE_KINDS = ("webdataset", "cc_sbu_align", "jsonl")
STAGE_SOURCE_KINDS = {1: ("webdataset",), 2: ("cc_sbu_align", "jsonl")}
TRAINABLE_PARTS = ("projection", "qformer", "vision", "llm")
PRECISIONS = ("fp32", "fp16", "bf16")
RELEASES = ("oct2023", "april2023")
AUGMENTS = ("random_resized_crop", "none")
LOSS_AVERAGES = ("global_tokens", "per_batch")
CACHE_DTYPES = ("float32", "float16")


@dataclass
class SourceConfig:
    """One data source. `path`: shard pattern(s) (`a/{000..099}.tar`, comma-separated allowed), a
    `cc_sbu_align` folder, or a JSONL file. `ratio`: batch-mixing weight among the sources."""

    name: str = "data"
    kind: str = "webdataset"
    path: str = ""
    ratio: float = 1.0


@dataclass
class ModelSection:
    dir: str = ""
    # model: keep the projection of the model directory; random: fresh nn.Linear init (stage 1 from
    # scratch); otherwise a path to a projection checkpoint (original .pth layout or our train_state.pt).
    init_projection: str = "model"
    trainable: list[str] = field(default_factory=lambda: ["projection"])
    release: str = "oct2023"  # pad token: "$$" (Oct 2023) or EOS (April 2023)
    max_txt_len: int = 32
    end_sym: str = "\n"
    prompt_template: str = ""
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""


@dataclass
class DataSection:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 64  # per process (per GPU)
    num_workers: int = 4
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    augment: str = "random_resized_crop"
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    caption_processor: bool = True
    max_words: int = 50


@dataclass
class OptimSection:
    epochs: int = 4
    iters_per_epoch: int = 5000  # optimizer steps per epoch
    max_steps: int = 0  # 0: epochs × iters_per_epoch
    accum_steps: int = 1
    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    max_grad_norm: float = 0.0  # 0: no clipping (the original does not clip)
    precision: str = "fp16"
    seed: int = 42
    loss_average: str = "global_tokens"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: once per epoch


@dataclass
class OutputSection:
    dir: str = "output/minigpt4"
    cache_features: str = ""
    cache_dtype: str = "float32"
    export_model_dir: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    stage: int = 1
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    output: OutputSection = field(default_factory=OutputSection)

    @property
    def total_steps(self) -> int:
        return self.optim.max_steps or self.optim.epochs * self.optim.iters_per_epoch

    @property
    def instruction_prompts(self) -> list[str]:
        """The stage-2 instruction list (the file's prompts containing `<ImageHere>`, as the original)."""
        prompts = list(self.model.prompts)
        if self.model.prompts_file:
            path = Path(self.model.prompts_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"model.prompts_file {path}: cannot read it ({exc.strerror or exc})"
                ) from None
            prompts += [line for line in lines if "<ImageHere>" in line]
        return prompts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        _check_choice("stage", self.stage, (1, 2))
        m, d, o = self.model, self.data, self.optim
        if not m.dir:
            raise ConfigError(
                "model.dir is required: the model directory to train (made by `minigpt4 convert`)"
            )
        for part in m.trainable:
            _check_choice("model.trainable", part, TRAINABLE_PARTS)
        if not m.trainable:
            raise ConfigError(f"model.trainable is empty; choose from {', '.join(TRAINABLE_PARTS)}")
        _check_choice("model.release", m.release, RELEASES)
        _check_choice("data.augment", d.augment, AUGMENTS)
        _check_choice("optim.precision", o.precision, PRECISIONS)
        _check_choice("optim.loss_average", o.loss_average, LOSS_AVERAGES)
        _check_choice("output.cache_dtype", self.output.cache_dtype, CACHE_DTYPES)
        _check_positive(
            self,
            [
                ("model", "max_txt_len"),
                ("data", "batch_size"),
                ("data", "shuffle_buffer"),
                ("data", "max_words"),
                ("optim", "epochs"),
                ("optim", "iters_per_epoch"),
                ("optim", "accum_steps"),
                ("optim", "log_every"),
            ],
        )
        _check_non_negative(
            self,
            [
                ("data", "num_workers"),
                ("optim", "max_steps"),
                ("optim", "warmup_steps"),
                ("optim", "checkpoint_every"),
                ("data", "shuffle_initial"),
            ],
        )
        if "{}" not in m.prompt_template and m.prompt_template:
            raise ConfigError("model.prompt_template must contain '{}' where the instruction goes")
        if self.stage == 2 and not self.instruction_prompts:
            raise ConfigError("stage 2 needs instructions: set model.prompts or model.prompts_file")
        if self.stage == 1 and (m.prompts or m.prompts_file):
            raise ConfigError(
                "stage 1 has no instruction (sequence [BOS][image][caption]); drop model.prompts"
            )
        if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            raise ConfigError("data.crop_scale must be [min, max] with 0 < min <= max <= 1")
        self._validate_sources()
        if o.min_lr > o.init_lr or o.init_lr <= 0:
            raise ConfigError("optim.init_lr must be > 0 and >= optim.min_lr")

    def _validate_sources(self) -> None:
        sources = self.data.sources
        if not sources:
            raise ConfigError("data.sources is empty: give at least one {name, kind, path}")
        allowed = STAGE_SOURCE_KINDS[self.stage]
        names = set()
        for i, src in enumerate(sources):
            key = f"data.sources[{i}]"
            _check_choice(f"{key}.kind", src.kind, SOURCE_KINDS)
            if src.kind not in allowed:
                raise ConfigError(
                    f"{key}.kind {src.kind!r} is not a stage-{self.stage} source ({', '.join(allowed)})"
                )
            if not src.path:
                raise ConfigError(f"{key}.path is empty")
            if src.ratio <= 0:
                raise ConfigError(f"{key}.ratio must be > 0")
            if src.name in names:
                raise ConfigError(f"{key}.name {src.name!r} is used twice")
            names.add(src.name)
        if self.stage == 2 and len(sources) > 1:
            raise ConfigError("stage 2 takes one source (a cc_sbu_align folder or a JSONL file)")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} is {value!r}; choose one of: {', '.join(str(c) for c in choices)}")


def _check_positive(cfg: TrainConfig, keys: list[tuple[str, str]]) -> None:
    for section, key in keys:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{section}.{key} must be > 0")


def _check_non_negative(cfg: TrainConfig, keys: list[tuple[str, str]]) -> None:
    for section, key in keys:
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{section}.{key} must be >= 0")


# ----- stage defaults --------------------------------------------------------------------------------

STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {
        "model": {"max_txt_len": 32, "end_sym": "\n", "prompt_template": "", "init_projection": "random"},
        "data": {"caption_processor": True},
        "optim": {
            "init_lr": 1e-4,
            "min_lr": 8e-5,
            "warmup_steps": 5000,
            "epochs": 4,
            "iters_per_epoch": 5000,
        },
    },
    2: {
        "model": {
            "max_txt_len": 160,
            "end_sym": "###",
            "prompt_template": STAGE2_TEMPLATES["vicuna"],
            "prompts": list(ALIGNMENT_PROMPTS),
            "init_projection": "model",
        },
        "data": {"caption_processor": False, "batch_size": 12},
        "optim": {"init_lr": 3e-5, "min_lr": 1e-5, "warmup_steps": 200, "epochs": 5, "iters_per_epoch": 200},
    },
}


# ----- dict → dataclasses ------------------------------------------------------------------------------


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    return _coerce_scalar(key, value, hint)


def _coerce_scalar(key: str, value: Any, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - a bug in the dataclasses


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key!s}; known: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, data, "")
    config.validate()
    return config


# ----- files, shipped configs, overrides ----------------------------------------------------------------


def shipped_configs() -> list[str]:
    """Names of the YAML configs shipped in train/configs/ (without .yaml)."""
    folder = resources.files(__package__).joinpath("configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name: str | Path) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    shipped = resources.files(__package__).joinpath("configs", f"{name}.yaml")
    if isinstance(name, str) and shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"training config not found: {name} (a YAML file, or one of: {', '.join(shipped_configs())})"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read training config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must be a YAML mapping at the top level")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.init_lr=3e-5` → (["optim", "init_lr"], 3e-5); the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {part} is not a section")
    node[parts[-1]] = value


def load_train_config(
    source: str | Path | dict[str, Any],
    overrides: typing.Iterable[str] = (),
    stage: int | None = None,
) -> TrainConfig:
    """YAML file / shipped name / dict → validated TrainConfig (see module docstring)."""
    data = dict(source) if isinstance(source, dict) else _read_yaml(resolve_config_path(source))
    for text in overrides:
        _apply_override(data, *parse_override(text))
    file_stage = data.get("stage", stage or 1)
    if stage is not None and file_stage != stage:
        raise ConfigError(f"this config is for stage {file_stage}; run `minigpt4 train stage{file_stage}`")
    if file_stage not in STAGE_DEFAULTS:
        raise ConfigError(f"stage is {file_stage!r}; choose 1 or 2")
    merged = _merge(STAGE_DEFAULTS[file_stage], data)
    merged["stage"] = file_stage
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("prompts_file") and "prompts" not in model:
        merged["model"]["prompts"] = []  # a prompt file replaces the default list
    return train_config_from_dict(merged)


def dump_yaml(config: TrainConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
