"""Tokenizers for the LLM side, without torch or transformers.

Contract:
- `SentencePieceTokenizer(path)` loads a LLaMA `tokenizer.model` and reproduces the slow (legacy)
  transformers `LlamaTokenizer` the original MiniGPT-4 used: `encode(text, add_bos)` first splits the text
  on the special-token strings `<s>`, `</s>`, `<unk>` (each becomes its id: the Llama-2 template's literal
  `<s>` is a BOS), then encodes every remaining non-empty chunk with `sp.encode(chunk)`, so EVERY chunk gets
  sentencepiece's "▁" dummy prefix (the legacy behaviour); BOS is prepended when `add_bos`. No whitespace
  is stripped around special tokens (LLaMA's special tokens are `AddedToken`s with lstrip/rstrip off).
- `HFTokenizersTokenizer(directory)` loads a `tokenizer.json` (e.g. SmolLM2's byte-level BPE) with the
  torch-free `tokenizers` library. Special tokens written in the text are matched by that library.
  BOS rule: the BOS token is `bos_token` of `tokenizer_config.json`, else of `special_tokens_map.json`;
  `encode(text, add_bos=True)` prepends it only when the tokenizer itself would: `add_bos_token` in
  `tokenizer_config.json` when that key exists, else whether the `tokenizer.json` post-processor puts
  the BOS first. A tokenizer without a BOS token (or that never adds it, like SmolLM2) ignores `add_bos`.
- Both: `decode(ids, skip_special=True)` drops bos/eos/unk/pad and every id >= `vocab_size` (Vicuna v0's
  LLM has a 32001st row with no tokenizer piece); `bos_id`, `eos_id`, `unk_id`, `pad_id` (None if the
  tokenizer has none), `vocab_size` (number of pieces), `id_to_piece(i)`.
- `load_tokenizer(directory)` picks `tokenizer.model` when present, else `tokenizer.json`; raises
  `TokenizerError` (one line) if neither exists, the file is corrupt, or the library is missing.
- `derive_stop_sequences(tok)` returns the encodings of `###` (docs/numerics.md §12): at the start of a segment
  (dummy prefix; LLaMA: [835]) and after text (LLaMA: [2277, 29937]), deduplicated, in that order.
- `stop_sequences_for(prompt_config, tok)`: the model's configured stop sequences, else the derived ones
  (what every decoder and the GPTQ calibration stop on).
- `check_vocab(tok, llm_vocab_size)` raises `TokenizerError` when the tokenizer does not fit the LLM's
  embedding rows (more pieces than rows, or more than `MAX_EXTRA_ROWS` unused rows).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import DependencyError, TokenizerError
from .files import read_json_object

SP_MODEL_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
STOP_TEXT = "###"
# An LLM may carry a few rows the tokenizer never produces (Vicuna v0: +1 pad row; some checkpoints pad
# the vocabulary to a multiple of 64/128). More than this means the tokenizer belongs to another model.
MAX_EXTRA_ROWS = 256
# Text that precedes `###` mid-answer: a newline (byte token in LLaMA: "\n###" -> 13, 2277, 29937), a
# letter, a full stop. Only probes whose encoding splits cleanly before `###` contribute (see below).
_MID_TEXT_PROBES = ("\n", "a", ".")


@runtime_checkable
class Tokenizer(Protocol):
    """What prompts, stitching and the decoders need from a tokenizer."""

    @property
    def bos_id(self) -> int | None: ...
    @property
    def eos_id(self) -> int | None: ...
    @property
    def unk_id(self) -> int | None: ...
    @property
    def pad_id(self) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...


def _optional_id(value: int) -> int | None:
    """sentencepiece reports a missing special token as -1."""
    return value if value >= 0 else None


class SentencePieceTokenizer:
    """The slow/legacy LLaMA tokenizer re-created on `sentencepiece` (see module docstring)."""

    def __init__(self, model_file: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError as err:
            raise DependencyError("reading tokenizer.model needs `pip install sentencepiece`") from err
        path = Path(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{path} is not a readable sentencepiece model ({err})") from err
        self.path = path
        self._n = self._sp.get_piece_size()
        # Special-token strings, longest first so that `</s>` wins over `<s>`-like prefixes.
        specials = {
            self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id) if i is not None
        }
        self._special_by_text = specials
        pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._split_re = re.compile(f"({pattern})") if pattern else None

    # ----- special ids ----------------------------------------------------------------------
    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def unk_id(self) -> int | None:
        return _optional_id(self._sp.unk_id())

    @property
    def pad_id(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id) if i is not None)

    # ----- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        chunks = self._split_re.split(text) if self._split_re else [text]
        for chunk in chunks:
            if chunk in self._special_by_text:
                ids.append(self._special_by_text[chunk])
            elif chunk:
                # Each chunk separately: this is what gives every chunk its own "▁" dummy prefix.
                ids.extend(self._sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self._n]
        if skip_special:
            special = self.special_ids
            return self._sp.decode([i for i in ids if i not in special])
        # Keep special tokens as their text; decode the runs between them normally.
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out.append(self._sp.decode(run) + self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self._n:
            raise TokenizerError(f"token id {token_id} is outside the tokenizer's {self._n} pieces")
        return self._sp.id_to_piece(token_id)


def _special_token_text(value: Any) -> str | None:
    """`bos_token` etc. are written either as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class HFTokenizersTokenizer:
    """A `tokenizer.json` tokenizer (BPE, e.g. SmolLM2) through the `tokenizers` library."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise DependencyError("reading tokenizer.json needs `pip install tokenizers`") from err
        root = Path(directory)
        path = root / HF_TOKENIZER_FILE
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # the library raises plain Exception subclasses for bad files
            raise TokenizerError(f"{path} is not a readable tokenizer.json ({err})") from err
        self.path = path
        self._n = self._tok.get_vocab_size(with_added_tokens=True)
        config = read_json_object(root / "tokenizer_config.json", TokenizerError, allow_missing=True)
        special_map = read_json_object(root / "special_tokens_map.json", TokenizerError, allow_missing=True)
        ids = {
            key: self._token_id(
                _special_token_text(config.get(key)) or _special_token_text(special_map.get(key))
            )
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self._bos, self._eos, self._unk, self._pad = (
            ids[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        )
        add_bos = config.get("add_bos_token")
        self.adds_bos = bool(add_bos) if isinstance(add_bos, bool) else self._post_processor_adds_bos()

    def _token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def _post_processor_adds_bos(self) -> bool:
        if self._bos is None:
            return False
        probe = self._tok.encode("a", add_special_tokens=True).ids
        return bool(probe) and probe[0] == self._bos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def pad_id(self) -> int | None:
        return self._pad

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self._bos, self._eos, self._unk, self._pad) if i is not None)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # The post-processor is bypassed: BOS is our decision (rule in the module docstring).
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_bos and self.adds_bos and self._bos is not None:
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self._n]
        if skip_special:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id) if 0 <= token_id < self._n else None
        if piece is None:
            raise TokenizerError(f"token id {token_id} is outside the tokenizer's {self._n} pieces")
        return piece


def load_tokenizer(directory: str | Path) -> SentencePieceTokenizer | HFTokenizersTokenizer:
    """Load the tokenizer in `directory`: `tokenizer.model` preferred (it is what LLaMA used)."""
    root = Path(directory)
    if (root / SP_MODEL_FILE).is_file():
        return SentencePieceTokenizer(root / SP_MODEL_FILE)
    if (root / HF_TOKENIZER_FILE).is_file():
        return HFTokenizersTokenizer(root)
    raise TokenizerError(
        f"no {SP_MODEL_FILE} or {HF_TOKENIZER_FILE} in {root}; point to the LLM's tokenizer folder"
    )


def _dedupe(sequences: Sequence[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for seq in sequences:
        if seq and seq not in out:
            out.append(seq)
    return out


def _mid_text_encoding(tok: Tokenizer, prefix: str) -> list[int] | None:
    """The ids of `###` right after `prefix`, if the encoding splits cleanly between the two."""
    head = tok.encode(prefix)
    full = tok.encode(prefix + STOP_TEXT)
    if full[: len(head)] != head or len(full) == len(head):
        return None  # `###` merged with the prefix (e.g. a ".###" piece): no stand-alone encoding
    tail = full[len(head) :]
    return tail if tok.decode(tail, skip_special=False) == STOP_TEXT else None


def derive_stop_sequences(tok: Tokenizer) -> list[list[int]]:
    """Encodings of `###`: first at a segment start (with the dummy prefix), then after text."""
    candidates = [tok.encode(STOP_TEXT)]
    candidates += [_mid_text_encoding(tok, p) or [] for p in _MID_TEXT_PROBES]
    stops = _dedupe(candidates)
    if not stops:
        raise TokenizerError("the tokenizer cannot encode '###', the stop marker of the prompt template")
    return stops


def stop_sequences_for(prompt_config: Any, tok: Tokenizer) -> list[list[int]]:
    """`prompt_config.stop_sequences` when set, else `derive_stop_sequences(tok)`."""
    configured = [list(seq) for seq in prompt_config.stop_sequences]
    return configured or derive_stop_sequences(tok)


def check_vocab(tok: Tokenizer, llm_vocab_size: int) -> None:
    """Refuse a tokenizer that does not belong to an LLM with `llm_vocab_size` embedding rows."""
    pieces = tok.vocab_size
    if pieces > llm_vocab_size:
        raise TokenizerError(
            f"the tokenizer has {pieces} tokens but the language model only {llm_vocab_size} embedding rows; "
            "use the tokenizer that came with the model"
        )
    if llm_vocab_size - pieces > MAX_EXTRA_ROWS:
        raise TokenizerError(
            f"the language model has {llm_vocab_size} embedding rows but the tokenizer only {pieces} tokens "
            "(more than 256 apart): the tokenizer belongs to another model"
        )
