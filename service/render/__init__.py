"""Rendering: every PNG of the service (attention maps, head grids, positional encodings,
comparison views), drawn with matplotlib and encoded with Pillow.

It uses the compute core and never the web layer (`make lint` checks it): canvas.py draws
(one module for every figure), views.py decides what each picture shows. Validating a heatmap
request and publishing images into the store belong to service.web.images.
"""
