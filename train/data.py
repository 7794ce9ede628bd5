"""Training data: webdataset shards (stage 1), `cc_sbu_align` folders and JSONL files (stage 2).

Contract:
- Stage 1 (`StreamingData`): tar shards of `{jpg|jpeg|png|webp, json{"caption"}|txt}` samples read with the
  `webdataset` library (`tarfile_samples`, `shuffle`), one infinite stream per source and per *data worker*
  (global worker g = rank × W + worker, G = world × W workers): in every pass over a source its shards are
  permuted with a seed shared by all ranks and worker g reads shards[g::G] (disjoint per rank and worker),
  then a shuffle buffer (`data.shuffle_buffer`) mixes samples. Each batch comes from one source, chosen
  with probability ∝ `ratio` (the original's MultiIterLoader), and holds `batch_size` good samples.
  Corrupt shards, images and captions are skipped and counted (`skipped`), never raised; a source that
  yields no usable sample for `MAX_BAD_IN_A_ROW` records raises `DataError`.
- Stage 2 (`IndexedData`): a `cc_sbu_align` folder (`filter_cap.json` = {"annotations": [{"image_id",
  "caption"}]}, `image/{image_id}.jpg`) or a JSONL file (`{"image": path, "caption": str}` or
  `{"image": path, "conversations": [...]}`; relative paths are relative to the file). Per pass the
  indices are permuted (seed shared by all ranks), padded to a multiple of the world size and split
  `perm[rank::world]` like `DistributedSampler`; batch k of every rank together is the k-th global batch
  of a 1-process run with `world × batch_size` (when the dataset size is a multiple of it). Unreadable
  images are skipped and counted; a batch may then be smaller (even empty).
- Images: `augment: random_resized_crop` (scale `crop_scale`, ratio 3/4..4/3, the original's
  `blip2_image_train`) or `none`, then the model's preprocessing (bicubic resize, CLIP mean/std). The
  crop draws from an RNG seeded by the sample's position, so runs are reproducible with any number of
  loader workers and after a resume.
- With a feature cache (`features.py`) the same streams deliver cached vision features instead of pixels.
- Resume: `state_dict()` is this rank's data position (batches consumed, per-worker stream cursors, skip
  counts); passing it back as `state` continues exactly where it stopped (stage 1 replays the shuffle
  without decoding images; stage 2 restarts the sampler at the batch). Requires the same world size and
  worker count; otherwise the stream restarts at a fresh, step-dependent seed (`restarted` is True).
Batches are dicts: `pixels` (B, 3, S, S) float32 or `features` (B, n, d) float32, `turns` (per sample
`[(instruction | None, answer), …]`), `size` (B); stage-1 batches also carry the sample `keys` and the
`source` name, stage-2 batches the record `indices`.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from minigpt4_local.errors import ConfigError, ImageError, MiniGPT4Error
from minigpt4_local.image import load_image, preprocess

from .captions import conversation_turns, process_caption
from .feature_files import read_shard_cache

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_IN_A_ROW = 10_000
MAX_IMAGE_PIXELS = 64_000_000
CROP_RATIO = (3 / 4, 4 / 3)

Turns = list[tuple[str | None, str]]


class DataError(MiniGPT4Error):
    """The training data cannot deliver batches (no usable samples, too few shards for the workers)."""


class SkipSample(Exception):
    """A record that is skipped and counted under `kind` (image, caption, record, tar)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# ----- images -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str = "none"
    crop_scale: tuple[float, float] = (0.5, 1.0)


