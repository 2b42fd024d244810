"""Module attributes imported on first use (a module's ``__getattr__``, PEP 562).

A package lists the names it exports lazily and the module each comes from; the first
``package.Name`` imports that module and keeps the value in the package's namespace, so a
program that never asks for the name never pays for importing it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_attributes(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, exporting ``names`` (name ->
    module holding it) on first use."""
    namespace = sys.modules[package].__dict__

    def getattr_(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(names[name]), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *names})

    return getattr_, dir_
