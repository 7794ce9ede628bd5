"""What a captioning job reads: inputs → read units (planned on the driver) → item rows (read by workers).

Contract (Ray-free; pyarrow is imported only for Parquet inputs):
- `plan_inputs(inputs, image_column=None, id_column=None, skip=(), rows_per_unit=16) -> InputPlan`: each
  input is an image file, a folder, a glob pattern, a webdataset shard (an uncompressed `.tar`) or a
  Parquet file (`.parquet`, `.pq`). A folder holding images is an image folder (its images,
  non-recursive, as `image.expand_image_inputs`); a folder without images is taken for its Parquet
  files, else its shards. Globs are expanded and each match classified by its suffix. Anything else is
  one `ConfigError`/`ImageError` line.
- Item ids are stable identities of the input item, never positions in this run's listing:
  image files → the resolved path (as `describe --jsonl` records it); shard members → `SHARD#KEY`
  (resolved shard path, webdataset key = the member path up to the first dot of its file name; the
  first image member of a key is the sample's image); Parquet rows → the `id_column` value (as a
  string), or `TABLE#ROW` (resolved file, row number in the file) without one. An input listed twice
  is planned once.
- `InputPlan.units`: JSON-able dicts, each at most `rows_per_unit` items, so that one unit is one batch of
  one actor call (Ray hands an actor a whole block): a chunk of image paths, a run of shard members
  (located by a scan of the shard's tar headers on the driver, read by offset), or a row range of one
  Parquet row group (a worker decodes the row group for each of its ranges: row groups of a few hundred
  images, the common layout, cost little). `InputPlan.total` counts the items of the inputs, done or
  not; `InputPlan.skipped` those left out because their id is in `skip` (known on the driver for every
  input but Parquet tables with an id column, whose rows `read_unit` leaves out).
- `read_unit(unit, skip=()) -> Iterator[ItemRow]` (runs on a worker): rows `{"id", "path", "image",
  "error"}` with a path to load (image files, path-valued Parquet cells: relative paths are taken
  relative to the table's folder) or the encoded bytes (shard members, byte cells), never both; `error`
  is set (and both empty) when the item cannot be read at all (a member larger than the limit, an empty
  cell, an unreadable shard or table: then one row whose id names the shard or table part).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ImageError
from ..image import (
    DEFAULT_MAX_FILE_BYTES,
    IMAGE_EXTENSIONS,
    check_encoded_size,
    expand_image_inputs,
    is_image_path,
)

__all__ = ["InputPlan", "ItemRow", "plan_inputs", "read_unit", "wds_key"]

SHARD_SUFFIXES = (".tar",)
TABLE_SUFFIXES = (".parquet", ".pq")
# Parquet columns looked for, in order, when --image-column is not given.
IMAGE_COLUMN_GUESSES = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes", "image_path", "path")

ItemRow = dict[str, Any]


@dataclass
class InputPlan:
    units: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    skipped: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # images / shards / tables planned


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _kind_of_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SHARD_SUFFIXES:
        return "shard"
    if suffix in TABLE_SUFFIXES:
        return "table"
    return "image"


def _classify(text: str) -> list[tuple[str, Path]]:
    """One input → (kind, path) pairs."""
    path = Path(text).expanduser()
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file())
        if any(is_image_path(p) for p in entries):
            return [("image", p) for p in expand_image_inputs([path])]
        for kind, suffixes in (("table", TABLE_SUFFIXES), ("shard", SHARD_SUFFIXES)):
            found = [p for p in entries if p.suffix.lower() in suffixes]
            if found:
                return [(kind, p) for p in found]
        raise ImageError(f"folder {path} has no images, Parquet files (.parquet) or webdataset shards (.tar)")
    if path.exists() or path.is_symlink() or not _has_glob_magic(text):
        if not path.exists() and _kind_of_file(path) != "image":
            raise ConfigError(f"no such file: {path}")
        return [(_kind_of_file(path), path)]  # a missing image path becomes an error row (load_image)
    matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
    chosen = [
        (k, p) for p in matches if p.is_file() and ((k := _kind_of_file(p)) != "image" or is_image_path(p))
    ]
    if not chosen:
        raise ImageError(f"pattern {text} matched no images, Parquet files or webdataset shards")
    return chosen


def _resolved(path: Path) -> str:
    return str(path.resolve())


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----- webdataset shards --------------------------------------------------------------------------------


def wds_key(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: (key = path up to the first dot of the file name, extension)."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, ext = name.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext if dot else ""


def _scan_shard(source: str) -> tuple[list[tuple[str, int, int]], str | None]:
    """(key, data offset, size) of each sample's image member, by a pass over the tar headers only."""
    members: list[tuple[str, int, int]] = []
    seen: set[str] = set()
    try:
        with tarfile.open(source, "r:") as tar:  # uncompressed: members can be read by offset
            for member in tar:
                key, ext = wds_key(member.name)
                suffix = f".{ext.rsplit('.', 1)[-1].lower()}" if ext else ""
                if member.isfile() and suffix in IMAGE_EXTENSIONS and key not in seen:
                    seen.add(key)
                    members.append((key, member.offset_data, member.size))
    except (OSError, EOFError, tarfile.TarError) as err:
        return members, f"cannot read webdataset shard {source}: {_one_line(err)}"
    return members, None


