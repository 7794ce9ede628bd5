"""Feature cache: the frozen vision side's outputs computed once, so training runs only projection + LLM.

Contract:
- `FeatureCache(root, fingerprint, dtype)`: `root/cache.json` records the fingerprint of the vision
  weights and image settings (`vision_fingerprint`); a cache built for other weights/settings raises
  `ConfigError` instead of silently training on stale features. Features are what `MiniGPT4.vision_features`
  returns (Q-Former output (n_query, d), or the ViT tokens for the Llama-2 variant), stored as `dtype`
  (float32 exact; float16 halves the disk) and read back as float32.
- Stage 1 (`cache_webdataset`): one `.safetensors` file per tar shard (tensor `features` (n, …); metadata
  `keys`, raw `captions`, `skipped` counts, the shard's size and mtime), written atomically (temp + rename).
  Rank r builds shards i with i % world == r; existing up-to-date files are kept, so an interrupted
  build resumes. It returns the sources re-pointed at the cache files (`StreamSource(cached=True)`), which
  `data.StreamingData` splits and shuffles exactly like the tar shards (same order when no record is corrupt).
- Stage 2 (`cache_records`): chunks of `CHUNK` records per file (`features`, `index`), split over ranks
  the same way; returns {record index: features} for every readable image.
- Images are preprocessed without augmentation (random crops would change the features every epoch).
- In a multi-process run every rank writes its share into the same folder: on several nodes it must be
  on a filesystem all of them see (as `output.dir` must be for `--resume`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt4_local.errors import ConfigError

from .data import (
    IMAGE_KEYS,
    ImageSpec,
    Record,
    SkipSample,
    StreamSource,
    decode_image_bytes,
    image_to_pixels,
    raw_caption,
    tar_samples,
)
from .feature_files import read_cache_file

CACHE_FORMAT = "minigpt4-local/feature-cache"
MANIFEST = "cache.json"
CHUNK = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16}

Log = Callable[[str], None]


def vision_fingerprint(model: Any, image: ImageSpec) -> str:
    """sha256 over the frozen vision-side tensors (ViT, ln_vision, Q-Former, queries) and image settings."""
    digest = hashlib.sha256()
    digest.update(json.dumps([image.size, list(image.mean), list(image.std)]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("llm.", "llama_proj.")):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _source_stamp(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "remote"
    return f"{st.st_size}:{int(st.st_mtime)}"


class FeatureCache:
    def __init__(self, root: str | Path, fingerprint: str, dtype: str = "float32") -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.dtype = DTYPES[dtype]

    def prepare(self, is_main: bool, barrier: Callable[[], None]) -> None:
        """Create or check the manifest (rank 0 writes it, everyone checks it)."""
        manifest = self.root / MANIFEST
        if is_main and not manifest.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            body = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "dtype": str(self.dtype)}
            manifest.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        barrier()
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ConfigError(f"{manifest} is unreadable: not a feature cache of this tool") from None
        if found.get("format") != CACHE_FORMAT:
            raise ConfigError(f"{self.root} is not a feature cache of this tool")
        if found.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"feature cache {self.root} was built for other vision weights or image settings; "
                "delete it or choose another --cache-features directory"
            )
        if found.get("dtype") != str(self.dtype):
            raise ConfigError(
                f"feature cache {self.root} holds {found.get('dtype')} features; set output.cache_dtype"
            )

    def shard_file(self, source: str, shard: str) -> Path:
        tag = hashlib.sha1(os.path.abspath(shard).encode()).hexdigest()[:10]
        stem = Path(shard).name.split(".")[0] or "shard"
        return self.root / source / f"{stem}-{tag}.safetensors"

    def chunk_file(self, source: str, chunk: int) -> Path:
        return self.root / source / f"chunk-{chunk:06d}.safetensors"


@torch.no_grad()
def _features(model: Any, pixels: list[np.ndarray], device: torch.device) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(pixels)).to(device)  # (B, 3, S, S)
    return model.vision_features(batch).float().cpu()  # (B, n, d)


def _shard_is_current(path: Path, shard: str) -> bool:
    if not path.is_file():
        return False
    try:
        _, meta = read_cache_file(path)
    except ConfigError:
        return False
    return meta.get("stamp") == _source_stamp(shard)


def _build_shard(
    model: Any,
    shard: str,
    out: Path,
    cache: FeatureCache,
    image: ImageSpec,
    device: torch.device,
    batch_size: int,
) -> Counter:
    counts: Counter = Counter()
    keys, captions, pending, chunks = [], [], [], []
    for sample in tar_samples(shard, counts):
        try:
            caption = raw_caption(sample)
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                raise SkipSample("image")
            pending.append(image_to_pixels(decode_image_bytes(sample[key]), image, ""))
        except SkipSample as skip:
            counts[skip.kind] += 1
            continue
        keys.append(sample["__key__"])
        captions.append(caption)
        if len(pending) == batch_size:
            chunks.append(_features(model, pending, device))
            pending = []
    if pending:
        chunks.append(_features(model, pending, device))
    features = torch.cat(chunks) if chunks else torch.zeros(0)
    meta = {
        "keys": json.dumps(keys),
        "captions": json.dumps(captions),
        "skipped": json.dumps(dict(counts)),
        "source": shard,
        "stamp": _source_stamp(shard),
    }
    _atomic_save({"features": features.to(cache.dtype)}, meta, out)
    return counts


def cache_webdataset(
    model: Any,
    sources: Sequence[StreamSource],
    cache: FeatureCache,
    image: ImageSpec,
    rank: int,
    world: int,
    barrier: Callable[[], None],
    device: torch.device,
    batch_size: int = 32,
    log: Log | None = None,
) -> list[StreamSource]:
    """Build (or reuse) the per-shard cache files; returns the cached sources (see module docstring)."""
    plain = ImageSpec(image.size, image.mean, image.std, "none", image.crop_scale)
    cached = []
    for source in sources:
        files = [cache.shard_file(source.name, s) for s in source.shards]
        for i, (shard, out) in enumerate(zip(source.shards, files, strict=True)):
            if i % world != rank or _shard_is_current(out, shard):
                continue
            counts = _build_shard(model, shard, out, cache, plain, device, batch_size)
            if log:
                log(f"cached features of {shard}" + (f" (skipped {dict(counts)})" if counts else ""))
        cached.append(StreamSource(source.name, tuple(str(f) for f in files), source.ratio, cached=True))
    barrier()
    return cached


def _chunk_stamp(records: Sequence[Record]) -> str:
    """Identity of a chunk's inputs: image paths with their size and mtime."""
    listing = [(r.image, _source_stamp(r.image)) for r in records]
    return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


