"""The tokens pipeline's parts (service.core.tokens): embeddings, positional encodings, rope."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.core import tokens as pipeline
from tests.support.reference import rope_reference, sinusoidal_reference

TEXT = "the cat sat on the mat because the mat was warm"


def test_embeddings_are_deterministic_per_token_and_seed() -> None:
    toks = TEXT.split()
    e = pipeline.embed(toks, 16, seed=3)
    assert e.shape == (len(toks), 16) and e.dtype == np.float32
    np.testing.assert_array_equal(e[0], e[4])  # "the" twice
    np.testing.assert_array_equal(e[0], pipeline.embed(["the"], 16, seed=3)[0])
    assert not np.array_equal(e[0], e[1])
    assert not np.array_equal(e[0], pipeline.embed(["the"], 16, seed=4)[0])


def test_embeddings_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from service.core.tokens import embed; print(embed(['héllo', 'x'], 8, 5).tobytes().hex())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2)
    }
    assert runs == {pipeline.embed(["héllo", "x"], 8, 5).tobytes().hex() + "\n"}


@pytest.mark.parametrize("d", [8, 9, 64])
def test_sinusoidal_matches_the_formula(d: int) -> None:
    np.testing.assert_allclose(
        pipeline.sinusoidal(20, d), sinusoidal_reference(20, d).numpy(), atol=1e-6
    )


def test_learned_positions_are_seeded_and_independent_of_length() -> None:
    long = pipeline.learned(30, 8, seed=1)
    np.testing.assert_array_equal(pipeline.learned(10, 8, seed=1), long[:10])
    assert not np.array_equal(pipeline.learned(10, 8, seed=2), long[:10])


def test_rope_matches_complex_rotation() -> None:
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    cos, sin = pipeline.rope_tables(7, 8)
    got = pipeline.apply_rope(x, cos, sin)
    for h in range(2):
        ref = rope_reference(torch.from_numpy(x[h].astype(np.float64)))
        np.testing.assert_allclose(got[h], ref.numpy(), atol=1e-5)