def _plan_shard(source: str, skip: Collection[str], rows: int, plan: InputPlan) -> None:
    members, error = _scan_shard(source)
    plan.total += len(members)
    todo = [m for m in members if f"{source}#{m[0]}" not in skip]
    plan.skipped += len(members) - len(todo)
    for chunk in _chunks(todo, rows):
        plan.units.append({"kind": "shard", "source": source, "members": chunk})
    if error is not None and source not in skip:  # the readable members are still described
        plan.units.append({"kind": "error", "id": source, "error": error})


def _read_shard(unit: dict[str, Any], skip: Collection[str], max_file_bytes: int) -> Iterator[ItemRow]:
    source = unit["source"]
    try:
        handle = open(source, "rb")  # noqa: SIM115 (closed below; errors become rows)
    except OSError as err:
        for key, _offset, _size in unit["members"]:
            yield _row(f"{source}#{key}", error=f"cannot read webdataset shard {source}: {_one_line(err)}")
        return
    with handle:
        for key, offset, size in unit["members"]:
            item_id = f"{source}#{key}"
            if item_id in skip:
                continue
            try:
                check_encoded_size(item_id, size, max_file_bytes)
                handle.seek(offset)
                data = handle.read(size)
                if len(data) != size:
                    raise ImageError(
                        f"cannot load image {item_id}: the shard ends inside it (truncated shard)"
                    )
            except ImageError as err:
                yield _row(item_id, error=str(err))
                continue
            except OSError as err:
                yield _row(item_id, error=f"cannot read {item_id}: {_one_line(err)}")
                continue
            yield _row(item_id, image=data)


# ----- Parquet tables -----------------------------------------------------------------------------------


def _image_column_kind(field_type: Any) -> str | None:
    import pyarrow as pa

    if pa.types.is_binary(field_type) or pa.types.is_large_binary(field_type):
        return "bytes"
    if pa.types.is_string(field_type) or pa.types.is_large_string(field_type):
        return "path"
    if pa.types.is_struct(field_type) and {"bytes", "path"} & {f.name for f in field_type}:
        return "struct"  # the Hugging Face `Image` feature: {"bytes", "path"}
    return None


def _pick_image_column(schema: Any, wanted: str | None, table: Path) -> tuple[str, str]:
    names = list(schema.names)
    if wanted is not None:
        if wanted not in names:
            raise ConfigError(f"{table} has no column {wanted!r} (columns: {', '.join(names)})")
        kind = _image_column_kind(schema.field(wanted).type)
        if kind is None:
            raise ConfigError(
                f"column {wanted!r} of {table} is {schema.field(wanted).type}, not image bytes or a path"
            )
        return wanted, kind
    for name in IMAGE_COLUMN_GUESSES:
        if name in names and (kind := _image_column_kind(schema.field(name).type)):
            return name, kind
    binary = [n for n in names if _image_column_kind(schema.field(n).type) in ("bytes", "struct")]
    if len(binary) == 1:
        return binary[0], _image_column_kind(schema.field(binary[0]).type) or "bytes"
    raise ConfigError(
        f"cannot tell which column of {table} holds the images (columns: {', '.join(names)}): "
        "pass --image-column NAME"
    )


def _plan_table(
    path: Path,
    image_column: str | None,
    id_column: str | None,
    skip: Collection[str],
    rows: int,
    plan: InputPlan,
) -> None:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot read Parquet file {path}: {_one_line(err)}") from None
    column, kind = _pick_image_column(schema, image_column, path)
    if id_column is not None and id_column not in schema.names:
        raise ConfigError(f"{path} has no id column {id_column!r} (columns: {', '.join(schema.names)})")
    source = _resolved(path)
    first = 0
    plan.total += meta.num_rows
    for group in range(meta.num_row_groups):
        count = meta.row_group(group).num_rows
        for start in range(0, count, rows):
            stop = min(count, start + rows)
            done: list[int] = []
            if id_column is None and skip:  # ids are row numbers: done rows are known here
                done = [n for n in range(start, stop) if f"{source}#{first + n}" in skip]
                plan.skipped += len(done)
                if len(done) == stop - start:
                    continue
            plan.units.append(
                {
                    "skip_rows": done,
                    "kind": "table",
                    "source": source,
                    "row_group": group,
                    "first_row": first,
                    "start": start,
                    "stop": stop,
                    "image_column": column,
                    "image_kind": kind,
                    "id_column": id_column,
                }
            )
        first += count


