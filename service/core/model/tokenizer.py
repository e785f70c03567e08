"""BERT's WordPiece tokenisation, by the `tokenizers` library from the model's tokenizer.json.

The bundled tokenizer.json pads and truncates every input to 128 wordpieces; both are switched
off here, so an input keeps all its wordpieces unless truncation is asked for, and then it is
cut to a length as the `transformers` tokenizer cuts it (strategy "longest_first": for a pair,
wordpieces are taken off the longer text first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding as _RawEncoding
from tokenizers import Tokenizer

from service.core.errors import InputError


@dataclass(frozen=True)
class Encoding:
    """One input as the model reads it: wordpieces with [CLS]/[SEP], ids and token types.

    type_ids: 0 for [CLS], the first text and its [SEP]; 1 for the second text and its [SEP].
    offsets: (start, end) characters of each wordpiece in its own text ((0, 0) for [CLS]/[SEP]).
    full_length: wordpieces of the whole input; more than len(tokens) when it was truncated.
    """

    tokens: list[str]
    ids: np.ndarray  # (L,) int64
    type_ids: np.ndarray  # (L,) int64
    offsets: list[tuple[int, int]]
    full_length: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.tokens)


def _checked_text(loc: str, text: object) -> str:
    if not isinstance(text, str):
        raise InputError(loc, f"expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            loc, f"is not valid Unicode: {exc.reason} at character {exc.start}"
        ) from None
    return text


class WordPiece:
    """Tokeniser for single texts and pairs; safe to share between threads.

    A `tokenizers.Tokenizer` carries its truncation setting as state, so each length this
    object cuts to has its own tokenizer, configured once and only read afterwards.
    """

    def __init__(self, tokenizer_json: str, lengths: tuple[int, ...]) -> None:
        self._full = self._load(tokenizer_json, None)
        self._cut = {n: self._load(tokenizer_json, n) for n in lengths}

    @staticmethod
    def _load(tokenizer_json: str, max_length: int | None) -> Tokenizer:
        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_padding()
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length, strategy="longest_first")
        return tok

    def encode(
        self, text: str, text_pair: str | None = None, *, max_length: int | None = None
    ) -> Encoding:
        """Every wordpiece of the input, or at most `max_length` (one of the lengths given at
        construction) with the rest cut as the `transformers` tokenizer cuts it."""
        text = _checked_text("text", text)
        if text_pair is not None:
            text_pair = _checked_text("text_pair", text_pair)
        full = self._full.encode(text, text_pair)
        if max_length is None or len(full.ids) <= max_length:
            return _wrap(full, len(full.ids))
        return _wrap(self._cut[max_length].encode(text, text_pair), len(full.ids))


def _wrap(raw: _RawEncoding, full_length: int) -> Encoding:
    return Encoding(
        tokens=list(raw.tokens),
        ids=np.asarray(raw.ids, dtype=np.int64),
        type_ids=np.asarray(raw.type_ids, dtype=np.int64),
        offsets=[(int(a), int(b)) for a, b in raw.offsets],
        full_length=full_length,
    )