def decode_image_bytes(data: bytes) -> Image.Image:
    """Fully decoded image from encoded bytes (EXIF orientation applied); raises SkipSample('image')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
                raise SkipSample("image")
            image.load()
            return ImageOps.exif_transpose(image)
    except SkipSample:
        raise
    except Exception:  # untrusted bytes: any decoder failure means a corrupt record
        raise SkipSample("image") from None


def random_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float]
) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def image_to_pixels(image: Image.Image, spec: ImageSpec, rng_seed: str) -> np.ndarray:
    """PIL image → (3, S, S) float32 pixels, with the training crop when `spec.augment` asks for it."""
    if spec.augment == "random_resized_crop":
        image = image.crop(
            random_crop_box(image.width, image.height, random.Random(rng_seed), spec.crop_scale)
        )
    return preprocess([image], spec.size, spec.mean, spec.std)[0]


# ----- stage 1: webdataset streams ---------------------------------------------------------------------


def expand_shards(pattern: str) -> list[str]:
    """Comma-separated brace patterns / globs / URLs → shard list (local files must exist)."""
    from braceexpand import braceexpand

    shards: list[str] = []
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        for item in braceexpand(part):
            if "://" in item or item.startswith("pipe:"):
                shards.append(item)
            elif any(ch in item for ch in "*?["):
                shards += sorted(glob.glob(item))
            elif Path(item).is_file():
                shards.append(item)
            else:
                raise ConfigError(f"webdataset shard not found: {item}")
    if not shards:
        raise ConfigError(f"no webdataset shards match {pattern!r}")
    return shards


@dataclass(frozen=True)
class StreamSource:
    name: str
    shards: tuple[str, ...]  # tar shards, or feature-cache shard files
    ratio: float
    cached: bool = False


def tar_samples(shard: str, counts: Counter) -> Iterator[dict[str, Any]]:
    from webdataset.tariterators import tarfile_samples

    def handler(exn: Exception) -> bool:
        counts["tar"] += 1
        return True  # skip the broken member / shard and go on

    yield from tarfile_samples(iter([{"url": shard}]), handler=handler)


def _cache_reader(shard: str, counts: Counter) -> Iterator[dict[str, Any]]:
    try:
        keys, captions, features = read_shard_cache(shard)
    except MiniGPT4Error:
        counts["cache"] += 1
        return
    for key, caption, row in zip(keys, captions, features, strict=True):
        yield {"__key__": key, "caption": caption, "features": row}


def _shard_cycle(source: StreamSource, index: int, seed: int, g: int, n_global: int) -> Iterator[str]:
    """Infinite: pass p permutes the shards (same on every rank) and worker g takes shards[g::G]."""
    for p in itertools.count():
        order = list(source.shards)
        random.Random(f"{seed}:shards:{index}:{p}").shuffle(order)
        yield from order[g::n_global]


def _raw_stream(
    source: StreamSource,
    index: int,
    seed: int,
    g: int,
    n_global: int,
    counts: Counter,
    buffer: int,
    initial: int,
) -> Iterator[dict[str, Any]]:
    from webdataset.filters import shuffle

    reader = _cache_reader if source.cached else tar_samples

    def samples() -> Iterator[dict[str, Any]]:
        shards_per_pass = max(len(source.shards[g::n_global]), 1)
        empty_run = 0  # consecutive shards without a single sample: a whole pass of them is fatal
        for shard in _shard_cycle(source, index, seed, g, n_global):
            got = False
            for sample in reader(shard, counts):
                got = True
                yield sample
            empty_run = 0 if got else empty_run + 1
            if empty_run >= shards_per_pass:
                raise DataError(f"source {source.name}: none of its shards holds a readable sample")

    return shuffle(buffer, initial=initial, rng=random.Random(f"{seed}:shuffle:{index}:{g}"))(samples())


def raw_caption(sample: dict[str, Any]) -> str:
    """The caption text of a webdataset sample: json["caption"], else txt (cache samples: "caption")."""
    if isinstance(sample.get("caption"), str):
        return sample["caption"]
    try:
        if "json" in sample:
            text = json.loads(sample["json"])["caption"]
        elif "txt" in sample:
            text = sample["txt"].decode("utf-8")
        else:
            raise SkipSample("caption")
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        raise SkipSample("caption") from None
    if not isinstance(text, str):
        raise SkipSample("caption")
    return text


@dataclass(frozen=True)
class Stage1Decoder:
    """Raw webdataset sample → {"pixels"|"features", "caption"}; raises SkipSample."""

    image: ImageSpec
    caption_processor: bool
    max_words: int
    seed: int

    def caption(self, sample: dict[str, Any]) -> str:
        text = raw_caption(sample)
        text = process_caption(text, self.max_words) if self.caption_processor else text.strip()
        if not text:
            raise SkipSample("caption")
        return text

    def __call__(self, sample: dict[str, Any], position: str) -> dict[str, Any]:
        caption = self.caption(sample)
        key = sample.get("__key__", "")
        if "features" in sample:
            return {"features": sample["features"], "caption": caption, "key": key}
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            raise SkipSample("image")
        pixels = image_to_pixels(
            decode_image_bytes(sample[image_key]), self.image, f"{self.seed}:crop:{position}"
        )
        return {"pixels": pixels, "caption": caption, "key": key}


def _stack(items: Sequence[dict[str, Any]], key: str) -> torch.Tensor | None:
    if not items or key not in items[0]:
        return None
    return torch.from_numpy(np.stack([np.asarray(x[key], dtype=np.float32) for x in items]))


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class WebDatasetStream(IterableDataset):
    """Per-worker infinite batch stream over several sources (see module docstring)."""

    def __init__(
        self,
        sources: Sequence[StreamSource],
        decoder: Stage1Decoder,
        batch_size: int,
        rank: int,
        world: int,
        num_workers: int,
        seed: int,
        buffer: int,
        initial: int,
        worker_states: dict[int, dict[str, Any]] | None = None,
        rotation: int = 0,
    ) -> None:
        super().__init__()
        self.sources = list(sources)
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.num_workers = max(num_workers, 1)
        self.seed = seed
        self.buffer, self.initial = buffer, initial
        self.worker_states = worker_states or {}
        self.rotation = rotation  # the DataLoader restarts its round-robin at worker 0: rotate roles
        n_global = world * self.num_workers
        for source in self.sources:
            if len(source.shards) < n_global:
                raise DataError(
                    f"source {source.name} has {len(source.shards)} shard(s) but the run reads with {n_global} data "
                    f"workers ({world} process(es) × {self.num_workers}); write more shards or use fewer workers"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        physical, _ = _worker_slot()
        logical = (physical + self.rotation) % self.num_workers
        g = self.rank * self.num_workers + logical
        n_global = self.world * self.num_workers
        state = self.worker_states.get(logical, {})
        counts: Counter = Counter(state.get("skipped", {}))
        cursors = {s.name: 0 for s in self.sources}
        cursors.update(state.get("cursors", {}))
        streams = {}
        for index, source in enumerate(self.sources):
            stream = _raw_stream(source, index, self.seed, g, n_global, counts, self.buffer, self.initial)
            streams[source.name] = itertools.islice(stream, cursors[source.name], None)  # replay, no decode
        mixer = random.Random(f"{self.seed}:mix:{g}")
        weights = [s.ratio for s in self.sources]
        batches = int(state.get("batches", 0))
        for _ in range(batches):
            mixer.choices(self.sources, weights)
        while True:
            (source,) = mixer.choices(self.sources, weights)
            items = self._fill(source, streams[source.name], cursors, counts, g)
            batches += 1
            yield {
                "pixels": _stack(items, "pixels"),
                "features": _stack(items, "features"),
                "turns": [[(None, x["caption"])] for x in items],
                "keys": [x["key"] for x in items],
                "source": source.name,
                "size": len(items),
                "worker": logical,
                "worker_state": {"batches": batches, "cursors": dict(cursors), "skipped": dict(counts)},
            }

    def _fill(
        self,
        source: StreamSource,
        stream: Iterator[dict[str, Any]],
        cursors: dict[str, int],
        counts: Counter,
        g: int,
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        bad = 0
        while len(items) < self.batch_size:
            raw = next(stream)
            position = f"{source.name}:{g}:{cursors[source.name]}"
            cursors[source.name] += 1
            try:
                items.append(self.decoder(raw, position))
                bad = 0
            except SkipSample as skip:
                counts[skip.kind] += 1
                bad += 1
                if bad >= MAX_BAD_IN_A_ROW:
                    raise DataError(f"source {source.name}: {bad} unusable records in a row") from None
        return items


# ----- stage 2: indexed records ------------------------------------------------------------------------


@dataclass
class Record:
    image: str
    turns: Turns


def read_cc_sbu_align(folder: str | Path) -> tuple[list[Record], Counter]:
    """`filter_cap.json` + `image/{image_id}.jpg` → records (bad annotations counted as 'record')."""
    root = Path(folder)
    index = root / "filter_cap.json"
    try:
        annotations = json.loads(index.read_text(encoding="utf-8"))["annotations"]
    except FileNotFoundError:
        raise ConfigError(f"{root} is not a cc_sbu_align folder: no filter_cap.json") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{index}: not a cc_sbu_align annotation file ({exc})") from None
    if not isinstance(annotations, list):
        raise ConfigError(f"{index}: 'annotations' must be a list")
    records, counts = [], Counter()
    for ann in annotations:
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or "image_id" not in ann:
            counts["record"] += 1
            continue
        records.append(Record(str(root / "image" / f"{ann['image_id']}.jpg"), [(None, ann["caption"])]))
    return records, counts


def _jsonl_record(line: str, base: Path) -> Record:
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise ValueError("no 'image' path")
    image = Path(data["image"]).expanduser()
    image = image if image.is_absolute() else base / image
    if isinstance(data.get("caption"), str):
        return Record(str(image), [(None, data["caption"])])
    return Record(str(image), list(conversation_turns(data.get("conversations"))))


def read_jsonl(path: str | Path) -> tuple[list[Record], Counter]:
    """JSONL records (see module docstring); unparsable lines are counted as 'record'."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read JSONL data {path}: {exc.strerror or exc}") from None
    records, counts = [], Counter()
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(_jsonl_record(line, path.parent))
        except (ValueError, TypeError):
            counts["record"] += 1
    return records, counts


