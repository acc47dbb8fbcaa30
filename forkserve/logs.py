"""Error log and access log.

The error log is the stdlib logger "forkserve.error"; the access log is "forkserve.access",
written only when `--access-logfile` is given or a logging configuration (`--log-config`,
logconfig_dict) sets that logger up, one line per response in the format of
`--access-log-format`, or one JSON object a line with `--access-log-format json`. The
format uses gunicorn's atoms so existing formats keep working:

    h remote address      l '-'              u remote user ('-')     t [time]
    r request line        m method           U path                  q query string
    H protocol            s status           b body bytes ('-' if 0) B body bytes
    f referer             a user agent       T seconds               M milliseconds
    D microseconds        L seconds (decimal) p worker pid
    {name}i request header   {name}o response header   {name}e environ variable
"""

from __future__ import annotations

import configparser
import json
import logging
import logging.config  # (apps may use it having imported only logging, as under gunicorn)
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from forkserve.errors import ConfigError
from forkserve.tomlfile import load_toml

if TYPE_CHECKING:
    from forkserve.config import Config

ERROR_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

error_log = logging.getLogger("forkserve.error")
access_log = logging.getLogger("forkserve.access")


def setup(cfg: Config) -> None:
    """Configure logging for this process (and the workers it forks): with --log-config or
    a config file's logconfig_dict, as that says; else the error log to --error-logfile
    ('-': stderr) in --log-format. The access log goes to --access-logfile ('-': stdout) if
    given, and is on when that or the logging configuration sets up forkserve.access.

    Raises ConfigError for a logging configuration that cannot be read or applied, or a log
    file that cannot be opened; the logging may then be half set up: `restore()` brings
    back what the last successful call set up."""
    global _applied
    config = _load_config(cfg.log_config, cfg.logconfig_dict)
    _apply(cfg, config)
    _applied = (cfg, config)


def restore() -> None:
    """Set up again, from memory (files are not read again), the logging of the last
    successful `setup`; if even that fails, the error log goes to stderr."""
    if _applied is None:
        return
    try:
        _apply(*_applied)
    except ConfigError:
        error_log.handlers.clear()
        error_log.addHandler(_handler("-", sys.stderr, _error_formatter(_applied[0])))


_LoggingConfig = dict[str, Any] | configparser.ConfigParser | None

# What the last successful setup() applied: the configuration and its logging configuration.
_applied: tuple[Config, _LoggingConfig] | None = None

ACCESS_LOGGER = "forkserve.access"
_INI_SUFFIXES = (".ini", ".conf", ".cfg")


def _load_config(path: str | None, config: dict[str, Any] | None) -> _LoggingConfig:
    """The logging configuration of a --log-config file (a dict for dictConfig, a parser for
    fileConfig) or a logconfig_dict; None when there is none. Changes nothing."""
    if path is None:
        return config
    try:
        if path.endswith(_INI_SUFFIXES):
            parser = configparser.ConfigParser(interpolation=None)
            if not parser.read(path, encoding="utf-8"):
                raise OSError(f"cannot read {path}")
            return parser
        with open(path, "rb") as f:
            loaded = load_toml(f) if path.endswith(".toml") else json.load(f)
    except (OSError, ValueError, configparser.Error) as exc:  # (JSON's and TOML's errors too)
        raise ConfigError(f"--log-config {path}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--log-config {path}: expected a dictionary for "
                          "logging.config.dictConfig")
    return loaded


def _apply(cfg: Config, config: _LoggingConfig) -> None:
    for logger in (error_log, access_log):
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.disabled = False
        logger.propagate = True
    configured = _apply_config(cfg, config)
    try:
        if configured is None:
            error_log.propagate = False
            error_log.addHandler(_handler(cfg.error_logfile, sys.stderr,
                                          _error_formatter(cfg)))
        if cfg.access_logfile is not None:
            access_log.propagate = False
            access_log.addHandler(_handler(cfg.access_logfile, sys.stdout,
                                           logging.Formatter("%(message)s")))
    except OSError as exc:
        raise ConfigError(f"cannot open log file {exc.filename}: {exc.strerror}") from None
    if error_log.level == logging.NOTSET:
        error_log.setLevel(cfg.log_level.upper())
    if cfg.access_logfile is None and (configured is None or ACCESS_LOGGER not in configured):
        access_log.disabled = True
    if access_log.level == logging.NOTSET:
        access_log.setLevel(logging.INFO)


