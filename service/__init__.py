"""Attention as a service: exact fused attention (C++) behind a Python API and HTTP fronts."""

from service.api import AttentionResult, MultiheadResult, attention, multihead_attention
from service.errors import InputError
from service.options import (
    AttentionOptions,
    MaskingOptions,
    MultiheadOptions,
    MultiheadWeights,
    Window,
)
from service.weights import init_multihead_weights

__all__ = [
    "AttentionOptions",
    "AttentionResult",
    "InputError",
    "MaskingOptions",
    "MultiheadOptions",
    "MultiheadResult",
    "MultiheadWeights",
    "Window",
    "attention",
    "init_multihead_weights",
    "multihead_attention",
]
