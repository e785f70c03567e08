"""`block_layout`: the common block-sparse layouts, so users need not draw them by hand.

A layout says which (query block, key block) pairs attention computes; pass it as
`block_mask={"block_size": ..., "layout": block_layout(...)}`, or name the pattern directly
(`block_mask={"block_size": ..., "pattern": {"kind": ...}}`). The diagonal of query block qb is
the key blocks that cover the same positions (top-left aligned: rows qb*bq .. qb*bq + bq - 1);
"local" keeps them and `window` key blocks on each side; "strided" (Sparse Transformer, Child
et al. 2019) adds every stride-th key block (the last of each group of `stride`); "bigbird"
(Zaheer et al. 2020) adds `global_blocks` global blocks (the first query blocks see every key
block, and the first key blocks are seen by every query block) and `random_blocks` random key
blocks per query block, drawn from `seed`, different for each head when num_heads is given.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from service.core.errors import InputError

PatternKind = Literal["local", "strided", "bigbird"]

# Cells a pattern may produce: a layout that large is a dense mask, which `mask` serves better.
MAX_CELLS = 1 << 26


def block_layout(
    kind: PatternKind,
    q_len: int,
    k_len: int,
    block_size: int | tuple[int, int],
    *,
    window: int = 1,
    stride: int | None = None,
    global_blocks: int = 0,
    random_blocks: int = 0,
    seed: int = 0,
    num_heads: int | None = None,
) -> np.ndarray:
    """A bool layout (ceil(q_len/bq), ceil(k_len/bk)), or (num_heads, ...) for "bigbird" with
    random blocks and num_heads given (each head its own random blocks)."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    if bq < 1 or bk < 1:
        raise InputError(("block_mask", "block_size"), f"must be >= 1, got {block_size}")
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    heads = num_heads if kind == "bigbird" and random_blocks and num_heads else 1
    if heads * nq * nk > MAX_CELLS:
        raise InputError(
            ("block_mask", "block_size"),
            f"the {kind} layout would have {heads * nq * nk} blocks (more than {MAX_CELLS}); "
            "use larger blocks",
        )
    qb = np.arange(nq)[:, None]
    kb = np.arange(nk)[None, :]
    first = (qb * bq) // bk  # key blocks covering query block qb's positions
    last = np.minimum(qb * bq + bq - 1, max(q_len - 1, 0)) // bk
    keep = (kb >= first - window) & (kb <= last + window)
    if kind == "strided":
        if stride is None or stride < 1:
            raise InputError(("block_mask", "pattern", "stride"), '"strided" needs a stride >= 1')
        keep = keep | (kb % stride == stride - 1)
    elif kind == "bigbird":
        keep = keep | (kb < global_blocks) | (qb < global_blocks)
        if random_blocks:
            return _with_random(keep, random_blocks, seed, heads)
    elif kind != "local":
        raise InputError(("block_mask", "pattern", "kind"), f"unknown layout kind {kind!r}")
    return keep


def _with_random(keep: np.ndarray, count: int, seed: int, heads: int) -> np.ndarray:
    """`keep` plus, per head and query block, `count` key blocks drawn without replacement
    from those it does not keep yet (all of them when fewer remain)."""
    rng = np.random.default_rng(seed)
    out = np.broadcast_to(keep, (heads, *keep.shape)).copy()
    # Random priorities; kept blocks never win. The `count` smallest of each row are drawn.
    prio = rng.random(out.shape)
    prio[out] = np.inf
    take = min(count, keep.shape[1])
    if take:
        drawn = np.argpartition(prio, take - 1, axis=-1)[..., :take]
        rows = np.take_along_axis(prio, drawn, axis=-1) < np.inf
        hh = np.arange(heads)[:, None, None]
        qq = np.arange(keep.shape[0])[None, :, None]
        out[hh, qq, drawn] |= rows
    return out if heads > 1 else out[0]
