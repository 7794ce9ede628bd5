"""Procedural demo scenes: determinism, labels vs caption vs pixels, splits, dataset writer, scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minigpt4_local.errors import ConfigError
from minigpt4_local.train.demo.scenes import (
    BG_MAX_SPREAD,
    PALETTE,
    POSITIONS,
    SHAPES,
    SPLIT_RANGES,
    aggregate,
    make_scene,
    parse_description,
    scene_seeds,
    score_description,
    write_scene_dataset,
)

ATTRS = ("shape", "color", "size", "position")


def _pixels(seed: int, size: int = 224) -> np.ndarray:
    return np.asarray(make_scene(seed, size).image, dtype=np.int16)  # (S, S, 3)


def test_module_is_torch_free() -> None:
    code = "import sys, minigpt4_local.train.demo.scenes; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_same_seed_same_scene_different_seeds_differ() -> None:
    a, b = make_scene(7), make_scene(7)
    assert a.caption == b.caption and a.labels() == b.labels()
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    others = [make_scene(s) for s in range(8, 28)]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(o.image)) for o in others)
    assert len({o.caption for o in others}) >= 18  # 6 shapes × 6 colours × … : captions rarely repeat


def test_scene_invariants_over_many_seeds() -> None:
    counts, kinds = set(), set()
    for seed in range(200):
        scene = make_scene(seed)
        cells = [(o.row, o.col) for o in scene.objects]
        assert 1 <= len(cells) <= 3 and len(set(cells)) == len(cells)
        assert cells == sorted(cells)  # reading order, as the caption lists them
        counts.add(len(cells))
        kinds.add(scene.background["kind"])
    assert counts == {1, 2, 3} and kinds == {"plain", "stripes", "noise"}


def test_caption_parses_back_to_the_labels() -> None:
    scores = [score_description(make_scene(s).caption, make_scene(s)) for s in range(200)]
    result = aggregate(scores)
    assert all(result[a] == 1.0 for a in (*ATTRS, "count", "overall")), result


@pytest.mark.parametrize("size", [224, 96])
def test_labels_agree_with_pixels(size: int) -> None:
    side = size / 3
    for seed in range(40):
        scene = make_scene(seed, size)
        px = np.asarray(scene.image, dtype=np.int16)  # (S, S, 3)
        covered = np.zeros(px.shape[:2], dtype=bool)
        for obj in scene.objects:
            x, y = obj.center
            assert tuple(px[y, x]) == PALETTE[obj.color], (seed, obj)
            # The object's own pixels (exact palette colour inside its cell) must stay inside that cell.
            y0, y1 = round(obj.row * side), round((obj.row + 1) * side)
            x0, x1 = round(obj.col * side), round((obj.col + 1) * side)
            mask = np.all(px == PALETTE[obj.color], axis=-1)
            ys, xs = np.nonzero(mask[y0:y1, x0:x1])
            assert ys.min() > 0 and xs.min() > 0 and ys.max() < y1 - y0 - 1 and xs.max() < x1 - x0 - 1
            extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            # large: bounding radius 0.38 cell (extent ≥ 1.4 r); small: 0.20 cell (extent ≤ 2 r + 1)
            assert extent >= 0.52 * side if obj.size == "large" else extent <= 0.41 * side + 1, (seed, obj)
            covered[y0:y1, x0:x1] = True
        # No palette colour anywhere outside the objects' cells; the background stays near-grey.
        background = px[~covered]
        assert (background.max(-1) - background.min(-1)).max() <= BG_MAX_SPREAD
        for rgb in PALETTE.values():
            assert not np.any(np.all(background == rgb, axis=-1))


def test_palette_and_background_are_not_confusable() -> None:
    colours = np.array(list(PALETTE.values()), dtype=float)
    dists = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert dists[~np.eye(len(colours), dtype=bool)].min() >= 100
    assert (colours.max(-1) - colours.min(-1)).min() >= 150  # every palette colour is saturated
    # Distance to the nearest grey (r = g = b): backgrounds stay within BG_MAX_SPREAD of that line.
    to_grey = np.linalg.norm(colours - colours.mean(-1, keepdims=True), axis=-1)
    assert to_grey.min() >= 100


def test_splits_are_disjoint() -> None:
    train, held = scene_seeds("train", 5000), scene_seeds("heldout", 5000)
    assert not set(train) & set(held) and len(set(train)) == 5000
    (t0, t1), (h0, h1) = SPLIT_RANGES["train"], SPLIT_RANGES["heldout"]
    assert t1 <= h0 or h1 <= t0  # the whole ranges, not only the first n, never overlap
    with pytest.raises(ConfigError, match="split"):
        scene_seeds("test", 3)
    with pytest.raises(ConfigError, match="cannot take"):
        scene_seeds("heldout", h1 - h0 + 1)
    with pytest.raises(ConfigError, match="seed"):
        make_scene(-1)


def test_written_cc_sbu_align_folder_is_readable(tmp_path: Path) -> None:
    from minigpt4_local.config import CLIP_MEAN, CLIP_STD
    from minigpt4_local.train.data import ImageSpec, IndexedData, RecordDataset, read_cc_sbu_align

    folder = write_scene_dataset(tmp_path / "cc", "heldout", 6, image_size=64)
    records, skipped = read_cc_sbu_align(folder)
    assert len(records) == 6 and not skipped
    labels = [json.loads(x) for x in (folder / "labels.jsonl").read_text().splitlines()]
    seeds = list(scene_seeds("heldout", 6))
    assert [x["seed"] for x in labels] == seeds
    for record, label, seed in zip(records, labels, seeds, strict=True):
        assert (
            record.turns == [(None, make_scene(seed, 64).caption)] and label["caption"] == record.turns[0][1]
        )
        assert Path(record.image).name == f"{seed}.jpg"
    data = IndexedData(RecordDataset(records, ImageSpec(32, CLIP_MEAN, CLIP_STD), seed=0), 3, 0, 1, 0, seed=0)
    batch = data.next_batch()
    assert batch["size"] == 3 and tuple(batch["pixels"].shape) == (3, 3, 32, 32) and not data.skipped
    # JPEG at quality 95 keeps the centre colour of every object close to its palette colour.
    from PIL import Image

    for label in labels:
        image = np.asarray(Image.open(folder / "image" / f"{label['seed']}.jpg"), dtype=float)
        for obj in label["objects"]:
            x, y = obj["center"]
            assert np.abs(image[y, x] - PALETTE[obj["color"]]).max() <= 40


def test_written_jsonl_is_readable(tmp_path: Path) -> None:
    from minigpt4_local.train.data import read_jsonl

    path = write_scene_dataset(tmp_path / "js", "train", 4, image_size=48, fmt="jsonl")
    records, skipped = read_jsonl(path)
    assert len(records) == 4 and not skipped
    assert all(Path(r.image).is_file() for r in records)
    assert records[1].turns == [(None, make_scene(1, 48).caption)]
    assert (path.parent / "labels.jsonl").is_file()
    with pytest.raises(ConfigError, match="format"):
        write_scene_dataset(tmp_path / "x", "train", 1, fmt="tar")


# ----- scoring ----------------------------------------------------------------------------------------


def _scene_with(n: int):
    return next(make_scene(s) for s in range(1000) if len(make_scene(s).objects) == n)


def test_one_wrong_colour_is_exactly_that_attribute_wrong() -> None:
    scene = _scene_with(2)
    first = scene.objects[0]
    wrong = next(c for c in PALETTE if c != first.color)
    text = scene.caption.replace(
        f"{first.size} {first.color} {first.shape}", f"{first.size} {wrong} {first.shape}", 1
    )
    score = score_description(text, scene)
    assert score["color"] == 0.5 and score["objects"][0]["color"] is False
    assert all(score[a] == 1.0 for a in ("shape", "size", "position")) and score["count"]


def test_parsing_is_robust_to_order_synonyms_and_layout() -> None:
    scene = _scene_with(2)
    a, b = scene.objects
    variants = [
        f"A {a.color} {a.shape}, {a.size}, {a.position}. Also a {b.color} {b.shape}, {b.size}, {b.position}.",
        f"In the {a.position} there is a {a.size} {a.color} {a.shape}; in the {b.position} a {b.size} {b.color} {b.shape}.",
        f"At the {a.position}, a {a.size} {a.color} {a.shape}, and at the {b.position}, a {b.size} {b.color} {b.shape}.",
        f"I see 2 objects. The {b.shape} at the {b.position} is {b.color} and {b.size}; "
        f"the {a.shape} at the {a.position} is {a.size} and {a.color}.",
        f"{b.size.upper()} {b.color.upper()} {b.shape.upper()} ({b.position.replace(' ', '-')}) "
        f"and {a.size} {a.color} {a.shape} ({a.position.replace(' ', '-')}) on a grey striped background",
    ]
    for text in variants:
        score = score_description(text, scene)
        assert all(score[x] == 1.0 for x in ATTRS) and score["count"], (text, score)


def test_synonyms_and_position_defaults() -> None:
    parsed = parse_description(
        "a big crimson disc in the upper-left corner, a tiny violet rhombus on the right"
    )
    values = [{k: m.value(k) for k in ATTRS} for m in parsed.objects]
    assert values == [
        {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
        {"shape": "diamond", "color": "purple", "size": "small", "position": "middle right"},
    ]
    assert parse_description("three shapes: two red circles and a star").count == 3
    assert parse_description("a red dot at the top").objects[0].value("position") == "top center"
    plural = parse_description("Two red circles: one at the top left and one at the bottom right.")
    assert [(m.value("color"), m.value("position")) for m in plural.objects] == [
        ("red", "top left"),
        ("red", "bottom right"),
    ]
    assert {POSITIONS[(1, 1)]} == {parse_description("a star in the middle").objects[0].value("position")}


def test_listing_every_value_earns_nothing() -> None:
    colours, shapes = list(PALETTE), list(SHAPES)
    for n in (1, 2, 3):
        scene = _scene_with(n)
        # One object said to be every colour / every shape / everywhere: those attributes are unanswered.
        o = scene.objects[0]
        text = f"a {o.size} {' '.join(colours)} {o.shape} at the {o.position}"
        assert score_description(text, scene)["color"] == 0.0
        everywhere = ", ".join(f"at the {p}" for p in POSITIONS.values())
        assert score_description(f"a {o.color} {o.shape} {everywhere}", scene)["position"] == 0.0
        # A laundry list of objects: one per colour (each with a different shape), or every combination.
        lists = [
            " and ".join(f"a {c} {s}" for c, s in zip(colours, shapes, strict=True)),
            ", ".join(f"a {o.size} {c} {s} at the {o.position}" for c in colours for s in shapes),
        ]
        for text in lists:
            score = score_description(text, scene)
            assert all(score[a] == 0.0 for a in ATTRS) and not score["count"], (n, text, score)


def test_extra_objects_cost_what_they_could_gain() -> None:
    scene = _scene_with(1)
    o = scene.objects[0]
    perfect = scene.caption.split(": ", 1)[1]
    other = next(c for c in PALETTE if c != o.color)
    # The right object plus one hallucinated one: every attribute's credit drops to zero for a 1-object scene.
    score = score_description(f"{perfect} and a {o.size} {other} {o.shape} at the {o.position}", scene)
    assert score["color"] == 0.0 and score["n_predicted"] == 2
    # Missing objects count as wrong: describing 1 of 3 objects perfectly scores 1/3.
    three = _scene_with(3)
    part = three.caption.split(": ", 1)[1].split(", ")[0]
    assert score_description(part, three)["shape"] == pytest.approx(1 / 3)


def test_aggregate() -> None:
    one, three = _scene_with(1), _scene_with(3)
    scores = [score_description(one.caption, one), score_description("nothing here", three)]
    result = aggregate(scores)
    assert result["shape"] == pytest.approx(1 / 4) and result["count"] == 0.5
    assert result["overall"] == pytest.approx((4 + 1) / (4 * 4 + 2))
    with pytest.raises(ConfigError):
        aggregate([])
