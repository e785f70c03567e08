"""TensorFlow, JAX, torch and any DLPack / array-protocol object in, q's library out
(service.core.frameworks), against the float64 references in tests/support/reference.py.

Needs the `frameworks` test extra (tensorflow-cpu, jax[cpu]); `make test` installs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notices

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch

import service
from service import InputError
from service.client import AttentionClient
from service.core.frameworks import from_numpy, to_numpy
from service.core.inputs import checked_float32
from service.core.tensor_codec import decode_tensor
from tests.support.mask_reference import reference as sparse_expected
from tests.support.reference import (
    bin_means,
    random_qkv,
    reference_attention,
    reference_multihead,
    row_entropy,
)

ATOL = 1e-4  # outputs and lse of O(1) scale
WEIGHT_ATOL = 1e-5  # probabilities are <= 1
README = Path(__file__).resolve().parents[2] / "README.md"


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@dataclass(frozen=True)
class Library:
    """How a test makes, reads and recognises one library's arrays, independently of the
    service (each through the library's own API)."""

    make: Callable[[np.ndarray, str | None], Any]  # numpy -> the library's array (dtype name)
    values: Callable[[Any], np.ndarray]  # the library's array -> its values in float64
    array_type: type
    float32: Any
    on_cpu: Callable[[Any], bool]
    total: Callable[[Any], float]  # a reduction run by the library itself
    transpose: Callable[[Any, tuple[int, ...]], Any]


def _tf_make(a: np.ndarray, dtype: str | None) -> Any:
    t = tf.constant(a)
    return t if dtype is None else tf.cast(t, getattr(tf, dtype))


def _jax_make(a: np.ndarray, dtype: str | None) -> Any:
    return jnp.asarray(a) if dtype is None else jnp.asarray(a, dtype=getattr(jnp, dtype))


def _torch_make(a: np.ndarray, dtype: str | None) -> Any:
    t = torch.from_numpy(np.array(a))  # writable, so torch does not warn
    return t if dtype is None else t.to(getattr(torch, dtype))


LIBRARIES = {
    "tensorflow": Library(
        make=_tf_make,
        values=lambda x: np.asarray(tf.cast(x, tf.float64)),
        array_type=tf.Tensor,
        float32=tf.float32,
        on_cpu=lambda x: x.device.endswith("CPU:0"),
        total=lambda x: float(tf.reduce_sum(tf.cast(x, tf.float64))),
        transpose=lambda x, axes: tf.transpose(x, axes),
    ),
    "jax": Library(
        make=_jax_make,
        values=lambda x: np.asarray(x.astype(jnp.float32), dtype=np.float64),
        array_type=jax.Array,
        float32=jnp.float32,
        on_cpu=lambda x: {d.platform for d in x.devices()} == {"cpu"},
        total=lambda x: float(jnp.sum(x.astype(jnp.float32))),
        transpose=lambda x, axes: jnp.transpose(x, axes),
    ),
    "torch": Library(
        make=_torch_make,
        values=lambda x: x.double().numpy(),
        array_type=torch.Tensor,
        float32=torch.float32,
        on_cpu=lambda x: x.device.type == "cpu",
        total=lambda x: float(x.double().sum()),
        transpose=lambda x, axes: x.permute(axes),
    ),
}
LIBRARY_NAMES = list(LIBRARIES)


def assert_result(lib: Library, got: Any, expected: np.ndarray | torch.Tensor, atol: float) -> None:
    """`got` is a float32 array of `lib` on the CPU, holding `expected`, and usable by `lib`."""
    assert isinstance(got, lib.array_type), type(got)
    assert got.dtype == lib.float32, got.dtype
    assert lib.on_cpu(got)
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(got), expected, atol=atol, rtol=0)
    if np.isfinite(expected).all():
        assert lib.total(got) == pytest.approx(expected.sum(), abs=atol * expected.size)


