"""A sentence-transformers model (BERT + mean pooling + L2 normalisation) on our kernel.

`analyse` gives what people look at in a real model: the wordpieces, every layer's and head's
attention probabilities (or those asked for), the last hidden state, and the sentence embedding
exactly as sentence-transformers computes it: the mean of the last hidden state over the real
wordpieces, L2-normalised, over at most the first `embedding_max_length` wordpieces (256 for
all-MiniLM-L6-v2, from its sentence_bert_config.json). For a longer input the embedding comes
from a second, shorter pass over the input cut to that length, as sentence-transformers cuts
it; `Analysis.embedding_truncated` says so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from typing_extensions import TypedDict, Unpack

from service.core.errors import InputError
from service.core.model.bert import BertConfig, BertWeights, EncoderOutput, forward
from service.core.model.package import ModelFiles, ModelIntegrityError, ModelSpec
from service.core.model.tokenizer import Encoding, WordPiece


@dataclass(frozen=True)
class Analysis:
    """One input through the model.

    encoding: the wordpieces the model read ([CLS]/[SEP] included, cut to the model's positions
    when truncation was asked for; `encoding.full_length` counts the whole input).
    attentions: (len(layers), len(heads), L, L) probabilities, query rows by key columns.
    hidden: (L, hidden) last hidden state. embedding: (hidden,) unit-length sentence embedding,
    read from the first `embedding_length` wordpieces (`embedding_truncated` when that is fewer
    than the input has).
    """

    encoding: Encoding
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    attentions: np.ndarray
    hidden: np.ndarray
    embedding: np.ndarray
    embedding_length: int
    embedding_truncated: bool
    kernel_ms: float
    elapsed_ms: float


class Choices(TypedDict, total=False):
    """What `prepare` (and so `analyse`) takes besides the texts."""

    truncate: bool
    layers: Sequence[int] | None
    heads: Sequence[int] | None


@dataclass(frozen=True)
class Prepared:
    """An input checked and tokenised, ready to run: what the limits are checked against."""

    text: str
    text_pair: str | None
    encoding: Encoding
    layers: tuple[int, ...]
    heads: tuple[int, ...]


def _indices(loc: str, values: Sequence[int] | None, count: int, what: str) -> tuple[int, ...]:
    """Checked indices in [0, count) (None = all), in the order given, without repeats."""
    if values is None:
        return tuple(range(count))
    if len(values) == 0:
        raise InputError(loc, f"names no {what}; leave it out for all {count}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= v < count:
            raise InputError((loc, i), f"{what} {v!r} is outside [0, {count})")
    if len(set(values)) != len(values):
        raise InputError(loc, f"names a {what} more than once")
    return tuple(int(v) for v in values)


class SentenceModel:
    """A loaded model: tokeniser, weights and pooling. Read-only once built: share it freely."""

    def __init__(self, spec: ModelSpec, files: ModelFiles) -> None:
        self.spec = spec
        self.config = BertConfig.from_json(files.config)
        self.weights = BertWeights.from_tensors(files.tensors, self.config)
        pooling = files.pooling
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
        if modes != {"pooling_mode_mean_tokens"}:
            raise ModelIntegrityError(f"only mean pooling is supported, the model has {pooling}")
        self.normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in files.modules)
        self.embedding_max_length = min(
            int(files.sentence_config["max_seq_length"]), self.config.max_positions
        )
        self.tokenizer = WordPiece(
            files.tokenizer_json, (self.config.max_positions, self.embedding_max_length)
        )

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def max_positions(self) -> int:
        return self.config.max_positions

    def tokenize(
        self, text: str, text_pair: str | None = None, *, truncate: bool = False
    ) -> Encoding:
        """The input's wordpieces; over the model's positions an InputError, unless truncate."""
        enc = self.tokenizer.encode(
            text, text_pair, max_length=self.max_positions if truncate else None
        )
        if len(enc) > self.max_positions:
            raise InputError(
                "text_pair" if text_pair is not None else "text",
                f"{len(enc)} wordpieces ([CLS] and [SEP] included) exceed the model's "
                f"{self.max_positions} positions; shorten the input, or set truncate to true to "
                f"keep the first {self.max_positions}",
            )
        return enc

    def run(
        self,
        encodings: Sequence[Encoding],
        *,
        layers: Sequence[int] = (),
        num_threads: int | None = None,
    ) -> EncoderOutput:
        """The encoder over several inputs at once (padded; the padding is never attended to)."""
        if not encodings:
            raise InputError("text", "no input")
        length = max(len(e) for e in encodings)
        ids = np.zeros((len(encodings), length), np.int64)
        types = np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e)] = e.ids
            types[i, : len(e)] = e.type_ids
        return forward(
            self.config,
            self.weights,
            ids,
            types,
            [len(e) for e in encodings],
            layers=layers,
            num_threads=num_threads,
        )

    def pool(self, hidden: np.ndarray, length: int) -> np.ndarray:
        """sentence-transformers' mean pooling over the first `length` rows, then Normalize."""
        emb = hidden[:length].sum(axis=0) / np.float32(max(length, 1))
        if self.normalize:
            emb = emb / np.float32(max(float(np.linalg.norm(emb)), 1e-12))
        return emb.astype(np.float32, copy=False)

    def embed(self, texts: Sequence[str], *, num_threads: int | None = None) -> np.ndarray:
        """(N, hidden) sentence embeddings, as SentenceTransformer.encode(texts) gives them."""
        encs = [self.tokenizer.encode(t, max_length=self.embedding_max_length) for t in texts]
        out = self.run(encs, num_threads=num_threads)
        return np.stack([self.pool(out.hidden[i], len(e)) for i, e in enumerate(encs)])

    def prepare(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        truncate: bool = False,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
    ) -> Prepared:
        """Check the layers and heads (None = all) and tokenise, before anything runs."""
        layer_ids = _indices("layers", layers, self.num_layers, "layer")
        head_ids = _indices("heads", heads, self.num_heads, "head")
        enc = self.tokenize(text, text_pair, truncate=truncate)
        return Prepared(text, text_pair, enc, layer_ids, head_ids)

    def analyse(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        num_threads: int | None = None,
        **choices: Unpack[Choices],
    ) -> Analysis:
        """Tokenise, run every layer, keep the attention of `layers` x `heads` (None = all);
        `truncate`, `layers` and `heads` as for `prepare`."""
        return self.analyse_prepared(
            self.prepare(text, text_pair, **choices), num_threads=num_threads
        )

    def analyse_prepared(self, p: Prepared, *, num_threads: int | None = None) -> Analysis:
        start = time.perf_counter()
        enc = p.encoding
        out = self.run([enc], layers=p.layers, num_threads=num_threads)
        assert out.attentions is not None
        attentions = out.attentions[:, 0]
        if p.heads != tuple(range(self.num_heads)):
            attentions = attentions[:, list(p.heads)]
        kernel_ms = out.kernel_ms
        limit = self.embedding_max_length
        if enc.full_length <= limit:
            embedding, emb_len = self.pool(out.hidden[0], len(enc)), len(enc)
        else:  # sentence-transformers reads the input cut to `limit`: a pass of its own
            short = self.tokenizer.encode(p.text, p.text_pair, max_length=limit)
            short_out = self.run([short], num_threads=num_threads)
            kernel_ms += short_out.kernel_ms
            embedding, emb_len = self.pool(short_out.hidden[0], len(short)), len(short)
        return Analysis(
            encoding=enc,
            layers=p.layers,
            heads=p.heads,
            attentions=attentions,
            hidden=out.hidden[0],
            embedding=embedding,
            embedding_length=emb_len,
            embedding_truncated=enc.full_length > emb_len,
            kernel_ms=kernel_ms,
            elapsed_ms=(time.perf_counter() - start) * 1e3,
        )
