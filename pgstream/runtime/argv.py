"""Keeping database passwords off the process table (``ps``, ``/proc/<pid>/cmdline``).

pgstream itself never puts a secret on a command line: ``run --workers N`` hands the DSN to
its children through their environment (:data:`DSN_ENV`), which only the same user can read.
A password the user typed in ``--dsn`` is overwritten in this process's own argument memory
as soon as the command starts (as ``mysql -p`` does), so it is visible at most during
interpreter start-up. Prefer ``PGSTREAM_DSN`` or a ``~/.pgpass`` file for passwords anyway.
"""

from __future__ import annotations

import logging
import re
import sys

__all__ = ["DSN_ENV", "hide_passwords", "mask_password"]

log = logging.getLogger("pgstream.argv")

#: the environment variable a supervisor passes the resolved DSN in (read by ``resolve_dsn``)
DSN_ENV = "PGSTREAM_DSN"

# URL form: scheme://user:password@host (the password up to the last '@' before the host)
_URL_PASSWORD = re.compile(rb"(://[^:/@?#]*:)([^/?#]*)(@)")
# key=value form and URL query parameters: password=... (quoted or not)
_KV_PASSWORD = re.compile(rb"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)


def _stars(match: re.Match[bytes]) -> bytes:
    groups = match.groups()
    return groups[0] + b"*" * len(groups[1]) + b"".join(groups[2:])


def mask_password(arg: bytes) -> bytes:
    """``arg`` with every DSN password replaced by as many ``*``: same length, no secret."""
    return _KV_PASSWORD.sub(_stars, _URL_PASSWORD.sub(_stars, arg))


def hide_passwords() -> bool:
    """Overwrite DSN passwords in this process's command line as the kernel shows it.

    Linux only (through ``/proc/self``); returns whether anything was hidden. Best effort: on
    any other system, or if the memory cannot be written, a warning says so.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/cmdline", "rb") as f:
            shown = f.read()
    except OSError:
        return False
    if _masked(shown) == shown:
        return False  # nothing to hide: never touch the memory
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # the fields after the command name (which may hold spaces) in parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            raw = mem.read(end - start)
            masked = _masked(raw)
            if masked != raw:
                mem.seek(start)
                mem.write(masked)
        return True
    except (OSError, ValueError, IndexError) as exc:
        log.warning(
            "could not hide the password given in --dsn from the process list (%s); "
            "pass it in PGSTREAM_DSN or ~/.pgpass instead",
            exc,
        )
        return False


def _masked(args: bytes) -> bytes:
    """NUL-separated arguments with each one's passwords masked (the same length)."""
    return b"\0".join(mask_password(arg) for arg in args.split(b"\0"))
