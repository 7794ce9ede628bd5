"""Stage-2 data generation (`minigpt4 train make-align-data`, docs/numerics.md §15), torch-free.

Contract: `make_align_data(images, pipeline, polisher, out, options, continue_below=80, progress=None)`:
1. each image is described by `pipeline` (any backend with the `Pipeline` interface) in a fresh chat
   session with `DETAIL_PROMPT`;
2. if the answer has at most `continue_below` generated tokens, the session is asked `Continue` (the
   conversation's multi-turn prompt, e.g. `…###Assistant: {answer}###Human: Continue###Assistant: `) and the
   reply is appended after a space;
3. the text is polished with the paper's fix-up prompt (`polisher`; None keeps the raw text);
4. `filter_reason` drops outputs by rule (apologies, "I made a mistake", refusals, empty or too short);
5. kept images are written as `out/image/{image_id}.jpg` and listed in `out/filter_cap.json`
   (`{"annotations": [{"image_id", "caption"}]}`, the cc_sbu_align format); every image, kept or not, gets
   a line in `out/review.jsonl` (`image_id`, `source`, `raw` = before, `polished` = after, `kept`, `reason`,
   `continued`, `tokens`), and `out/review.md` shows the same side by side for the manual pass (delete
   entries from filter_cap.json to drop them).
Resumable: images whose source path already has a line in review.jsonl are skipped (a polish failure is
retried from its stored raw text, without describing again); filter_cap.json is rewritten atomically from
review.jsonl. Unreadable images are recorded (reason `unreadable`) and never crash the run.
Returns an `AlignSummary` (counts).
The describe stage (steps 1–2) is pluggable: `describe_many(paths)` yields `(path, Description | error
message, image or None)` in any order, each path once; the default, `describe_locally(pipeline, options,
continue_below)`, describes one image after another in this process, and
`minigpt4_local.distributed.describe_for_align` runs the same two turns on a Ray cluster. Polish retries
come first, then the new images in the order their descriptions arrive; each record is appended to
review.jsonl (the commit log) as soon as it is complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from minigpt4_local.errors import ImageError, MiniGPT4Error
from minigpt4_local.image import load_image

DETAIL_PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_PROMPT = "Continue"
CONTINUE_BELOW = 80  # "if the answer is not longer than 80 tokens"
MIN_WORDS = 5
WRITE_EVERY = 20
REVIEW_FILE = "review.jsonl"
REVIEW_MD = "review.md"
CAPTIONS_FILE = "filter_cap.json"
POLISH_FAILED = "polish failed"

# Rule filter (paper §3.2: drop apologies and "I'm sorry, I made a mistake"-style outputs): reason → pattern.
FILTER_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("apology", re.compile(r"\b(sorry|apologi[sz]e|apologies)\b", re.IGNORECASE)),
    ("mistake", re.compile(r"\b(made|make) (a|an) (mistake|error)\b", re.IGNORECASE)),
    (
        "refusal",
        re.compile(r"\b(as an ai|language model|i cannot|i can't|i am unable|i'm unable)\b", re.IGNORECASE),
    ),
    ("no image", re.compile(r"\b(no|not an?) image (is )?(provided|attached|given)\b", re.IGNORECASE)),
)


@dataclass
class ReviewRecord:
    image_id: str
    source: str
    raw: str = ""
    polished: str = ""
    kept: bool = False
    reason: str = ""
    continued: bool = False
    tokens: list[int] = field(default_factory=list)


@dataclass
class AlignSummary:
    total: int = 0
    skipped_done: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    out: str = ""


def filter_reason(text: str) -> str | None:
    """Why a polished description is dropped by rule, or None to keep it."""
    if len(text.split()) < MIN_WORDS:
        return "too short"
    for reason, pattern in FILTER_RULES:
        if pattern.search(text):
            return reason
    return None


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_review(out: Path) -> dict[str, ReviewRecord]:
    """source path → latest record (lines cut by an interruption are ignored)."""
    records: dict[str, ReviewRecord] = {}
    path = out / REVIEW_FILE
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = ReviewRecord(**json.loads(line))
        except (ValueError, TypeError):
            continue
        records[record.source] = record
    return records


def write_outputs(out: Path, records: dict[str, ReviewRecord]) -> None:
    """filter_cap.json (kept records) and review.md from the review records."""
    kept = [r for r in records.values() if r.kept]
    annotations = [{"image_id": r.image_id, "caption": r.polished} for r in kept]
    _atomic_write(
        out / CAPTIONS_FILE, json.dumps({"annotations": annotations}, ensure_ascii=False, indent=1) + "\n"
    )
    lines = ["# Stage-2 data review", "", f"{len(kept)} kept of {len(records)}.", ""]
    for r in records.values():
        status = "kept" if r.kept else f"dropped ({r.reason})"
        lines += [
            f"## {r.image_id} — {status}",
            "",
            f"source: `{r.source}`",
            "",
            "**before**",
            "",
            r.raw or "_(none)_",
            "",
            "**after**",
            "",
            r.polished or "_(none)_",
            "",
        ]
    _atomic_write(out / REVIEW_MD, "\n".join(lines))


_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


def _new_id(path: Path, taken: set[str]) -> str:
    base = _ID_CHARS.sub("_", path.stem).strip("_") or "image"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def describe(pipeline: Any, image: Any, options: Any, continue_below: int) -> tuple[str, bool, list[int]]:
    """(text, continued, generated-token counts) for one image: detailed prompt, then `Continue` if short."""
    session = pipeline.session()
    session.add_image(image)
    first = session.ask(DETAIL_PROMPT, options)
    counts = [len(first.token_ids)]
    if len(first.token_ids) > continue_below:
        return first.text, False, counts
    more = session.ask(CONTINUE_PROMPT, options)
    counts.append(len(more.token_ids))
    return " ".join(t for t in (first.text.strip(), more.text.strip()) if t), True, counts


@dataclass
class Description:
    """What the describe stage gives for one image: the text, whether `Continue` was asked, token counts."""

    raw: str
    continued: bool
    tokens: list[int]


# (path, its Description or the error that kept it from being described, its decoded image if at hand)
Described = tuple[Path, "Description | MiniGPT4Error", Any]
DescribeMany = Callable[[Sequence[Path]], Iterable[Described]]


def describe_locally(pipeline: Any, options: Any, continue_below: int = CONTINUE_BELOW) -> DescribeMany:
    """The describe stage in this process, one image after another (the `DescribeMany` default)."""

    def run(paths: Sequence[Path]) -> Iterator[Described]:
        for path in paths:
            try:
                image = load_image(path)
            except ImageError as exc:
                yield path, exc, None
                continue
            raw, continued, tokens = describe(pipeline, image, options, continue_below)
            yield path, Description(raw, continued, tokens), image

    return run


def _finish(record: ReviewRecord, path: Path, image: Any, polisher: Any, out: Path) -> ReviewRecord:
    """Polish, filter and (when kept) save the image of a described record."""
    try:
        record.polished = polisher.polish(record.raw) if polisher is not None else record.raw.strip()
    except MiniGPT4Error as exc:
        record.reason = f"{POLISH_FAILED}: {exc}"
        return record
    reason = filter_reason(record.polished)
    record.kept, record.reason = reason is None, reason or ""
    if record.kept:
        try:
            image = image if image is not None else load_image(path)
        except ImageError as exc:  # gone or changed since it was described
            record.kept, record.reason = False, f"unreadable: {exc}"
            return record
        target = out / "image" / f"{record.image_id}.jpg"
        tmp = target.with_name(f".{target.name}.tmp")
        image.convert("RGB").save(tmp, format="JPEG", quality=95)
        os.replace(tmp, target)
    return record


def _described(record: ReviewRecord, result: Description | MiniGPT4Error) -> bool:
    """Fill `record` from the describe stage; False when the image could not be described."""
    if isinstance(result, Description):
        record.raw, record.continued, record.tokens = result.raw, result.continued, result.tokens
        return True
    record.reason = (
        f"unreadable: {result}" if isinstance(result, ImageError) else f"describe failed: {result}"
    )
    return False


def make_align_data(
    images: Sequence[str | Path],
    pipeline: Any,
    polisher: Any,
    out: str | Path,
    options: Any,
    continue_below: int = CONTINUE_BELOW,
    progress: Callable[[ReviewRecord], None] | None = None,
    describe_many: DescribeMany | None = None,
) -> AlignSummary:
    """Generate a cc_sbu_align folder from `images` (see module docstring)."""
    out = Path(out)
    (out / "image").mkdir(parents=True, exist_ok=True)
    records = read_review(out)
    taken = {r.image_id for r in records.values()}
    summary = AlignSummary(total=len(images), out=str(out))
    describe_many = describe_many or describe_locally(pipeline, options, continue_below)
    retries: list[tuple[Path, ReviewRecord]] = []
    pending: dict[str, tuple[Path, ReviewRecord]] = {}
    for item in images:
        path = Path(item)
        source = str(path.resolve())
        previous = records.get(source)
        if previous is not None and not previous.reason.startswith(POLISH_FAILED):
            summary.skipped_done += 1
        elif previous is not None:  # a record retried after a polish failure keeps its description
            retries.append((path, previous))
        elif source not in pending:
            pending[source] = (path, ReviewRecord(image_id=_new_id(path, taken), source=source))
    review = (out / REVIEW_FILE).open("a", encoding="utf-8")
    written = 0

    def commit(record: ReviewRecord) -> None:
        nonlocal written
        records[record.source] = record
        review.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        review.flush()
        os.fsync(review.fileno())
        written += 1
        if progress:
            progress(record)
        if written % WRITE_EVERY == 0:
            write_outputs(out, records)

    try:
        for path, record in retries:
            record.reason = ""
            commit(_finish(record, path, None, polisher, out))
        for path, result, image in describe_many([p for p, _ in pending.values()]):
            entry = pending.pop(str(path.resolve()), None)
            if entry is None:  # not asked for, or already committed: each image is recorded once
                continue
            record = entry[1]
            if _described(record, result):
                record = _finish(record, path, image, polisher, out)
            commit(record)
    finally:
        review.close()
        write_outputs(out, records)
    summary.kept = sum(r.kept for r in records.values())
    dropped: dict[str, int] = {}
    for r in records.values():
        if not r.kept:
            key = r.reason.split(":")[0]
            dropped[key] = dropped.get(key, 0) + 1
    summary.dropped = dropped
    return summary
