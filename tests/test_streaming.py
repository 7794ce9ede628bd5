"""TextStream: what is streamed is a prefix of the post-processed answer, never text after `###`."""

from __future__ import annotations

from minigpt4_local.streaming import TextStream

# A toy "tokenizer": each id maps to a fixed string; decode = concatenation (like sentencepiece pieces).
PIECES = {
    0: " The",
    1: " cat",
    2: " sits",
    3: "#",
    4: "##",
    5: ".",
    6: "\ufffd",
    7: "é",
    8: " ###",
    9: "Human",
}


def decode(ids: list[int]) -> str:
    text = "".join(PIECES[i] for i in ids)
    # Byte-fallback tokenizers show an incomplete UTF-8 sequence as U+FFFD until the next byte arrives.
    return text.replace("\ufffdé", "é")


def run(ids: list[int]) -> tuple[list[str], str]:
    stream = TextStream(decode)
    chunks = [stream.push(i) for i in ids]
    chunks.append(stream.finish())
    return chunks, "".join(chunks)


def test_plain_text_streams_every_token_and_strips_leading_space() -> None:
    chunks, text = run([0, 1, 2, 5])
    assert text == "The cat sits."
    assert chunks[:4] == ["The", " cat", " sits", "."]


def test_stop_mark_split_over_tokens_is_never_shown() -> None:
    # "##" then "#" (the LLaMA mid-text encoding of ###: 2277, 29937), then more text.
    chunks, text = run([0, 1, 4, 3, 9, 2])
    assert text == "The cat"
    assert all("#" not in c for c in chunks)


def test_single_hash_that_is_not_a_stop_mark_is_released() -> None:
    _, text = run([0, 3, 1])
    assert text == "The# cat"


def test_incomplete_utf8_is_held_back_until_completed() -> None:
    chunks, text = run([0, 6, 7])
    assert "\ufffd" not in "".join(chunks)
    assert text == "Theé"


def test_stop_mark_with_leading_space() -> None:
    _, text = run([0, 1, 8, 9])
    assert text == "The cat"