def _cell_path(value: str, table: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(table).parent / path)


def _cell_image(value: Any, kind: str, table: str) -> tuple[str, bytes]:
    """A Parquet cell → (path, bytes); both empty when the cell holds no image."""
    if kind == "struct":
        value = value or {}
        data, path = value.get("bytes"), value.get("path")
        if data:
            return "", bytes(data)
        return (_cell_path(path, table), b"") if path else ("", b"")
    if kind == "bytes":
        return "", bytes(value or b"")
    return (_cell_path(value, table), b"") if value else ("", b"")


def _read_table(unit: dict[str, Any], skip: Collection[str]) -> Iterator[ItemRow]:
    import pyarrow.parquet as pq

    source, column, id_column = unit["source"], unit["image_column"], unit["id_column"]
    first, start, stop = unit["first_row"], unit["start"], unit["stop"]
    columns = [column] + ([id_column] if id_column and id_column != column else [])
    try:
        group = pq.ParquetFile(source).read_row_group(unit["row_group"], columns=columns)
        group = group.slice(start, stop - start)
    except (OSError, ValueError) as err:
        problem = f"cannot read Parquet file {source} (row group {unit['row_group']}): {_one_line(err)}"
        done = set(unit.get("skip_rows", ()))
        for n in range(start, stop):
            if n not in done:
                yield _row(f"{source}#{first + n}", error=problem)
        return
    ids = group.column(id_column).to_pylist() if id_column else [None] * group.num_rows
    done = set(unit.get("skip_rows", ()))
    for n, (key, value) in enumerate(zip(ids, group.column(column).to_pylist(), strict=True)):
        item_id = f"{source}#{first + start + n}" if key is None else str(key)
        if start + n in done or item_id in skip:
            continue
        path, data = _cell_image(value, unit["image_kind"], source)
        if not path and not data:
            yield _row(item_id, error=f"cannot load image {item_id}: its {column!r} cell is empty")
        else:
            yield _row(item_id, path=path, image=data)


# ----- planning -----------------------------------------------------------------------------------------


def plan_inputs(
    inputs: Sequence[str | os.PathLike],
    image_column: str | None = None,
    id_column: str | None = None,
    skip: Collection[str] = (),
    rows_per_unit: int = 16,
) -> InputPlan:
    """Plan the reading of `inputs` (see the module docstring)."""
    if not inputs:
        raise ConfigError("no inputs given")
    rows = max(1, rows_per_unit)
    plan = InputPlan()
    kinds = {"image": 0, "shard": 0, "table": 0}
    seen: set[str] = set()
    pending: list[str] = []

    def flush_paths() -> None:
        for chunk in _chunks(pending, rows):
            plan.units.append({"kind": "paths", "paths": chunk})
        pending.clear()

    for text in inputs:
        for kind, path in _classify(os.fspath(text)):
            source = _resolved(path)
            if source in seen:
                continue
            seen.add(source)
            kinds[kind] += 1
            if kind == "image":
                plan.total += 1
                if source in skip:
                    plan.skipped += 1
                else:
                    pending.append(source)
                continue
            flush_paths()  # keep the units in input order
            if kind == "shard":
                _plan_shard(source, skip, rows, plan)
            else:
                _plan_table(path, image_column, id_column, skip, rows, plan)
    flush_paths()
    plan.kinds = {f"{k}s": n for k, n in kinds.items() if n}
    return plan


# ----- reading (on a worker) ---------------------------------------------------------------------------


def _row(item_id: str, path: str = "", image: bytes = b"", error: str = "") -> ItemRow:
    # Every field always present with one type, so the blocks of every unit share one schema.
    return {"id": item_id, "path": path, "image": image, "error": error}


def read_unit(
    unit: dict[str, Any] | str, skip: Collection[str] = (), max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> Iterator[ItemRow]:
    """The item rows of one read unit (a dict from `plan_inputs`, or its JSON), as they are read."""
    plan: dict[str, Any] = json.loads(unit) if isinstance(unit, str) else unit
    kind = plan["kind"]
    if kind == "paths":
        return (_row(p, path=p) for p in plan["paths"] if p not in skip)
    if kind == "shard":
        return _read_shard(plan, skip, max_file_bytes)
    if kind == "table":
        return _read_table(plan, skip)
    if kind == "error":
        return iter([_row(plan["id"], error=plan["error"])])
    raise ConfigError(f"unknown read unit kind {kind!r}")
