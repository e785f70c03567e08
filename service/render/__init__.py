"""Rendering: pictures of the core's results (matplotlib and Pillow; never the web layer)."""
