"""A job enriching file records from a table, for tests/faults/test_lookup_faults.py.

Environment: ``LOOKUPAPP_FILE`` (the input), ``LOOKUPAPP_BATCH``, ``LOOKUPAPP_MISSING``.
"""

from __future__ import annotations

import os

import pgstream as ps

DDL = """
CREATE TABLE users (id bigint PRIMARY KEY, country text, tier int);
CREATE TABLE facts (order_id bigint, user_id bigint, country text, tier int CHECK (tier < 900),
    _source text NOT NULL, _partition text NOT NULL, _offset bigint NOT NULL,
    _seq int NOT NULL DEFAULT 0, UNIQUE (_source, _partition, _offset, _seq));
CREATE TABLE per_country (country text PRIMARY KEY, n bigint NOT NULL);
"""

app = ps.App("lookups", batch_size=int(os.environ.get("LOOKUPAPP_BATCH", "25")))
orders = app.stream("orders", ps.FileSource(os.environ.get("LOOKUPAPP_FILE", "orders.jsonl")))
enriched = orders.lookup(
    "users",
    on={"user_id": "id"},
    columns=["country", "tier"],
    missing=os.environ.get("LOOKUPAPP_MISSING", "null"),
)
enriched.map(
    lambda o: {"order_id": o["id"], "user_id": o["user_id"], "country": o["country"],
               "tier": o["tier"]}
).to_table("facts")
enriched.map(lambda o: {"country": o["country"] or "?"}).key_by("country").aggregate(
    n=ps.count()
).to_table("per_country")
