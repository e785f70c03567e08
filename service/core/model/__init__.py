"""Real pretrained models, run by our own kernel: MiniLM-L6 (a 6-layer, 12-head BERT).

- package.py: find a model's files in its installed package and check them (SHA-256).
- tokenizer.py: WordPiece tokenisation (the `tokenizers` library), single texts and pairs.
- bert.py: the BERT encoder's forward pass in numpy; attention by `service.attention`.
- sentence.py: the sentence-transformers model: analysis of one input, embeddings.
- registry.py: the known models, each loaded once per process on first use.
"""

from service.core.model.package import ModelIntegrityError, ModelNotInstalled, ModelSpec
from service.core.model.registry import MODELS, get_model, model_spec, model_status, unload
from service.core.model.sentence import Analysis, Prepared, SentenceModel
from service.core.model.tokenizer import Encoding

__all__ = [
    "MODELS",
    "Analysis",
    "Encoding",
    "ModelIntegrityError",
    "ModelNotInstalled",
    "ModelSpec",
    "Prepared",
    "SentenceModel",
    "get_model",
    "model_spec",
    "model_status",
    "unload",
]
