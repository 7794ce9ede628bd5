"""Training logs: a JSONL line per optimizer step, console lines, and a progress bar (rank 0 only).

Contract:
- `Reporter(log_path, total_steps, start_step, log_every, progress, echo)`: `step(record)` appends the
  record (`step`, `epoch`, `loss`, `lr`, `samples_per_s`, `skipped`, …) to `log_path` as one JSON line
  (flushed), advances the bar, and every `log_every` steps prints a one-line summary through `echo`.
  On a terminal (and `progress=True`) a rich progress bar on stderr shows step, loss, lr and samples/s;
  elsewhere only the periodic lines are printed. `close()` stops the bar.
- `truncate_log(log_path, keep_through)` drops entries after step `keep_through` (used on resume, so the
  log reads like one uninterrupted run). `read_log(path)` returns the records.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_log(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: that step is redone after the resume
    return records


def truncate_log(path: str | Path, keep_through: int) -> None:
    path = Path(path)
    kept = [r for r in read_log(path) if isinstance(r.get("step"), int) and r["step"] <= keep_through]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


class Reporter:
    def __init__(
        self,
        log_path: str | Path,
        total_steps: int,
        start_step: int,
        log_every: int,
        progress: bool,
        echo: Callable[[str], None],
    ) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.log_path.open("a", encoding="utf-8")
        self.total = total_steps
        self.log_every = log_every
        self.echo = echo
        self._bar = None
        if progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()

    @staticmethod
    def summary(record: dict[str, Any]) -> str:
        skipped = sum(record.get("skipped", {}).values())
        return (
            f"step {record['step']} epoch {record['epoch']} loss {record['loss']:.4f} lr {record['lr']:.3e} "
            f"{record['samples_per_s']:.1f} samples/s" + (f" skipped {skipped}" if skipped else "")
        )

    def step(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._bar is not None:
            info = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['samples_per_s']:.1f}/s"
            self._bar.update(self._task, completed=record["step"], info=info)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total:
            self.echo(self.summary(record))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._fh.close()
