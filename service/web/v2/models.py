"""The two models of the Open Inference Protocol front: `attention` and `multihead`.

Each model declares its inputs and outputs (the metadata), maps the request `parameters` onto
the one options model (service.core.options) under the options' own names, and runs the jobs
the v1 routes run (service.web.jobs: the same limits, checked before anything large is
allocated). Tensor options (mask, key_lengths, projection weights) travel as inputs; `window`
is split into window_left, window_right and dilation, since protocol parameters are scalars;
list options (global_tokens, alibi_slopes) take a JSON list or a comma-separated string.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from service.core.errors import InputError
from service.core.options import AttentionOptions, MultiheadOptions
from service.web.deps import AppState
from service.web.images import HeatmapSpec
from service.web.jobs import run_attention, run_multihead
from service.web.problems import validation_items
from service.web.v2.codec import FLOAT_TYPES, TensorSpec
from service.web.v2.errors import ProtocolError, UnknownModel

VERSION = "1"
PLATFORM = "attention_native"

Tensors = dict[str, np.ndarray]  # inputs or outputs, by name
Params = dict[str, Any]  # request or response parameters
Requested = tuple[str, ...] | None  # the outputs a request names (None: the defaults)
Result = tuple[Tensors, Params]  # the outputs, and the response parameters
Infer = Callable[[AppState, Tensors, Params, Requested], Result]
OptionsT = TypeVar("OptionsT", AttentionOptions, MultiheadOptions)

# Options that are tensors travel as inputs; `window` is split into three scalar parameters.
_TENSOR_OPTIONS = frozenset({"mask", "key_lengths", "weights"})
_WINDOW = {"window_left": "left", "window_right": "right", "dilation": "dilation"}
_LIST_OPTIONS: dict[str, type] = {"global_tokens": int, "alibi_slopes": float}
_HEATMAP = {
    "heatmap_batch": "batch",
    "heatmap_heads": "heads",
    "heatmap_tokens": "tokens",
    "heatmap_inline": "inline",
}
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_BIASES = ("q_bias", "k_bias", "v_bias", "out_bias")
_SEPARATORS = re.compile(r"[,\s]+")


@functools.cache
def _parameter_names(options: type[BaseModel]) -> tuple[str, ...]:
    """Every option of `options` as a parameter name (so new options become parameters too)."""
    names = [n for n in options.model_fields if n not in _TENSOR_OPTIONS and n != "window"]
    return (*names, *_WINDOW, "heatmap", *_HEATMAP)


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


def _heatmap_spec(params: Mapping[str, Any]) -> HeatmapSpec | None:
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


def _v2_loc(loc: tuple[str | int, ...], names: frozenset[str]) -> tuple[str | int, ...]:
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
    if head in names:
        return ("parameters", *loc)
    return loc


def _parse_options(model: type[OptionsT], params: Params, tensors: Tensors) -> OptionsT:
    """The options model from the parameters and the tensor options given as inputs (mask,
    key_lengths, projection weights); every name checked, errors named as /v2 names them."""
    names = _parameter_names(model)
    _check_parameters(params, names)
    data: dict[str, Any] = {"key_lengths": _key_lengths(tensors.get("key_lengths"))}
    if "mask" in tensors:
        data["mask"] = tensors["mask"]
    if "weights" in model.model_fields:
        weights = _projection_weights(tensors)
        if weights is not None:
            data["weights"] = weights
    window: dict[str, Any] = {}
    for name, value in params.items():
        if name in _WINDOW:
            window[_WINDOW[name]] = value
        elif name in _LIST_OPTIONS:
            data[name] = _split_list(name, value, _LIST_OPTIONS[name])
        elif name != "heatmap" and name not in _HEATMAP:
            data[name] = value
    if window:
        data["window"] = window
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        item = validation_items(exc)[0]
        loc = _v2_loc(tuple(item["loc"]), frozenset(names))
        raise InputError(loc or ("parameters",), item["msg"]) from None


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


def _wanted(requested: Requested, weights_flag: bool, extra: tuple[str, ...]) -> tuple[str, ...]:
    """Outputs to return: the requested ones (default `output`), plus `extra` when the flag
    (return_weights / need_weights) is set."""
    names = list(requested) if requested is not None else ["output"]
    if weights_flag:
        names += [n for n in extra if n not in names]
    return tuple(names)


def _response_parameters(result: Any, drawn: list[dict], method: str) -> dict[str, Any]:
    """What v1 puts in `meta` and `heatmaps`, as scalar response parameters."""
    params: dict[str, Any] = {
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": method,
    }
    for image in drawn:
        head = image["head"]
        key = f"heatmap_b{image['batch']}_{f'h{head}' if isinstance(head, int) else head}"
        params[key] = image["url"] if "url" in image else f"data:image/png;base64,{image['png']}"
    return params


# ---------------------------------------------------------------------------------------------
# attention


_ATTENTION_PARAMETERS = _parameter_names(AttentionOptions)


def _attention(state: AppState, tensors: Tensors, params: Params, requested: Requested) -> Result:
    opts = _parse_options(AttentionOptions, params, tensors)
    spec = _heatmap_spec(params)
    if spec is not None and opts.compare:
        raise InputError(
            ("parameters", "heatmap"),
            "heatmaps of a comparison are drawn by /v1/attention only; on /v2, ask for compare "
            "or for heatmap",
        )
    wanted = _wanted(requested, opts.return_weights, ("weights", "lse"))
    job = run_attention(
        state,
        tensors["q"],
        tensors["k"],
        tensors["v"],
        opts,
        spec,
        return_weights="weights" in wanted or "lse" in wanted,
    )
    result, drawn = job.result, job.heatmaps
    produced = {"output": result.output, "weights": result.weights, "lse": result.lse}
    params_out = _response_parameters(result, drawn, result.method)
    if result.comparison is not None:
        params_out.update(
            (f"compare_{key}", value)
            for key, value in result.comparison.items()
            if isinstance(value, (int, float, str, bool))
        )
    return {name: produced[name] for name in wanted}, params_out


# ---------------------------------------------------------------------------------------------
# multihead


_MULTIHEAD_PARAMETERS = _parameter_names(MultiheadOptions)


def _projection_weights(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    given = [n for n in (*_PROJECTIONS, *_BIASES) if n in tensors]
    if not given:
        return None
    missing = [n for n in _PROJECTIONS if n not in tensors]
    if missing:
        raise ProtocolError(
            f"inputs {', '.join(_PROJECTIONS)} go together (biases are optional); missing: "
            f"{', '.join(missing)}"
        )
    return {n: tensors[n] for n in given}


def _multihead(state: AppState, tensors: Tensors, params: Params, requested: Requested) -> Result:
    opts = _parse_options(MultiheadOptions, params, tensors)
    spec = _heatmap_spec(params)
    wanted = _wanted(requested, opts.need_weights, ("weights", "lse"))
    job = run_multihead(
        state,
        tensors["query"],
        tensors.get("key"),
        tensors.get("value"),
        opts,
        spec,
        need_weights="weights" in wanted or "lse" in wanted,
    )
    result, probs, drawn = job.result, job.weights, job.heatmaps
    produced = {"output": result.output, "weights": probs, "lse": result.lse}
    params_out = _response_parameters(result, drawn, "exact")
    params_out["param_count"] = result.param_count
    return {name: produced[name] for name in wanted}, params_out


# ---------------------------------------------------------------------------------------------
# Registry

_MASK_TYPES = ("BOOL", *FLOAT_TYPES)
_LENGTH_TYPES = ("INT64", "INT32")


def _float(name: str, rank: int, optional: bool = False) -> TensorSpec:
    return TensorSpec(name, "FP32", (-1,) * rank, FLOAT_TYPES, optional)


@dataclass(frozen=True)
class Model:
    """A model of the protocol front: metadata, parameter names, and how it runs."""

    name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]
    parameters: tuple[str, ...]
    run: Infer

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs.values()],
            "outputs": [t.metadata() for t in self.outputs.values()],
        }

    def infer(
        self, state: AppState, tensors: Tensors, params: Params, requested: Requested
    ) -> Result:
        """Run the model; InputErrors name parameters and inputs as the protocol does."""
        try:
            return self.run(state, tensors, params, requested)
        except InputError as exc:
            loc = _v2_loc(exc.loc, frozenset(self.parameters) - frozenset(self.inputs))
            if loc == exc.loc:
                raise
            raise type(exc)(loc, exc.msg) from None


def _by_name(*specs: TensorSpec) -> dict[str, TensorSpec]:
    return {s.name: s for s in specs}


# q, k, v: rank 2 to 4 are accepted, as in /v1/attention ((Lq, D), (Hq, Lq, D) or
# (B, Hq, Lq, D)); the metadata shows the full rank. Every float datatype is accepted.
MODELS: dict[str, Model] = {
    "attention": Model(
        "attention",
        _by_name(
            _float("q", 4),
            _float("k", 4),
            _float("v", 4),
            TensorSpec("mask", "BOOL", (-1, -1, -1, -1), _MASK_TYPES, optional=True),
            TensorSpec("key_lengths", "INT64", (-1,), _LENGTH_TYPES, optional=True),
        ),
        _by_name(_float("output", 4), _float("weights", 4), _float("lse", 3)),
        _ATTENTION_PARAMETERS,
        _attention,
    ),
    "multihead": Model(
        "multihead",
        _by_name(
            _float("query", 3),
            _float("key", 3, optional=True),
            _float("value", 3, optional=True),
            TensorSpec("mask", "BOOL", (-1, -1, -1, -1), _MASK_TYPES, optional=True),
            TensorSpec("key_lengths", "INT64", (-1,), _LENGTH_TYPES, optional=True),
            *(_float(n, 2, optional=True) for n in _PROJECTIONS),
            *(_float(n, 1, optional=True) for n in _BIASES),
        ),
        _by_name(_float("output", 3), _float("weights", 3), _float("lse", 3)),
        _MULTIHEAD_PARAMETERS,
        _multihead,
    ),
}


def get_model(name: str, version: str | None = None) -> Model:
    """The model, or UnknownModel (404) naming what exists."""
    model = MODELS.get(name)
    if model is None:
        raise UnknownModel(f"unknown model '{name}'; the models are {', '.join(MODELS)}")
    if version is not None and version != VERSION:
        raise UnknownModel(f"model '{name}' has no version '{version}'; its versions: {VERSION}")
    return model