READERS: dict[str, Callable[[str], tuple[list[Record], Counter]]] = {
    "cc_sbu_align": read_cc_sbu_align,
    "jsonl": read_jsonl,
}


class RecordDataset(Dataset):
    """(pass, index) → one decoded item, or an error marker; features come from a cache when given."""

    def __init__(
        self,
        records: Sequence[Record],
        image: ImageSpec,
        seed: int,
        features: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.records = list(records)
        self.image = image
        self.seed = seed
        self.features = features

    def __len__(self) -> int:
        return len(self.records)

    def load_pixels(self, index: int, rng_seed: str) -> np.ndarray:
        try:
            image = load_image(self.records[index].image)
        except ImageError:
            raise SkipSample("image") from None
        return image_to_pixels(image, self.image, rng_seed)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        pass_index, index = key
        item: dict[str, Any] = {"index": index, "turns": self.records[index].turns}
        try:
            if self.features is not None:
                if index not in self.features:
                    raise SkipSample("image")  # unreadable when the cache was built
                item["features"] = self.features[index]
            else:
                item["pixels"] = self.load_pixels(index, f"{self.seed}:crop:{pass_index}:{index}")
        except SkipSample as skip:
            return {"index": index, "error": skip.kind}
        return item


def collate_records(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    good = [x for x in items if "error" not in x]
    return {
        "pixels": _stack(good, "pixels"),
        "features": _stack(good, "features"),
        "turns": [x["turns"] for x in good],
        "indices": [x["index"] for x in good],
        "size": len(good),
        "skipped": dict(Counter(x["error"] for x in items if "error" in x)),
    }


class DistributedBatchSampler:
    """Infinite, resumable batches of (pass, index) keys (see module docstring)."""

    def __init__(
        self, n: int, batch_size: int, rank: int, world: int, seed: int, start_batch: int = 0
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.start_batch = seed, start_batch
        self.per_rank = math.ceil(n / world)
        self.batches_per_pass = self.per_rank // batch_size
        if self.batches_per_pass == 0:
            raise DataError(
                f"the dataset has {n} record(s): too few for batch size {batch_size} × {world} process(es)"
            )

    def rank_indices(self, pass_index: int) -> list[int]:
        perm = np.random.default_rng([self.seed, pass_index]).permutation(self.n).tolist()
        padded = perm + perm[: self.per_rank * self.world - self.n]
        return padded[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_pass, mine = -1, []
        for k in itertools.count(self.start_batch):
            pass_index, j = divmod(k, self.batches_per_pass)
            if pass_index != cached_pass:
                cached_pass, mine = pass_index, self.rank_indices(pass_index)
            yield [(pass_index, i) for i in mine[j * self.batch_size : (j + 1) * self.batch_size]]


# ----- main-process wrappers -----------------------------------------------------------------------------


@dataclass
class DataPosition:
    kind: str
    world: int
    num_workers: int
    batches: int = 0
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "world": self.world,
            "num_workers": self.num_workers,
            "batches": self.batches,
            "workers": {int(k): v for k, v in self.workers.items()},
            "skipped": dict(self.skipped),
        }


def _next(iterator: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """next() that turns a loader worker's wrapped error back into its own one-line message."""
    try:
        return next(iterator)
    except MiniGPT4Error as exc:
        text, marker = str(exc), f"{type(exc).__name__}: "
        if text.startswith("Caught ") and marker in text:  # torch's ExceptionWrapper re-raise
            raise type(exc)(text.rsplit(marker, 1)[1]) from None
        raise


def _loader_kwargs(num_workers: int, pin: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin}
    if num_workers:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
    return kwargs


def _usable_state(state: dict[str, Any] | None, kind: str, world: int, workers: int) -> bool:
    return (
        bool(state)
        and state.get("kind") == kind
        and state.get("world") == world
        and state.get("num_workers") == workers
    )


class StreamingData:
    """Stage-1 batches through a DataLoader; tracks the data position of this rank."""

    def __init__(
        self,
        sources: Sequence[StreamSource],
        decoder: Stage1Decoder,
        batch_size: int,
        rank: int,
        world: int,
        num_workers: int,
        seed: int,
        buffer: int,
        initial: int,
        state: dict[str, Any] | None = None,
        restart_salt: int = 0,
        pin_memory: bool = False,
    ) -> None:
        workers = max(num_workers, 1)
        self.restarted = bool(state) and not _usable_state(state, "webdataset", world, workers)
        if not _usable_state(state, "webdataset", world, workers):
            state = None
            seed = seed + 1_000_003 * restart_salt if self.restarted else seed
        self.position = DataPosition("webdataset", world, workers)
        if state:
            self.position.batches = int(state["batches"])
            self.position.workers = {int(k): v for k, v in state["workers"].items()}
        dataset = WebDatasetStream(
            sources,
            decoder,
            batch_size,
            rank,
            world,
            num_workers,
            seed,
            buffer,
            initial,
            worker_states=self.position.workers,
            rotation=self.position.batches % workers,
        )
        self.loader = DataLoader(dataset, batch_size=None, **_loader_kwargs(num_workers, pin_memory))
        self._it: Iterator[dict[str, Any]] | None = None

    def next_batch(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = _next(self._it)
        self.position.batches += 1
        self.position.workers[int(batch.pop("worker"))] = batch.pop("worker_state")
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        total: Counter = Counter()
        for state in self.position.workers.values():
            total.update(state.get("skipped", {}))
        return dict(total)

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_dict()


class IndexedData:
    """Stage-2 batches through a DataLoader with the distributed batch sampler."""

    def __init__(
        self,
        dataset: RecordDataset,
        batch_size: int,
        rank: int,
        world: int,
        num_workers: int,
        seed: int,
        state: dict[str, Any] | None = None,
        load_skipped: Counter | None = None,
        restart_salt: int = 0,
        pin_memory: bool = False,
    ) -> None:
        workers = max(num_workers, 1)
        self.restarted = bool(state) and not _usable_state(state, "indexed", world, workers)
        usable = _usable_state(state, "indexed", world, workers)
        self.position = DataPosition("indexed", world, workers, skipped=dict(load_skipped or {}))
        if usable:
            self.position.batches = int(state["batches"])
            self.position.skipped = dict(state["skipped"])
        elif self.restarted:
            seed = seed + 1_000_003 * restart_salt
        sampler = DistributedBatchSampler(len(dataset), batch_size, rank, world, seed, self.position.batches)
        self.loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_records,
            **_loader_kwargs(num_workers, pin_memory),
        )
        self._it: Iterator[dict[str, Any]] | None = None

    def next_batch(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = _next(self._it)
        self.position.batches += 1
        total = Counter(self.position.skipped)
        total.update(batch.pop("skipped"))
        self.position.skipped = dict(total)
        return batch

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.position.skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_dict()
