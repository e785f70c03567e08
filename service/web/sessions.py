"""Memory sessions kept in the store: service.core.sessions streamed over HTTP, the one
implementation behind /v1/sessions and the /v2 front's sequences.

A session is a record of the heatmap store's backend (service.web.store, records under
`NAMESPACE`): its MemoryState as bytes, with its owner and time to live. It survives a restart,
and any process sharing the store can continue it. An append reads the record and its version,
computes, and replaces the record only if it is still at that version: of two concurrent
appends one wins and the other is answered 409 with nothing appended, so a segment is never
lost or applied out of order. A session expires `ttl_s` after its last segment. Sessions and
sequences together are at most ATTN_SESSION_MAX (503 with Retry-After beyond, once the expired
ones are dropped). With API keys a session belongs to the key that opened it: another key gets
404, as for an id that never existed.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np

from service.core.errors import InputError
from service.core.sessions import MemoryState, SegmentResult, SessionOptions, append
from service.web import images
from service.web.deps import AppState
from service.web.images import HeatmapSpec
from service.web.problems import ServiceError
from service.web.store import RecordLimitReached, VersionConflict

NAMESPACE = "sessions"
_ID_BYTES = 16  # secrets.token_urlsafe: 22 characters, 128 random bits


class SessionNotFound(
    ServiceError, status=404, slug="session-not-found", title="Session not found"
):
    """No such session: never made, expired, deleted, or another API key's."""


class SessionConflict(
    ServiceError, status=409, slug="session-conflict", title="Session changed meanwhile"
):
    """Another segment was appended while this one was computed; this one was not appended."""


class SessionsFull(ServiceError, status=503, slug="sessions-full", title="Too many sessions"):
    """ATTN_SESSION_MAX live sessions already; Retry-After says when to try again."""


def owner_of(state: AppState, authorization: str | None) -> str:
    """Who owns what this request opens: '' without API keys (an id alone gives access), else a
    digest of the request's key (already checked by the API's guard). Keys are never stored."""
    if not state.access.keys.enabled:
        return ""
    _, _, token = (authorization or "").partition(" ")
    raw = token.strip().encode("latin-1", "replace")
    return hashlib.sha256(b"attention-service session owner\0" + raw).hexdigest()


def sequence_key(owner: str, sequence_id: int | str) -> str:
    """The record key of a /v2 sequence: its id is the client's, so the owner is part of it."""
    kind = "i" if isinstance(sequence_id, int) else "s"
    digest = hashlib.sha256(f"{owner}\0{kind}{sequence_id}".encode()).hexdigest()
    return "seq-" + digest[:40]


def timestamp(unix: float) -> str:
    """RFC 3339 UTC, to the second."""
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")[:-6] + "Z"


@dataclass(frozen=True)
class Session:
    """A session as read from the store: its record key and version, owner and lifetime."""

    key: str
    state: MemoryState
    owner: str
    ttl_s: int
    expires_at: float
    version: int

    def info(self) -> dict:
        """What GET answers (and POST /v1/sessions, with status 201)."""
        s = self.state
        shape = None
        if s.layout is not None:
            rank, b, hq, hkv, d, dv = s.layout
            shape = {"rank": rank, "batch": b, "heads": hq, "kv_heads": hkv, "head_dim": d,
                     "value_dim": dv}  # fmt: skip
        return {
            "id": self.key,
            "position": s.position,
            "expires_at": timestamp(self.expires_at),
            "ttl_s": self.ttl_s,
            "memory": {"raw": s.raw, "compressed": s.compressed},
            "options": s.options.model_dump(),
            "shape": shape,
        }


def _value(state: MemoryState, owner: str, ttl_s: int) -> bytes:
    return state.to_bytes({"owner": owner, "ttl_s": str(ttl_s)})


def open_session(
    app: AppState, owner: str, options: SessionOptions, ttl_s: int, key: str | None = None
) -> Session:
    """A new session (a fresh id, or `key`: a sequence's, replacing one still open there)."""
    state = MemoryState(options)
    value = _value(state, owner, ttl_s)
    if key is not None:
        app.store.delete_record(NAMESPACE, key)  # sequence_start: a new sequence under this id
    while True:
        new_key = key or secrets.token_urlsafe(_ID_BYTES)
        try:
            record = app.store.create_record(
                NAMESPACE, new_key, value, ttl_s=ttl_s, max_count=app.settings.session_max
            )
        except RecordLimitReached:
            raise SessionsFull(
                f"{app.settings.session_max} sessions are open (ATTN_SESSION_MAX); end one "
                "(DELETE /v1/sessions/{id}, or sequence_end) or retry later",
                headers={"Retry-After": str(app.settings.retry_after_s)},
            ) from None
        if record is not None:
            return Session(new_key, state, owner, ttl_s, record.expires_at, record.version)
        if key is not None:  # opened by a concurrent sequence_start meanwhile
            raise SessionConflict(f"{_what(key)} was opened by another request meanwhile")


