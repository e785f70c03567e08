"""The Open Inference Protocol front (KServe v2 / Triton), at /v2.

datamodels.py: the protocol's documents; codec.py: tensors and bodies on the wire; errors.py:
its exceptions and error form (answered by the app's exception handlers); models.py: the
`attention` and `multihead` models; routes.py: the routes.
"""
