"""The reference for MiniLM-L6: `transformers`' BertModel and tokenizer on the installed files,
and sentence-transformers' pooling written out (mean over the attention mask, F.normalize)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference reads local files only

from transformers import AutoTokenizer, BertModel  # noqa: E402

from service.core.model.package import locate  # noqa: E402
from service.core.model.registry import MINILM_L6  # noqa: E402


@cache
def model_dir() -> Path:
    return locate(MINILM_L6)


@cache
def hf_model() -> BertModel:
    return BertModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval().float()


@cache
def hf_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(model_dir()))


def reference(enc: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(layers, heads, L, L) attentions and (L, H) last hidden state of one unpadded input."""
    with torch.no_grad():
        out = hf_model()(**enc, output_attentions=True)
    attn = torch.stack([a[0] for a in out.attentions]).numpy()
    return attn, out.last_hidden_state[0].numpy()


def reference_text(text: str, pair: str | None = None, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    return reference(hf_tokenizer()(text, pair, return_tensors="pt", **kw))


def st_embedding(text: str, pair: str | None = None) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2: tokenise cut to 256 (longest_first), mean over
    the attention mask, L2-normalise (its Transformer, Pooling and Normalize modules)."""
    enc = hf_tokenizer()(
        text, pair, truncation="longest_first", max_length=256, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = hf_model()(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)[0].numpy()
