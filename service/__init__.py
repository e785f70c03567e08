"""Attention as a service: exact fused attention (C++) behind a Python API and HTTP fronts.

The Python API is exported here lazily (PEP 562): `service.attention` imports the compute core
(and the compiled extension) on first use, so `import service.client` needs neither the
extension nor the web framework. The layers are subpackages:

- service.core: attention on arrays (numpy, pydantic and the extension only);
- service.render: PNG pictures of attention (matplotlib and Pillow, on top of the core);
- service.distributed: one exact attention split across a Ray cluster (the `ray` extra; Ray is
  imported on first use of service.distributed_attention only);
- service.web: the HTTP service (FastAPI), one subpackage per protocol front (v1, v2);
- service.client and service.cli: a client of the HTTP service, and its command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exported name -> the module that defines it.
_EXPORTS = {
    "attention": "service.core.attention",
    "multihead_attention": "service.core.multihead",
    "attention_map": "service.core.maps",
    "distributed_attention": "service.distributed.attention",
    "init_multihead_weights": "service.core.weights",
    "block_layout": "service.core.layouts",
    "MemorySession": "service.core.sessions",
    "MemoryState": "service.core.sessions",
    "SegmentResult": "service.core.sessions",
    "Memory": "service.core.options",
    "MemorySpec": "service.core.options",
    "BlockMask": "service.core.options",
    "BlockPattern": "service.core.options",
    "AttentionResult": "service.core.results",
    "MultiheadResult": "service.core.results",
    "AttentionMaps": "service.core.results",
    "AttentionOptions": "service.core.options",
    "MaskingOptions": "service.core.options",
    "MultiheadOptions": "service.core.options",
    "MultiheadWeights": "service.core.options",
    "Window": "service.core.options",
    "InputError": "service.core.errors",
    "LimitError": "service.core.errors",
    "__version__": "service.core.version",
}

__all__ = [
    "AttentionMaps",
    "AttentionOptions",
    "AttentionResult",
    "BlockMask",
    "BlockPattern",
    "InputError",
    "LimitError",
    "MaskingOptions",
    "Memory",
    "MemorySession",
    "MemorySpec",
    "MemoryState",
    "MultiheadOptions",
    "MultiheadResult",
    "MultiheadWeights",
    "SegmentResult",
    "Window",
    "__version__",
    "attention",
    "attention_map",
    "distributed_attention",
    "block_layout",
    "init_multihead_weights",
    "multihead_attention",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from service.core.attention import attention
    from service.core.errors import InputError, LimitError
    from service.core.layouts import block_layout
    from service.core.maps import attention_map
    from service.core.multihead import multihead_attention
    from service.core.options import (
        AttentionOptions,
        BlockMask,
        BlockPattern,
        MaskingOptions,
        Memory,
        MemorySpec,
        MultiheadOptions,
        MultiheadWeights,
        Window,
    )
    from service.core.results import AttentionMaps, AttentionResult, MultiheadResult
    from service.core.sessions import MemorySession, MemoryState, SegmentResult
    from service.core.version import VERSION as __version__
    from service.core.weights import init_multihead_weights
    # Not distributed_attention: the compute core imports this package (the extension lives
    # in it), so naming the distributed layer here would look to `make lint` like the core
    # reaching above itself. It is service.distributed.attention.distributed_attention.


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), "VERSION" if name == "__version__" else name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
