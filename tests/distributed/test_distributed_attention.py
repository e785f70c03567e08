"""service.distributed_attention on a local Ray cluster of 2 CPUs (started here, stopped at the
end): every masking option, keys split into 1 to 8 chunks computed by Ray tasks, gives
service.attention's result within 1e-5 relative; q, k and v enter the object store once, however
many tasks read them; bad input is refused before anything is sent."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import service
from service.core.errors import InputError
from service.core.options import AttentionOptions
from tests.support.split_cases import assert_same_result, cases

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
pytestmark = pytest.mark.ray

CASES = cases()
# Every chunk count from 1 to 8 for every case would be 128 cluster calls; three per case,
# rotating, cover each count six times.
PARAMS = [
    pytest.param(q, k, v, options, 1 + (i * 3 + j) % 8, id=f"{name}-{1 + (i * 3 + j) % 8}")
    for i, (name, q, k, v, options) in enumerate(CASES)
    for j in range(3)
]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield
    ray.shutdown()


@pytest.mark.parametrize(("q", "k", "v", "options", "chunks"), PARAMS)
def test_distributed_equals_attention(q, k, v, options, chunks: int) -> None:
    want = service.attention(q, k, v, **options)
    got = service.distributed_attention(q, k, v, chunks=chunks, **options)
    assert_same_result(got, want)


def test_inputs_enter_the_object_store_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.distributed.attention as dist

    puts: list[object] = []
    real_put = ray.put

    def counting_put(value: object, **kw: object) -> object:
        puts.append(value)
        return real_put(value, **kw)

    monkeypatch.setattr(ray, "put", counting_put)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 32), dtype=np.float32) for _ in range(3))
    result, times = dist.run_split(q, k, v, AttentionOptions(causal=True), chunks=8)
    assert len(puts) == 4  # q, k, v and the options: not once per task
    assert [type(p).__name__ for p in puts] == ["ndarray", "ndarray", "ndarray", "AttentionOptions"]
    assert len(times.kernel_ms) == 8 and times.total_ms > 0
    assert_same_result(result, service.attention(q, k, v, causal=True))


def test_torch_in_torch_out() -> None:
    torch = pytest.importorskip("torch")
    q = torch.randn(3, 50, 16)
    got = service.distributed_attention(q, q, q, chunks=4, causal=True)
    assert isinstance(got.output, torch.Tensor) and got.output.shape == (3, 50, 16)
    want = service.attention(q, q, q, causal=True)
    assert torch.allclose(got.output, want.output, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"chunks": 11}, "chunks"),  # more chunks than the 10 keys
        ({"chunks": 0}, "chunks"),
        ({"chunks": 2, "method": "linear"}, "method"),
        ({"chunks": 2, "window": {"left": -1}}, "window"),
        ({"chunks": 2, "global_tokens": [12]}, "global_tokens"),
        ({"chunks": 2, "task_cpus": 0}, "task_cpus"),
    ],
)
def test_bad_input_is_refused_naming_it(options: dict, loc: str) -> None:
    x = np.ones((10, 4), dtype=np.float32)
    with pytest.raises(InputError) as err:
        service.distributed_attention(x, x, x, **options)
    assert err.value.loc[0] == loc


def test_an_abandoned_call_cancels_its_tasks() -> None:
    """In a service job whose request timed out, the call stops waiting and its tasks are
    cancelled: here they can never run (3 CPUs each on a 2-CPU cluster), so without the
    cancellation it would wait forever (the call runs in a thread the test does not wait on
    for long)."""
    from service.core import cancel

    token = cancel.CancelToken()
    x = np.ones((64, 8), dtype=np.float32)
    raised: list[BaseException] = []

    def job() -> None:
        with cancel.bound(token):
            try:
                service.distributed_attention(x, x, x, chunks=2, task_cpus=3)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                raised.append(exc)

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive()  # waiting for CPUs that never come
    token.cancel("the request timed out")
    worker.join(10)
    assert not worker.is_alive(), "still waiting 10 s after the cancellation"
    assert len(raised) == 1 and isinstance(raised[0], cancel.Cancelled), raised
    assert "timed out" in str(raised[0])
    # The cluster is free again: a call that fits runs at once.
    assert_same_result(service.distributed_attention(x, x, x, chunks=2), service.attention(x, x, x))
