"""Finding the user's app from ``MODULE:APP``."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from pgstream.api import App
from pgstream.errors import ConfigError
from pgstream.usercode import describe, format_traceback

log = logging.getLogger("pgstream.loader")


def load_app(target: str) -> App:
    """Import ``module:attribute`` (or ``path/to/file.py:attribute``) and return the App.

    The current directory is put on ``sys.path`` first, as ``python -m`` would. An error in
    the user's module names its file and line; its full traceback is logged at INFO (``-v``).
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected MODULE:APP, got {target!r}", hint="e.g. pgstream run app:app")
    if module_name.endswith(".py") or os.sep in module_name:
        path = Path(module_name).resolve()
        if not path.exists():
            raise ConfigError(f"no such file: {module_name}")
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    elif os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name or (exc.name and module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"cannot import module {module_name!r}",
                hint="run from the directory that holds it, or put it on PYTHONPATH",
            ) from exc
        log.info("importing %r failed:\n%s", module_name, format_traceback(exc))
        raise ConfigError(f"importing {module_name!r} failed: {describe(exc)}") from exc
    except ConfigError:
        raise
    except Exception as exc:
        log.info("importing %r failed:\n%s", module_name, format_traceback(exc))
        raise ConfigError(f"importing {module_name!r} failed: {describe(exc)}") from exc
    app = getattr(module, attr, None)
    if app is None:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(app, App):
        raise ConfigError(
            f"{target} is a {type(app).__name__}, not a pgstream App",
            hint="define it with app = pgstream.App('job-name')",
        )
    return app
