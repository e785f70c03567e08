"""Request parameters and tensor options of the Open Inference Protocol front, as the one
options model (service.core.options), and errors located by /v2's names.

Protocol parameters are scalars, so options that are not travel otherwise: tensor options
(mask, key_lengths, projection weights) and the integer lists of packed documents and chosen
rows (cu_seqlens, cu_seqlens_q, cu_seqlens_k, weights_rows) are inputs; `window` is split into
window_left, window_right and dilation; `block_mask` into an input block_layout and parameters
block_q and block_k (block_k defaulting to block_q); `memory` into memory_segment,
memory_length, memory_compressed, memory_rate and memory_pool; list options (global_tokens,
alibi_slopes) take a JSON list or a comma-separated string. A sequence (Triton's sequence_id,
sequence_start, sequence_end) takes its memory from its first request's parameters
(`sequence_options`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from service.core.errors import InputError
from service.core.options import AttentionOptions, MultiheadOptions
from service.core.sessions import SessionOptions
from service.web.images import HeatmapSpec
from service.web.problems import validation_items
from service.web.v2.errors import ProtocolError

Tensors = dict[str, np.ndarray]  # inputs or outputs, by name
Params = dict[str, Any]  # request or response parameters
OptionsT = TypeVar("OptionsT", AttentionOptions, MultiheadOptions)

# Options that are tensors travel as inputs; `window` is split into three scalar parameters,
# `block_mask` into the input block_layout and the parameters block_q and block_k.
INT_INPUTS = ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "weights_rows")
_TENSOR_OPTIONS = frozenset({"mask", "key_lengths", "weights", "block_mask", *INT_INPUTS})
_BLOCK = ("block_q", "block_k")
_WINDOW = {"window_left": "left", "window_right": "right", "dilation": "dilation"}
_MEMORY = {f"memory_{name}": name for name in ("segment", "length", "compressed", "rate", "pool")}
_LIST_OPTIONS: dict[str, type] = {"global_tokens": int, "alibi_slopes": float}
_HEATMAP = {
    "heatmap_batch": "batch",
    "heatmap_heads": "heads",
    "heatmap_tokens": "tokens",
    "heatmap_inline": "inline",
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
BIASES = ("q_bias", "k_bias", "v_bias", "out_bias")
_SEPARATORS = re.compile(r"[,\s]+")


@functools.cache
def parameter_names(options: type[BaseModel]) -> tuple[str, ...]:
    """Every option of `options` as a parameter name (so new options become parameters too)."""
    names = [
        n
        for n in options.model_fields
        if n not in _TENSOR_OPTIONS and n not in ("window", "memory")
    ]
    memory = tuple(_MEMORY) if "memory" in options.model_fields else ()
    return (*names, *_WINDOW, *_BLOCK, *memory, "heatmap", *_HEATMAP)


# ---------------------------------------------------------------------------------------------
# Parameters -> options


def _split_list(name: str, value: Any, item: type) -> Any:
    """A list option from a JSON list, one number, or a comma/space separated string."""
    if isinstance(value, str):
        text = value.strip()
        if name == "alibi_slopes" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        parts = [p for p in _SEPARATORS.split(text) if p]
        try:
            return [item(p) for p in parts]
        except ValueError:
            raise InputError(
                ("parameters", name),
                f"expected {'integers' if item is int else 'numbers'} separated by commas, "
                f"got {value[:60]!r}",
            ) from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value  # a list or a bool: the options model validates it


def heatmap_spec(params: Mapping[str, Any]) -> HeatmapSpec | None:
    """`heatmap` (true, or v1's object) and the heatmap_* companions as a HeatmapSpec."""
    flag = params.get("heatmap")
    if isinstance(flag, str) and flag.strip().lower() in ("true", "false"):
        flag = flag.strip().lower() == "true"
    extras = {_HEATMAP[k]: v for k, v in params.items() if k in _HEATMAP}
    if flag is None or flag is False:
        if extras:
            first = next(k for k in params if k in _HEATMAP)
            raise InputError(("parameters", first), "applies only with heatmap: true")
        return None
    if flag is True:
        spec: dict[str, Any] = {}
    elif isinstance(flag, dict):
        spec = dict(flag)  # v1's object form, for clients that send JSON objects as parameters
    else:
        raise InputError(("parameters", "heatmap"), "expected true or false")
    heads = extras.get("heads")
    if isinstance(heads, str) and heads.strip() not in ("all", "mean"):
        extras["heads"] = _split_list("heatmap_heads", heads, int)
    elif isinstance(heads, int) and not isinstance(heads, bool):
        extras["heads"] = [heads]
    if isinstance(extras.get("tokens"), str):
        extras["tokens"] = extras["tokens"].split()
    spec.update(extras)
    try:
        return HeatmapSpec.model_validate(spec)
    except ValidationError as exc:
        item = validation_items(exc)[0]
        field = str(item["loc"][0]) if item["loc"] else ""
        name = f"heatmap_{field}" if f"heatmap_{field}" in _HEATMAP else "heatmap"
        raise InputError(("parameters", name), item["msg"]) from None


def v2_loc(loc: tuple[str | int, ...], names: frozenset[str]) -> tuple[str | int, ...]:
    """A v1 error location in the /v2 vocabulary (parameter and input names)."""
    if not loc:
        return loc
    head = loc[0]
    if head == "window" and len(loc) > 1:
        return ("parameters", "dilation" if loc[1] == "dilation" else f"window_{loc[1]}")
    if head == "heatmap":
        return ("parameters", f"heatmap_{loc[1]}" if len(loc) > 1 else "heatmap")
    if head == "weights" and len(loc) > 1:
        return loc[1:]  # projection weights are inputs of their own
    if head == "memory":
        return ("parameters", f"memory_{loc[1]}" if len(loc) > 1 else "memory_segment")
    if head == "block_mask":
        if len(loc) > 1 and loc[1] == "block_size":
            return ("parameters", "block_q")
        return ("block_layout",)
    if head in names:
        return ("parameters", *loc)
    return loc


def parse_options(model: type[OptionsT], params: Params, tensors: Tensors) -> OptionsT:
    """The options model from the parameters and the tensor options given as inputs (mask,
    key_lengths, projection weights); every name checked, errors named as /v2 names them."""
    names = parameter_names(model)
    _check_parameters(params, names)
    data: dict[str, Any] = {"key_lengths": _key_lengths(tensors.get("key_lengths"))}
    if "mask" in tensors:
        data["mask"] = tensors["mask"]
    if "weights" in model.model_fields:
        weights = _projection_weights(tensors)
        if weights is not None:
            data["weights"] = weights
    window: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for name, value in params.items():
        if name in _BLOCK:
            continue  # with the block_layout input
        if name in _WINDOW:
            window[_WINDOW[name]] = value
        elif name in _MEMORY:
            memory[_MEMORY[name]] = value
        elif name in _LIST_OPTIONS:
            data[name] = _split_list(name, value, _LIST_OPTIONS[name])
        elif name != "heatmap" and name not in _HEATMAP:
            data[name] = value
    if window:
        data["window"] = window
    if memory:
        data["memory"] = memory
    block = _block_mask(tensors.get("block_layout"), params)
    if block is not None:
        data["block_mask"] = block
    for name in INT_INPUTS:
        if name in tensors:
            data[name] = _int_list(name, tensors[name])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        item = validation_items(exc)[0]
        loc = v2_loc(tuple(item["loc"]), frozenset(names))
        raise InputError(loc or ("parameters",), item["msg"]) from None


# Parameters of a sequence's requests: its memory and options on the first (sequence_start),
# the outputs' on every one.
_SEQUENCE_START = ("memory_length", "memory_compressed", "memory_rate", "memory_pool", "causal",
                   "scale")  # fmt: skip
_SEQUENCE_ANY = ("return_weights", "heatmap", *_HEATMAP)


def sequence_options(
    params: Params, tensors: Tensors, start: bool
) -> tuple[SessionOptions | None, bool]:
    """A sequence request's (options when it starts the sequence, return_weights); its inputs
    are q, k and v alone."""
    known = (*_SEQUENCE_START, *_SEQUENCE_ANY) if start else _SEQUENCE_ANY
    for name in params:
        if name not in known:
            why = (
                "a sequence's segments are its requests"
                if name == "memory_segment"
                else "the request with sequence_start sets the sequence's options"
                if name in _SEQUENCE_START
                else "a sequence streams recurrent memory; its requests take " + ", ".join(known)
            )
            raise InputError(("parameters", name), f"not accepted in a sequence ({why})")
    for name in tensors:
        if name not in ("q", "k", "v"):
            raise ProtocolError(f"input '{name}': a sequence's requests take q, k and v only")
    flag = params.get("return_weights", False)
    if not isinstance(flag, bool):
        raise InputError(("parameters", "return_weights"), "expected true or false")
    if not start:
        return None, flag
    memory = {_MEMORY[n]: v for n, v in params.items() if n in _MEMORY}
    data = {n: params[n] for n in ("causal", "scale") if n in params}
    try:
        return SessionOptions.model_validate({"memory": memory, **data}), flag
    except ValidationError as exc:
        item = validation_items(exc)[0]
        loc = v2_loc(tuple(item["loc"]), frozenset(_SEQUENCE_START))
        raise InputError(loc or ("parameters",), item["msg"]) from None


def _block_mask(layout: np.ndarray | None, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The block_mask option from the block_layout input and the block_q / block_k parameters."""
    if layout is None:
        for name in _BLOCK:
            if name in params:
                raise InputError(("parameters", name), "applies only with a block_layout input")
        return None
    if "block_q" not in params:
        raise InputError(("parameters", "block_q"), "required with a block_layout input")
    bq = params["block_q"]
    return {"block_size": [bq, params.get("block_k", bq)], "layout": layout}


def _int_list(name: str, arr: np.ndarray) -> list[int]:
    if arr.ndim != 1:
        raise ProtocolError(f"input '{name}': expected shape [n], got {list(arr.shape)}")
    return arr.tolist()


def _check_parameters(params: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for name in params:
        if name not in known:
            raise ProtocolError(
                f"unknown parameter '{name}'; this model's parameters are {', '.join(known)}"
            )


def _key_lengths(arr: np.ndarray | None) -> list[int] | None:
    if arr is None:
        return None
    if arr.ndim != 1:
        raise ProtocolError(
            f"input 'key_lengths': expected shape [B] (one length per batch item), got "
            f"{list(arr.shape)}"
        )
    return arr.tolist()


def _projection_weights(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    given = [n for n in (*PROJECTIONS, *BIASES) if n in tensors]
    if not given:
        return None
    missing = [n for n in PROJECTIONS if n not in tensors]
    if missing:
        raise ProtocolError(
            f"inputs {', '.join(PROJECTIONS)} go together (biases are optional); missing: "
            f"{', '.join(missing)}"
        )
    return {n: tensors[n] for n in given}
