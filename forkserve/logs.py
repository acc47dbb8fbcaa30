"""Error log and access log.

The error log is the stdlib logger "forkserve.error"; the access log is "forkserve.access",
written only when `--access-logfile` is given, one line per response in the format of
`--access-log-format`. The format uses gunicorn's atoms so existing formats keep working:

    h remote address      l '-'              u remote user ('-')     t [time]
    r request line        m method           U path                  q query string
    H protocol            s status           b body bytes ('-' if 0) B body bytes
    f referer             a user agent       T seconds               M milliseconds
    D microseconds        L seconds (decimal) p worker pid
    {name}i request header   {name}o response header   {name}e environ variable
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from forkserve.config import Config

ERROR_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"

error_log = logging.getLogger("forkserve.error")
access_log = logging.getLogger("forkserve.access")


def setup(cfg: Config) -> None:
    """Point the error and access loggers at their files ('-' for stderr/stdout)."""
    level, error_logfile, access_logfile = cfg.log_level, cfg.error_logfile, cfg.access_logfile
    error_log.handlers.clear()
    error_log.propagate = False
    error_log.setLevel(level.upper())
    error_log.addHandler(_handler(error_logfile, sys.stderr, ERROR_LOG_FORMAT))
    access_log.handlers.clear()
    access_log.propagate = False
    access_log.setLevel(logging.INFO)
    if access_logfile is None:
        access_log.disabled = True
    else:
        access_log.disabled = False
        access_log.addHandler(_handler(access_logfile, sys.stdout, "%(message)s"))


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


def _handler(target: str, stream, fmt: str) -> logging.Handler:
    handler: logging.Handler
    if target == "-":
        handler = _StreamHandler(stream)
        handler.set_name("stderr" if stream is sys.stderr else "stdout")
    else:
        handler = _FileHandler(target, encoding="utf-8")
        handler.set_name(target)
    handler.setFormatter(logging.Formatter(fmt, DATE_FORMAT))
    return handler


def error_stream():
    """The open stream the error log writes to (for faulthandler), or None."""
    for handler in error_log.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            return stream
    return None


def reopen() -> list[str]:
    """Reopen log files (after logrotate moved them away); streams are left as they are.

    A file that cannot be opened again (its folder gone, no permission) keeps the stream in
    use; returns what failed ("PATH: reason" each), for the caller to report."""
    failed = []
    for logger in (error_log, access_log):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                try:
                    stream = handler._open()
                except OSError as exc:
                    failed.append(f"{handler.baseFilename}: {exc.strerror}")
                    continue
                with handler.lock:
                    handler.stream.close()
                    handler.stream = stream
    return failed


def flush() -> None:
    """Flush every log handler: called before a process ends with os._exit()."""
    for logger in (error_log, access_log):
        for handler in logger.handlers:
            handler.flush()


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
                return _header(self._request_headers, name)
            if kind == "o":
                return _header(self._response_headers, name)
            if kind == "e":
                return str(self._environ.get(key[1:-2], "-"))
        return "-"


def _header(headers: Iterable, name: str) -> str:
    for key, value in headers:
        key = key.decode("latin-1") if isinstance(key, bytes) else key
        if key.lower() == name:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return "-"


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
    """Format one access-log line. `started` is a time.time() value, `duration` in seconds."""
    path, _, query = target.partition("?")
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