# ---------------------------------------------------------------------------------------------
# The public functions, each library in and out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_attention_matches_the_reference(name: str, dtype: str) -> None:
    lib = LIBRARIES[name]
    rng = np.random.default_rng([LIBRARY_NAMES.index(name), len(dtype)])
    q, k, v = random_qkv(2, 4, 2, 9, 13, 16, 8, seed=rng)  # grouped heads, Lq != Lk, Dv != D
    mask = rng.random((2, 1, 9, 13)) < 0.8
    lengths = np.array([13, 7])
    tq, tk, tv = (lib.make(a, dtype) for a in (q, k, v))
    result = service.attention(
        tq,
        tk,
        tv,
        causal="bottom_right",
        mask=lib.make(mask, None),
        key_lengths=lib.make(lengths, None),
        return_weights=True,
    )
    # The reference sees exactly the values the library holds (rounded to `dtype`).
    ref = reference_attention(
        *(lib.values(t) for t in (tq, tk, tv)),
        causal="bottom_right",
        mask=mask,
        key_lengths=lengths.tolist(),
    )
    # bfloat16 inputs take bf16 dot products where the CPU has them (precision "auto"): P is
    # rounded to bf16 for P.V, so each output errs by up to 2^-8 * sum_j p_ij |v_j| <= 2^-8 max|v|
    # (tests/native/test_precision.py derives the bound); scores, weights and lse stay float32.
    vmax = float(np.abs(lib.values(tv)).max())
    out_atol = 2.0**-8 * vmax + 2e-5 * vmax if dtype == "bfloat16" else ATOL
    assert_result(lib, result.output, ref.output, out_atol)
    assert_result(lib, result.weights, ref.weights, WEIGHT_ATOL)
    assert_result(lib, result.lse, ref.lse, ATOL)


@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_multihead_attention_matches_the_reference(name: str) -> None:
    """Query, key, value, every weight and key_lengths given as the library's arrays (for
    TensorFlow the weights are tf.Variables, as a Keras layer holds them)."""
    lib = LIBRARIES[name]
    rng = np.random.default_rng(LIBRARY_NAMES.index(name))
    x = rng.standard_normal((2, 9, 32)).astype(np.float32)
    key = rng.standard_normal((2, 11, 10)).astype(np.float32)
    value = rng.standard_normal((2, 11, 14)).astype(np.float32)
    w = service.init_multihead_weights(32, 4, 2, 10, 14, seed=1)
    fields = _weights(w)
    fields["q_bias"] = rng.uniform(-0.5, 0.5, 32).astype(np.float32)
    weights = {n: lib.make(a, None) for n, a in fields.items()}
    if name == "tensorflow":
        weights = {n: tf.Variable(t) for n, t in weights.items()}
    result = service.multihead_attention(
        lib.make(x, None),
        lib.make(key, None),
        lib.make(value, None),
        num_heads=4,
        num_kv_heads=2,
        weights=weights,
        key_lengths=lib.make(np.array([11, 4]), None),
        need_weights=True,
        average_weights=False,
    )
    out, probs, lse = reference_multihead(
        x, key, value, service.MultiheadWeights(**fields), 4, 2, key_lengths=[11, 4]
    )
    assert_result(lib, result.output, out, ATOL)
    assert_result(lib, result.weights, probs, WEIGHT_ATOL)
    assert_result(lib, result.lse, lse, ATOL)


@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_attention_map_matches_the_reference(name: str) -> None:
    lib = LIBRARIES[name]
    rng = np.random.default_rng(10 + LIBRARY_NAMES.index(name))
    q, k, v = random_qkv(1, 2, 2, 12, 10, 16, seed=rng)
    maps = service.attention_map(*(lib.make(a, None) for a in (q, k, v)), bins=(3, 2), top_k=3)
    ref = reference_attention(q, k, v)
    w = ref.weights.numpy()
    assert_result(lib, maps.output, ref.output, ATOL)
    assert_result(lib, maps.lse, ref.lse, ATOL)
    assert_result(lib, maps.pooled, bin_means(w, 3, 2), WEIGHT_ATOL)
    assert_result(lib, maps.entropy, row_entropy(w), ATOL)
    assert_result(lib, maps.column_sums, w.sum(-2), ATOL)
    top = np.argsort(-w, axis=-1, kind="stable")[..., :3]
    assert isinstance(maps.top_k_indices, lib.array_type)
    # int64, or int32 in JAX, which makes every int64 int32 unless jax_enable_x64 is set.
    assert np.asarray(maps.top_k_indices).dtype == (np.int32 if name == "jax" else np.int64)
    np.testing.assert_array_equal(np.asarray(maps.top_k_indices), top)
    assert_result(lib, maps.top_k_weights, np.take_along_axis(w, top, -1), WEIGHT_ATOL)


