"""Locust users for `make load` (tests/load/run.py starts the server and runs this headless).

Each user loops over a weighted mix: small and large attention, multi-head attention, token
self-attention with its heatmap and positional picture, attention with a heatmap, and the PNGs
those answers point to. A 503 with Retry-After is the service refusing work on purpose
(overload): counted apart and not a failure. Every status code seen is written as JSON to
$LOAD_STATUS_FILE when locust quits, with every response time, for run.py's report.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser

_rng = np.random.default_rng(0)
DELIBERATE_503 = "503 overloaded (Retry-After)"
# What run.py reports, written to $LOAD_STATUS_FILE when locust quits: every status code,
# every response time per request name, and the test's duration.
STATUS: Counter[str] = Counter()
TIMES: defaultdict[str, list[float]] = defaultdict(list)
FAILED: Counter[str] = Counter()
CLOCK: dict[str, float] = {}


def _b64(shape: tuple[int, ...]) -> dict[str, Any]:
    arr = _rng.standard_normal(shape).astype("<f4")
    return {"dtype": "float32", "shape": list(shape), "b64": base64.b64encode(arr).decode()}


def _lists(shape: tuple[int, ...]) -> list[Any]:
    return np.round(_rng.standard_normal(shape), 4).tolist()


def _body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


# Bodies are made once: the load is on the server, not on building requests.
SMALL = _body({"q": _lists((2, 16, 32)), "k": _lists((2, 16, 32)), "v": _lists((2, 16, 32))})
LARGE = _body(
    {
        "q": _b64((1, 8, 512, 64)),
        "k": _b64((1, 8, 512, 64)),
        "v": _b64((1, 8, 512, 64)),
        "causal": True,
    }
)
MULTIHEAD = _body(
    {"query": _b64((2, 64, 128)), "num_heads": 8, "num_kv_heads": 2, "need_weights": True}
)
WITH_HEATMAP = _body(
    {
        "q": _lists((4, 48, 32)),
        "k": _lists((4, 48, 32)),
        "v": _lists((4, 48, 32)),
        "heatmap": {"heads": [0]},
    }
)
_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "cat",
    "sat",
]
JSON = {"Content-Type": "application/json"}


@events.test_start.add_listener
def _started(**_: Any) -> None:
    CLOCK["start"] = time.monotonic()


@events.request.add_listener
def _record(
    name: str,
    response_time: float,
    response: Any = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    TIMES[name].append(response_time)
    if exception is not None:
        FAILED[name] += 1
    code = getattr(response, "status_code", 0) if response is not None else 0
    if not code:
        STATUS[f"error {type(exception).__name__ if exception else 'no response'}"] += 1
        return
    retry = response.headers.get("Retry-After") if response.headers else None
    STATUS[DELIBERATE_503 if code == 503 and retry else str(code)] += 1


@events.quitting.add_listener
def _write(**_: Any) -> None:
    path = os.environ.get("LOAD_STATUS_FILE")
    if path:
        seconds = time.monotonic() - CLOCK.get("start", time.monotonic())
        doc = {"status": STATUS, "times": TIMES, "failed": FAILED, "seconds": seconds}
        with open(path, "w") as f:
            json.dump(doc, f)


class ServiceUser(FastHttpUser):
    wait_time = between(0.0, 0.05)
    # One connection per user, as 32 independent clients would have.
    concurrency = 1

    def _post(self, path: str, body: bytes, name: str) -> dict[str, Any] | None:
        """POST; the JSON answer on 200, None otherwise (a deliberate 503 is no failure)."""
        with self.client.post(path, data=body, headers=JSON, name=name, catch_response=True) as r:
            if r.status_code == 200:
                return r.json()
            if r.status_code == 503 and r.headers.get("Retry-After"):
                r.success()
                return None
            r.failure(f"{r.status_code}: {(r.text or '')[:200]}")
            return None

    def _fetch_png(self, url: str) -> None:
        with self.client.get(url, name="heatmap png", catch_response=True) as r:
            if r.status_code != 200 or not (r.content or b"").startswith(b"\x89PNG"):
                r.failure(f"{r.status_code}: not a PNG")

    @task(10)
    def attention_small(self) -> None:
        self._post("/v1/attention", SMALL, "attention small (2x16x32)")

    @task(2)
    def attention_large(self) -> None:
        self._post("/v1/attention", LARGE, "attention large (8x512x64, causal)")

    @task(4)
    def multihead(self) -> None:
        self._post("/v1/multihead", MULTIHEAD, "multihead (2x64x128, 8/2 heads)")

    @task(2)
    def tokens(self) -> None:
        text = " ".join(random.choices(_WORDS, k=random.randint(6, 24)))
        doc = {"text": text, "d_model": 64, "num_heads": 4, "heatmap": {"heads": "mean"}}
        answer = self._post("/v1/tokens", _body(doc), "tokens (+ heatmap)")
        if answer:
            images = [*answer.get("heatmaps", []), answer.get("positional_encoding") or {}]
            for image in images:
                if image.get("url"):
                    self._fetch_png(image["url"])

    @task(3)
    def attention_heatmap(self) -> None:
        answer = self._post("/v1/attention", WITH_HEATMAP, "attention + heatmap (4x48x32)")
        for image in (answer or {}).get("heatmaps", []):
            self._fetch_png(image["url"])
