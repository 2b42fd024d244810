"""Where a user's code failed: the last traceback frame outside pgstream, the stdlib and
installed packages, for error messages and dead letters.

Only failures pay for this: nothing here runs while records succeed.
"""

from __future__ import annotations

import os
import site
import sysconfig
import traceback
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep
#: filename -> whether it is the user's code (``None``: an installed package's)
_classified: dict[str, bool | None] = {}
#: filename -> how messages show it
_shown_as: dict[str, str] = {}


def _library_prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(stdlib directories, installed-package directories), each ending with a separator."""
    paths = sysconfig.get_paths()
    stdlib = {paths.get("stdlib", ""), paths.get("platstdlib", "")}
    packages = {paths.get("purelib", ""), paths.get("platlib", "")}
    packages.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    packages.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else "")

    def norm(dirs: set[str]) -> tuple[str, ...]:
        return tuple(os.path.realpath(d) + os.sep for d in dirs if d)

    return norm(stdlib), norm(packages)


_STDLIB, _PACKAGES = _library_prefixes()


def _kind(filename: str) -> bool | None:
    """True for user code, None for an installed package's, False for pgstream, the stdlib,
    and code without a file (``<frozen importlib._bootstrap>``, generated kernels)."""
    if filename in _classified:
        return _classified[filename]
    kind: bool | None
    if filename.startswith("<"):
        kind = False
    else:
        real = os.path.realpath(filename)
        parts = real.split(os.sep)
        if real.startswith(_PACKAGE):
            kind = False
        elif "site-packages" in parts or "dist-packages" in parts or real.startswith(_PACKAGES):
            kind = None
        elif real.startswith(_STDLIB):
            kind = False
        else:
            kind = True
    _classified[filename] = kind
    return kind


def _shown(filename: str) -> str:
    """``filename`` relative to the current directory (when the worker started failing)
    when it lies below it."""
    shown = _shown_as.get(filename)
    if shown is None:
        try:
            rel = os.path.relpath(filename)
        except ValueError:  # another drive (Windows)
            rel = os.pardir
        shown = _shown_as[filename] = filename if rel.startswith(os.pardir) else rel
    return shown


def user_location(exc: BaseException) -> str | None:
    """``"app.py:14 in <lambda>"``: the last frame of ``exc``'s traceback in the user's code
    (not in pgstream, the stdlib or site-packages; an installed package's frame when no other
    is left), or the position of a ``SyntaxError``; ``None`` when there is none."""
    best: tuple[str, int, str] | None = None
    fallback: tuple[str, int, str] | None = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        kind = _kind(code.co_filename)
        if kind:
            best = (code.co_filename, lineno, code.co_name)
        elif kind is None:
            fallback = (code.co_filename, lineno, code.co_name)
    if (
        isinstance(exc, SyntaxError)
        and exc.filename
        and exc.lineno
        and _kind(exc.filename) is not False
    ):
        return f"{_shown(exc.filename)}:{exc.lineno}"
    found = best or fallback
    if found is None:
        return None
    filename, lineno, name = found
    return f"{_shown(filename)}:{lineno} in {name}"


def describe(exc: BaseException) -> str:
    """``"ZeroDivisionError: division by zero (at app.py:14 in <lambda>)"``."""
    return describe_at(exc, user_location(exc))


def describe_at(exc: BaseException, where: str | None) -> str:
    """:func:`describe` with the location already found (``None``: none)."""
    text = f"{type(exc).__name__}: {exc}"
    if where is None or (isinstance(exc, SyntaxError) and exc.filename):
        return text  # a SyntaxError's text already says "(app.py, line 3)"
    return f"{text} (at {where})"


def format_traceback(exc: BaseException) -> str:
    """The full traceback of ``exc`` (chained causes included), for ``-v`` logging."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()


__all__ = ["describe", "describe_at", "format_traceback", "user_location"]