@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_transposed_inputs(name: str) -> None:
    """(B, L, H, D) arrays transposed to (B, H, L, D): a strided view in torch, which numpy
    reads as such; TensorFlow and JAX lay the transpose out anew."""
    lib = LIBRARIES[name]
    base = np.random.default_rng(20).standard_normal((2, 7, 3, 16)).astype(np.float32)
    t = lib.transpose(lib.make(base, None), (0, 2, 1, 3))
    result = service.attention(t, t, t, causal=True, return_weights=True)
    q = base.transpose(0, 2, 1, 3)
    ref = reference_attention(q, q, q, causal=True)
    assert_result(lib, result.output, ref.output, ATOL)
    assert_result(lib, result.weights, ref.weights, WEIGHT_ATOL)


def test_mixed_libraries_answer_in_the_library_of_q() -> None:
    rng = np.random.default_rng(30)
    q, k, v = random_qkv(2, 2, 2, 6, 8, 16, seed=rng)
    mask = rng.random((6, 8)) < 0.8
    mask[:, 0] = True
    ref = reference_attention(q, k, v, mask=mask, key_lengths=[8, 5])
    jax_q = service.attention(
        jnp.asarray(q),
        tf.constant(k),
        torch.from_numpy(v),
        mask=mask,
        key_lengths=tf.constant([8, 5]),
    )
    assert_result(LIBRARIES["jax"], jax_q.output, ref.output, ATOL)
    tf_q = service.attention(tf.Variable(q), k, jnp.asarray(v), mask=jnp.asarray(mask))
    no_lengths = reference_attention(q, k, v, mask=mask)
    assert_result(LIBRARIES["tensorflow"], tf_q.output, no_lengths.output, ATOL)
    numpy_q = service.attention(q, tf.constant(k), jnp.asarray(v), mask=torch.from_numpy(mask))
    assert type(numpy_q.output) is np.ndarray and numpy_q.output.dtype == np.float32
    np.testing.assert_allclose(numpy_q.output, no_lengths.output.numpy(), atol=ATOL)


def test_list_options_take_arrays_of_any_library_wherever_options_are_given() -> None:
    """key_lengths, global_tokens, alibi_slopes: as keywords, in an options dict, and in the
    options model itself."""
    opts = service.AttentionOptions(
        key_lengths=tf.constant([8, 5]),
        global_tokens=jnp.asarray([1]),
        alibi_slopes=torch.tensor([0.5, 0.25], dtype=torch.bfloat16),
        window={"left": 1, "right": 1},
    )
    assert opts.key_lengths == [8, 5] and opts.global_tokens == [1]
    assert opts.alibi_slopes == [0.5, 0.25]
    q, k, v = random_qkv(2, 2, 2, 6, 8, 16, seed=31)
    window = {"left": 1, "right": 1}
    ref = reference_attention(
        q, k, v, key_lengths=[8, 5], global_tokens=[1], window=window, alibi_slopes=[0.5, 0.25]
    )
    as_dict = {
        "key_lengths": jnp.asarray([8, 5]),
        "global_tokens": tf.constant([1]),
        "alibi_slopes": np.array([0.5, 0.25]),
        "window": window,
    }
    for result in (
        service.attention(q, k, v, opts),
        service.attention(q, k, v, as_dict),
        service.attention(q, k, v, **as_dict),
    ):
        np.testing.assert_allclose(result.output, ref.output.numpy(), atol=ATOL)


