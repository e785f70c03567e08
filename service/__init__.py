"""Attention as a service."""
