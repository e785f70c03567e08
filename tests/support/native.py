"""Helpers of the native tests (tests/native): the instruction sets, switching between them,
and the Hypothesis settings of the fuzzers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

from service import _native

# Every instruction set the extension is built for (native/dispatch.cpp), and what each needs of
# the CPU, in /proc/cpuinfo's names.
REQUIRES = {
    "baseline": {"sse4_2"},
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"},
}
ISAS = _native.available_isas()  # those this CPU runs

# ATTN_FUZZ_SCALE multiplies the number of examples (`make fuzz` runs 10x).
FUZZ_SCALE = int(os.environ.get("ATTN_FUZZ_SCALE", "1"))


@contextmanager
def isa_set(name: str) -> Iterator[None]:
    previous = _native.isa()
    _native.set_isa(name)
    try:
        yield
    finally:
        _native.set_isa(previous)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        database=None,
        # Reproducible in `make test`; `make fuzz` (ATTN_FUZZ_RANDOM=1) explores new examples.
        derandomize=not os.environ.get("ATTN_FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
