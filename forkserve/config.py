"""From the command line (and a Python config file) to a `Config`.

The parser is generated from `settings.SETTINGS`. A config file given with `-c FILE` is a
Python module, as gunicorn users know it: module-level names that are settings set them
(the command line wins), and functions named after a hook in `HOOKS` become server hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import types
from collections.abc import Callable
from typing import Any, NoReturn

from forkserve import __version__
from forkserve.cpus import usable_cpus
from forkserve.errors import ConfigError
from forkserve.settings import BY_NAME, DEFAULT_APP, SETTINGS, Setting
from forkserve.tomlfile import load_toml

# Server hooks a config file may define, called as in gunicorn:
#   on_starting(server)          master, before binding; an exception stops the start
#   on_reload(server)            master, on HUP, after the configuration is re-read
#   when_ready(server)           master, once every first worker has booted
#   pre_fork(server, worker)     master, just before forking `worker` (its record)
#   post_fork(server, worker)    the new worker, right after fork (the Worker object)
#   worker_exit(server, worker)  the worker, after it stopped serving
# Any other hook exception is logged and the server carries on.
HOOKS = ("on_starting", "on_reload", "when_ready", "pre_fork", "post_fork", "worker_exit")


class Config:
    """The effective configuration: one attribute per setting, plus `app`.

    `workers` is always a number here: 'auto' is resolved when the config is built.
    """

    app: str
    bind: list[str]
    backlog: int
    workers: int
    threads: int | str  # or 'auto'
    worker_connections: int
    timeout: float
    boot_timeout: float
    header_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_worker_memory: int
    pidfile: str | None
    preload: bool
    worker_class: str
    interface: str
    loop: str
    lifespan: str
    root_path: str
    forwarded_allow_ips: str
    limit_request_body: int
    server_header: str
    proxy_protocol: bool
    ws_max_size: int
    ws_ping_interval: float
    ws_ping_timeout: float
    certfile: str | None
    keyfile: str | None
    ca_certs: str | None
    client_cert: str
    ciphers: str | None
    tls_min_version: str
    user: str | None
    group: str | None
    umask: int
    allow_root: bool
    graceful_timeout: float
    drain_delay: float
    keep_alive: float
    limit_request_line: int
    limit_request_fields: int
    limit_request_field_size: int
    chdir: str | None
    log_level: str
    error_logfile: str
    access_logfile: str | None
    access_log_format: str
    health_path: str | None
    control_socket: str | None  # a path, or 'auto' (forkserve.control.default_path)
    metrics_bind: str | None
    statsd_host: str | None
    statsd_prefix: str
    log_config: str | None
    log_format: str
    logconfig_dict: dict[str, Any] | None  # from a config file only
    reload: bool
    reload_dirs: list[str]
    reload_include: list[str]
    reload_exclude: list[str]
    hooks: dict[str, Callable[..., Any]]
    config: str | None
    sources: dict[str, str]
    check_only: bool

    def __init__(self, **values: Any) -> None:
        for setting in SETTINGS:
            default = setting.default
            setattr(self, setting.name, list(default) if setting.repeat else default)
        self.app = DEFAULT_APP
        self.logconfig_dict = None
        self.hooks = {}
        self.config = None
        self.sources = {}
        self.check_only = False
        for name, value in values.items():
            if not hasattr(self, name):
                raise ConfigError(f"unknown setting {name!r}")
            setattr(self, name, value)
        if self.workers == "auto":
            self.workers = usable_cpus()

    def __repr__(self) -> str:
        return f"Config({vars(self)!r})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _type(setting: Setting):
    def convert(text: str) -> Any:
        try:
            return setting.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = setting.name
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The `forkserve` argument parser; its errors raise ConfigError instead of exiting."""
    parser = _Parser(
        prog="forkserve",
        description="Serve a WSGI or ASGI app with a preforking master and one worker per CPU.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "app", nargs="?", default=None, metavar="MODULE:VARIABLE",
        help="The app to serve: MODULE:VARIABLE, or MODULE:FACTORY() to call a factory. "
        f"Default: the built-in demo app ({DEFAULT_APP}).",
    )
    parser.add_argument("--version", action="version", version=f"forkserve {__version__}")
    parser.add_argument(
        "-c", "--config", metavar="FILE",
        help="Config file: TOML (forkserve.toml, or [tool.forkserve] in pyproject.toml, both "
        "found in the working directory without this option) or a Python file that may also "
        "define server hooks (on_starting, on_reload, when_ready, pre_fork, post_fork, "
        "worker_exit). Also FORKSERVE_CONFIG. The environment and the command line override "
        "it.",
    )
    parser.add_argument(
        "--check-config", action="store_true", default=None,
        help="Validate the configuration, print the effective values and where each came "
        "from, and exit.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        group = groups.get(setting.section)
        if group is None:
            group = groups[setting.section] = parser.add_argument_group(setting.section)
        help_text = setting.help.replace("%", "%%")  # argparse formats help with %
        if setting.flag:
            group.add_argument(*setting.flags, dest=setting.name, action="store_const",
                               const=True, default=None, help=help_text)
            continue
        optional = {"nargs": "?", "const": setting.const} if setting.const is not None else {}
        group.add_argument(
            *setting.flags,
            dest=setting.name,
            type=_type(setting),
            action="append" if setting.repeat else "store",
            default=None,
            metavar=setting.metavar,
            help=help_text,
            **optional,
        )
    return parser


CONFIG_FILE = "forkserve.toml"
CONFIG_ENV = "FORKSERVE_CONFIG"
APP_ENV = "FORKSERVE_APP"


def parse_args(argv: list[str], environ: dict[str, str] | None = None) -> Config:
    """Build the effective Config; raises ConfigError with a one-line message.

    Precedence: command line > environment (FORKSERVE_*) > config file > defaults. The
    config file is `-c FILE` (or FORKSERVE_CONFIG): a Python module, a TOML file, or a
    pyproject.toml; without one, ./forkserve.toml, then [tool.forkserve] in ./pyproject.toml
    (in --chdir's directory if given) are used when present. `Config.sources` says where
    each value came from.
    """
    environ = os.environ if environ is None else environ
    namespace = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    check_only = given.pop("check_config", False)
    path = given.pop("config", None) or environ.get(CONFIG_ENV) or _discover(
        given.get("chdir") or os.getcwd())
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    hooks: dict[str, Callable[..., Any]] = {}
    if path:
        file_values, hooks = load_config_file(path)
        label = f"config file {os.path.abspath(path)}"
        _layer(values, sources, file_values, lambda name: label)
    _layer(values, sources, _from_environment(environ),
           lambda name: f"environment {BY_NAME[name].env if name in BY_NAME else APP_ENV}")
    _layer(values, sources, given, lambda name: "command line")
    cfg = Config(**values)
    if cfg.reload and cfg.preload:
        raise ConfigError("--reload cannot be used with --preload: the master would keep "
                          "the code it loaded, so no change could ever reach the workers")
    if cfg.log_config and cfg.logconfig_dict is not None:
        raise ConfigError(f"--log-config and the config file's {LOGCONFIG_DICT} both "
                          "configure logging: keep one")
    cfg.hooks = hooks
    cfg.config = os.path.abspath(path) if path else None
    cfg.sources = sources
    cfg.check_only = check_only
    return cfg


def _layer(values: dict[str, Any], sources: dict[str, str], layer: dict[str, Any],
           source: Callable[[str], str]) -> None:
    for name, value in layer.items():
        values[name] = value
        sources[name] = source(name)


def _discover(directory: str) -> str | None:
    candidate = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(candidate):
        return candidate
    pyproject = os.path.join(directory, "pyproject.toml")
    if os.path.isfile(pyproject) and _read_toml(pyproject).get("tool", {}).get("forkserve"):
        return pyproject
    return None


def _from_environment(environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text is None or not (text.strip() or setting.empty_is_value):
            continue  # empty, as compose files and templates write unset values: unset
        try:
            if setting.repeat:
                values[setting.name] = [setting.parse(item.strip())
                                        for item in text.split(",") if item.strip()]
            else:
                values[setting.name] = setting.parse(text)
        except ValueError as exc:
            raise ConfigError(f"environment variable {setting.env}: {exc}") from None
    if environ.get(APP_ENV, "").strip():
        values["app"] = environ[APP_ENV].strip()
    return values


def load_config_file(path: str) -> tuple[dict[str, Any], dict[str, Callable[..., Any]]]:
    """Read a config file (Python, TOML or pyproject.toml); return its settings (checked)
    and, for Python files, its hooks."""
    if path.endswith(".py"):
        return _load_python(path)
    data = _read_toml(path)
    if os.path.basename(path) == "pyproject.toml":
        data = data.get("tool", {}).get("forkserve", {})
        where = f"{path} [tool.forkserve]"
    else:
        where = path
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name == "app":
            if not isinstance(value, str):
                raise ConfigError(f"config file {where}: app: expected a string, got {value!r}")
            values[name] = value
        elif name == LOGCONFIG_DICT:
            values[name] = _logconfig_dict(value, where)
        elif name in BY_NAME:
            values[name] = _checked(BY_NAME[name], value, where)
        else:
            raise ConfigError(f"config file {where}: unknown setting {name!r}")
    return values, {}


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return load_toml(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _load_python(path: str) -> tuple[dict[str, Any], dict[str, Callable[..., Any]]]:
    """Run a Python config file; return its settings (checked) and its hooks."""
    try:
        namespace = runpy.run_path(path, run_name="forkserve_config")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except Exception as exc:
        raise ConfigError(f"config file {path}: {type(exc).__name__}: {exc}") from None
    values: dict[str, Any] = {}
    hooks: dict[str, Callable[..., Any]] = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType | type):
            continue
        if name in HOOKS:
            if not callable(value):
                raise ConfigError(f"config file {path}: hook {name} must be a function")
            hooks[name] = value
        elif name in BY_NAME:
            values[name] = _checked(BY_NAME[name], value, path)
        elif name == "app":
            if not isinstance(value, str):
                raise ConfigError(f"config file {path}: app must be a string")
            values[name] = value
        elif name == LOGCONFIG_DICT:
            values[name] = _logconfig_dict(value, path)
        elif not callable(value):
            raise ConfigError(f"config file {path}: unknown setting {name!r}")
    return values, hooks


# A config file's logging configuration given inline (gunicorn's name): a dictConfig dict.
LOGCONFIG_DICT = "logconfig_dict"


def _logconfig_dict(value: Any, where: str) -> dict[str, Any]:
    """A logconfig_dict checked as far as it can be before it is applied (logs.setup
    applies it, and says what dictConfig refuses)."""
    if not isinstance(value, dict):
        raise ConfigError(f"config file {where}: {LOGCONFIG_DICT}: expected a dictionary for "
                          f"logging.config.dictConfig, got {type(value).__name__}")
    if value.get("version") != 1:
        raise ConfigError(f"config file {where}: {LOGCONFIG_DICT}: needs \"version\": 1 "
                          "(logging.config.dictConfig's schema)")
    return value


def describe(cfg: Config) -> str:
    """The effective configuration as TOML, each value with where it came from."""
    lines = [f"# forkserve {__version__}: effective configuration"]
    for name in ["app", *(setting.name for setting in SETTINGS)]:
        value = getattr(cfg, name)
        source = cfg.sources.get(name, "default")
        if name == "workers" and "workers" not in cfg.sources:
            source = "default: auto, the CPUs this process may use"
        if value is None:
            lines.append(f"# {name} is not set".ljust(48) + f"  # {source}")
            continue
        text = f'"{value:03o}"' if name == "umask" else json.dumps(value)
        lines.append(f"{name} = {text}".ljust(48) + f"  # {source}")
    if cfg.hooks:
        lines.append(f"# hooks from {cfg.config}: {', '.join(sorted(cfg.hooks))}")
    return "\n".join(lines)


def _checked(setting: Setting, value: Any, path: str) -> Any:
    """A config-file value for `setting`, validated as its command-line text would be."""
    where = f"config file {path}: {setting.name}"
    if setting.flag:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected True or False, got {value!r}")
        return value
    if value is None and setting.default is None:
        return None
    items = value if setting.repeat and isinstance(value, list | tuple) else [value]
    parsed = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(f"{where}: expected a string or number, got {item!r}")
        try:
            parsed.append(setting.parse(setting.to_text(item)))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return parsed if setting.repeat else parsed[0]
