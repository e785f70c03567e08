"""Recurrent memory streamed: a sequence of any length sent segment by segment, each answered
exactly as the `memory` option answers it in one call (service.core.memory) when that call's
segments are the ones streamed.

A session keeps only what the next segment needs (`MemoryState`): the raw keys and values of
its M most recent positions and its C most recent compressed slots, so the state is bounded by
(M + C) positions whatever the length streamed. A segment of n positions (a multiple of the
rate when C > 0) attends to the keys [slots | raw memory | segment] with causality, when set,
aligned bottom-right (j <= i + slots + raw, which is Transformer-XL's j <= p). Afterwards the
positions that leave the raw memory are pooled into slots; since the rate divides M and every
segment, they always fill whole slots, so a stream keeps nothing partial.

`append` is a pure function (state in, result and new state out): the HTTP fronts keep the
state in the store between requests (service.web.sessions) and replace it only if nobody else
did meanwhile. `MemorySession` is the same for a Python caller, in memory.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.numpy import load, save

from service.core import exact
from service.core.errors import InputError
from service.core.inputs import (
    ArrayLike,
    Peaks,
    absmax,
    caller_rank,
    input_error,
    qkv_4d,
    thread_count,
    to_output,
)
from service.core.masking import native_masking
from service.core.memory import pool_slots
from service.core.options import AttentionOptions, CausalMode, MemorySpec

_FORMAT = "attention-service/memory-state/1"
# What a segment's shape is compared on, with the input and the words an error uses.
_LAYOUT = (
    ("q", "rank"),
    ("q", "batch size"),
    ("q", "query heads"),
    ("k", "key/value heads"),
    ("q", "head dim"),
    ("v", "value dim"),
)


class SessionOptions(BaseModel):
    """What a session is opened with: its memory, causality and score scale."""

    model_config = ConfigDict(extra="forbid")

    memory: MemorySpec
    causal: bool | CausalMode = Field(
        False,
        description="Each segment attends causally within itself (Transformer-XL); both "
        "alignments are the same here (a segment's queries are its keys).",
    )
    scale: float | None = Field(None, description="Score scale; default 1/sqrt(D).")

    @field_validator("scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("scale must be a finite number")
        return v


@dataclass(frozen=True)
class SegmentResult:
    """One segment's answer. output (.., Hq, n, Dv) in q's rank and library; weights
    (.., Hq, n, slots + raw + n) over the keys [compressed | memory | segment] and lse, only when
    asked for. position: positions streamed so far, this segment included. memory_raw and
    memory_compressed: the raw positions and slots this segment attended to."""

    output: ArrayLike
    weights: ArrayLike | None
    lse: ArrayLike | None
    position: int
    memory_raw: int
    memory_compressed: int
    elapsed_ms: float
    flops: int


@dataclass(frozen=True)
class MemoryState:
    """A session between segments: its options, the positions streamed, the shape its segments
    keep (rank, B, Hq, Hkv, D, Dv; None before the first) and the memory (B, Hkv, m, D) and
    (B, Hkv, m, Dv): raw keys and values of the last m <= M positions, and the last s <= C
    slots."""

    options: SessionOptions
    position: int = 0
    layout: tuple[int, ...] | None = None
    raw_k: np.ndarray | None = field(default=None, repr=False)
    raw_v: np.ndarray | None = field(default=None, repr=False)
    slot_k: np.ndarray | None = field(default=None, repr=False)
    slot_v: np.ndarray | None = field(default=None, repr=False)

    @property
    def raw(self) -> int:
        """Raw positions held (what the next segment sees)."""
        return 0 if self.raw_k is None else self.raw_k.shape[2]

    @property
    def compressed(self) -> int:
        """Slots held (what the next segment sees)."""
        return 0 if self.slot_k is None else self.slot_k.shape[2]

    @property
    def nbytes(self) -> int:
        arrays = (self.raw_k, self.raw_v, self.slot_k, self.slot_v)
        return sum(a.nbytes for a in arrays if a is not None)

    def to_bytes(self, meta: dict[str, str] | None = None) -> bytes:
        """The state as safetensors bytes; `meta` (strings) travels with it."""
        header = {
            "format": _FORMAT,
            "options": self.options.model_dump_json(),
            "position": str(self.position),
            "layout": json.dumps(self.layout),
            **(meta or {}),
        }
        names = ("raw_k", "raw_v", "slot_k", "slot_v")
        tensors = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        return save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[MemoryState, dict[str, str]]:
        """(state, the meta it was saved with); ValueError for bytes `to_bytes` did not make."""
        (size,) = struct.unpack_from("<Q", data)
        meta: dict[str, str] = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"not a memory state of format {_FORMAT}")
        tensors = load(data)
        layout = json.loads(meta["layout"])
        state = cls(
            options=SessionOptions.model_validate_json(meta["options"]),
            position=int(meta["position"]),
            layout=None if layout is None else tuple(layout),
            **{n: tensors[n] for n in ("raw_k", "raw_v", "slot_k", "slot_v") if n in tensors},
        )
        return state, meta


def session_options(
    memory: MemorySpec | dict[str, Any], causal: bool | str = False, scale: float | None = None
) -> SessionOptions:
    """The options validated; InputError naming the field."""
    try:
        return SessionOptions.model_validate({"memory": memory, "causal": causal, "scale": scale})
    except ValidationError as exc:
        raise input_error(exc) from None


def _check_layout(state: MemoryState, layout: tuple[int, ...]) -> None:
    if state.layout is None:
        return
    for (loc, what), was, now in zip(_LAYOUT, state.layout, layout, strict=True):
        if was != now:
            raise InputError(
                loc,
                f"{what} {now} differs from the session's earlier segments ({was}); every "
                "segment keeps the first one's shape but its length",
            )


def _joined(*parts: np.ndarray | None) -> np.ndarray:
    arrays = [p for p in parts if p is not None]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=2)


def append(
    state: MemoryState,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    return_weights: bool = False,
    num_threads: int | None = None,
) -> tuple[SegmentResult, MemoryState]:
    """One segment: q, k, v of its n positions ((n, D), (H, n, D) or (B, H, n, D), as the first
    segment had them). Returns its result and the state after it; `state` is left as it was."""
    opts = state.options
    spec = opts.memory
    q4, k4, v4, rank, peaks = qkv_4d(q, k, v)
    b, hq, n, d = q4.shape
    if k4.shape[2] != n:
        raise InputError(
            "k", f"a segment's keys are its own positions: k has {k4.shape[2]}, q has {n}"
        )
    if n == 0:
        raise InputError("q", "a segment needs at least one position")
    c = spec.slot_rate
    if spec.compressed > 0 and n % c:
        raise InputError(
            "q",
            f"a segment of {n} positions is not a multiple of memory.rate={c} (slots pool "
            "whole positions of each segment)",
        )
    layout = (rank, b, hq, k4.shape[1], d, v4.shape[3])
    _check_layout(state, layout)
    threads = thread_count(num_threads)

    keys = _joined(state.slot_k, state.raw_k, k4)
    values = _joined(state.slot_v, state.raw_v, v4)
    # max|x| of the joined keys and values: the segment's from its checks, the memory's (at most
    # M positions and their slots) measured; np.max, unlike max, keeps a NaN of a stored state.
    joined = Peaks(
        peaks.q,
        float(np.max((peaks.k, absmax(state.slot_k), absmax(state.raw_k)))),
        float(np.max((peaks.v, absmax(state.slot_v), absmax(state.raw_v)))),
    )
    attn = AttentionOptions(
        causal="bottom_right" if opts.causal else False,
        scale=opts.scale,
        return_weights=return_weights,
    )
    kw = native_masking(attn, (b, hq, n, keys.shape[2]))
    out, lse, weights, elapsed = exact.run(
        q4, keys, values, attn, kw, peaks=joined, threads=threads
    )
    result = SegmentResult(
        output=to_output(caller_rank(out, rank), q),
        weights=None if weights is None else to_output(caller_rank(weights, rank), q),
        lse=None if weights is None else to_output(caller_rank(lse, rank), q),
        position=state.position + n,
        memory_raw=state.raw,
        memory_compressed=state.compressed,
        elapsed_ms=elapsed,
        flops=exact.dense_flops(q4, keys, values),
    )
    return result, _advanced(state, layout, k4, v4)


def _advanced(
    state: MemoryState, layout: tuple[int, ...], k4: np.ndarray, v4: np.ndarray
) -> MemoryState:
    """The state after a segment: the positions leaving the raw memory pooled into slots (whole
    slots: the rate divides M and each segment), the last M positions kept raw."""
    spec = state.options.memory
    all_k, all_v = _joined(state.raw_k, k4), _joined(state.raw_v, v4)
    leaving = max(0, all_k.shape[2] - spec.length)
    slot_k, slot_v = state.slot_k, state.slot_v
    if spec.compressed > 0 and leaving > 0:
        c = spec.slot_rate
        slot_k = _joined(slot_k, pool_slots(all_k[:, :, :leaving], c, spec.pool))
        slot_v = _joined(slot_v, pool_slots(all_v[:, :, :leaving], c, spec.pool))
        slot_k = np.ascontiguousarray(slot_k[:, :, -spec.compressed :])
        slot_v = np.ascontiguousarray(slot_v[:, :, -spec.compressed :])
    return replace(
        state,
        position=state.position + k4.shape[2],
        layout=layout,
        # Copies: the state must not keep the caller's (or a request's) whole arrays alive.
        raw_k=np.array(all_k[:, :, leaving:]),
        raw_v=np.array(all_v[:, :, leaving:]),
        slot_k=slot_k,
        slot_v=slot_v,
    )


class MemorySession:
    """Recurrent memory in Python: `append(q, k, v)` one segment after another; the answers are
    those of `service.attention(..., memory=...)` on the whole sequence with these segments.

        s = service.MemorySession(memory={"length": 512, "compressed": 64, "rate": 4},
                                  causal=True)
        for q, k, v in segments:
            out = s.append(q, k, v).output

    Appends from several threads are serialised. `state` (a MemoryState, `to_bytes()` for
    keeping it) and `MemorySession.resume(state)` carry a session across processes.
    """

    def __init__(
        self,
        memory: MemorySpec | dict[str, Any],
        *,
        causal: bool | str = False,
        scale: float | None = None,
        num_threads: int | None = None,
    ) -> None:
        self._state = MemoryState(session_options(memory, causal, scale))
        self._threads = thread_count(num_threads)
        self._lock = threading.Lock()

    @classmethod
    def resume(cls, state: MemoryState | bytes, *, num_threads: int | None = None) -> MemorySession:
        """A session continuing from a saved state (or its bytes)."""
        if isinstance(state, bytes | bytearray):
            state = MemoryState.from_bytes(bytes(state))[0]
        session = cls(state.options.memory, causal=state.options.causal, num_threads=num_threads)
        session._state = state
        return session

    @property
    def state(self) -> MemoryState:
        return self._state

    @property
    def position(self) -> int:
        """Positions appended so far."""
        return self._state.position

    def append(
        self, q: ArrayLike, k: ArrayLike, v: ArrayLike, *, return_weights: bool = False
    ) -> SegmentResult:
        """Attention for one segment (see `append`); a bad segment leaves the session as it was."""
        with self._lock:
            result, self._state = append(
                self._state,
                q,
                k,
                v,
                return_weights=return_weights,
                num_threads=self._threads or None,
            )
        return result
