"""A BERT encoder's forward pass in numpy, with every attention computed by our kernel.

Per layer, as `transformers`' BertModel (eager, inference): one fused Q/K/V projection, ONE call
to `service.attention` for all heads and all inputs of the batch (padding keys excluded through
key_lengths, probabilities returned), the output projection + residual + LayerNorm, then the
GELU (erf) feed-forward + residual + LayerNorm. Everything is float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from service.core.attention import attention
from service.core.model.package import ModelIntegrityError

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t(a1 + t(a2 + ...)) e^(-x^2), t = 1 / (1 + p x), x >= 0,
# with an absolute error below 1.5e-7; evaluated in float32 it stays within 6e-7 (float64 would
# cost 6x the time for nothing BERT's float32 outputs can show). numpy has no erf, and scipy
# would be a large dependency for one function.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


# The projections run on one BLAS thread: they are small (L x 384 by 384 x 1536 at most), and
# OpenBLAS's threads spin and synchronise per call; measured on 2 busy cores, a 9-wordpiece
# input took 37 ms with two BLAS threads and 14 ms with one, 128 wordpieces 369 ms and 75 ms
# (service/approx.py saw the same). Our attention kernel still uses its own threads.
_BLAS = ThreadpoolController()


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, to within 6e-7 for float32 (1.5e-7 for float64)."""
    a = np.abs(x)
    t = a * x.dtype.type(_ERF_P)
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * x.dtype.type(_ERF_A[4])
    for coef in _ERF_A[3::-1]:  # Horner, in place: this runs on every feed-forward activation
        poly += coef
        poly *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    np.exp(a, out=a)
    poly *= a
    np.subtract(1.0, poly, out=poly)
    return np.copysign(poly, x, out=poly)


def gelu(x: np.ndarray) -> np.ndarray:
    """x * Phi(x), the exact (erf) GELU that BERT's "gelu" means."""
    y = erf(x * x.dtype.type(1.0 / math.sqrt(2.0)))
    y += 1.0
    y *= 0.5
    y *= x
    return y


def _linear(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, residual: np.ndarray | None = None
) -> np.ndarray:
    """x @ w + b (+ residual), adding in place into the product."""
    y = x @ w
    y += b
    if residual is not None:
        y += residual
    return y


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps)) * gamma + beta


