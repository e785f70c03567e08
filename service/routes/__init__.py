"""Thin routes: parse, call the Python API, render, respond."""

from service.routes import attention, health, heatmaps, multihead, tokens

ROUTERS = (attention.router, multihead.router, tokens.router, heatmaps.router, health.router)
