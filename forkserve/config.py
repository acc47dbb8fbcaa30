"""From the command line to a `Config`: the parser is generated from `settings.SETTINGS`."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from forkserve import __version__
from forkserve.cpus import usable_cpus
from forkserve.errors import ConfigError
from forkserve.settings import DEFAULT_APP, SETTINGS, Setting


class Config:
    """The effective configuration: one attribute per setting, plus `app`.

    `workers` is always a number here: 'auto' is resolved when the config is built.
    """

    app: str
    bind: list[str]
    backlog: int
    workers: int
    threads: int
    timeout: float
    graceful_timeout: float
    keep_alive: float
    limit_request_line: int
    limit_request_fields: int
    limit_request_field_size: int
    chdir: str | None
    log_level: str
    error_logfile: str
    access_logfile: str | None
    access_log_format: str

    def __init__(self, **values: Any) -> None:
        for setting in SETTINGS:
            default = setting.default
            setattr(self, setting.name, list(default) if setting.repeat else default)
        self.app = DEFAULT_APP
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
        description="Serve a WSGI app with a preforking master and one worker per CPU.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "app", nargs="?", default=DEFAULT_APP, metavar="MODULE:VARIABLE",
        help="The app to serve: MODULE:VARIABLE, or MODULE:FACTORY() to call a factory. "
        f"Default: the built-in demo app ({DEFAULT_APP}).",
    )
    parser.add_argument("--version", action="version", version=f"forkserve {__version__}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        group = groups.get(setting.section)
        if group is None:
            group = groups[setting.section] = parser.add_argument_group(setting.section)
        group.add_argument(
            *setting.flags,
            dest=setting.name,
            type=_type(setting),
            action="append" if setting.repeat else "store",
            default=None,
            metavar=setting.metavar,
            help=setting.help.replace("%", "%%"),  # argparse formats help with %
        )
    return parser


def parse_args(argv: list[str]) -> Config:
    """Build a Config from command-line arguments; raises ConfigError with a one-line message."""
    namespace = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(namespace).items() if v is not None}
    return Config(**values)
