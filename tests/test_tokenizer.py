"""Tokenizer tests: legacy LLaMA semantics on sentencepiece, the tokenizers path, stops, vocab checks.

References are computed independently with the `sentencepiece` / `tokenizers` libraries directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawHFTokenizer

from minigpt4_local.errors import DependencyError, MiniGPT4Error, TokenizerError
from minigpt4_local.tokenizer import (
    HFTokenizersTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    derive_stop_sequences,
    load_tokenizer,
)
from tests.support.tiny_tokenizer import (
    _train_sentencepiece,
    make_tiny_bpe_tokenizer_json,
    make_tiny_sentencepiece,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def raw_sp(sp_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(sp_dir: Path) -> SentencePieceTokenizer:
    loaded = load_tokenizer(sp_dir)
    assert isinstance(loaded, SentencePieceTokenizer)
    return loaded


# ----- the tiny tokenizer itself -------------------------------------------------------------------
def test_tiny_sentencepiece_is_llama_like_and_deterministic(
    tmp_path: Path, raw_sp: spm.SentencePieceProcessor
) -> None:
    assert raw_sp.get_piece_size() == 1000
    assert (raw_sp.unk_id(), raw_sp.bos_id(), raw_sp.eos_id(), raw_sp.pad_id()) == (0, 1, 2, -1)
    assert [raw_sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert raw_sp.id_to_piece(3) == "<0x00>"  # byte fallback pieces follow the specials, as in LLaMA
    assert raw_sp.encode("12", out_type=str)[-2:] == ["1", "2"]  # split_digits
    again = make_tiny_sentencepiece(tmp_path / "again")
    # A fresh training run (bypassing the per-process cache) gives the same bytes.
    assert _train_sentencepiece.__wrapped__(1000) == (again / "tokenizer.model").read_bytes()
    config = json.loads((again / "tokenizer_config.json").read_text())
    assert config["bos_token"]["content"] == "<s>" and config["legacy"] is True
    assert json.loads((again / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_tiny_sentencepiece_other_size(tmp_path: Path) -> None:
    sp = spm.SentencePieceProcessor(
        model_file=str(make_tiny_sentencepiece(tmp_path, 600) / "tokenizer.model")
    )
    assert sp.get_piece_size() == 600


# ----- SentencePieceTokenizer ----------------------------------------------------------------------
def test_special_ids_and_protocol(tok: SentencePieceTokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, None)
    assert tok.vocab_size == 1000
    assert isinstance(tok, Tokenizer)


@pytest.mark.parametrize(
    "text", ["Describe this image in detail.", "</Img> What is it?###Assistant: ", " two  spaces"]
)
def test_plain_text_matches_sentencepiece(
    tok: SentencePieceTokenizer, raw_sp: spm.SentencePieceProcessor, text: str
) -> None:
    assert tok.encode(text) == raw_sp.encode(text)
    assert tok.encode(text, add_bos=True) == [1, *raw_sp.encode(text)]


def test_special_strings_split_and_each_chunk_gets_dummy_prefix(
    tok: SentencePieceTokenizer, raw_sp: spm.SentencePieceProcessor
) -> None:
    text = "questions.<s>[INST] hello</s>x<unk>"
    expected = [*raw_sp.encode("questions."), 1, *raw_sp.encode("[INST] hello"), 2, *raw_sp.encode("x"), 0]
    assert tok.encode(text) == expected
    # Legacy behaviour: the chunk after `<s>` starts with the "▁" dummy prefix like a fresh text.
    after_bos = tok.encode(text)[len(raw_sp.encode("questions.")) + 1]
    assert tok.id_to_piece(after_bos).startswith("▁")
    # Plain sentencepiece would treat `<s>` as ordinary characters (no id 1 anywhere).
    assert 1 not in raw_sp.encode(text)


def test_decode_skips_specials_and_pieceless_ids(
    tok: SentencePieceTokenizer, raw_sp: spm.SentencePieceProcessor
) -> None:
    body = raw_sp.encode("The dog runs.")
    # 1000 = piece count: Vicuna v0's 32001st embedding row has no piece.
    ids = [1, *body, 1000, 2, 0]
    assert tok.decode(ids) == raw_sp.decode(body) == "The dog runs."
    assert tok.decode(ids, skip_special=False) == "<s>The dog runs.</s><unk>"
    with pytest.raises(TokenizerError):
        tok.id_to_piece(1000)


# ----- loading -------------------------------------------------------------------------------------
def test_load_prefers_tokenizer_model(tmp_path: Path) -> None:
    make_tiny_bpe_tokenizer_json(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizersTokenizer)
    make_tiny_sentencepiece(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (None, b""),
        ("tokenizer.model", b"not a model"),
        ("tokenizer.model", b""),
        ("tokenizer.json", b'{"x":'),
    ],
)
def test_load_errors_are_one_line(tmp_path: Path, name: str | None, content: bytes) -> None:
    if name:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert not isinstance(info.value, DependencyError)


# ----- HF tokenizers path --------------------------------------------------------------------------
def test_hf_tokenizer_smollm2_style(tmp_path: Path) -> None:
    tok = load_tokenizer(make_tiny_bpe_tokenizer_json(tmp_path))
    raw = RawHFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)  # from tokenizer_config.json
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 600
    text = "###Human: <Img> a dog.###"
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    # SmolLM2's post-processor adds no BOS, so neither does add_bos.
    assert tok.encode(text, add_bos=True) == tok.encode(text)
    assert tok.encode("hi<|im_end|>")[-1] == 2
    assert tok.decode([1, *tok.encode("a red car"), 2, 600]) == "a red car"
    assert tok.id_to_piece(tok.encode("###")[0]) == raw.id_to_token(raw.encode("###").ids[0])


def test_hf_tokenizer_bos_rule(tmp_path: Path) -> None:
    with_template = load_tokenizer(make_tiny_bpe_tokenizer_json(tmp_path / "t", bos_in_template=True))
    assert with_template.encode("a cat", add_bos=True) == [1, *with_template.encode("a cat")]
    # An explicit add_bos_token in tokenizer_config.json wins over the post-processor.
    off = make_tiny_bpe_tokenizer_json(tmp_path / "off", bos_in_template=True)
    config = json.loads((off / "tokenizer_config.json").read_text())
    (off / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert load_tokenizer(off).encode("a cat", add_bos=True) == load_tokenizer(off).encode("a cat")
    # No BOS token declared at all: add_bos does nothing.
    none = make_tiny_bpe_tokenizer_json(tmp_path / "none", bos_in_template=True)
    config.pop("bos_token")
    (none / "tokenizer_config.json").write_text(json.dumps(config))
    nobos = load_tokenizer(none)
    assert nobos.bos_id is None and nobos.encode("a cat", add_bos=True) == nobos.encode("a cat")


# ----- stop sequences ------------------------------------------------------------------------------
def _independent_mid_text(raw_sp: spm.SentencePieceProcessor, prefix: str) -> list[int] | None:
    pieces = raw_sp.encode(prefix + "###", out_type=str)
    head = raw_sp.encode(prefix, out_type=str)
    tail = pieces[len(head) :]
    if pieces[: len(head)] != head or "".join(tail) != "###":
        return None
    return [raw_sp.piece_to_id(p) for p in tail]


def test_stop_sequences_of_tiny_tokenizer(
    tok: SentencePieceTokenizer, raw_sp: spm.SentencePieceProcessor
) -> None:
    start = raw_sp.encode("###")
    assert raw_sp.id_to_piece(start[0]).startswith("▁")  # the segment-start form carries the dummy prefix
    expected = [start]
    for prefix in ("\n", "a", "."):
        mid = _independent_mid_text(raw_sp, prefix)
        if mid and mid not in expected:
            expected.append(mid)
    stops = derive_stop_sequences(tok)
    assert stops == expected
    assert len(stops) >= 2  # "▁###" at a segment start differs from "###" after text
    assert all(raw_sp.decode(s) == "###" for s in stops)


class _LlamaLikeTokenizer:
    """LLaMA's real ids for the probes derive_stop_sequences uses ("\\n###" -> 13, 2277, 29937)."""

    table: ClassVar[dict[str, list[int]]] = {
        "###": [835],
        "\n": [29871, 13],
        "\n###": [29871, 13, 2277, 29937],
        "a": [263],
        "a###": [263, 2277, 29937],
        ".": [869],
        ".###": [869, 2277, 29937],
    }
    pieces: ClassVar[dict[int, str]] = {835: "▁###", 2277: "##", 29937: "#"}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return list(self.table[text])

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip()


