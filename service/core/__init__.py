"""The compute core: numpy and the native extension only (no web framework, no plotting)."""
