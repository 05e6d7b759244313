"""Resolve ``pkg.module:function`` or ``path/to/file.py:function`` to the objective callable."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from optguard.errors import ObjectiveError

__all__ = ["load_objective", "error_line"]


def error_line(exc: BaseException) -> str:
    """The last line of a traceback: ``ValueError: boom``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _split_target(target: str) -> tuple[str, str]:
    module, sep, attr = target.rpartition(":")
    if not sep or not module or not attr:
        raise ObjectiveError(
            f"objective {target!r} must be 'package.module:function' or 'path/file.py:function'"
        )
    return module, attr


def _import_file(path_text: str, target: str) -> Any:
    path = Path(path_text).resolve()
    if not path.is_file():
        raise ObjectiveError(f"objective file not found: {path_text}")
    name = "optguard_objective_" + path.stem.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ObjectiveError(f"cannot load objective file {path_text}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickling and dataclasses look the module up by name
    sys.path.insert(0, str(path.parent))  # sibling imports work as when run as a script
    spec.loader.exec_module(module)
    return module


def _import_module(name: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's own packages
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ObjectiveError(f"objective module not found: {name}") from None
        raise


def load_objective(target: str) -> Callable[..., Any]:
    """Import the objective; every failure becomes one ``ObjectiveError`` line."""
    module_name, attr = _split_target(target)
    is_file = module_name.endswith(".py") or os.sep in module_name or "/" in module_name
    try:
        module = _import_file(module_name, target) if is_file else _import_module(module_name)
    except ObjectiveError:
        raise
    except (Exception, SystemExit) as exc:  # user code: any import-time failure is reported
        raise ObjectiveError(f"cannot import objective {target}: {error_line(exc)}") from exc
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise ObjectiveError(f"objective {target}: {module_name} has no attribute {attr!r}") from None
    if not callable(func):
        raise ObjectiveError(
            f"objective {target} is not callable (it is a {type(func).__name__})"
        )
    return func
