"""pgstream's benchmark suite; run ``python -m benchmarks.run --help`` (see run.py)."""
