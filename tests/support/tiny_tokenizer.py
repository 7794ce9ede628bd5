"""Tiny tokenizers trained on the fly for tests (no downloads, deterministic, ~1 s).

Contract:
- `make_tiny_sentencepiece(out_dir, vocab_size=1000) -> Path` trains a LLaMA-like sentencepiece model
  (BPE, byte fallback, identity normalisation, "▁" dummy prefix, whitespace kept as is, digits split,
  `<unk>`=0 `<s>`=1 `</s>`=2, no pad) with exactly `vocab_size` pieces and writes an HF-LLaMA-style
  directory: `tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`. Returns `out_dir`.
- `make_tiny_bpe_tokenizer_json(out_dir, vocab_size=600, bos_in_template=False) -> Path` trains a
  byte-level BPE `tokenizer.json` in the SmolLM2 style (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`)
  plus its `tokenizer_config.json`. With `bos_in_template` the tokenizer's post-processor prepends
  `<|im_start|>` (like LLaMA's fast tokenizer prepends `<s>`), otherwise it adds nothing (like SmolLM2).
  Returns `out_dir`.
Both cache the trained bytes per process, so many tests can call them cheaply.
"""

from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

# Words of the prompt templates (docs/numerics.md §10) so that BPE learns their merges like LLaMA did.
_TEMPLATE_LINES = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions.",
    "###Human: <Img><ImageHere></Img> Describe this image in detail.###Assistant: ",
    "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] ",
    "###Human: Continue ###Assistant: The photo shows a dog.###",
)

_WORD_TEXT = (
    "the a an and or but of to in on at by with from for about over under between behind near "
    "image picture photo scene view person people man woman child children dog cat bird horse car bus "
    "train street road building house window door table chair bed room kitchen tree trees grass sky "
    "cloud clouds water river lake sea beach mountain snow field flower flowers garden city night day "
    "light dark red blue green yellow white black brown gray orange pink purple small large big little "
    "old young tall short long open closed standing sitting walking running holding wearing looking "
    "playing eating riding flying parked shows is are was were has have there this that these those it "
    "its their his her they he she we you I can see describe detail details question questions answer "
    "please provide following give will be able once what where who how why many much some several two "
    "three four five colorful bright sunny cloudy background foreground left right top bottom center "
    "middle front side corner edge surface wooden metal glass stone plastic paper shirt hat jacket dress "
    "shoes bag phone book cup plate bowl food pizza sandwich fruit apple banana cake bread computer "
    "screen keyboard television sign text letter number clock lamp umbrella boat plane bicycle "
    "motorcycle truck airport station market park bench fence wall floor roof ceiling"
)
_WORDS = tuple(_WORD_TEXT.split())

_SYLLABLE_TEXT = "ka lo mi ne ru sa ti vo ze pa qu fi da go hu ja be co xi ly wo"
_SYLLABLES = tuple(_SYLLABLE_TEXT.split())


def _corpus(lines: int) -> list[str]:
    """Deterministic English-ish text: template lines, sentences, `###` in all positions, digits."""
    rng = random.Random(20230420)
    out = list(_TEMPLATE_LINES) * 8
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        # Pseudo-words give BPE enough distinct merges to fill any test vocabulary size.
        words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
        rng.shuffle(words)
        sentence = " ".join(words).capitalize() + rng.choice([".", "!", "?", ",", ":"])
        kind = i % 6
        if kind == 0:
            sentence = f"###Human: <Img><ImageHere></Img> {sentence}###Assistant: {sentence}###"
        elif kind == 1:
            sentence = f"<s>[INST] {sentence} [/INST] {sentence} {rng.randint(0, 99999)}"
        elif kind == 2:
            sentence = f"{sentence} ### {sentence}:### {rng.randint(0, 9999)} items"
        out.append(sentence)
    return out


@functools.lru_cache(maxsize=8)
def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(300 + vocab_size // 2)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        hard_vocab_limit=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _added_token(content: str) -> dict[str, object]:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def make_tiny_sentencepiece(out_dir: str | Path, vocab_size: int = 1000) -> Path:
    """Write a LLaMA-like sentencepiece tokenizer directory with exactly `vocab_size` pieces."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_size))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "eos_token": _added_token("</s>"),
        "unk_token": _added_token("<unk>"),
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
    }
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


_BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@functools.lru_cache(maxsize=8)
def _train_bpe(vocab_size: int, bos_in_template: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(400), trainer=trainer)
    if bos_in_template:
        bos = _BPE_SPECIALS[1]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def make_tiny_bpe_tokenizer_json(
    out_dir: str | Path, vocab_size: int = 600, bos_in_template: bool = False
) -> Path:
    """Write a SmolLM2-style byte-level BPE `tokenizer.json` directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(_train_bpe(vocab_size, bos_in_template))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
