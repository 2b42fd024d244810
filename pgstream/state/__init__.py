"""Keyed operator state."""
