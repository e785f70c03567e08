"""Thin routes: parse, call the Python API, render, respond."""

from service.routes import attention, health, heatmaps, models, multihead, tokens

# The API (behind the optional API keys and rate limit), and what stays open to everyone.
API_ROUTERS = (
    attention.router,
    multihead.router,
    tokens.router,
    heatmaps.router,
    models.router,
)
OPEN_ROUTERS = (health.router,)
ROUTERS = (*API_ROUTERS, *OPEN_ROUTERS)
