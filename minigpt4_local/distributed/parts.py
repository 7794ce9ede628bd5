"""The output folder of a captioning job: part files committed atomically, read back for resuming.

Contract (Ray-free; pyarrow for Parquet parts):
- A committed part is `DIR/part-<run>-<n>.parquet` or `.jsonl` (`<run>`: UTC time + random hex, so parts
  of several runs sort by time and never collide). It is first written as `DIR/.tmp-part-…`, flushed and
  fsync-ed, then renamed to its final name (and the folder fsync-ed): a reader sees a part whole or not
  at all. Temporary files are never read; `remove_stale_temp(DIR)` deletes those a killed run left behind
  (one job per DIR at a time).
- `PartWriter(DIR, fmt, rows_per_part, seconds_per_part, seen)`: `add(table)` buffers result rows (and
  returns the rows it kept) and
  commits a part once `rows_per_part` rows are buffered or `seconds_per_part` passed since the first
  buffered row (what a killed driver loses is at most that much work); `close()` commits the rest. Rows
  whose id is in `seen` (ids committed earlier, then every id it commits) are dropped and counted in
  `duplicates`: each id is committed at most once per DIR.
- `committed_ids(DIR) -> set[str]` and `read_results(DIR) -> list[dict]` read every committed part of
  either format; a part that cannot be parsed is one `MiniGPT4Error` line naming it.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MiniGPT4Error

__all__ = [
    "FORMATS",
    "PartWriter",
    "committed_ids",
    "committed_parts",
    "read_results",
    "remove_stale_temp",
]

FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-part-"


def committed_parts(out: str | Path) -> list[Path]:
    """The committed part files of `out`, oldest run first."""
    folder = Path(out)
    if not folder.is_dir():
        return []
    suffixes = set(FORMATS.values())
    return sorted(p for p in folder.iterdir() if p.name.startswith(PART_PREFIX) and p.suffix in suffixes)


def remove_stale_temp(out: str | Path) -> int:
    """Delete the temporary parts a killed run left in `out`; returns how many."""
    folder = Path(out)
    stale = [p for p in folder.glob(f"{TMP_PREFIX}*")] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _bad_part(path: Path, err: Exception) -> MiniGPT4Error:
    return MiniGPT4Error(f"cannot read result part {path}: {' '.join(str(err).split())}")


def _read_part(path: Path, columns: list[str] | None = None) -> list[dict[str, Any]]:
    if path.suffix == FORMATS["parquet"]:
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, columns=columns).to_pylist()
        except (OSError, ValueError) as err:
            raise _bad_part(path, err) from None
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                rows.append({k: row.get(k) for k in columns} if columns else row)
    except (OSError, ValueError) as err:
        raise _bad_part(path, err) from None
    return rows


def committed_ids(out: str | Path) -> set[str]:
    """Ids in the committed parts of `out`."""
    return {row["id"] for part in committed_parts(out) for row in _read_part(part, ["id"])}


def read_results(out: str | Path) -> list[dict[str, Any]]:
    """Every committed result row of `out` (parts in commit order)."""
    return [row for part in committed_parts(out) for row in _read_part(part)]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartWriter:
    """Buffers result rows (pyarrow tables) and commits them as atomically renamed part files."""

    def __init__(
        self,
        out: str | Path,
        fmt: str = "parquet",
        *,
        rows_per_part: int = 1000,
        seconds_per_part: float = 60.0,
        seen: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown output format {fmt!r} (choose {', '.join(FORMATS)})")
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.fmt = fmt
        self.rows_per_part = max(1, rows_per_part)
        self.seconds_per_part = seconds_per_part
        self.seen = set(seen)
        self.clock = clock
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)
        self.parts: list[Path] = []
        self.rows_written = 0
        self.duplicates = 0
        self._tables: list[Any] = []
        self._buffered = 0
        self._since: float | None = None

    def add(self, table: Any) -> Any:
        """Buffer `table` (pyarrow, with an `id` column) less rows already seen (returned); commit when due."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = table.column("id").to_pylist()
        keep = []
        for item_id in ids:
            fresh = item_id not in self.seen
            keep.append(fresh)
            if fresh:
                self.seen.add(item_id)
        self.duplicates += len(ids) - sum(keep)
        if not all(keep):
            table = pc.filter(table, pa.array(keep, type=pa.bool_()))
        if table.num_rows:
            self._tables.append(table)
            self._buffered += table.num_rows
            if self._since is None:
                self._since = self.clock()
        if self._buffered >= self.rows_per_part or (
            self._since is not None and self.clock() - self._since >= self.seconds_per_part
        ):
            self.flush()
        return table

    def flush(self) -> Path | None:
        """Commit the buffered rows as one part (None when nothing is buffered)."""
        if not self._buffered:
            return None
        import pyarrow as pa

        table = pa.concat_tables(self._tables)
        name = f"{PART_PREFIX}{self.run_id}-{len(self.parts):05d}{FORMATS[self.fmt]}"
        final = self.out / name
        tmp = self.out / f"{TMP_PREFIX}{name}"
        try:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                with tmp.open("wb") as fh:
                    pq.write_table(table, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                with tmp.open("w", encoding="utf-8") as fh:
                    for row in table.to_pylist():
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.out)
        self.parts.append(final)
        self.rows_written += table.num_rows
        self._tables, self._buffered, self._since = [], 0, None
        return final

    def close(self) -> None:
        self.flush()