def test_stop_sequences_llama_ids() -> None:
    assert derive_stop_sequences(_LlamaLikeTokenizer()) == [[835], [2277, 29937]]  # docs/numerics.md §12


def test_stop_sequences_of_bpe_tokenizer(tmp_path: Path) -> None:
    tok = load_tokenizer(make_tiny_bpe_tokenizer_json(tmp_path))
    stops = derive_stop_sequences(tok)
    assert stops and stops[0] == tok.encode("###")
    assert all(tok.decode(s) == "###" for s in stops)


# ----- vocabulary check ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "ok"), [(1000, True), (1001, True), (1256, True), (1257, False), (2000, False), (999, False)]
)
def test_check_vocab(tok: SentencePieceTokenizer, rows: int, ok: bool) -> None:
    if ok:
        check_vocab(tok, rows)  # +1 is Vicuna v0's pad row
    else:
        with pytest.raises(TokenizerError) as info:
            check_vocab(tok, rows)
        assert "\n" not in str(info.value) and str(rows) in str(info.value)
        assert isinstance(info.value, MiniGPT4Error)


# ----- torch-free ----------------------------------------------------------------------------------
def test_tokenizer_module_is_torch_free(sp_dir: Path) -> None:
    code = (
        "import sys\n"
        "from minigpt4_local.tokenizer import load_tokenizer, derive_stop_sequences\n"
        f"tok = load_tokenizer({str(sp_dir)!r})\n"
        "derive_stop_sequences(tok); tok.decode(tok.encode('a <s> b', add_bos=True))\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