def _apply_config(cfg: Config, config: _LoggingConfig) -> set[str] | None:
    """Apply a logging configuration; return the names of the loggers it configures (None
    when there is none). Loggers it does not name keep working (they are not disabled
    unless it says disable_existing_loggers)."""
    if config is None:
        return None
    where = f"--log-config {cfg.log_config}" if cfg.log_config else "logconfig_dict"
    try:
        if isinstance(config, configparser.ConfigParser):
            logging.config.fileConfig(config, disable_existing_loggers=False)
            return {config.get(f"logger_{key.strip()}", "qualname", fallback=key.strip())
                    for key in config.get("loggers", "keys", fallback="").split(",")}
        logging.config.dictConfig({"disable_existing_loggers": False, **config})
    except KeyError as exc:  # (fileConfig's way of saying so)
        raise ConfigError(f"{where}: missing section or option {exc}") from None
    except (OSError, ValueError, TypeError, AttributeError, ImportError,
            configparser.Error) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc}: {cause}" if cause is not None and str(cause) not in str(exc) else exc
        raise ConfigError(f"{where}: {detail}") from None
    loggers = config.get("loggers")
    return set(loggers) if isinstance(loggers, dict) else set()


def _error_formatter(cfg: Config) -> logging.Formatter:
    if cfg.log_format == "json":
        return JSONFormatter()
    return logging.Formatter(ERROR_LOG_FORMAT, DATE_FORMAT)


class JSONFormatter(logging.Formatter):
    """A record as one JSON object: time (RFC 3339, UTC), level, pid, logger, message, and
    the traceback of its exception if any (--log-format json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def rfc3339(timestamp: float) -> str:
    """`timestamp` (a time.time() value) as RFC 3339 in UTC, to the millisecond."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds")


