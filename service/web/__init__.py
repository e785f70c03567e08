"""The web layer: the HTTP service (FastAPI) on top of the compute core, the rendering and the
distributed layer.

app.py builds the app (create_app); settings.py, deps.py (what routes share, as typed
dependencies), middleware.py, problems.py (every error's answer), wire.py (JSON bodies),
security.py and ratelimit.py (API keys, rate budgets), limits.py, metrics.py, scheduler.py
(admission control in front of worker threads), store/ (the state store: heatmaps, records,
rate budgets; files or Redis), jobs/ (the work behind every front), images.py (heatmap
requests: checks and publishing), health.py, docs.py, viewer.py with static/; rayserve.py (the
app as Ray Serve replicas); one subpackage per protocol front: v1/ and v2/ (the Open Inference
Protocol).

Nothing outside this package imports it but the CLI (`make lint` checks it).
"""
