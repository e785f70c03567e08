"""Type stub of the compiled extension (native/bindings.cpp): fused attention kernels.

Arrays are read in place through their strides; q, k, v of attention() are float32, float16 or
bfloat16 (ml_dtypes' dtype, or int16/uint16 bits with bfloat16=True), those of the other entry
points and the weights float32, masks bool or float32, block layouts bool, key_lengths,
global_tokens and weights_rows int64, cu_seqlens int32 or int64. Shapes are checked natively and
every problem is a ValueError whose message starts with the argument's name.
"""

import numpy as np
import numpy.typing as npt
from typing_extensions import TypedDict, Unpack

__version__: str

_Float32 = npt.NDArray[np.float32]

class _MaskArgs(TypedDict, total=False):
    """Which keys each query sees (native/masking.cpp checks them and builds the mask plan)."""

    causal: int  # 0 none, 1 top-left, 2 bottom-right
    mask: np.ndarray | None  # bool (True = attend) or float32 added to the scores
    key_lengths: np.ndarray | None
    window_left: int  # -1: unbounded
    window_right: int
    dilation: int
    global_tokens: np.ndarray | None
    block_layout: np.ndarray | None  # bool, broadcastable to (B, Hq, ceil(Lq/bq), ceil(Lk/bk))
    block_q: int  # 0 without a layout
    block_k: int  # 0: block_q
    cu_seqlens: np.ndarray | None  # packed documents' offsets (q and k alike), B = 1
    cu_seqlens_q: np.ndarray | None
    cu_seqlens_k: np.ndarray | None
    key_begin: int  # keys outside [key_begin, key_end) are not seen; positions stay absolute
    key_end: int  # -1: Lk
    # Recurrent memory: segments of memory_segment rows (0: off) seeing memory_length raw keys
    # before them; with memory_compressed > 0, k and v hold the Lq raw positions followed by
    # ceil(Lq / memory_rate) pooled slots, of which each segment sees its last memory_compressed
    # slots ending at or before its raw memory.
    memory_segment: int
    memory_length: int
    memory_compressed: int
    memory_rate: int

class _Masking(_MaskArgs, total=False):
    """Keyword arguments every entry point takes: which keys each query sees, how scores form
    (service.core.masking builds them from the options model), threads and cancellation."""

    alibi_slopes: np.ndarray | None
    softcap: float  # 0: none
    num_threads: int  # 0: the default
    cancel: CancelFlag | None

class _PlanSummary(TypedDict):
    groups: int
    items: int
    spans: int
    full_spans: int
    pairs: int  # (query, key) pairs visited, over every batch and head
    head_dependent: bool
    build_seconds: float

class Cancelled(RuntimeError):
    """A call stopped because its CancelFlag was set."""

class CancelFlag:
    """Pass as cancel= to a call; set() from another thread stops it (it raises Cancelled)
    after each worker finishes its current item."""

    def __init__(self) -> None: ...
    def set(self) -> None: ...
    def is_set(self) -> bool: ...

def version() -> str:
    """The package version (same as __version__)."""

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    return_weights: bool = False,
    weights_rows: np.ndarray | None = None,
    bfloat16: bool = False,
    precision: str = "auto",
    out_dtype: str = "float32",
    **masking: Unpack[_Masking],
) -> tuple[np.ndarray, _Float32, _Float32 | None]:
    """Exact attention: (out (B,Hq,Lq,Dv), lse (B,Hq,Lq), weights or None): the weights are
    (B,Hq,Lq,Lk) with return_weights, (B,Hq,len(weights_rows),Lk) for the rows asked for.

    precision: 'auto' (bf16 dot products for bfloat16 inputs where the CPU has AVX512_BF16,
    else float32), 'fp32' or 'bf16' (bf16 numerics, emulated without the instruction).
    out_dtype: float32, bfloat16 (uint16 bits), float16 or input (q's dtype)."""

def multihead(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    q_weight: np.ndarray,
    k_weight: np.ndarray,
    v_weight: np.ndarray,
    out_weight: np.ndarray,
    q_bias: np.ndarray | None = None,
    k_bias: np.ndarray | None = None,
    v_bias: np.ndarray | None = None,
    out_bias: np.ndarray | None = None,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    return_weights: bool = False,
    weights_rows: np.ndarray | None = None,
    **masking: Unpack[_Masking],
) -> tuple[_Float32, _Float32, _Float32 | None]:
    """torch.nn.MultiheadAttention(batch_first=True) math with grouped kv heads:
    (out (B,Lq,E), lse (B,H,Lq), weights (B,H,Lq or len(weights_rows),Lk) or None)."""

def attention_maps(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    bins_q: int = 1,
    bins_k: int = 1,
    top_k: int = 0,
    **masking: Unpack[_Masking],
) -> tuple[
    _Float32,
    _Float32,
    npt.NDArray[np.float64],
    _Float32,
    npt.NDArray[np.int64],
    _Float32,
    npt.NDArray[np.float64],
]:
    """Exact attention maps in O(L) memory: (out, lse, pooled (B,Hq,Pq,Pk) bin means,
    entropy (B,Hq,Lq), top_idx and top_w (B,Hq,Lq,K), column sums (B,Hq,Lk))."""

def mask_plan(
    b: int, hq: int, lq: int, lk: int, *, kernel: str = "attention", **masking: Unpack[_MaskArgs]
) -> _PlanSummary:
    """Summary of the mask plan of a call with these shapes and masking options."""

def set_num_threads(n: int) -> None:
    """Default number of threads for calls with num_threads=0."""

def get_num_threads() -> int: ...
def isa() -> str:
    """Instruction set in use: baseline, avx2, avx512 or avx512bf16."""

def bf16_dot() -> bool:
    """Whether the build in use forms bf16 products with the CPU's instruction."""

def available_isas() -> list[str]:
    """Instruction sets this CPU supports and this build contains."""

def set_isa(name: str) -> None:
    """Force an instruction set."""
