"""Find the app: import `MODULE:VARIABLE` or call `MODULE:FACTORY(...)`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from forkserve.errors import AppNotFound, ConfigError

DEFAULT_NAMES = ("app", "application")


def check_app_module(spec: str, chdir: str | None = None) -> None:
    """Raise ConfigError if `spec` is malformed or its top-level package cannot be found.

    Nothing is imported: the master calls this to refuse a typo at once, with exit status 2,
    while loading the app stays the workers' job.
    """
    module_name = _split(spec)[0]
    _add_to_path(chdir)
    top = module_name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        raise AppNotFound(f"cannot load app {spec!r}: no module named {top!r}")


def _split(spec: str) -> tuple[str, str]:
    module_name, _, expression = spec.partition(":")
    if not module_name or not all(p.isidentifier() for p in module_name.split(".")):
        raise ConfigError(f"bad app {spec!r}: expected MODULE:VARIABLE")
    return module_name, expression


def _add_to_path(chdir: str | None) -> None:
    directory = chdir or os.getcwd()
    if directory not in sys.path:
        sys.path.insert(0, directory)


def load_app(spec: str, chdir: str | None = None) -> Callable[..., Any]:
    """Import and return the WSGI callable named by `spec`.

    `spec` is MODULE, MODULE:NAME or MODULE:FACTORY(ARGS) where ARGS are Python literals.
    A module or attribute that does not exist raises AppNotFound; an exception raised by the
    app's own import or factory propagates unchanged so its traceback can be reported.
    """
    module_name, expression = _split(spec)
    name, args, kwargs, call = _parse_expression(spec, expression)
    _add_to_path(chdir)

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise AppNotFound(f"cannot load app {spec!r}: no module named {missing!r}") from None
        raise

    names = (name,) if name else DEFAULT_NAMES
    for candidate in names:
        if hasattr(module, candidate):
            app = getattr(module, candidate)
            break
    else:
        raise AppNotFound(
            f"cannot load app {spec!r}: module {module_name!r} has no attribute "
            + " or ".join(repr(n) for n in names)
        )
    if call:
        app = app(*args, **kwargs)
    if not callable(app):
        raise ConfigError(f"cannot serve {spec!r}: {type(app).__name__} object is not callable")
    if _is_asgi(app):
        raise ConfigError(
            f"cannot serve {spec!r}: it is an ASGI app and this version serves WSGI apps only"
        )
    return app


def _parse_expression(spec: str, expression: str) -> tuple[str, list, dict, bool]:
    """Split NAME or NAME(literal, key=literal) into its parts."""
    if not expression:
        return "", [], {}, False
    try:
        node = ast.parse(expression, mode="eval").body
    except SyntaxError:
        node = None
    if isinstance(node, ast.Name):
        return node.id, [], {}, False
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
        except ValueError:
            raise ConfigError(f"bad app {spec!r}: factory arguments must be literals") from None
        return node.func.id, args, kwargs, True
    raise ConfigError(f"bad app {spec!r}: expected MODULE:VARIABLE or MODULE:FACTORY()")


def _is_asgi(app: Callable[..., Any]) -> bool:
    call = app if inspect.isroutine(app) or inspect.isclass(app) else type(app).__call__
    return inspect.iscoroutinefunction(call)
