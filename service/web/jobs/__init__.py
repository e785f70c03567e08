"""The work behind each HTTP front, shared by /v1 and the Open Inference Protocol (/v2): one
module per job (attention, multihead, tokens and the real model).

Every request goes one way: the route parses its own wire format into the options model,
tensors and a heatmap spec; a job here checks the limits before anything large is allocated,
runs the compute core and draws the heatmaps (service.web.images); the route encodes the plain
result in its own format. Errors name the option fields (InputError); each front maps those
locations onto its own names. `compute` lets a front name the core function it runs (one place
to wrap it, as the overload tests do on the /v1 routes).
"""

from service.web.jobs.attention import (
    INLINE_MAX_ELEMENTS,
    INLINE_MAX_FLOPS,
    AttentionJob,
    fits_inline,
    run_attention,
)
from service.web.jobs.multihead import MultiheadJob, run_multihead
from service.web.jobs.tokens import ModelJob, TokensJob, load_model, run_model, run_tokens

__all__ = [
    "INLINE_MAX_ELEMENTS",
    "INLINE_MAX_FLOPS",
    "AttentionJob",
    "ModelJob",
    "MultiheadJob",
    "TokensJob",
    "fits_inline",
    "load_model",
    "run_attention",
    "run_model",
    "run_multihead",
    "run_tokens",
]
