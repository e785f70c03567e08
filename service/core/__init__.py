"""The compute core: attention on numpy arrays (or any library's) through the C++ extension.

numpy, pydantic and `service._native` (and threadpoolctl, to keep BLAS serial in approx/ and
model/; tokenizers and safetensors, to read a real model's files in model/); never FastAPI,
Starlette, uvicorn, matplotlib or Pillow (`make lint` checks it). What is where:

- options.py: the one options model shared by the Python API and every HTTP front.
- tensor_codec.py: tensors in and out of JSON-friendly forms (the client uses it too, so it
  needs numpy alone); tensor_field.py: the pydantic field type built on it.
- inputs.py: normalising what a caller passes (dtypes, ranks, options); frameworks.py: other
  libraries' arrays (torch, TensorFlow, JAX, DLPack) as numpy views, and results back.
- masking.py: the masking options as the extension's arguments; native_call.py: one call into
  the extension (cancellation, errors, timing).
- attention.py, multihead.py, maps.py: the public functions (exact attention and its
  approximations, torch's multi-head attention, exact maps and statistics at any length);
  exact.py: the exact kernel on 4-D arrays; approx/: the approximations; results.py: what they
  return.
- weights.py, tokens.py: projection weights; the tokens pipeline (embeddings, positions).
- model/: a real pretrained model (MiniLM-L6, a BERT) with every attention in the kernel: its
  files found and hash-checked, WordPiece, the encoder's forward pass, sentence embeddings.
- errors.py, cancel.py, version.py: errors naming their input, cooperative cancellation, the
  package version.
"""