def _what(key: str) -> str:
    return "the sequence" if key.startswith("seq-") else f"session {key}"


def load(app: AppState, owner: str, key: str, what: str | None = None) -> Session:
    """The session, or SessionNotFound (unknown, expired, deleted, or another key's)."""
    record = app.store.get_record(NAMESPACE, key)
    missing = SessionNotFound(f"no {what or 'session ' + repr(key)}: unknown or expired")
    if record is None:
        raise missing
    try:
        state, meta = MemoryState.from_bytes(record.value)
    except (ValueError, KeyError):  # not a session (another tool's record): as good as absent
        raise missing from None
    if meta.get("owner", "") != owner:
        raise missing
    return Session(key, state, owner, int(meta["ttl_s"]), record.expires_at, record.version)


def delete(app: AppState, owner: str, key: str) -> None:
    """Drop the session (SessionNotFound if there is none for this owner)."""
    load(app, owner, key)
    if not app.store.delete_record(NAMESPACE, key):
        raise SessionNotFound(f"no session {key!r}: unknown or expired")


@dataclass(frozen=True)
class Appended:
    """A segment's result, the session after it, and the segment's heatmaps."""

    result: SegmentResult
    session: Session
    heatmaps: list[dict]


def _shape4(a: np.ndarray) -> tuple[int, ...]:
    return (1,) * (4 - a.ndim) + a.shape if 2 <= a.ndim <= 4 else (0, 0, 0, 0)


def _check_limits(
    app: AppState,
    session: Session,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    weights: bool,
    spec: HeatmapSpec | None,
) -> None:
    """Everything the append would allocate must fit the limits, checked before it starts."""
    b, hq, n, _ = _shape4(q)
    _, hkv, _, d = _shape4(k)
    dv = _shape4(v)[3]
    s = session.state
    seen = s.compressed + s.raw + n
    spec_mem = s.options.memory
    held = spec_mem.length + spec_mem.compressed
    limits = app.limits
    limits.elements("k", (b, hkv, seen, max(d, dv)), "the segment's keys with the memory")
    limits.elements("k", (b, hkv, held, max(d, dv)), "the session's memory")
    limits.elements("v", (b, hq, n, dv), "the output")
    if weights:
        limits.elements("q", (b, hq, n, seen), "the weights")
    if spec is not None:
        images.check_spec(spec.model_copy(update={"tokens": None}), (b, hq, n, seen), limits)
        if spec.tokens is not None and len(spec.tokens) != n:
            raise InputError(
                ("heatmap", "tokens"), f"{len(spec.tokens)} labels for the segment's {n} positions"
            )


def append_segment(
    app: AppState,
    session: Session,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    return_weights: bool,
    spec: HeatmapSpec | None,
    end: bool = False,
) -> Appended:
    """Attention for one segment; the session replaced in the store (or, `end`, dropped) only
    if nobody appended meanwhile (SessionConflict otherwise: nothing appended)."""
    _check_limits(app, session, q, k, v, return_weights, spec)
    result, state = append(
        session.state,
        q,
        k,
        v,
        return_weights=return_weights or spec is not None,
        num_threads=app.num_threads,
    )
    value = _value(state, session.owner, session.ttl_s)
    try:
        record = app.store.replace_record(
            NAMESPACE, session.key, value, version=session.version, ttl_s=session.ttl_s
        )
    except VersionConflict as exc:
        raise SessionConflict(
            f"{_what(session.key)} moved on (another segment was appended while this one was "
            f"computed: version {exc.version}, this one read {session.version}); this segment "
            "was not appended: send it again"
        ) from None
    if record is None:
        raise SessionNotFound(f"{_what(session.key)} ended or expired while the segment ran")
    if end:
        app.store.delete_record(NAMESPACE, session.key)
    after = replace(session, state=state, expires_at=record.expires_at, version=record.version)
    drawn = _draw(app, session, result, spec) if spec is not None else []
    if spec is not None and not return_weights:
        result = replace(result, weights=None, lse=None)
    return Appended(result, after, drawn)


def _draw(app: AppState, session: Session, result: SegmentResult, spec: HeatmapSpec) -> list[dict]:
    """The segment's weights over its keys [compressed | memory | segment], labelled."""
    s, m = result.memory_compressed, result.memory_raw
    weights = np.asarray(result.weights)
    n = weights.shape[-2]
    start = result.position - n
    if spec.tokens is not None:  # the segment's labels, after the memory's positions
        c = session.state.options.memory.slot_rate
        first_slot = (start - m) // c - s
        labels = [f"slot {first_slot + t}" for t in range(s)]
        labels += [f"@{p}" for p in range(start - m, start)] + list(spec.tokens)
        spec = spec.model_copy(update={"tokens": labels})
    title = f"{_what(session.key)}, positions {start}-{start + n - 1}"
    sections = [("compressed", s), ("memory", m), ("segment", n)]
    return images.draw_weights(weights, spec, app.store, title=title, sections=sections)
