"""The /v1 front: JSON tensors in, JSON out, heatmaps as PNG urls (or inline).

One module per route group (attention, multihead, tokens, sessions, heatmaps, models), each with
one router that sets its prefix once; routing.json_io declares a JSON route's body, response and
problem responses; the request and response models are in schemas.py (the real model's in
model_schemas.py, the memory sessions' in session_schemas.py).
"""

from service.web.v1 import attention, heatmaps, models, multihead, sessions, tokens

ROUTERS = (
    attention.router,
    multihead.router,
    tokens.router,
    sessions.router,
    heatmaps.router,
    models.router,
)
