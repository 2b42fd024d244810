"""The embedded PostgreSQL server used when no database is configured.

It is the ``pgserver`` package (the ``embedded`` extra): a PostgreSQL build that runs from
site-packages, listening on a Unix socket only. The server is started on first use and left
running for later commands, which reuse it; its data lives in ``$PGSTREAM_HOME/pgdata``
(default: ``platformdirs.user_data_dir("pgstream")/pgdata``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pgstream.errors import DatabaseError

__all__ = ["HOME_ENV", "data_dir", "ensure_server", "home_dir", "start_server", "stop_server"]

HOME_ENV = "PGSTREAM_HOME"
INSTALL_HINT = "pip install 'pgstream-engine[embedded]'"

_servers: dict[Path, tuple[str, Any]] = {}


def home_dir() -> Path:
    """pgstream's local home: ``$PGSTREAM_HOME`` or the platform's user data directory."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(platformdirs.user_data_dir("pgstream", appauthor=False))


def data_dir() -> Path:
    """The embedded server's data directory (``<home>/pgdata``)."""
    return home_dir() / "pgdata"


def _ensure_runtime_dir() -> None:
    """Set ``XDG_RUNTIME_DIR`` if missing, so platformdirs (used by pgserver) stays quiet."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    runtime = Path(tempfile.gettempdir()) / f"runtime-{os.getuid()}"
    with contextlib.suppress(OSError):
        runtime.mkdir(mode=0o700, exist_ok=True)
        # platformdirs warns about a runtime dir that is not private
        if runtime.stat().st_uid == os.getuid() and runtime.stat().st_mode & 0o077:
            runtime.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def _import_pgserver() -> Any:
    _ensure_runtime_dir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise DatabaseError(
            "no database configured and the embedded PostgreSQL server is not installed",
            hint=f"{INSTALL_HINT}, or point pgstream at a server with --dsn / PGSTREAM_DSN",
        ) from None
    return pgserver


def start_server(pgdata: Path, *, cleanup: bool = False) -> str:
    """Start (or reuse) an embedded server on ``pgdata`` and return its libpq DSN.

    With ``cleanup=False`` the server keeps running after this process exits, so the next
    command reuses it; with ``cleanup=True`` it is stopped and ``pgdata`` deleted at exit
    (used by tests). Progress and warnings from pgserver are not shown.
    """
    pgdata = pgdata.expanduser().resolve()
    if pgdata in _servers:
        return _servers[pgdata][0]
    pgserver = _import_pgserver()
    # pgserver logs server logs and shutdown notes itself; pgstream reports errors instead.
    logger = logging.getLogger("pgserver")
    logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            server = pgserver.get_server(pgdata, cleanup_mode="delete" if cleanup else None)
            dsn = str(server.get_uri())
    except Exception as exc:
        log = pgdata / "log"
        raise DatabaseError(
            f"could not start the embedded PostgreSQL server in {pgdata}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}",
            hint=f"see {log}" if log.exists() else f"set {HOME_ENV} to a writable directory",
        ) from exc
    _servers[pgdata] = (dsn, server)
    return dsn


def stop_server(pgdata: Path) -> None:
    """Stop a server this process started with :func:`start_server` (if it is the last user).

    A server started with ``cleanup=True`` also has its data directory deleted.
    """
    entry = _servers.pop(pgdata.expanduser().resolve(), None)
    if entry is None:
        return
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        entry[1].cleanup()


def ensure_server() -> str:
    """Start (or reuse) the default embedded server under :func:`data_dir`; return its DSN."""
    return start_server(data_dir())
