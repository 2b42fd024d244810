"""User-facing errors: each names the problem and the fix in one message."""

from __future__ import annotations


class PgStreamError(Exception):
    """An error the CLI reports as one clear line (plus an optional hint), without a traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(PgStreamError):
    """Bad arguments, unknown MODULE:APP, invalid pipeline definitions."""

    exit_code = 2


class DatabaseError(PgStreamError):
    """The database cannot be reached or is not prepared (wrong DSN, schema not migrated)."""


class SinkSchemaError(PgStreamError):
    """A sink table is missing or lacks a column or unique index the pipeline needs."""


class SinkRejectedError(SinkSchemaError):
    """The sink table rejects every record for one reason (it does not fit what the pipeline
    writes): the worker stops instead of dead-lettering the whole stream."""


class SourceUnavailableError(PgStreamError):
    """A source cannot be read, or its offsets jumped past what was committed."""


class PrivilegeError(DatabaseError):
    """The database role lacks a grant pgstream needs (the message names it and the GRANT)."""


class RecordFailedError(PgStreamError):
    """A record failed with ``on_error="fail"``: the worker stops without committing it."""


class JobStateError(PgStreamError):
    """A ``pgstream job`` command cannot act on the stored job as it is (live workers, a
    name with no checkpoint, a new name that already has one)."""


class LeaseLostError(Exception):
    """This worker's epoch is stale: another worker owns the partition now (internal)."""
