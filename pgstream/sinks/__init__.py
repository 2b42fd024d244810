"""Sinks: append and upsert tables owned by the user."""