@pytest.mark.parametrize("name", ["tensorflow", "jax"])
def test_sparse_options_take_the_library_arrays(name: str) -> None:
    """block_mask's layout, cu_seqlens and weights_rows as TensorFlow / JAX arrays (q from the
    same library): the answer in q's library, against the dense float64 reference."""
    lib = LIBRARIES[name]
    rng = np.random.default_rng(41)
    q, k, v = (rng.standard_normal((2, 70, 16)).astype(np.float32) for _ in range(3))
    layout = rng.random((2, 3, 3)) < 0.7  # (H, ceil(70/32), ceil(70/32))
    layout[:, :, 0] = True  # every row sees a block
    res = service.attention(
        lib.make(q, None), lib.make(k, None), lib.make(v, None),
        block_mask={"block_size": 32, "layout": lib.make(layout, None)},
        cu_seqlens=lib.make(np.array([0, 25, 70], dtype=np.int32), None),
        weights_rows=lib.make(np.array([69, 3], dtype=np.int64), None),
    )  # fmt: skip
    out, lse, w = sparse_expected(
        q[None], k[None], v[None], scale=16**-0.5, block_layout=layout[None].copy(),
        block_q=32, block_k=32, cu_seqlens_q=np.array([0, 25, 70]),
        cu_seqlens_k=np.array([0, 25, 70]),
    )  # fmt: skip
    assert_result(lib, res.output, out[0], ATOL)
    assert_result(lib, res.weights, w[0][:, [69, 3]], WEIGHT_ATOL)
    assert_result(lib, res.lse, lse[0][:, [69, 3]], ATOL)


def test_the_http_client_sends_any_library_as_its_bytes() -> None:
    """service.client encodes TensorFlow, JAX and torch arrays as numpy would (b64 of the
    float32 values; bfloat16 widened, as the wire has no bfloat16 for requests)."""
    rng = np.random.default_rng(32)
    q, k, v = (a[0] for a in random_qkv(1, 2, 2, 3, 4, 8, seed=rng))
    sent: dict[str, Any] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, json={"output": sent["q"], "meta": {}})

    with AttentionClient(transport=httpx.MockTransport(answer)) as client:
        client.attention(tf.constant(q), jnp.asarray(k, dtype=jnp.bfloat16), torch.from_numpy(v))
    decoded = {n: decode_tensor(sent[n]) for n in "qkv"}
    np.testing.assert_array_equal(decoded["q"], q)
    np.testing.assert_array_equal(
        decoded["k"], LIBRARIES["jax"].values(jnp.asarray(k, jnp.bfloat16))
    )
    np.testing.assert_array_equal(decoded["v"], v)
    assert all(sent[n]["dtype"] == "float32" and "b64" in sent[n] for n in "qkv")


# ---------------------------------------------------------------------------------------------
# The conversion itself: views, not copies


def _buffer_address(name: str, x: Any) -> int:
    """Where the library keeps x's data, asked of the library itself."""
    if name == "jax":
        return x.unsafe_buffer_pointer()
    if name == "torch":
        return x.data_ptr()
    # TensorFlow's bitcast reinterprets the buffer without copying it.
    return _address(np.from_dlpack(tf.bitcast(x, tf.uint16 if x.dtype.size == 2 else tf.int32)))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", LIBRARY_NAMES)
def test_conversion_is_a_view_in_the_library_dtype(name: str, dtype: str) -> None:
    lib = LIBRARIES[name]
    a = np.random.default_rng(40).standard_normal((3, 5, 8)).astype(np.float32)
    x = lib.make(a, dtype)
    arr = to_numpy(x)
    assert arr.dtype.name == dtype and arr.shape == (3, 5, 8)
    assert _address(arr) == _buffer_address(name, x)  # no copy
    np.testing.assert_array_equal(arr.astype(np.float64), lib.values(x))
    converted, _ = checked_float32("q", x)
    if dtype == "float32":  # all the way to the kernel without a copy
        assert np.shares_memory(converted, arr)
    else:  # the kernel computes in float32: one widening copy, exact
        np.testing.assert_array_equal(converted, lib.values(x).astype(np.float32))


def test_torch_bfloat16_without_ml_dtypes_is_widened_to_float32() -> None:
    """ml_dtypes is no dependency of the service: without it, torch's bfloat16 bits become
    float32 (exactly) instead of an ml_dtypes.bfloat16 view."""
    code = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ml_dtypes":
            raise ModuleNotFoundError(name, name=name)
