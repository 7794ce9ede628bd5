"""Training data: webdataset shard splitting, mixing, shuffling, corrupt-record counting and exact resume;
cc_sbu_align / JSONL readers; the distributed batch sampler."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minigpt4_local.config import CLIP_MEAN, CLIP_STD
from minigpt4_local.errors import ConfigError
from minigpt4_local.train.data import (
    DataError,
    DistributedBatchSampler,
    ImageSpec,
    Stage1Decoder,
    StreamingData,
    StreamSource,
    _shard_cycle,
    expand_shards,
    random_crop_box,
    read_cc_sbu_align,
    read_jsonl,
)
from tests.support.train_data import CAPTIONS, write_cc_sbu_align, write_jsonl, write_wds_shards

SPEC = ImageSpec(56, CLIP_MEAN, CLIP_STD, "none")


def decoder(**kw) -> Stage1Decoder:
    return Stage1Decoder(kw.pop("image", SPEC), kw.pop("caption_processor", True), 50, 42)


def stream(sources, rank=0, world=1, workers=0, batch=4, state=None, buffer=8) -> StreamingData:
    return StreamingData(
        sources, decoder(), batch, rank, world, workers, seed=42, buffer=buffer, initial=4, state=state
    )


def take(data: StreamingData, n: int) -> list[dict]:
    return [data.next_batch() for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_wds_shards(
        tmp_path_factory.mktemp("wds"), shards=4, per_shard=6, corrupt={"00100002", "00200004"}
    )


def test_expand_shards(shards: list[Path]) -> None:
    folder = shards[0].parent
    assert expand_shards(f"{folder}/shard-{{000..003}}.tar") == [str(s) for s in shards]
    assert expand_shards(f"{folder}/shard-00[01].tar,{shards[3]}") == [
        str(shards[0]),
        str(shards[1]),
        str(shards[3]),
    ]
    with pytest.raises(ConfigError, match="shard not found"):
        expand_shards(f"{folder}/shard-{{000..009}}.tar")


def test_shards_split_disjointly_over_ranks_and_workers() -> None:
    source = StreamSource("s", tuple(f"{i}.tar" for i in range(10)), 1.0)
    n_global = 4  # 2 ranks x 2 workers
    for pass_index in range(2):
        seen = []
        for g in range(n_global):
            cycle = _shard_cycle(source, 0, 42, g, n_global)
            per_pass = len(source.shards[g::n_global])
            passes = [[next(cycle) for _ in range(per_pass)] for _ in range(2)]
            seen += passes[pass_index]
        assert sorted(seen) == sorted(source.shards)  # every shard once per pass, no overlap


def test_stream_reads_all_samples_skips_and_counts_corrupt(shards: list[Path]) -> None:
    source = StreamSource("toy", tuple(str(s) for s in shards), 1.0)
    data = stream([source], batch=2)
    batches = take(data, 40)  # ~3.6 passes: the shuffle buffer runs across pass boundaries
    keys = [k for b in batches for k in b["keys"]]
    assert len(set(keys)) == 22 and not {"00100002", "00200004"} & set(keys)  # 24 minus the 2 corrupt
    assert data.skipped["image"] >= 6 and set(data.skipped) == {"image"}  # counted on every pass
    first = batches[0]
    assert first["pixels"].shape == (2, 3, 56, 56) and first["features"] is None
    assert all(
        t[0][0] is None and t[0][1] in {c.lower().rstrip(".!") for c in CAPTIONS.values()}
        for b in batches
        for t in b["turns"]
    )
    # The shuffle buffer mixes samples: the stream is not the tar order.
    assert keys != sorted(keys)


def test_caption_records_without_caption_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "bad.tar"
    good = write_wds_shards(tmp_path / "g", 1, 3)[0]
    with tarfile.open(good) as src, tarfile.open(path, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                data = b"{not json"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    data = stream([StreamSource("bad", (str(path),), 1.0)], batch=1, buffer=2)
    keys = [data.next_batch()["keys"][0] for _ in range(3)]
    assert set(keys) == {"00000002"}  # the only sample with a usable caption (.txt)
    assert data.skipped["caption"] >= 2


def test_sources_mixed_by_ratio(tmp_path: Path) -> None:
    a = write_wds_shards(tmp_path / "a", 2, 3, seed=1)
    b = write_wds_shards(tmp_path / "b", 2, 3, seed=2)
    sources = [StreamSource("a", tuple(map(str, a)), 3.0), StreamSource("b", tuple(map(str, b)), 1.0)]
    data = stream(sources, batch=1, buffer=2)
    counts = Counter(data.next_batch()["source"] for _ in range(200))
    assert 0.65 < counts["a"] / 200 < 0.85  # expected 0.75, binomial sd 0.03


def test_ranks_read_disjoint_shards(shards: list[Path]) -> None:
    source = StreamSource("toy", tuple(str(s) for s in shards), 1.0)
    keys = []
    for rank in range(2):
        data = stream([source], rank=rank, world=2, batch=1, buffer=2)
        keys.append({k for b in take(data, 5) for k in b["keys"]})  # within this rank's first pass (2 shards)
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    shard_of = [{k[:3] for k in ks} for ks in keys]
    assert not shard_of[0] & shard_of[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly(shards: list[Path], workers: int) -> None:
    source = StreamSource("toy", tuple(str(s) for s in shards), 1.0)
    full = stream([source], workers=workers, batch=3)
    first = take(full, 5)
    state = json.loads(json.dumps(full.state_dict()))  # survives serialisation
    rest = take(full, 6)
    resumed = stream([source], workers=workers, batch=3, state=state)
    again = take(resumed, 6)
    assert [b["keys"] for b in rest] == [b["keys"] for b in again]
    for x, y in zip(rest, again, strict=True):
        assert np.array_equal(x["pixels"].numpy(), y["pixels"].numpy())
    assert resumed.skipped == full.skipped
    assert len(first) == 5


def test_stream_restarts_when_world_changes(shards: list[Path]) -> None:
    source = StreamSource("toy", tuple(str(s) for s in shards), 1.0)
    data = stream([source], batch=2)
    take(data, 2)
    other = StreamingData([source], decoder(), 2, 0, 2, 0, 42, 8, 4, state=data.state_dict(), restart_salt=5)
    assert other.restarted and other.next_batch()["size"] == 2


def test_too_few_shards_for_workers(shards: list[Path]) -> None:
    source = StreamSource("toy", tuple(str(s) for s in shards[:2]), 1.0)
    with pytest.raises(DataError, match="2 shard"):
        stream([source], world=2, workers=2)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_source_raises_instead_of_spinning(tmp_path: Path, workers: int) -> None:
    bad = tmp_path / "zero.tar"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(DataError) as err:
        stream([StreamSource("bad", (str(bad),), 1.0)], batch=1, workers=workers).next_batch()
    assert (
        str(err.value) == "source bad: none of its shards holds a readable sample"
    )  # one line, even from a worker


def test_random_crop_box_stays_inside() -> None:
    import random

    rng = random.Random(0)
    for w, h in [(40, 40), (300, 50), (10, 200)]:
        for _ in range(50):
            left, top, right, bottom = random_crop_box(w, h, rng, (0.5, 1.0))
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
            area = (right - left) * (bottom - top) / (w * h)
            assert area <= 1.0


# ----- stage 2 --------------------------------------------------------------------------------------------


def test_read_cc_sbu_align(tmp_path: Path) -> None:
    folder = write_cc_sbu_align(tmp_path / "cc", 5)
    index = json.loads((folder / "filter_cap.json").read_text())
    index["annotations"].append({"caption": "no id"})
    (folder / "filter_cap.json").write_text(json.dumps(index))
    records, counts = read_cc_sbu_align(folder)
    assert len(records) == 5 and counts == {"record": 1}
    assert records[2].image == str(folder / "image" / "2.jpg")
    assert records[2].turns == [(None, index["annotations"][2]["caption"])]
    with pytest.raises(ConfigError, match=r"filter_cap\.json"):
        read_cc_sbu_align(tmp_path)


def test_read_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", 4)
    with path.open("a") as fh:
        fh.write(
            "{broken\n"
            + json.dumps({"image": "x.png", "conversations": [{"from": "gpt", "value": "a"}]})
            + "\n"
        )
    records, counts = read_jsonl(path)
    assert len(records) == 4 and counts == {"record": 2}
    assert records[0].turns[0][0] is None
    assert records[1].turns[0][0] == "<Img><ImageHere></Img> What is in the picture?"
    assert records[1].image == str(tmp_path / "jsonl_images" / "img1.png")  # relative to the JSONL file


def test_batch_sampler_ranks_form_the_global_batch() -> None:
    n, batch = 24, 3
    single = DistributedBatchSampler(n, batch * 2, 0, 1, seed=7)
    ranks = [DistributedBatchSampler(n, batch, r, 2, seed=7) for r in range(2)]
    its = [iter(single), *(iter(r) for r in ranks)]
    for _ in range(10):  # crosses pass boundaries (4 global batches per pass)
        whole = next(its[0])
        parts = next(its[1]) + next(its[2])
        assert sorted(whole) == sorted(parts)
    resumed = iter(DistributedBatchSampler(n, batch, 1, 2, seed=7, start_batch=10))
    assert next(resumed) == next(its[2])
    with pytest.raises(DataError, match="too few"):
        DistributedBatchSampler(3, 4, 0, 1, seed=0)
