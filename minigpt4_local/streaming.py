"""Incremental detokenisation for streaming answers to a terminal (torch-free, backend-agnostic).

Contract: `TextStream(decode)` receives generated token ids one at a time through `push(id)` and
returns the new text that is safe to show. What it shows is always a prefix of what
`prompts.postprocess` will return for the full answer in the common case: text after the first `###`
is never shown (`TextStream(decode, stop_mark=None)` drops that rule, for grammar-constrained output), `#` characters that might start `###` and an incomplete UTF-8 sequence (decoded as
U+FFFD by byte-fallback tokenizers) are held back until the next token settles them, leading
whitespace is dropped. `finish()` returns whatever is still held back and safe to show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

STOP_MARK = "###"


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop_mark: str | None = STOP_MARK) -> None:
        self._decode = decode
        self._stop_mark = stop_mark
        self._ids: list[int] = []
        self._shown = ""
        self._stopped = False

    def _visible(self, final: bool) -> str:
        text = self._decode(self._ids).lstrip()
        cut = text.find(self._stop_mark) if self._stop_mark else -1
        if cut >= 0:
            self._stopped = True
            return text[:cut].rstrip()
        if not final:
            # Hold back a trailing partial "###" and a trailing partial multi-byte character.
            if self._stop_mark:
                text = text.rstrip("#")
            while text.endswith("\ufffd"):
                text = text[:-1]
        return text

    def push(self, token_id: int) -> str:
        if self._stopped:
            return ""
        self._ids.append(int(token_id))
        return self._emit(self._visible(final=False))

    def finish(self) -> str:
        if self._stopped:
            return ""
        return self._emit(self._visible(final=True).rstrip())

    def _emit(self, visible: str) -> str:
        if not visible.startswith(self._shown):
            # The tokenizer re-segmented earlier text (rare): show nothing new rather than garble.
            return ""
        new = visible[len(self._shown) :]
        self._shown = visible
        return new