class _ReportsFailures:
    """A handler mix-in: a record that cannot be written (a full disk, a closed pipe) is
    counted and dropped, the first failure of an episode is reported in one line on the
    original stderr, and the count is logged once writing works again; the stdlib would
    print a traceback to stderr for every record."""

    lost = 0
    _failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)  # type: ignore[misc]  # calls handleError() on failure
        if not self._failed and self.lost:
            lost, self.lost = self.lost, 0
            super().emit(logging.makeLogRecord({  # type: ignore[misc]
                "name": record.name, "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{lost} log records were lost while the log could not be written"}))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (stdlib's name)
        self._failed = True
        if not self.lost:
            error = sys.exc_info()[1]
            try:
                sys.__stderr__.write(f"forkserve: cannot write to {self.name}: {error}; "
                                     "dropping log records until it works again\n")
                sys.__stderr__.flush()
            except (OSError, ValueError, AttributeError):
                pass  # stderr is what fails: nowhere left to say it
        self.lost += 1


class _StreamHandler(_ReportsFailures, logging.StreamHandler):
    pass


class _FileHandler(_ReportsFailures, logging.FileHandler):
    pass


def _handler(target: str, stream, formatter: logging.Formatter) -> logging.Handler:
    handler: logging.Handler
    if target == "-":
        handler = _StreamHandler(stream)
        handler.set_name("stderr" if stream is sys.stderr else "stdout")
    else:
        handler = _FileHandler(target, encoding="utf-8")
        handler.set_name(target)
    handler.setFormatter(formatter)
    return handler


def error_stream():
    """The open stream the error log writes to (for faulthandler), or None: of its own
    handlers, else of those it propagates to (a --log-config may leave it to the root's)."""
    logger: logging.Logger | None = error_log
    while logger is not None:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None:
                return stream
        logger = logger.parent if logger.propagate else None
    return None


def _all_handlers() -> list[logging.Handler]:
    """Every handler of every logger of this process (a --log-config may add any), once."""
    loggers = [logging.getLogger(), *(logger for logger in
                                      list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(logger, logging.Logger))]
    handlers: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            handlers.setdefault(id(handler), handler)
    return list(handlers.values())


def log_files() -> list[str]:
    """The paths of the files this process logs to."""
    return [handler.baseFilename for handler in _all_handlers()
            if isinstance(handler, logging.FileHandler)]


def reopen() -> list[str]:
    """Reopen log files (after logrotate moved them away), those of a --log-config too;
    streams are left as they are.

    A file that cannot be opened again (its folder gone, no permission) keeps the stream in
    use; returns what failed ("PATH: reason" each), for the caller to report."""
    failed = []
    for handler in _all_handlers():
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            try:
                stream = handler._open()
            except OSError as exc:
                failed.append(f"{handler.baseFilename}: {exc.strerror}")
                continue
            with handler.lock:
                handler.stream.close()
                handler.stream = stream
    return failed


def reopen_and_say(reason: str) -> None:
    """`reopen`, and log the outcome (`reason` begins the lines)."""
    failed = reopen()
    for failure in failed:
        error_log.error("%s: cannot reopen log file %s; still writing to the file it "
                        "replaced", reason, failure)
    if not failed:
        error_log.info("%s: log files reopened", reason)


def flush() -> None:
    """Flush every log handler: called before a process ends with os._exit()."""
    for handler in _all_handlers():
        try:
            handler.flush()
        except (OSError, ValueError):
            pass  # a handler that cannot write has said so (or cannot say it anywhere)


class _Atoms(dict):
    """The values one access-log line may use; header atoms are looked up on demand."""

    def __init__(self, values: dict, request_headers: Iterable, response_headers: Iterable,
                 environ: dict | None) -> None:
        super().__init__(values)
        self._request_headers = request_headers
        self._response_headers = response_headers
        self._environ = environ or {}

    def __missing__(self, key: str) -> str:
        if len(key) > 3 and key[0] == "{" and key[-2] == "}":
            name, kind = key[1:-2].lower(), key[-1]
            if kind == "i":
                return _header(self._request_headers, name) or "-"
            if kind == "o":
                return _header(self._response_headers, name) or "-"
            if kind == "e":
                return str(self._environ.get(key[1:-2], "-"))
        return "-"


def _header(headers: Iterable, name: str) -> str | None:
    """The value of the first header `name` (lower-case) in `headers`, None if none."""
    for key, value in headers:
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


# --access-log-format's value for one JSON object a line instead of a format.
ACCESS_JSON = "json"


def format_access_line(
    fmt: str,
    *,
    remote: str,
    method: str,
    target: str,
    version: str,
    status: int,
    sent: int,
    started: float,
    duration: float,
    request_headers: Iterable = (),
    response_headers: Iterable = (),
    environ: dict | None = None,
) -> str:
    """Format one access-log line. `started` is a time.time() value, `duration` in seconds.
    With `fmt` "json", a JSON object (see the --access-log-format setting)."""
    path, _, query = target.partition("?")
    if fmt == ACCESS_JSON:
        return json.dumps({
            "time": rfc3339(started),
            "remote_addr": remote or None,
            "method": method,
            "path": path,
            "query": query,
            "protocol": f"HTTP/{version}",
            "status": status,
            "bytes": sent,
            "duration_us": int(duration * 1_000_000),
            "referer": _header(request_headers, "referer"),
            "user_agent": _header(request_headers, "user-agent"),
            "request_id": _header(request_headers, "x-request-id")
            or _header(response_headers, "x-request-id"),
        }, ensure_ascii=False)
    values = {
        "h": remote or "-",
        "l": "-",
        "u": "-",
        "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(started)),
        "r": f"{method} {target} HTTP/{version}",
        "m": method,
        "U": path,
        "q": query,
        "H": f"HTTP/{version}",
        "s": status,
        "b": str(sent) if sent else "-",
        "B": sent,
        "T": int(duration),
        "M": int(duration * 1000),
        "D": int(duration * 1_000_000),
        "L": f"{duration:.6f}",
        "p": f"<{os.getpid()}>",
    }
    atoms = _Atoms(values, request_headers, response_headers, environ)
    atoms["f"] = atoms["{referer}i"]
    atoms["a"] = atoms["{user-agent}i"]
    return fmt % atoms


def check_access_log_format(fmt: str) -> None:
    """Raise ValueError if `fmt` cannot format an access-log line."""
    try:
        format_access_line(
            fmt, remote="127.0.0.1", method="GET", target="/", version="1.1", status=200,
            sent=0, started=0.0, duration=0.0,
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"bad access log format {fmt!r}: {exc}") from None
