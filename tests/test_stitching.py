"""Stitch plans: per-segment tokenization, positions, left truncation, and materialisation (numpy + torch).

The truncation reference is the original's tensor slice `embs[-max_length:]` of the full sequence.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from minigpt4_local.errors import PromptError
from minigpt4_local.prompts import Conversation
from minigpt4_local.stitching import IMAGE_PLACEHOLDER, ImagePart, TextPart, build_plan, stitch, truncate_left
from minigpt4_local.tokenizer import load_tokenizer
from tests.support.tiny_tokenizer import make_tiny_sentencepiece

REPO = Path(__file__).resolve().parents[1]
N_IMG = 4  # image rows per image in these tests
HIDDEN = 8


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def raw_sp(sp_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(sp_dir: Path):
    return load_tokenizer(sp_dir)


def _prompt(template: str, images: int = 1) -> str:
    conv = Conversation(template)
    for _ in range(images):
        conv.add_image()
    conv.ask("Describe this image in detail.")
    return conv.prompt()


def test_placeholder() -> None:
    assert IMAGE_PLACEHOLDER == "<ImageHere>"


# ----- plans ---------------------------------------------------------------------------------------
def test_vicuna_plan_segments(tok, raw_sp: spm.SentencePieceProcessor) -> None:
    prompt = _prompt("vicuna_v0")
    head, tail = prompt.split("<ImageHere>")
    plan = build_plan(prompt, tok, N_IMG)
    first, second = raw_sp.encode(head), raw_sp.encode(tail)  # independent per-segment reference
    assert plan.parts == (TextPart((1, *first)), ImagePart(0, 0, N_IMG), TextPart(tuple(second)))
    # Every segment carries the dummy prefix: "</Img> Describe…" starts with a "▁" piece.
    assert raw_sp.id_to_piece(second[0]).startswith("▁")
    assert plan.token_ids().count(1) == 1  # BOS only on the first segment
    assert plan.total_length == 1 + len(first) + N_IMG + len(second)
    assert plan.positions == (1 + len(first),)
    assert plan.num_images == 1


def test_llama2_plan_has_two_bos(tok, raw_sp: spm.SentencePieceProcessor) -> None:
    prompt = _prompt("llama2")
    plan = build_plan(prompt, tok, N_IMG)
    head = prompt.split("<ImageHere>")[0]
    system, rest = head.split("<s>")
    expected_first = (1, *raw_sp.encode(system), 1, *raw_sp.encode(rest))
    assert plan.parts[0] == TextPart(expected_first)
    assert plan.token_ids().count(1) == 2  # add_bos + the literal `<s>`
    assert raw_sp.id_to_piece(expected_first[len(raw_sp.encode(system)) + 2]).startswith("▁")


def test_two_image_positions(tok, raw_sp: spm.SentencePieceProcessor) -> None:
    prompt = _prompt("vicuna_v0", images=2)
    segs = prompt.split("<ImageHere>")
    lens = [len(raw_sp.encode(s)) for s in segs]
    plan = build_plan(prompt, tok, N_IMG)
    assert plan.num_images == 2
    assert plan.positions == (1 + lens[0], 1 + lens[0] + N_IMG + lens[1])
    assert plan.total_length == 1 + sum(lens) + 2 * N_IMG
    assert [type(p).__name__ for p in plan.parts] == [
        "TextPart",
        "ImagePart",
        "TextPart",
        "ImagePart",
        "TextPart",
    ]


def test_empty_segments(tok) -> None:
    plan = build_plan("<ImageHere>", tok, N_IMG)
    assert plan.parts == (TextPart((1,)), ImagePart(0, 0, N_IMG))  # the empty first segment still gets BOS
    assert plan.positions == (1,)
    with pytest.raises(PromptError):
        build_plan("x", tok, 0)


# ----- stitching -----------------------------------------------------------------------------------
def _tables(plan, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((1000, HIDDEN)).astype(np.float32)  # (vocab, hidden)
    images = [rng.standard_normal((N_IMG, HIDDEN)).astype(np.float32) for _ in range(plan.num_images)]
    return table, images


def _reference(plan, table: np.ndarray, images: list[np.ndarray]) -> np.ndarray:
    """Row by row, independent of `stitch`: text rows from the table, image rows at `positions`."""
    rows = []
    ids = iter(plan.token_ids())
    starts = {p: i for i, p in enumerate(plan.positions)}
    t = 0
    while t < plan.total_length:
        if t in starts:
            rows.extend(images[starts[t]])
            t += N_IMG
        else:
            rows.append(table[next(ids)])
            t += 1
    return np.stack(rows)


def test_stitch_numpy(tok) -> None:
    plan = build_plan(_prompt("vicuna_v0", images=2), tok, N_IMG)
    table, images = _tables(plan)
    out = stitch(plan, lambda ids: table[ids], images)
    assert isinstance(out, np.ndarray) and out.shape == (plan.total_length, HIDDEN)
    np.testing.assert_array_equal(out, _reference(plan, table, images))  # exact: pure copies
    for pos, img in zip(plan.positions, images, strict=True):
        np.testing.assert_array_equal(out[pos : pos + N_IMG], img)


def test_stitch_torch(tok) -> None:
    torch = pytest.importorskip("torch")
    plan = build_plan(_prompt("llama2", images=2), tok, N_IMG)
    table, images = _tables(plan, seed=1)
    emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(table))
    out = stitch(plan, lambda ids: emb(torch.tensor(ids)), [torch.from_numpy(i) for i in images])
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (plan.total_length, HIDDEN)
    assert torch.equal(out, torch.from_numpy(_reference(plan, table, images)))


def test_stitch_custom_concat(tok) -> None:
    plan = build_plan(_prompt("vicuna_v0"), tok, N_IMG)
    table, images = _tables(plan)
    calls = []

    def concat(parts):
        calls.append(len(parts))
        return np.vstack(parts)

    out = stitch(plan, lambda ids: table[ids], images, concat=concat)
    assert calls == [3] and out.shape == (plan.total_length, HIDDEN)


@pytest.mark.parametrize("count", [0, 2])
def test_stitch_image_count_mismatch(tok, count: int) -> None:
    plan = build_plan(_prompt("vicuna_v0"), tok, N_IMG)
    table, _ = _tables(plan)
    with pytest.raises(PromptError, match="1 image slot"):
        stitch(plan, lambda ids: table[ids], [np.zeros((N_IMG, HIDDEN), np.float32)] * count)


@pytest.mark.parametrize("shape", [(N_IMG + 1, HIDDEN), (N_IMG, HIDDEN + 1), (1, N_IMG, HIDDEN), (N_IMG,)])
def test_stitch_image_shape_mismatch(tok, shape: tuple[int, ...]) -> None:
    plan = build_plan(_prompt("vicuna_v0"), tok, N_IMG)
    table, _ = _tables(plan)
    with pytest.raises(PromptError):
        stitch(plan, lambda ids: table[ids], [np.zeros(shape, np.float32)])


def test_stitch_images_disagree_on_hidden(tok) -> None:
    plan = build_plan(_prompt("vicuna_v0", images=2), tok, N_IMG)
    table, _ = _tables(plan)
    images = [np.zeros((N_IMG, HIDDEN), np.float32), np.zeros((N_IMG, HIDDEN + 2), np.float32)]
    with pytest.raises(PromptError):
        stitch(plan, lambda ids: table[ids], images)


# ----- truncation ----------------------------------------------------------------------------------
def test_truncate_left_matches_tensor_slice(tok) -> None:
    plan = build_plan(_prompt("vicuna_v0", images=2), tok, N_IMG)
    table, images = _tables(plan)
    full = stitch(plan, lambda ids: table[ids], images)
    first_image, second_image = plan.positions
    for max_length in range(1, plan.total_length + 3):
        cut = truncate_left(plan, max_length)
        assert cut.total_length == min(max_length, plan.total_length)
        assert cut.num_images == 2  # the caller still passes every image
        out = stitch(cut, lambda ids: table[ids], images)
        np.testing.assert_array_equal(out, full[-max_length:])  # the original's embs[:, begin_idx:]
        begin = max(0, plan.total_length - max_length)
        expected_positions = tuple(
            None if begin >= p + N_IMG else max(p - begin, 0) for p in (first_image, second_image)
        )
        assert cut.positions == expected_positions


def test_truncate_cuts_into_an_image(tok) -> None:
    plan = build_plan(_prompt("vicuna_v0"), tok, N_IMG)
    image_start = plan.positions[0]
    cut = truncate_left(plan, plan.total_length - image_start - 1)  # drop the text and one image row
    assert cut.parts[0] == ImagePart(0, 1, N_IMG - 1)
    assert cut.positions == (0,)
    assert truncate_left(plan, plan.total_length) is plan
    with pytest.raises(PromptError):
        truncate_left(plan, 0)


# ----- torch-free ----------------------------------------------------------------------------------
def test_stitching_modules_are_torch_free(sp_dir: Path) -> None:
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from minigpt4_local import prompts, stitching, tokenizer\n"
        f"tok = tokenizer.load_tokenizer({str(sp_dir)!r})\n"
        "plan = stitching.build_plan('a<ImageHere>b', tok, 2)\n"
        "plan = stitching.truncate_left(plan, 3)\n"
        "out = stitching.stitch(plan, lambda ids: np.zeros((len(ids), 3)), [np.ones((2, 3))])\n"
        "assert out.shape == (3, 3)\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