@dataclass(frozen=True)
class BertConfig:
    """The parts of a BERT config.json the forward pass uses, checked to be ones it supports."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, cfg: dict[str, Any]) -> BertConfig:
        supported = {
            "model_type": "bert",
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
        }
        for key, value in supported.items():
            if cfg.get(key, value) != value:
                raise ModelIntegrityError(f"config.json: {key}={cfg.get(key)!r} is not supported")
        try:
            out = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                intermediate_size=int(cfg["intermediate_size"]),
                max_positions=int(cfg["max_position_embeddings"]),
                type_vocab_size=int(cfg["type_vocab_size"]),
                layer_norm_eps=float(cfg["layer_norm_eps"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"config.json: missing or bad field {exc}") from None
        if out.hidden_size % out.num_heads:
            raise ModelIntegrityError("config.json: hidden_size is not a multiple of the heads")
        return out


@dataclass(frozen=True)
class LayerWeights:
    """One encoder layer, with matrices transposed to (in, out) so that y = x @ w + b."""

    qkv_w: np.ndarray  # (H, 3H): query | key | value
    qkv_b: np.ndarray
    attn_out_w: np.ndarray
    attn_out_b: np.ndarray
    ln1_g: np.ndarray
    ln1_b: np.ndarray
    ff_in_w: np.ndarray  # (H, I)
    ff_in_b: np.ndarray
    ff_out_w: np.ndarray  # (I, H)
    ff_out_b: np.ndarray
    ln2_g: np.ndarray
    ln2_b: np.ndarray


@dataclass(frozen=True)
class BertWeights:
    word: np.ndarray  # (V, H)
    position: np.ndarray  # (P, H)
    token_type: np.ndarray  # (T, H)
    emb_ln_g: np.ndarray
    emb_ln_b: np.ndarray
    layers: tuple[LayerWeights, ...]

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], cfg: BertConfig) -> BertWeights:
        """From the checkpoint's tensors (names as `transformers` saves BertModel), each shape
        checked against the config."""
        h, i = cfg.hidden_size, cfg.intermediate_size

        def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
            arr = tensors.get(name)
            if arr is None:
                raise ModelIntegrityError(f"the weights have no tensor {name}")
            if arr.shape != shape:
                raise ModelIntegrityError(f"{name} has shape {arr.shape}, expected {shape}")
            if arr.dtype != np.float32:
                raise ModelIntegrityError(f"{name} is {arr.dtype}, expected float32")
            return arr

        def linear(name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
            w = get(f"{name}.weight", (n_out, n_in))
            return np.ascontiguousarray(w.T), get(f"{name}.bias", (n_out,))

        layers = []
        for n in range(cfg.num_layers):
            p = f"encoder.layer.{n}."
            q, k, v = (linear(f"{p}attention.self.{m}", h, h) for m in ("query", "key", "value"))
            attn_out = linear(f"{p}attention.output.dense", h, h)
            ff_in = linear(f"{p}intermediate.dense", h, i)
            ff_out = linear(f"{p}output.dense", i, h)
            layers.append(
                LayerWeights(
                    qkv_w=np.concatenate([q[0], k[0], v[0]], axis=1),
                    qkv_b=np.concatenate([q[1], k[1], v[1]]),
                    attn_out_w=attn_out[0],
                    attn_out_b=attn_out[1],
                    ln1_g=get(f"{p}attention.output.LayerNorm.weight", (h,)),
                    ln1_b=get(f"{p}attention.output.LayerNorm.bias", (h,)),
                    ff_in_w=ff_in[0],
                    ff_in_b=ff_in[1],
                    ff_out_w=ff_out[0],
                    ff_out_b=ff_out[1],
                    ln2_g=get(f"{p}output.LayerNorm.weight", (h,)),
                    ln2_b=get(f"{p}output.LayerNorm.bias", (h,)),
                )
            )
        return cls(
            word=get("embeddings.word_embeddings.weight", (cfg.vocab_size, h)),
            position=get("embeddings.position_embeddings.weight", (cfg.max_positions, h)),
            token_type=get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, h)),
            emb_ln_g=get("embeddings.LayerNorm.weight", (h,)),
            emb_ln_b=get("embeddings.LayerNorm.bias", (h,)),
            layers=tuple(layers),
        )


@dataclass(frozen=True)
class EncoderOutput:
    """hidden: (B, L, H) last hidden state (rows past an input's length are padding).
    attentions: (len(layers), B, heads, L, L) probabilities of the layers asked for, or None.
    kernel_ms: time inside our attention kernel; elapsed_ms: the whole forward pass."""

    hidden: np.ndarray
    attentions: np.ndarray | None
    layers: tuple[int, ...]
    kernel_ms: float
    elapsed_ms: float


def forward(
    cfg: BertConfig,
    w: BertWeights,
    ids: np.ndarray,
    type_ids: np.ndarray,
    lengths: Sequence[int],
    *,
    layers: Sequence[int] = (),
    num_threads: int | None = None,
) -> EncoderOutput:
    """Run the encoder over a padded batch: ids and type_ids (B, L) int, lengths (B,).

    Positions past an input's length are padding: no query attends to them (key_lengths). The
    attention probabilities of `layers` are kept; the others are never materialised.
    """
    with _BLAS.limit(limits=1, user_api="blas"):
        return _forward(cfg, w, ids, type_ids, lengths, layers, num_threads)


def _forward(
    cfg: BertConfig,
    w: BertWeights,
    ids: np.ndarray,
    type_ids: np.ndarray,
    lengths: Sequence[int],
    layers: Sequence[int],
    num_threads: int | None,
) -> EncoderOutput:
    start = time.perf_counter()
    b, length = ids.shape
    if length > cfg.max_positions:
        raise ValueError(f"{length} positions; the model has {cfg.max_positions}")
    nh, hd, hs, eps = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.layer_norm_eps
    keep = tuple(dict.fromkeys(layers))
    # Filled layer by layer: only one layer's probabilities exist beside it at any time.
    attentions = np.empty((len(keep), b, nh, length, length), np.float32) if keep else None
    x = w.word[ids] + w.position[:length][None] + w.token_type[type_ids]
    # Rows of the whole batch at once: (B*L, H), one BLAS call per projection.
    x = layer_norm(x.reshape(b * length, hs), w.emb_ln_g, w.emb_ln_b, cfg.layer_norm_eps)
    kernel_ms = 0.0
    for n, lw in enumerate(w.layers):
        qkv = _linear(x, lw.qkv_w, lw.qkv_b)
        # (B, L, 3, heads, hd) -> three (B, heads, L, hd) arrays, as the kernel takes them.
        q, k, v = np.ascontiguousarray(qkv.reshape(b, length, 3, nh, hd).transpose(2, 0, 3, 1, 4))
        res = attention(
            q,
            k,
            v,
            key_lengths=list(lengths),
            return_weights=n in keep,
            num_threads=num_threads,
        )
        kernel_ms += res.elapsed_ms
        if attentions is not None and n in keep:
            attentions[keep.index(n)] = res.weights
        context = res.output.transpose(0, 2, 1, 3).reshape(b * length, hs)
        x = layer_norm(_linear(context, lw.attn_out_w, lw.attn_out_b, x), lw.ln1_g, lw.ln1_b, eps)
        ff = gelu(_linear(x, lw.ff_in_w, lw.ff_in_b))
        x = layer_norm(_linear(ff, lw.ff_out_w, lw.ff_out_b, x), lw.ln2_g, lw.ln2_b, eps)
    x = x.reshape(b, length, hs)
    return EncoderOutput(
        hidden=x,
        attentions=attentions,
        layers=keep,
        kernel_ms=kernel_ms,
        elapsed_ms=(time.perf_counter() - start) * 1e3,
    )