def _build_chunk(
    model: Any,
    records: Sequence[Record],
    start: int,
    out: Path,
    cache: FeatureCache,
    image: ImageSpec,
    device: torch.device,
    batch_size: int,
) -> None:
    from minigpt4_local.errors import ImageError
    from minigpt4_local.image import load_image

    indices, pixels, rows = [], [], []
    for offset, record in enumerate(records):
        try:
            pixels.append(image_to_pixels(load_image(record.image), image, ""))
        except ImageError:
            continue
        indices.append(start + offset)
        if len(pixels) == batch_size:
            rows.append(_features(model, pixels, device))
            pixels = []
    if pixels:
        rows.append(_features(model, pixels, device))
    features = torch.cat(rows) if rows else torch.zeros(0)
    tensors = {"features": features.to(cache.dtype), "index": torch.tensor(indices, dtype=torch.int64)}
    _atomic_save(tensors, {"stamp": _chunk_stamp(records)}, out)


def cache_records(
    model: Any,
    source: str,
    records: Sequence[Record],
    cache: FeatureCache,
    image: ImageSpec,
    rank: int,
    world: int,
    barrier: Callable[[], None],
    device: torch.device,
    batch_size: int = 32,
    log: Log | None = None,
) -> dict[int, np.ndarray]:
    """Build (or reuse) the chunk files of a stage-2 dataset; returns {record index: features}."""
    plain = ImageSpec(image.size, image.mean, image.std, "none", image.crop_scale)
    n_chunks = (len(records) + CHUNK - 1) // CHUNK
    for chunk in range(rank, n_chunks, world):
        out = cache.chunk_file(source, chunk)
        part = records[chunk * CHUNK : (chunk + 1) * CHUNK]
        if out.is_file():
            with contextlib.suppress(ConfigError):
                if read_cache_file(out)[1].get("stamp") == _chunk_stamp(part):
                    continue
        _build_chunk(model, part, chunk * CHUNK, out, cache, plain, device, batch_size)
        if log:
            log(f"cached features of records {chunk * CHUNK}..{chunk * CHUNK + len(part) - 1}")
    barrier()
    table: dict[int, np.ndarray] = {}
    for chunk in range(n_chunks):
        tensors, _ = read_cache_file(cache.chunk_file(source, chunk))
        for index, row in zip(tensors["index"].tolist(), tensors["features"], strict=False):
            table[index] = row
    return table
