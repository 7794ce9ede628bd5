"""Procedural shape scenes for the bundled demo model: images, templated captions, labels and scoring.

Contract (numpy + PIL only; never imports torch):
- `make_scene(seed, image_size=224) -> Scene` is a pure function of its arguments: 1–3 flat-coloured
  objects on a 3×3 grid, each in its own cell and strictly inside it (so objects never overlap), on a
  plain / striped / noisy background made only of near-grey colours (channel spread ≤ `BG_MAX_SPREAD`),
  while every palette colour is strongly saturated, so background and objects are never confusable.
  The pixel at each object's `center` is exactly its palette colour (objects are drawn without
  anti-aliasing). Same seed → identical pixels and caption.
- Caption template: "<count> shape(s): a <size> <color> <shape> <at the|in the> <position>, … and …",
  objects in reading order (row-major cells), e.g. "two shapes: a large red circle at the top left and a
  small blue triangle at the bottom right".
- `scene_seeds(split, n)`: seeds for "train" and "heldout" come from disjoint ranges (`SPLIT_RANGES`).
- `write_scene_dataset(out_dir, split, n, image_size=224, fmt="cc_sbu_align") -> Path`: writes
  `image/{seed}.jpg` plus either `filter_cap.json` (the `cc_sbu_align` folder, returned as the data path)
  or `captions.jsonl` (returned), and always `labels.jsonl` (one `Scene.labels()` dict per line).
- `score_description(text, scene) -> dict` and `aggregate(scores) -> dict`: see `score_description`.

Description parsing (what `parse_description` understands):
- Case, hyphens and plurals are normalised ("Top-Left", "circles"). Synonyms (`*_WORDS` tables):
  circle = disc/disk/dot/ball, square = box/rectangle, diamond = rhombus/lozenge, cross (not "plus",
  which is a conjunction); large = big/huge/giant/larger/bigger, small = little/tiny/smaller (medium is
  understood and always wrong); red = crimson/scarlet, yellow = gold/golden, green = emerald,
  blue = navy, purple = violet; other colour words (pink, brown, grey, …) are understood and always
  wrong. Position: top/upper, bottom/lower, left/leftmost, right/rightmost, center/centre/middle/central;
  a missing axis is the centre ("top" = top center, "left" = middle left). "shape/object/item/figure/thing"
  is an object of unknown shape; "<number> shapes|objects|…" states the total count (digits or words).
- Attachment: the text is cut into clauses at . , ; : ! ? and "and"/"but"/"while". Inside a clause, colour
  and size words belong to the next shape word (else the previous one), positions to the previous shape
  word (else the next). A clause without a shape word continues the previous object ("a red circle,
  large, top left") unless that object already has that attribute, then it goes to the next object
  ("at the top left, a red circle, and at the bottom right, a blue triangle"). "the/this/that <shape>"
  refers back to the latest object of that shape. "two red circles" is two red circle objects, which the
  following shape-less clauses fill in order ("…: one at the top left and one at the bottom right"). Colour words right around "background"/"backdrop"
  describe the background and are ignored. Relations ("left of the square") are not understood.
Scoring rule (why listing everything earns nothing): an attribute of a predicted object counts only if
the description gives it exactly one value (several colours for one object → no colour). Predicted
objects are matched one-to-one to the true ones maximising agreement, position first (weight 4 > 1+1+1).
Per attribute, correct = true objects whose match has the right value, minus one per extra predicted
object, floored at 0, divided by the true count: an extra object can gain at most one match per attribute
and always costs one, so padding a description with guesses never raises its score. Count is correct
when the stated total (else the number of predicted objects) equals the true count.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from minigpt4_local.errors import ConfigError

# ----- vocabulary of the scenes -----------------------------------------------------------------------

# Saturated, pairwise far apart (RGB distance ≥ 100) so a small model can tell them apart after JPEG.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "orange": (250, 125, 10),
    "yellow": (240, 225, 30),
    "green": (20, 175, 55),
    "blue": (30, 80, 230),
    "purple": (150, 40, 190),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# Cell (row, col) → position name; the names read naturally in "at the <name>".
POSITIONS: dict[tuple[int, int], str] = {
    (r, c): ("center" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}") for r in range(3) for c in range(3)
}
POSITION_CELLS = {name: cell for cell, name in POSITIONS.items()}
SIZE_RADIUS = {"small": 0.20, "large": 0.38}  # bounding-circle radius, as a fraction of the cell side
CELL_MARGIN = 0.06  # gap kept between an object's bounding circle and its cell edge (fraction of cell)
MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 48
BG_GREYS = (45, 75, 105, 135, 165, 195, 225)
BG_TINTS = ((0, 0, 0), (6, 3, 0), (0, 3, 6))  # warm / cool greys: spread ≤ 6 before noise
BG_NOISE_STD = 10.0  # grey (channel-equal) noise keeps the spread unchanged
BG_MAX_SPREAD = 6  # max(R,G,B) - min(R,G,B) of any background pixel; palette spreads are ≥ 150
BACKGROUNDS = ("plain", "stripes", "noise")
NUMBER_NAMES = {1: "one", 2: "two", 3: "three"}

SPLIT_RANGES: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "heldout": (1_000_000_000, 1_001_000_000),
}
DATASET_FORMATS = ("cc_sbu_align", "jsonl")
JPEG_QUALITY = 95


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str  # a POSITIONS name
    row: int
    col: int
    center: tuple[int, int]  # (x, y) pixel, inside the shape
    radius: float  # bounding-circle radius in pixels
    bbox: tuple[int, int, int, int]  # (left, top, right, bottom), inclusive pixel bounds

    def phrase(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where}"


@dataclass(frozen=True)
class Scene:
    seed: int
    image_size: int
    image: Image.Image = field(compare=False, repr=False)
    caption: str
    objects: tuple[SceneObject, ...]
    background: dict[str, Any]

    def labels(self) -> dict[str, Any]:
        """JSON-ready labels (no pixels)."""
        return {
            "seed": self.seed,
            "image_size": self.image_size,
            "caption": self.caption,
            "background": self.background,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "position": o.position,
                    "row": o.row,
                    "col": o.col,
                    "center": list(o.center),
                    "radius": o.radius,
                    "bbox": list(o.bbox),
                }
                for o in self.objects
            ],
        }


# ----- drawing ----------------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radii: Sequence[float], start_deg: float) -> list[tuple[float, float]]:
    """Points at equal angular steps from `start_deg` (0° = up, clockwise), one per radius."""
    step = 360.0 / len(radii)
    return [
        (
            cx + r * math.sin(math.radians(start_deg + i * step)),
            cy - r * math.cos(math.radians(start_deg + i * step)),
        )
        for i, r in enumerate(radii)
    ]


def _cross(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    a = 0.32 * r  # arm half-width
    pts = [
        (a, r),
        (a, a),
        (r, a),
        (r, -a),
        (a, -a),
        (a, -r),
        (-a, -r),
        (-a, -a),
        (-r, -a),
        (-r, a),
        (-a, a),
        (-a, r),
    ]
    return [(cx + x, cy + y) for x, y in pts]


# shape → polygon points for centre (cx, cy) and bounding radius r (None: drawn as an ellipse). Every
# polygon contains its centre, which is what the labels promise.
SHAPE_POLYGONS = {
    "square": lambda cx, cy, r: _polygon(cx, cy, [r * 1.0] * 4, 45.0),
    "triangle": lambda cx, cy, r: _polygon(cx, cy, [r] * 3, 0.0),
    "star": lambda cx, cy, r: _polygon(cx, cy, [r, 0.45 * r] * 5, 0.0),
    "diamond": lambda cx, cy, r: [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)],
    "cross": _cross,
}


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    cx, cy = obj.center
    fill = PALETTE[obj.color]
    r = obj.radius
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(SHAPE_POLYGONS[obj.shape](cx, cy, r), fill=fill)


def _grey(value: int, tint: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.array([value + t for t in tint], dtype=np.float64), 0, 255)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(size, size, 3) uint8 near-grey background and its description."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    tint = BG_TINTS[int(rng.integers(len(BG_TINTS)))]
    first, second = (int(g) for g in rng.choice(BG_GREYS, size=2, replace=False))
    base = np.broadcast_to(_grey(first, tint), (size, size, 3)).copy()
    info: dict[str, Any] = {"kind": kind, "grey": first, "tint": list(tint)}
    if kind == "stripes":
        period = int(rng.integers(6, 20))
        direction = ("horizontal", "vertical", "diagonal")[int(rng.integers(3))]
        yy, xx = np.mgrid[0:size, 0:size]
        coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[direction]
        band = (coord // period) % 2 == 1  # (size, size)
        base[band] = _grey(second, tint)
        info.update(second_grey=second, period=period, direction=direction)
    elif kind == "noise":
        noise = rng.normal(0.0, BG_NOISE_STD, size=(size, size, 1))  # same offset on R, G, B: stays grey
        base = base + noise
        info.update(noise_std=BG_NOISE_STD)
    return np.clip(np.rint(base), 0, 255).astype(np.uint8), info


def _place(rng: np.random.Generator, cell: int, size_name: str, image_size: int) -> SceneObject:
    row, col = divmod(cell, 3)
    side = image_size / 3
    radius = SIZE_RADIUS[size_name] * side
    slack = max(side / 2 - radius - CELL_MARGIN * side, 0.0)  # how far the centre may move in the cell
    cx = round((col + 0.5) * side + rng.uniform(-slack, slack))
    cy = round((row + 0.5) * side + rng.uniform(-slack, slack))
    bbox = (
        math.floor(cx - radius),
        math.floor(cy - radius),
        math.ceil(cx + radius),
        math.ceil(cy + radius),
    )
    return SceneObject(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=list(PALETTE)[int(rng.integers(len(PALETTE)))],
        size=size_name,
        position=POSITIONS[(row, col)],
        row=row,
        col=col,
        center=(cx, cy),
        radius=radius,
        bbox=bbox,
    )


def caption_for(objects: Sequence[SceneObject]) -> str:
    """The templated caption of objects in reading order (see module docstring)."""
    n = len(objects)
    phrases = [o.phrase() for o in objects]
    listed = phrases[0] if n == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{NUMBER_NAMES[n]} shape{'s' if n > 1 else ''}: {listed}"


def make_scene(seed: int, image_size: int = 224) -> Scene:
    """The scene of `seed` (see module docstring); raises ConfigError for a negative seed or tiny size."""
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"scene seed must be a non-negative integer, got {seed!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"scene image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    rng = np.random.default_rng(seed)
    pixels, background = _background(rng, image_size)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(9, size=count, replace=False))  # reading order
    objects = tuple(_place(rng, cell, SIZES[int(rng.integers(len(SIZES)))], image_size) for cell in cells)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj)
    return Scene(seed, image_size, image, caption_for(objects), objects, background)


# ----- seeds and datasets -----------------------------------------------------------------------------


def scene_seeds(split: str, n: int) -> range:
    """The first `n` seeds of `split` ("train" or "heldout"; the ranges never overlap)."""
    if split not in SPLIT_RANGES:
        raise ConfigError(f"unknown scene split {split!r}; choose one of {', '.join(SPLIT_RANGES)}")
    start, stop = SPLIT_RANGES[split]
    if not 0 <= n <= stop - start:
        raise ConfigError(f"split {split!r} holds {stop - start} scenes; cannot take {n}")
    return range(start, start + n)


def write_scene_dataset(
    out_dir: str | Path, split: str, n: int, image_size: int = 224, fmt: str = "cc_sbu_align"
) -> Path:
    """Write `n` scenes of `split` (see module docstring); returns the data path for the training config."""
    if fmt not in DATASET_FORMATS:
        raise ConfigError(f"unknown scene dataset format {fmt!r}; choose one of {', '.join(DATASET_FORMATS)}")
    root = Path(out_dir)
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations, labels = [], []
    for seed in scene_seeds(split, n):
        scene = make_scene(seed, image_size)
        # 4:4:4 chroma keeps the colour edges of small shapes crisp.
        scene.image.save(root / "image" / f"{seed}.jpg", quality=JPEG_QUALITY, subsampling=0)
        annotations.append({"image_id": str(seed), "caption": scene.caption})
        labels.append({"image_id": str(seed), "split": split, **scene.labels()})
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in labels), encoding="utf-8")
    if fmt == "cc_sbu_align":
        (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}), encoding="utf-8")
        return root
    path = root / "captions.jsonl"
    lines = [
        json.dumps({"image": f"image/{a['image_id']}.jpg", "caption": a["caption"]}) for a in annotations
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ----- parsing descriptions ---------------------------------------------------------------------------

ATTRIBUTES = ("shape", "color", "size", "position")
SHAPE_WORDS = {
    **{s: s for s in SHAPES},
    "disc": "circle",
    "disk": "circle",
    "dot": "circle",
    "ball": "circle",
    "box": "square",
    "rectangle": "square",
    "rhombus": "diamond",
    "lozenge": "diamond",
}
GENERIC_WORDS = {"shape", "object", "item", "figure", "thing"}  # an object of unspecified shape
COLOR_WORDS = {
    **{c: c for c in PALETTE},
    "crimson": "red",
    "scarlet": "red",
    "gold": "yellow",
    "golden": "yellow",
    "emerald": "green",
    "navy": "blue",
    "violet": "purple",
    # Understood but never a palette colour: mentioning them is a wrong colour, not a missing one.
    **{c: c for c in ("pink", "brown", "black", "white", "grey", "gray", "cyan", "teal", "magenta")},
}
SIZE_WORDS = {
    "small": "small",
    "little": "small",
    "tiny": "small",
    "smaller": "small",
    "large": "large",
    "big": "large",
    "huge": "large",
    "giant": "large",
    "larger": "large",
    "bigger": "large",
    "medium": "medium",
}
ROW_WORDS = {"top": 0, "upper": 0, "topmost": 0, "bottom": 2, "lower": 2, "bottommost": 2}
COL_WORDS = {"left": 0, "leftmost": 0, "right": 2, "rightmost": 2}
CENTER_WORDS = {"center", "centre", "middle", "central"}
POSITION_FILLERS = {"the", "of", "hand", "side", "corner", "part", "edge", "area", "region", "half"}
NUMBER_WORDS = {
    **{w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six"), start=0)},
    **{w: i for i, w in enumerate(("seven", "eight", "nine", "ten"), start=7)},
    "single": 1,
}
CLAUSE_BREAKS = {".", ",", ";", ":", "!", "?", "and", "but", "while"}
DEFINITE = {"the", "this", "that"}
BACKGROUND_WORDS = {"background", "backdrop"}
BACKGROUND_WINDOW = 3  # colour words this many tokens around "background" describe it
POSITION_WEIGHT = 4  # > the other three attributes together: matching pairs by position first


def _singular(word: str) -> str:
    for suffix in ("es", "s"):
        stem = word[: -len(suffix)]
        if word.endswith(suffix) and (stem in SHAPE_WORDS or stem in GENERIC_WORDS):
            return stem
    return word


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+|[.,;:!?]", text.lower().replace("-", " ").replace("_", " "))


@dataclass
class _Mention:
    """A predicted object: each attribute is the set of values the description attached to it."""

    values: dict[str, set[str]] = field(default_factory=lambda: {a: set() for a in ATTRIBUTES})

    def value(self, attribute: str) -> str | None:
        found = self.values[attribute]
        return next(iter(found)) if len(found) == 1 else None  # zero or conflicting values: no answer


def _is_position_word(token: str) -> bool:
    return token in ROW_WORDS or token in COL_WORDS or token in CENTER_WORDS


def _position_phrases(tokens: Sequence[str]) -> list[tuple[int, str | None]]:
    """(token index, position name or None if contradictory) for each run of position words."""
    found, i = [], 0
    while i < len(tokens):
        if not _is_position_word(tokens[i]):
            i += 1
            continue
        start, words = i, []
        while i < len(tokens) and (_is_position_word(tokens[i]) or tokens[i] in POSITION_FILLERS):
            if _is_position_word(tokens[i]):
                words.append(tokens[i])
            i += 1
        rows = {ROW_WORDS[w] for w in words if w in ROW_WORDS}
        cols = {COL_WORDS[w] for w in words if w in COL_WORDS}
        if len(rows) > 1 or len(cols) > 1:
            found.append((start, None))
            continue
        # A centre word fills whichever axis the other words leave open ("top center", "middle left").
        cell = (rows.pop() if rows else 1, cols.pop() if cols else 1)
        found.append((start, POSITIONS[cell]))
    return found


def _background_tokens(tokens: Sequence[str]) -> set[int]:
    hits = [i for i, t in enumerate(tokens) if t in BACKGROUND_WORDS]
    return {j for i in hits for j in range(i - BACKGROUND_WINDOW, i + BACKGROUND_WINDOW + 1)}


def _clauses(tokens: Sequence[str]) -> list[list[int]]:
    clauses: list[list[int]] = [[]]
    for i, tok in enumerate(tokens):
        if tok in CLAUSE_BREAKS:
            clauses.append([])
        else:
            clauses[-1].append(i)
    return [c for c in clauses if c]


def _number_before(tokens: Sequence[str], i: int) -> int | None:
    """The number word/digit before token i, skipping colour and size adjectives ("two red circles")."""
    j = i - 1
    while j >= 0 and (tokens[j] in COLOR_WORDS or tokens[j] in SIZE_WORDS):
        j -= 1
    if j < 0:
        return None
    tok = tokens[j]
    return int(tok) if tok.isdigit() else NUMBER_WORDS.get(tok)


def _is_definite(tokens: Sequence[str], i: int) -> bool:
    j = i - 1
    while j >= 0 and (tokens[j] in COLOR_WORDS or tokens[j] in SIZE_WORDS):
        j -= 1
    return j >= 0 and tokens[j] in DEFINITE


@dataclass
class ParsedDescription:
    objects: list[_Mention]
    stated_count: int | None  # the total the text states ("two shapes"), None if absent or contradictory

    @property
    def count(self) -> int:
        return self.stated_count if self.stated_count is not None else len(self.objects)


def parse_description(text: str) -> ParsedDescription:
    """Free text → predicted objects and stated count (rules in the module docstring)."""
    tokens = _tokens(text)
    ignored = _background_tokens(tokens)
    positions = dict(_position_phrases(tokens))
    totals: set[int] = set()
    anchors: dict[int, list[int]] = {}  # token index → indices of the objects it introduces
    objects: list[_Mention] = []
    for i, tok in enumerate(tokens):
        word = _singular(tok)
        plural = word != tok
        if word not in SHAPE_WORDS and word not in GENERIC_WORDS:
            continue
        number = _number_before(tokens, i)
        if word in GENERIC_WORDS and number is not None:
            totals.add(number)  # "two shapes": a total, not an object
            continue
        if word in GENERIC_WORDS and plural:
            continue
        if _is_definite(tokens, i) and not plural:
            earlier = [k for k, m in enumerate(objects) if m.values["shape"] == {SHAPE_WORDS.get(word, "")}]
            if earlier:
                anchors[i] = [earlier[-1]]
                continue
        copies = (number or 2) if plural else 1
        anchors[i] = list(range(len(objects), len(objects) + copies))
        for _ in range(copies):
            mention = _Mention()
            if word in SHAPE_WORDS:
                mention.values["shape"].add(SHAPE_WORDS[word])
            objects.append(mention)
    stated = next(iter(totals)) if len(totals) == 1 else None
    _attach(tokens, ignored, positions, anchors, objects)
    return ParsedDescription(objects, stated)


def _attributes_of(
    i: int, tok: str, ignored: set[int], positions: dict[int, str | None]
) -> tuple[str, str] | None:
    if i in positions:
        return "position", positions[i] or "?"  # "?" = contradictory phrase: never correct
    if tok in COLOR_WORDS and i not in ignored:
        return "color", COLOR_WORDS[tok]
    if tok in SIZE_WORDS:
        return "size", SIZE_WORDS[tok]
    return None


def _attach(
    tokens: Sequence[str],
    ignored: set[int],
    positions: dict[int, str | None],
    anchors: dict[int, list[int]],
    objects: list[_Mention],
) -> None:
    """Give every colour/size/position mention to an object (rules in the module docstring)."""
    orphans: list[
        tuple[list[int], int | None, str, str]
    ] = []  # (previous group, next object, attribute, value)
    last_group: list[int] = []  # the objects of the latest shape word ("two circles": two objects)
    clause_list = _clauses(tokens)
    for ci, clause in enumerate(clause_list):
        here = [i for i in clause if i in anchors]
        for i in clause:
            found = _attributes_of(i, tokens[i], ignored, positions)
            if found is None:
                continue
            attribute, value = found
            before = [a for a in here if a < i]
            after = [a for a in here if a > i]
            # Adjectives precede their noun; positions follow it ("a red circle at the top left").
            order = (before[::-1] + after) if attribute == "position" else (after + before[::-1])
            if order:
                for k in anchors[order[0]]:
                    objects[k].values[attribute].add(value)
            else:
                nxt = next((anchors[a][0] for c in clause_list[ci + 1 :] for a in c if a in anchors), None)
                orphans.append((last_group, nxt, attribute, value))
        if here:
            last_group = anchors[here[-1]]
    for group, nxt, attribute, value in orphans:
        open_slot = next((k for k in group if not objects[k].values[attribute]), None)
        fallback = nxt if nxt is not None else (group[-1] if group else None)
        target = open_slot if open_slot is not None else fallback
        if target is not None:
            objects[target].values[attribute].add(value)


# ----- scoring ----------------------------------------------------------------------------------------


def _true_values(obj: SceneObject) -> dict[str, str]:
    return {"shape": obj.shape, "color": obj.color, "size": obj.size, "position": obj.position}


def _agreement(pred: _Mention, true: dict[str, str]) -> int:
    weights = {"position": POSITION_WEIGHT, "shape": 1, "color": 1, "size": 1}
    return sum(w for a, w in weights.items() if pred.value(a) == true[a])


def _match(preds: Sequence[_Mention], truths: Sequence[dict[str, str]]) -> list[int | None]:
    """For each true object the index of its predicted object (or None), maximising total agreement.

    An optimal matching only ever uses each true object's top-len(truths) candidates (if its partner were
    outside them, one of them is free and no worse), so the search stays tiny even for long lists."""
    k = len(truths)
    slots: list[list[int | None]] = []
    for true in truths:
        ranked = sorted(range(len(preds)), key=lambda p: (-_agreement(preds[p], true), p))
        slots.append([*ranked[:k], None])
    best: tuple[int, list[int | None]] = (-1, [None] * k)
    for choice in itertools.product(*slots):
        used = [c for c in choice if c is not None]
        if len(used) != len(set(used)):
            continue
        total = sum(_agreement(preds[c], t) for c, t in zip(choice, truths, strict=True) if c is not None)
        if total > best[0]:
            best = (total, list(choice))
    return best[1]


def score_description(text: str, scene: Scene) -> dict[str, Any]:
    """Per-attribute correctness of a free-text description of `scene`.

    Returns {"shape"|"color"|"size"|"position": fraction in [0, 1] (rule in the module docstring),
    "count": bool, "correct": {attribute: effective number of correct objects (after the extra-object
    penalty)}, "n_true", "n_predicted", "stated_count", "objects": [per true object {attribute: bool}]}."""
    parsed = parse_description(text)
    truths = [_true_values(o) for o in scene.objects]
    matched = _match(parsed.objects, truths)
    per_object = [
        {a: p is not None and parsed.objects[p].value(a) == t[a] for a in ATTRIBUTES}
        for p, t in zip(matched, truths, strict=True)
    ]
    extra = max(len(parsed.objects) - len(truths), 0)
    correct = {a: max(sum(o[a] for o in per_object) - extra, 0) for a in ATTRIBUTES}
    return {
        **{a: correct[a] / len(truths) for a in ATTRIBUTES},
        "count": parsed.count == len(truths),
        "correct": correct,
        "n_true": len(truths),
        "n_predicted": len(parsed.objects),
        "stated_count": parsed.stated_count,
        "objects": per_object,
    }


def aggregate(scores: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Accuracy over scenes: per object attribute (correct objects / true objects, pooled), count (share of
    scenes) and "overall" = all correct (object, attribute) pairs plus correct counts over all of them."""
    scores = list(scores)
    if not scores:
        raise ConfigError("cannot aggregate zero scene scores")
    n_objects = sum(s["n_true"] for s in scores)
    result = {a: sum(s["correct"][a] for s in scores) / n_objects for a in ATTRIBUTES}
    count_right = sum(bool(s["count"]) for s in scores)
    result["count"] = count_right / len(scores)
    total_right = sum(sum(s["correct"].values()) for s in scores) + count_right
    result["overall"] = total_right / (len(ATTRIBUTES) * n_objects + len(scores))
    result["scenes"] = float(len(scores))
    return result
