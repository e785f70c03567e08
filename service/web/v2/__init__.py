"""The Open Inference Protocol front (KServe v2 / Triton), at /v2.

datamodels.py: the protocol's documents; codec.py: requests on the wire (bodies, tensors,
parameters); response.py: the outputs asked for and the response; parameters.py: the models'
parameters as the options model; errors.py: the protocol's exceptions and error form (answered
by the app's exception handlers); models.py: the `attention` and `multihead` models; routes.py:
the routes.
"""
