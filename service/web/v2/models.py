"""The two models of the Open Inference Protocol front: `attention` and `multihead`.

Each model declares its inputs and outputs (the metadata), maps the request `parameters` and
tensor options onto the one options model (service.web.v2.parameters: under the options' own
names, with the splits scalar parameters need), and runs the jobs the v1 routes run
(service.web.jobs: the same limits, checked before anything large is allocated). `attention`
also keeps sequences (Triton's sequence_id, sequence_start, sequence_end): recurrent memory
streamed request by request, as /v1/sessions streams it (service.web.sessions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from service.core.errors import InputError
from service.core.options import AttentionOptions, MultiheadOptions
from service.core.split import MAX_CHUNKS
from service.web import sessions
from service.web.deps import AppState
from service.web.jobs import run_attention, run_multihead
from service.web.v2.codec import FLOAT_TYPES, Sequence, TensorSpec
from service.web.v2.errors import ProtocolError, UnknownModel
from service.web.v2.parameters import (
    BIASES,
    INT_INPUTS,
    PROJECTIONS,
    Params,
    Tensors,
    heatmap_spec,
    parameter_names,
    parse_options,
    sequence_options,
    v2_loc,
)

VERSION = "1"
PLATFORM = "attention_native"

Requested = tuple[str, ...] | None  # the outputs a request names (None: the defaults)
Result = tuple[Tensors, Params]  # the outputs, and the response parameters
Infer = Callable[[AppState, Tensors, Params, Requested], Result]
# A sequence's request: also the sequence and the owner (service.web.sessions.owner_of).
SequenceInfer = Callable[[AppState, Tensors, Params, Requested, Sequence, str], Result]


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


_ATTENTION_PARAMETERS = parameter_names(AttentionOptions)


def _attention(state: AppState, tensors: Tensors, params: Params, requested: Requested) -> Result:
    # `chunks` is how to compute (keys split across the Ray cluster), not an attention option.
    chunks = params.get("chunks")
    if chunks is not None and (
        not isinstance(chunks, int) or isinstance(chunks, bool) or not 1 <= chunks <= MAX_CHUNKS
    ):
        raise InputError(("parameters", "chunks"), f"must be an integer in [1, {MAX_CHUNKS}]")
    params = {name: value for name, value in params.items() if name != "chunks"}
    opts = parse_options(AttentionOptions, params, tensors)
    spec = heatmap_spec(params)
    if spec is not None and opts.compare:
        raise InputError(
            ("parameters", "heatmap"),
            "heatmaps of a comparison are drawn by /v1/attention only; on /v2, ask for compare "
            "or for heatmap",
        )
    rows = opts.weights_rows is not None
    extra = ("weights", "lse", "slot_weights") if opts.memory is not None else ("weights", "lse")
    wanted = _wanted(requested, opts.return_weights or rows, extra)
    if "slot_weights" in wanted and opts.memory is None:
        raise InputError(
            ("parameters", "memory_segment"), "output 'slot_weights' needs memory parameters"
        )
    job = run_attention(
        state,
        tensors["q"],
        tensors["k"],
        tensors["v"],
        opts,
        spec,
        return_weights=bool({"weights", "lse", "slot_weights"} & set(wanted)),
        chunks=chunks,
    )
    result, drawn = job.result, job.heatmaps
    produced = {
        "output": result.output,
        "weights": result.weights,
        "lse": result.lse,
        "slot_weights": result.slot_weights,
    }
    params_out = _response_parameters(result, drawn, result.method)
    if result.comparison is not None:
        params_out.update(
            (f"compare_{key}", value)
            for key, value in result.comparison.items()
            if isinstance(value, (int, float, str, bool))
        )
    return {name: produced[name] for name in wanted}, params_out


def _attention_sequence(
    state: AppState,
    tensors: Tensors,
    params: Params,
    requested: Requested,
    sequence: Sequence,
    owner: str,
) -> Result:
    """One request of a sequence: its segment appended to the sequence's memory (opened by
    sequence_start, dropped after sequence_end)."""
    options, return_weights = sequence_options(params, tensors, sequence.start)
    spec = heatmap_spec(params)
    for name in ("q", "k", "v"):
        if name not in tensors:
            raise ProtocolError(f"missing input '{name}'")
    wanted = _wanted(requested, return_weights, ("weights", "lse"))
    if "slot_weights" in wanted:
        raise ProtocolError(
            "output 'slot_weights' belongs to a memory call without a sequence; a sequence's "
            "weights cover its compressed slots, memory and segment"
        )
    key = sessions.sequence_key(owner, sequence.id)
    if options is not None:
        session = sessions.open_session(
            state, owner, options, state.settings.session_ttl_s, key=key
        )
    else:
        what = f"sequence {sequence.id!r} (start it with sequence_start: true)"
        session = sessions.load(state, owner, key, what=what)
    done = sessions.append_segment(
        state,
        session,
        tensors["q"],
        tensors["k"],
        tensors["v"],
        return_weights="weights" in wanted or "lse" in wanted,
        spec=spec,
        end=sequence.end,
    )
    result = done.result
    produced = {"output": result.output, "weights": result.weights, "lse": result.lse}
    params_out = _response_parameters(result, done.heatmaps, "exact")
    params_out.update(
        sequence_position=result.position,
        memory_raw=result.memory_raw,
        memory_compressed=result.memory_compressed,
    )
    return {name: produced[name] for name in wanted}, params_out


# ---------------------------------------------------------------------------------------------
# multihead


_MULTIHEAD_PARAMETERS = parameter_names(MultiheadOptions)


def _multihead(state: AppState, tensors: Tensors, params: Params, requested: Requested) -> Result:
    opts = parse_options(MultiheadOptions, params, tensors)
    spec = heatmap_spec(params)
    wanted = _wanted(
        requested, opts.need_weights or opts.weights_rows is not None, ("weights", "lse")
    )
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


def _sparse_inputs() -> tuple[TensorSpec, ...]:
    """The block layout, the packed documents' offsets and the chosen rows (both models)."""
    return (
        TensorSpec("block_layout", "BOOL", (-1, -1, -1, -1), ("BOOL", *_LENGTH_TYPES), True),
        *(TensorSpec(n, "INT64", (-1,), _LENGTH_TYPES, optional=True) for n in INT_INPUTS[:3]),
        TensorSpec("weights_rows", "INT64", (-1,), ("INT64",), optional=True),
    )


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
    run_sequence: SequenceInfer | None = None

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [t.metadata() for t in self.inputs.values()],
            "outputs": [t.metadata() for t in self.outputs.values()],
        }

    def infer(
        self,
        state: AppState,
        tensors: Tensors,
        params: Params,
        requested: Requested,
        sequence: Sequence | None = None,
        owner: str = "",
    ) -> Result:
        """Run the model (a sequence's request with `sequence`); InputErrors name parameters
        and inputs as the protocol does."""
        try:
            if sequence is None:
                return self.run(state, tensors, params, requested)
            if self.run_sequence is None:
                raise ProtocolError(
                    f"model '{self.name}' is stateless: sequence_id applies to model "
                    "'attention' (recurrent memory)"
                )
            return self.run_sequence(state, tensors, params, requested, sequence, owner)
        except InputError as exc:
            loc = v2_loc(exc.loc, frozenset(self.parameters) - frozenset(self.inputs))
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
            *_sparse_inputs(),
        ),
        _by_name(
            _float("output", 4), _float("weights", 4), _float("lse", 3), _float("slot_weights", 4)
        ),
        _ATTENTION_PARAMETERS,
        _attention,
        _attention_sequence,
    ),
    "multihead": Model(
        "multihead",
        _by_name(
            _float("query", 3),
            _float("key", 3, optional=True),
            _float("value", 3, optional=True),
            TensorSpec("mask", "BOOL", (-1, -1, -1, -1), _MASK_TYPES, optional=True),
            TensorSpec("key_lengths", "INT64", (-1,), _LENGTH_TYPES, optional=True),
            *_sparse_inputs(),
            *(_float(n, 2, optional=True) for n in PROJECTIONS),
            *(_float(n, 1, optional=True) for n in BIASES),
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