sys.meta_path.insert(0, Missing())
import numpy as np, torch, service
from service.core.frameworks import to_numpy
t = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
arr = to_numpy(t)
assert arr.dtype == np.float32 and (arr == t.float().numpy()).all(), arr.dtype
out = service.attention(t, t, t).output
assert out.dtype == torch.float32 and "ml_dtypes" not in sys.modules
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_strided_torch_views_are_copied_only_for_the_kernel() -> None:
    base = torch.randn(2, 7, 3, 16)
    t = base.transpose(1, 2)
    view = to_numpy(t)
    assert np.shares_memory(view, base.numpy()) and not view.flags.c_contiguous
    assert view.strides == tuple(s * 4 for s in t.stride())
    dense, _ = checked_float32("q", t)
    assert dense.flags.c_contiguous and not np.shares_memory(dense, base.numpy())
    np.testing.assert_array_equal(dense, t.contiguous().numpy())


def test_results_are_handed_over_without_a_copy_where_the_library_allows() -> None:
    arr = np.arange(4096, dtype=np.float32).reshape(64, 64)
    assert from_numpy(arr, torch.zeros(1)).data_ptr() == _address(arr)
    # TensorFlow and JAX take 64-byte aligned buffers as they are; numpy's are 16-byte aligned,
    # and TensorFlow aborts the process on an op over a misaligned one, so those are copied.
    buf = np.empty(arr.nbytes + 68, np.uint8)
    start = -_address(buf) % 64
    for offset, shared in ((start, True), (start + 4, False)):
        out = buf[offset : offset + arr.nbytes].view(np.float32).reshape(arr.shape)
        out[...] = arr
        as_tf = from_numpy(out, tf.zeros(1))
        assert (_buffer_address("tensorflow", as_tf) == _address(out)) is shared
        assert float(tf.reduce_sum(tf.matmul(as_tf, as_tf))) == float((arr @ arr).sum())
        as_jax = from_numpy(out, jnp.zeros(1))
        assert (as_jax.unsafe_buffer_pointer() == _address(out)) is shared
        np.testing.assert_array_equal(np.asarray(jnp.matmul(as_jax, as_jax)), arr @ arr)


class NotASequence:
    """An array of no known library, with no sequence protocol: reading it element by element
    (through Python lists) fails the test."""

    def __init__(self, a: np.ndarray, namespace: Any = None) -> None:
        self._a = a
        if namespace is not None:
            self.__array_namespace__ = lambda api_version=None: namespace

    def __len__(self) -> int:
        raise AssertionError("read as a sequence")

    def __getitem__(self, i: Any) -> Any:
        raise AssertionError("read as a sequence")


class DLPackOnly(NotASequence):
    """Speaks DLPack and nothing else (no __array__)."""

    def __dlpack__(self, **kwargs: Any) -> Any:
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._a.__dlpack_device__()


class ArrayInterfaceOnly(NotASequence):
    """Speaks only the array interface."""

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return self._a.__array_interface__


@pytest.mark.parametrize("kind", [DLPackOnly, ArrayInterfaceOnly])
def test_any_dlpack_or_array_interface_object(kind: type) -> None:
    rng = np.random.default_rng(50)
    q, k, v = random_qkv(1, 2, 2, 5, 7, 8, seed=rng)
    mask = rng.random((5, 7)) < 0.8
    mask[:, 0] = True
    wrapped = [kind(a) for a in (q, k, v)]
    assert np.shares_memory(to_numpy(wrapped[0]), q)
    result = service.attention(*wrapped, mask=kind(mask), return_weights=True)
    ref = reference_attention(q, k, v, mask=mask)
    assert type(result.output) is np.ndarray  # no way back to an unknown library: numpy
    np.testing.assert_allclose(result.output, ref.output.numpy(), atol=ATOL)
    np.testing.assert_allclose(result.lse, ref.lse.numpy(), atol=ATOL)


def test_array_api_namespace_is_the_way_back() -> None:
    """A library unknown to the service gets its answer from its own namespace's from_dlpack
    (the Array API standard; JAX goes this way too)."""

    class Namespace:
        made: list[np.ndarray] = []

        @classmethod
        def from_dlpack(cls, x: Any) -> DLPackOnly:
            cls.made.append(np.from_dlpack(x))
            return DLPackOnly(cls.made[-1])

    q = np.random.default_rng(51).standard_normal((4, 8)).astype(np.float32)
    result = service.attention(DLPackOnly(q, Namespace), q, q)
    assert isinstance(result.output, DLPackOnly) and len(Namespace.made) == 1
    np.testing.assert_allclose(
        Namespace.made[0], reference_attention(*(q[None, None],) * 3).output[0, 0], atol=ATOL
    )


