"""Resolve ``pkg.module:function`` or ``path/to/file.py:function`` to the objective callable.

``check_target`` looks at the target without running any of its code, so that ``optguard
run`` can reject a typo before it touches the storage; ``load_objective`` imports it (workers).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from optguard.errors import ObjectiveError

__all__ = ["load_objective", "check_target", "error_line"]


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


def _is_file(module_name: str) -> bool:
    return module_name.endswith(".py") or os.sep in module_name or "/" in module_name


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
    try:
        module = (
            _import_file(module_name, target)
            if _is_file(module_name)
            else _import_module(module_name)
        )
    except ObjectiveError:
        raise
    except (Exception, SystemExit) as exc:  # user code: any import-time failure is reported
        raise ObjectiveError(f"cannot import objective {target}: {error_line(exc)}") from exc
    try:
        func = getattr(module, attr)
    except AttributeError:
        raise ObjectiveError(
            f"objective {target}: {module_name} has no attribute {attr!r}"
        ) from None
    if not callable(func):
        raise ObjectiveError(
            f"objective {target} is not callable (it is a {type(func).__name__})"
        )
    return func


# -- checked without importing ------------------------------------------------------------------

_UNKNOWN = object()  # a module whose source cannot be found or read: left to the import
_NESTED_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _find_spec(fullname: str, path: list[str] | None) -> Any:
    """The spec the import system would use, found without executing any module.

    ``importlib.util.find_spec("a.b")`` would import (run) ``a``; this asks the finders
    directly with the parent's search locations, as the import system does.
    """
    if fullname in sys.modules:
        module = sys.modules[fullname]
        if module is None:
            return None
        return getattr(module, "__spec__", None) or _UNKNOWN
    if path is None and os.getcwd() not in sys.path and "" not in sys.path:
        # the worker puts the working directory first, as `python -m` would (_import_module)
        spec = importlib.machinery.PathFinder.find_spec(fullname, [os.getcwd()])
        if spec is not None:
            return spec
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        try:
            spec = find(fullname, path, None)
        except (ImportError, ValueError, OSError):
            return _UNKNOWN  # a custom finder failing here is the import's to report
        if spec is not None:
            return spec
    return None


def _module_source(name: str) -> Path | None:
    """The ``.py`` file of module ``name``; ``None`` when it has none (built in, compiled,
    namespace package, found by a custom finder). ``ObjectiveError`` when it does not exist."""
    parts = name.split(".")
    search: list[str] | None = None
    spec: Any = None
    for depth in range(1, len(parts) + 1):
        fullname = ".".join(parts[:depth])
        spec = _find_spec(fullname, search)
        if spec is None:
            raise ObjectiveError(f"objective module not found: {name}")
        if spec is _UNKNOWN:
            return None
        if depth < len(parts):
            parent = sys.modules.get(fullname)
            search = getattr(parent, "__path__", None) or spec.submodule_search_locations
            if search is None:  # "No module named 'a.b'; 'a' is not a package"
                raise ObjectiveError(f"objective module not found: {name}")
            search = list(search)
    origin = getattr(spec, "origin", None)
    if not getattr(spec, "has_location", False) or not isinstance(origin, str):
        return None
    source = Path(origin)
    return source if source.suffix in importlib.machinery.SOURCE_SUFFIXES else None


def _parse(path: Path, shown: str) -> ast.Module:
    """The module's syntax tree; any error the compiler would raise on import, with file:line.

    ``compile`` checks what the parser alone lets through (``return`` outside a function);
    it runs nothing. Its warnings (invalid escapes) are the import's business, not ours.
    """
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ObjectiveError(f"cannot read objective file {shown}: {exc.strerror}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=shown)
            compile(tree, shown, "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f"{shown}:{exc.lineno}" if exc.lineno else shown
        raise ObjectiveError(
            f"objective file {where}: {type(exc).__name__}: {exc.msg}"
        ) from None
    except ValueError as exc:  # null bytes, undecodable source
        raise ObjectiveError(f"cannot parse objective file {shown}: {exc}") from None
    return tree


def _module_names(tree: ast.Module) -> tuple[set[str], bool]:
    """The names module code binds at top level, and whether it may bind others in ways the
    tree does not show (``from x import *``, ``__getattr__``, ``globals()``, ``exec``)."""
    names: set[str] = set()
    dynamic = False

    def visit(node: ast.AST) -> None:
        nonlocal dynamic
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            return  # their bodies bind their own names (but see ``global`` below)
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                dynamic |= alias.name == "*"
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            dynamic |= node.func.id in ("vars", "locals") and not node.args  # module's dict
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    for node in ast.walk(tree):  # anywhere, functions included
        if isinstance(node, ast.Global):
            names.update(node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            dynamic |= node.func.id in ("globals", "exec")
        elif isinstance(node, ast.Attribute):
            dynamic |= node.attr == "__dict__" or (
                node.attr == "modules" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"
            )  # fmt: skip
    return names, dynamic or "__getattr__" in names


def check_target(target: str) -> None:
    """Reject a target that cannot load, without importing or running any of its code.

    The module is located as the import would locate it (the file, or the finders for
    ``pkg.mod``, never executing ``pkg/__init__.py``), compiled for syntax errors, and the
    function must be bound at its top level. What the source cannot tell (a module built at
    run time, a star import, a compiled module) is left to the worker's import.
    """
    module_name, attr = _split_target(target)
    if _is_file(module_name):
        path: Path | None = Path(module_name)
        if not path.is_file():
            raise ObjectiveError(f"objective file not found: {module_name}")
        suffix = path.suffix
        if suffix not in importlib.machinery.all_suffixes():
            raise ObjectiveError(f"cannot load objective file {module_name}: not a .py file")
        if suffix not in importlib.machinery.SOURCE_SUFFIXES:
            path = None  # compiled: nothing to read
        shown = module_name
    else:
        path = _module_source(module_name)
        shown = str(path)
    if path is None:
        return
    names, dynamic = _module_names(_parse(path, shown))
    if attr in names or dynamic:
        return
    close = difflib.get_close_matches(attr, sorted(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ObjectiveError(f"objective {target}: {module_name} has no attribute {attr!r}{hint}")
