"""/v1/sessions: the requests and responses of memory sessions (service.web.sessions)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.core.sessions import SessionOptions
from service.core.tensor_field import Tensor
from service.web.docs import example_config
from service.web.v1.schemas import HeatmapRef, Meta, _EncodedQKV, _WithHeatmap

_MEMORY_EXAMPLE = {"length": 512, "compressed": 64, "rate": 4, "pool": "mean"}


class SessionCreateRequest(SessionOptions):
    """Open a session: its memory, causality, score scale and lifetime."""

    model_config = example_config(
        {"memory": _MEMORY_EXAMPLE, "causal": True, "ttl_s": 600}, extra="forbid"
    )

    ttl_s: int | None = Field(
        None,
        ge=1,
        description="Seconds the session lives after its last segment; default and most: "
        "ATTN_SESSION_TTL_S.",
    )


class MemoryHeld(BaseModel):
    raw: int = Field(description="Raw positions (at most memory.length).")
    compressed: int = Field(description="Compressed slots (at most memory.compressed).")


class SegmentShape(BaseModel):
    """What every segment keeps of the first one's shape (all but its length)."""

    rank: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int


class SessionInfo(BaseModel):
    """A session: where it stands and what it holds for the next segment."""

    model_config = example_config(
        {
            "id": "c2Vzc2lvbi1leGFtcGxlLQ",
            "position": 1024,
            "expires_at": "2025-01-01T12:00:00Z",
            "ttl_s": 3600,
            "memory": {"raw": 512, "compressed": 64},
            "options": {"memory": _MEMORY_EXAMPLE, "causal": True, "scale": None},
            "shape": dict(rank=3, batch=1, heads=8, kv_heads=8, head_dim=64, value_dim=64),
        }
    )

    id: str
    position: int = Field(description="Positions streamed so far.")
    expires_at: str = Field(description="RFC 3339 UTC: ttl_s after the last segment.")
    ttl_s: int
    memory: MemoryHeld = Field(description="What the next segment will attend to.")
    options: SessionOptions
    shape: SegmentShape | None = Field(description="null before the first segment.")


class SegmentRequest(_WithHeatmap, _EncodedQKV):
    """One segment: q, k, v of its n positions (Lq = Lk = n: (n, D), (H, n, D) or (B, H, n, D),
    the first segment's shape but the length; n a multiple of memory.rate when compressed > 0)."""

    model_config = example_config(
        {
            "q": [[0.1, 0.2], [0.3, 0.4]],
            "k": [[0.1, 0.2], [0.3, 0.4]],
            "v": [[1.0, 0.0], [0.0, 1.0]],
            "heatmap": True,
        },
        extra="forbid",
    )

    return_weights: bool = Field(
        False,
        description="Also return the weights (.., Hq, n, slots + raw + n) over the keys "
        "[compressed | memory | segment] and the row log-sum-exp.",
    )


class SegmentResponse(BaseModel):
    """A segment's attention, and where the session stands after it."""

    model_config = example_config(
        {
            "output": [[0.5, 0.5], [0.45, 0.55]],
            "position": 2,
            "memory": {"raw": 0, "compressed": 0},
            "expires_at": "2025-01-01T12:00:00Z",
            "heatmaps": [],
            "meta": {"shape": [2, 2], "elapsed_ms": 0.02, "flops": 32, "method": "exact"},
        }
    )

    output: Tensor = Field(description="(.., Hq, n, Dv), q's rank.")
    weights: Tensor | None = Field(
        None, description="(.., Hq, n, slots + raw + n) over [compressed | memory | segment]."
    )
    lse: Tensor | None = Field(None, description="(.., Hq, n) row log-sum-exp.")
    position: int = Field(description="Positions streamed so far, this segment included.")
    memory: MemoryHeld = Field(description="The memory this segment attended to.")
    expires_at: str
    heatmaps: list[HeatmapRef] = Field(
        default_factory=list,
        description="The segment's keys drawn as [compressed | memory | segment], labelled.",
    )
    meta: Meta


# Request models whose JSON schema the routes reference (they parse bodies themselves).
REQUEST_MODELS: tuple[type[BaseModel], ...] = (SessionCreateRequest, SegmentRequest)
