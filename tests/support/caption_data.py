"""Inputs for the captioning-job tests: held-out demo scenes as PNG files, webdataset shards, Parquet tables.

`write_scenes(folder, n)` renders the first `n` held-out scenes (train/demo/scenes.py; the seeds eval-demo
scores on) as lossless PNGs named `<seed>.png` at the render size the demo was trained on;
`write_shard(path, members)` writes an uncompressed tar of (name, bytes); `write_table(path, columns,
row_group_size)` a Parquet file.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minigpt4_local.train.demo.recipe import SCENE_RENDER_SIZE
from minigpt4_local.train.demo.scenes import make_scene, scene_seeds


def scene_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    make_scene(seed, SCENE_RENDER_SIZE).image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_scenes(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in scene_seeds("heldout", n):
        path = folder / f"{seed}.png"
        path.write_bytes(scene_png(seed))
        paths.append(path)
    return paths


def write_shard(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_table(path: Path, columns: dict[str, list[Any]], row_group_size: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
