"""The ``pgstream demo`` job: an orders stream, its sink tables and its input generator.

* :mod:`pgstream.demo.app` — the job itself (``pgstream run pgstream.demo.app:app``);
* :mod:`pgstream.demo.schema` — its sink tables, as a user's migration would define them;
* :mod:`pgstream.demo.data` — the deterministic input and the expected results.
"""

JOB = "pgstream-demo"
INPUT_ENV = "PGSTREAM_DEMO_INPUT"

__all__ = ["INPUT_ENV", "JOB"]
