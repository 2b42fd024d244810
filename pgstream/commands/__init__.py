"""CLI commands, one module each (discovered by :mod:`pgstream.cli`)."""
