"""Operators: stateless steps, keys, aggregates and folds."""
