"""Start-up stays cheap: the run path imports no library it does not use, and the schema
check needs Alembic only when the database is not at the head revision."""

from __future__ import annotations

import json
import subprocess
import sys

from pgstream.db.migrate import declared_head, head

#: libraries a worker reading a file or a table into PostgreSQL never needs
HEAVY = ("sqlalchemy", "alembic", "rich", "confluent_kafka", "nats", "redis", "pgserver")


def test_the_run_path_imports_no_heavy_library() -> None:
    code = (
        "import json, sys\n"
        "import pgstream, pgstream.cli, pgstream.commands.run, pgstream.runtime.worker\n"
        "import pgstream.loader, pgstream.sources.table, pgstream.sources.file\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert heavy == [], f"imported at start-up: {heavy}"


#: pgstream's own modules an app loads only when it uses them (windows, broker sources)
OPTIONAL = (
    "pgstream.operators.windows",
    "pgstream.operators.sessions",
    "pgstream.operators.eventtime",
    "pgstream.sources.kafka",
    "pgstream.sources.nats",
    "pgstream.sources.redis_stream",
)
#: loaded when a sink first rejects a row
ON_REJECTION = ("pgstream.runtime.rejections",)


def test_windows_and_broker_sources_load_when_first_used() -> None:
    code = (
        "import json, sys\n"
        "import pgstream as ps, pgstream.cli, pgstream.commands.run, pgstream.runtime.worker\n"
        "before = sorted(sys.modules)\n"
        "names = [ps.tumbling, ps.hopping, ps.session, ps.KafkaSource, ps.NatsSource,\n"
        "         ps.RedisStreamSource]\n"
        "print(json.dumps([before, sorted(sys.modules), [n.__module__ for n in names]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, homes = json.loads(out.stdout)
    assert [m for m in (*OPTIONAL, *ON_REJECTION) if m in before] == []
    assert [m for m in OPTIONAL if m not in after] == []
    assert homes == [
        "pgstream.operators.windows",
        "pgstream.operators.windows",
        "pgstream.operators.sessions",
        "pgstream.sources.kafka",
        "pgstream.sources.nats",
        "pgstream.sources.redis_stream",
    ]


def test_declared_head_is_alembics_head() -> None:
    """The fast schema check reads the revision files' own lines: it must agree with Alembic
    (when it cannot tell, it says None and Alembic decides)."""
    assert declared_head() in (head(), None)
    assert declared_head() is not None  # today's revision files are plain enough
