"""Find the app: import `MODULE:VARIABLE` or call `MODULE:FACTORY(...)`."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from forkserve.errors import EXIT_BOOT, EXIT_CONFIG, EXIT_OK, AppNotFound, ConfigError
from forkserve.logs import error_log

DEFAULT_NAMES = ("app", "application")


def preload(spec: str, chdir: str | None) -> tuple[Callable[..., Any] | None, int]:
    """--preload: load the app in the master, logging the outcome. Returns (the app, 0),
    or (None, the exit status: 2 for a bad spec or a missing module, 3 when it raised)."""
    try:
        app = load_app(spec, chdir)
    except ConfigError as exc:
        error_log.error("%s", exc)
        return None, EXIT_CONFIG
    except BaseException:
        error_log.error("cannot preload %s:\n%s", spec, traceback.format_exc().rstrip())
        return None, EXIT_BOOT
    error_log.info("preloaded %s", spec)
    return app, EXIT_OK


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
    return app


def detect_interface(app: Callable[..., Any], wanted: str = "auto") -> str:
    """'wsgi', 'asgi3' or 'asgi2' for `app`; `wanted` ('wsgi', 'asgi', 'asgi2') overrides.

    ASGI 3 apps are coroutine functions, or objects (partials, callable instances) whose call
    is one. ASGI 2 apps are classes instantiated with the scope whose instances have an
    async __call__(receive, send). Anything else is WSGI.
    """
    if wanted == "wsgi":
        return "wsgi"
    if wanted == "asgi":
        return "asgi3"
    if wanted == "asgi2":
        return "asgi2"
    if inspect.isclass(app):
        # Instances are called with (receive, send): look at the call they will have.
        call = next((vars(k)["__call__"] for k in app.__mro__ if "__call__" in vars(k)), None)
        return "asgi2" if inspect.iscoroutinefunction(call) else "wsgi"
    return "asgi3" if _is_coroutine(app) else "wsgi"


def _is_coroutine(obj: Any) -> bool:
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.isroutine(obj):
        return inspect.iscoroutinefunction(obj)
    return inspect.iscoroutinefunction(type(obj).__call__)


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