# ---------------------------------------------------------------------------------------------
# What is refused, naming the argument


class OnCuda:
    """What a CUDA array looks like through DLPack (this machine has no GPU)."""

    dtype = "float32"

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, 1)  # kDLCUDA, device 1

    def __dlpack__(self, **kwargs: Any) -> Any:
        raise AssertionError("a device array must not be read")

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a device array must not be copied to the host")


def _qkv_numpy() -> tuple[np.ndarray, ...]:
    return random_qkv(1, 2, 2, 4, 4, 8, seed=60)


def _weights(w: service.MultiheadWeights) -> dict[str, Any]:
    return {n: getattr(w, n) for n in service.MultiheadWeights.model_fields}


GPU_CASES: dict[str, tuple[Callable[[], Any], tuple]] = {
    "q": (lambda: service.attention(OnCuda(), *_qkv_numpy()[1:]), ("q",)),
    "v": (lambda: service.attention(*_qkv_numpy()[:2], OnCuda()), ("v",)),
    "mask": (lambda: service.attention(*_qkv_numpy(), mask=OnCuda()), ("mask",)),
    "key_lengths": (
        lambda: service.attention(*_qkv_numpy(), key_lengths=OnCuda()),
        ("key_lengths",),
    ),
    "map k": (lambda: service.attention_map(_qkv_numpy()[0], OnCuda(), _qkv_numpy()[2]), ("k",)),
    "multihead query": (lambda: service.multihead_attention(OnCuda(), num_heads=2), ("query",)),
    "multihead weight": (
        lambda: service.multihead_attention(
            np.ones((3, 8), np.float32),
            num_heads=2,
            weights={**_weights(service.init_multihead_weights(8, 2)), "k_proj": OnCuda()},
        ),
        ("weights", "k_proj"),
    ),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_arrays_are_refused_with_a_way_out(case: str) -> None:
    call, loc = GPU_CASES[case]
    with pytest.raises(InputError) as info:
        call()
    assert info.value.loc == loc
    assert "CUDA device (device 1)" in info.value.msg and "move it there" in info.value.msg


BAD_ARRAYS: dict[str, tuple[Callable[[], Any], tuple, str]] = {
    "tensorflow int32 q": (lambda: tf.ones((2, 4, 8), tf.int32), ("q",), "unsupported dtype int32"),
    "jax complex q": (lambda: jnp.ones((2, 4, 8), jnp.complex64), ("q",), "complex64"),
    "tensorflow strings q": (lambda: tf.constant([["a", "b"]]), ("q",), "unsupported dtype"),
    "torch meta q": (lambda: torch.ones(2, 4, 8, device="meta"), ("q",), "torch"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_unreadable_arrays_name_their_argument(case: str) -> None:
    make, loc, words = BAD_ARRAYS[case]
    x = np.ones((2, 4, 8), np.float32)
    with pytest.raises(InputError) as info:
        service.attention(make(), x, x)
    assert info.value.loc == loc and words in info.value.msg


def test_jax_tracers_are_refused_inside_jit() -> None:
    x = jnp.ones((4, 8))
    with pytest.raises(InputError) as info:
        jax.jit(lambda a: service.attention(a, a, a).output)(x)
    assert info.value.loc == ("q",) and "jax" in info.value.msg


# ---------------------------------------------------------------------------------------------
# The README's examples, verbatim


def test_readme_framework_examples_run_and_print_what_the_readme_says(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    found = re.search(
        r"```python\n(?P<code>(?:(?!```).)*?import tensorflow.*?)```\s*\nprints\s*\n\s*```\n"
        r"(?P<out>.*?)```",
        section,
        re.S,
    )
    assert found, "README's Python API section has no TensorFlow/JAX example with its output"
    run = subprocess.run(
        [sys.executable, "-c", found["code"]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == found["out"]
