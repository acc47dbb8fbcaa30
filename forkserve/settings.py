"""The one table of settings.

Every setting is declared here once: its name, command-line flags, default, how a string
becomes a value (and which strings are refused), and its help text. The argument parser in
`config.py` is generated from this table, so a setting cannot exist in one place and be
missing from another.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from forkserve.errors import ConfigError
from forkserve.proxy import DEFAULT_TRUSTED, TrustedProxies
from forkserve.tls import CLIENT_CERT_MODES, MIN_VERSIONS

DEFAULT_APP = "forkserve.demo:app"
DEFAULT_BIND = "127.0.0.1:8000"

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# gunicorn's "combined" style, with the same atoms (see logs.py for the full list).
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def _count_or_auto(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return _int_at_least(1)(text)
    except ValueError as exc:
        raise ValueError(f"expected 'auto' or a whole number >= 1 ({exc})") from None


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _directory(text: str) -> str:
    if not os.path.isdir(text):
        raise ValueError(f"no such directory: {text!r}")
    return os.path.abspath(text)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _http_parser(text: str) -> str:
    parser = _choice("auto", "h11", "httptools")(text)
    if parser == "httptools":
        try:
            import httptools  # noqa: F401
        except ImportError:
            raise ValueError("httptools is not installed (pip install 'forkserve[fast]')") from None
    return parser


def _umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(f"expected an octal mask like 022, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"expected an octal mask from 000 to 777, got {text!r}")
    return value


def _header_value(text: str) -> str:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"not latin-1: {text!r}") from None
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
        raise ValueError(f"control character in {text!r}")
    return text


def _trusted_proxies(text: str) -> str:
    try:
        TrustedProxies(text)
    except ConfigError as exc:
        raise ValueError(str(exc).split(": ", 1)[1]) from None
    return text


def _access_log_format(text: str) -> str:
    from forkserve.logs import check_access_log_format

    check_access_log_format(text)
    return text


# --reload's defaults: what changes reload, and what is never looked into.
RELOAD_INCLUDE = ("*.py",)
RELOAD_EXCLUDE = (".*", "*~", "__pycache__", "node_modules", "venv")
LOG_CONFIG_SUFFIXES = (".json", ".toml", ".ini", ".conf", ".cfg")


def _pattern(text: str) -> str:
    if not text or "/" in text:
        raise ValueError(f"expected a file name pattern such as '*.py' (no '/'), got {text!r}")
    return text


def _log_config_file(text: str) -> str:
    if not text.endswith(LOG_CONFIG_SUFFIXES):
        raise ValueError(f"expected a file ending in {', '.join(LOG_CONFIG_SUFFIXES)}, "
                         f"got {text!r}")
    if not os.path.isfile(text):
        raise ValueError(f"no such file: {text!r}")
    return os.path.abspath(text)


def _control_socket(text: str) -> str:
    if text == "auto":
        return text
    if not text or "\0" in text:
        raise ValueError(f"expected a path or 'auto', got {text!r}")
    if ":" in text and "/" not in text:  # `--control-socket myapp:app` took the app
        raise ValueError(f"{text!r} looks like the app, not a path: put the app first, or "
                         "write --control-socket=PATH")
    return os.path.abspath(text)


def _tcp_address(text: str) -> str:
    from forkserve.sockets import parse_bind

    try:
        address = parse_bind(text)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if address.kind != "tcp":
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return text


def _health_path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in "?# ") or not text.isascii() \
            or not text.isprintable():
        raise ValueError(f"expected a path such as /healthz (no query, no spaces), got {text!r}")
    return text


def _text(text: str) -> str:
    return text


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Setting:
    """One setting: how it is spelled, what it defaults to and how a string is checked.

    `parse` turns one command-line string into a value or raises ValueError whose message
    says what was expected. `repeat` settings collect every occurrence into a list; `flag`
    settings take no argument on the command line (their presence means true).
    """

    name: str
    flags: tuple[str, ...]
    default: Any
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    repeat: bool = False
    flag: bool = False
    section: str = "server"
    # A typed value from a config file back to the text `parse` takes (umask: 0o22 → "22").
    to_text: Callable[[Any], str] = str
    # Is an empty environment variable a value? Otherwise it counts as unset.
    empty_is_value: bool = False
    # The value of the option given without its argument (None: the argument is required).
    const: str | None = None

    @property
    def env(self) -> str:
        """The environment variable that sets it (a list: comma-separated)."""
        return "FORKSERVE_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "bind", ("-b", "--bind"), [DEFAULT_BIND], _text,
        "Address to listen on: HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N. "
        "Repeat to listen on several.",
        metavar="ADDRESS", repeat=True,
    ),
    Setting(
        "backlog", ("--backlog",), 2048, _int_at_least(1),
        "Maximum number of pending connections queued by the kernel.", metavar="N",
    ),
    Setting(
        "workers", ("-w", "--workers"), "auto", _count_or_auto,
        "Number of worker processes, or 'auto' for one per CPU this process may use "
        "(CPU affinity, capped by the cgroup CPU quota).", metavar="N|auto",
    ),
    Setting(
        "threads", ("--threads",), 1, _count_or_auto,
        "WSGI: requests served at once by each worker. With 1 the app is called in the "
        "worker's event loop once the request body is in (a large body, or one sent after "
        "100 Continue, is read by the app from a thread while the loop calls it for no one "
        "else); with more, in a pool of that many threads. 'auto', for apps that wait on "
        "databases or other services: called in the loop while its calls return within "
        "1 ms; once some take longer (3 in a second, and 1% of its calls), in a pool that "
        "grows as requests wait, up to 64 threads, until 10 s pass without that (the idle "
        "threads then end). "
        "With more than 1 or 'auto', wsgi.multithread is true.", metavar="N|auto",
    ),
    Setting(
        "worker_connections", ("--worker-connections",), 1000, _int_at_least(1),
        "Most connections one worker holds at once. At the limit, the connection idle longest "
        "(no request begun) is closed to take a new one; with none idle, the worker stops "
        "accepting and leaves new connections to the others.", metavar="N",
    ),
    Setting(
        "timeout", ("-t", "--timeout"), 30.0, _seconds,
        "A worker silent for this many seconds writes every thread's traceback to the error "
        "log, is killed and replaced. 0 disables.",
        metavar="SECONDS",
    ),
    Setting(
        "graceful_timeout", ("--graceful-timeout",), 30.0, _seconds,
        "On a graceful stop, workers still busy after this many seconds are killed.",
        metavar="SECONDS",
    ),
    Setting(
        "drain_delay", ("--drain-delay",), 0.0, _seconds,
        "On TERM, first keep accepting and serving for this many seconds while "
        "--health-path answers 503 and every response says Connection: close, so that a "
        "load balancer takes the server out of rotation before its sockets close; then stop "
        "gracefully. A second TERM, or INT/QUIT, ends the delay at once.",
        metavar="SECONDS",
    ),
    Setting(
        "keep_alive", ("--keep-alive",), 75.0, _seconds,
        "Seconds an idle keep-alive connection is kept open. The default outlasts the "
        "60 s idle timeout of common load balancers. 0 disables keep-alive.",
        metavar="SECONDS",
    ),
    Setting(
        "header_timeout", ("--header-timeout",), 10.0, _seconds,
        "Seconds a new connection has to send its first byte, and a client to send a whole "
        "request head once it started one; slower (slowloris) connections are closed. 0 "
        "leaves only --keep-alive.",
        metavar="SECONDS",
    ),
    Setting(
        "boot_timeout", ("--boot-timeout",), 120.0, _seconds,
        "A worker that has not loaded the app after this many seconds is killed (kept apart "
        "from --timeout so that a slow import is not mistaken for a hang). 0 disables.",
        metavar="SECONDS",
    ),
    Setting(
        "max_requests", ("--max-requests",), 0, _int_at_least(0),
        "Recycle a worker after it served this many requests (its replacement starts "
        "first). 0 disables.", metavar="N",
    ),
    Setting(
        "max_requests_jitter", ("--max-requests-jitter",), 0, _int_at_least(0),
        "Add a random 0..J to each worker's --max-requests so workers do not all recycle at "
        "once.", metavar="J",
    ),
    Setting(
        "max_worker_memory", ("--max-worker-memory",), 0, _int_at_least(0),
        "Recycle a worker whose resident memory exceeds this many MiB, checked between "
        "requests. 0 disables.", metavar="MB",
    ),
    Setting(
        "pidfile", ("-p", "--pid"), None, _text,
        "Write the master's pid to this file once the sockets are bound; it is removed at "
        "exit, and renamed FILE.oldbin during a USR2 upgrade.", metavar="FILE",
    ),
    Setting(
        "limit_request_line", ("--limit-request-line",), 8190, _int_at_least(64),
        "Maximum size in bytes of the request line; longer gets 414.", metavar="BYTES",
    ),
    Setting(
        "limit_request_fields", ("--limit-request-fields",), 100, _int_at_least(1),
        "Maximum number of request header fields; more gets 431.", metavar="N",
    ),
    Setting(
        "limit_request_field_size",
        ("--limit-request-field-size", "--limit-request-field_size"), 8190, _int_at_least(64),
        "Maximum size in bytes of one request header field; larger gets 431.",
        metavar="BYTES",
    ),
    Setting(
        "preload", ("--preload",), False, _flag,
        "Load the app in the master before forking, and gc.freeze() it, so workers share "
        "its memory copy-on-write. HUP then cannot reload the app's code; USR2 can.",
        flag=True, section="app",
    ),
    Setting(
        "worker_class", ("-k", "--worker-class"), "auto", _choice("auto", "sync", "asgi"),
        "Worker kind: 'sync' (WSGI: the app called inline or in --threads), 'asgi' (ASGI: "
        "a task per request), or 'auto' to follow the app's interface. Both run on one "
        "event loop per worker (--loop).",
        metavar="KIND", section="app",
    ),
    Setting(
        "interface", ("--interface",), "auto", _choice("auto", "wsgi", "asgi", "asgi2"),
        "The app's interface, when auto-detection guesses wrong: wsgi, asgi (ASGI 3) or "
        "asgi2 (a class instantiated with the scope).", metavar="NAME", section="app",
    ),
    Setting(
        "loop", ("--loop",), "auto", _choice("auto", "asyncio", "uvloop"),
        "Event loop of the workers: uvloop (installed with forkserve where it has wheels), "
        "asyncio, or auto (uvloop if installed).", metavar="LOOP", section="app",
    ),
    Setting(
        "http", ("--http",), "auto", _http_parser,
        "HTTP/1.1 parser: h11 (the reference), httptools (llhttp, about twice as fast; "
        "installed with forkserve where it has wheels), or auto (httptools if it imports, "
        "else h11). Both refuse and answer exactly the same requests.",
        metavar="PARSER", section="app",
    ),
    Setting(
        "lifespan", ("--lifespan",), "auto", _choice("auto", "on", "off"),
        "ASGI lifespan protocol: 'on' requires it (a failed startup fails the worker's "
        "boot), 'auto' uses it when the app supports it, 'off' never sends it.",
        metavar="MODE", section="app",
    ),
    Setting(
        "root_path", ("--root-path",), "", _text,
        "The path the app is mounted at behind a proxy (e.g. /api), whether the proxy strips "
        "it from request paths or not: SCRIPT_NAME for WSGI (PATH_INFO is the rest); "
        "root_path for ASGI, whose path then includes it (/api/state for a request to "
        "/api/state or to /state).", metavar="PATH", section="app",
    ),
    Setting(
        "ws_max_size", ("--ws-max-size",), 16 * 1024 * 1024, _int_at_least(1),
        "Largest WebSocket message accepted, in bytes; a larger one closes the connection "
        "with 1009.", metavar="BYTES", section="websocket",
    ),
    Setting(
        "ws_ping_interval", ("--ws-ping-interval",), 20.0, _seconds,
        "Seconds between pings on an idle WebSocket (keeps proxies from dropping it). "
        "0 disables.", metavar="SECONDS", section="websocket",
    ),
    Setting(
        "ws_ping_timeout", ("--ws-ping-timeout",), 20.0, _seconds,
        "A WebSocket whose peer does not answer a ping within this many seconds is closed "
        "(1011).", metavar="SECONDS", section="websocket",
    ),
    Setting(
        "forwarded_allow_ips", ("--forwarded-allow-ips",), DEFAULT_TRUSTED,
        _trusted_proxies,
        "Proxies whose Forwarded / X-Forwarded-For, -Proto, -Host headers are believed: "
        "comma-separated addresses and CIDR networks, 'unix' for connections over a unix "
        "socket, or '*' for everyone. From other peers these headers are ignored.",
        metavar="LIST",
    ),
    Setting(
        "certfile", ("--certfile",), None, _text,
        "Serve HTTPS: the PEM certificate chain (server certificate first). Re-read on HUP, "
        "so a renewed certificate needs no restart.", metavar="FILE", section="tls",
    ),
    Setting(
        "keyfile", ("--keyfile",), None, _text,
        "The certificate's PEM private key, when it is not in --certfile.", metavar="FILE",
        section="tls",
    ),
    Setting(
        "ca_certs", ("--ca-certs",), None, _text,
        "PEM file of the CA certificates that client certificates must chain to.",
        metavar="FILE", section="tls",
    ),
    Setting(
        "client_cert", ("--client-cert",), "none", _choice(*CLIENT_CERT_MODES),
        "Client certificates: 'none' (not asked for), 'optional' (checked against "
        "--ca-certs when sent) or 'required' (the handshake fails without a valid one).",
        metavar="MODE", section="tls",
    ),
    Setting(
        "ciphers", ("--ciphers",), None, _text,
        "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults); default: "
        "Python's secure defaults.", metavar="LIST", section="tls",
    ),
    Setting(
        "tls_min_version", ("--tls-min-version",), "1.2", _choice(*MIN_VERSIONS),
        "Oldest TLS version accepted: 1.2 or 1.3.", metavar="VERSION", section="tls",
    ),
    Setting(
        "user", ("-u", "--user"), None, _text,
        "Switch the master (and so the workers) to this user, by name or uid, once the "
        "sockets are bound. Running as root without it is refused (see --allow-root).",
        metavar="USER", section="privileges",
    ),
    Setting(
        "group", ("-g", "--group"), None, _text,
        "Switch to this group, by name or gid (default: the user's primary group).",
        metavar="GROUP", section="privileges",
    ),
    Setting(
        "umask", ("--umask",), 0o022, _umask,
        "File mode mask of the server processes, in octal; also sets the mode of unix "
        "sockets it creates.", metavar="MASK", section="privileges",
        to_text=lambda value: format(value, "o") if isinstance(value, int) else str(value),
    ),
    Setting(
        "allow_root", ("--allow-root",), False, _flag,
        "Allow serving as root (without --user). Not recommended.", flag=True,
        section="privileges",
    ),
    Setting(
        "limit_request_body", ("--limit-request-body",), 100 * 1024 * 1024, _int_at_least(0),
        "Maximum size in bytes of a request body: 413, from Content-Length before anything "
        "is read, or from the first chunk size that takes a chunked body past it. 0 means "
        "no limit.",
        metavar="BYTES",
    ),
    Setting(
        "proxy_protocol", ("--proxy-protocol",), False, _flag,
        "Every connection starts with a PROXY protocol header (HAProxy v1 or v2) from a "
        "load balancer in --forwarded-allow-ips, naming the real client (and, v2, whether it "
        "came over TLS). Connections without one, or from other peers, are closed.",
        flag=True,
    ),
    Setting(
        "server_header", ("--server-header",), "forkserve", _header_value,
        "Value of the Server response header (the app's own wins); empty to send none.",
        metavar="TEXT", empty_is_value=True,
    ),
    Setting(
        "chdir", ("--chdir",), None, _directory,
        "Change to this directory before loading the app (it is put first on sys.path).",
        metavar="DIR", section="app",
    ),
    Setting(
        "control_socket", ("--control-socket",), None, _control_socket,
        "Serve the control socket at this path, for `forkserve ctl` (status, reload, scale, "
        "stop, dump...): a unix socket of mode 0600 owned by the user that serves; only that "
        "user and root may use it. Without PATH (or 'auto'): control.sock in "
        "$RUNTIME_DIRECTORY if set (systemd's RuntimeDirectory=), else in /run/forkserve. "
        "Off by default.", metavar="PATH", section="observability", const="auto",
    ),
    Setting(
        "metrics_bind", ("--metrics-bind",), None, _tcp_address,
        "Serve Prometheus metrics from the master at http://HOST:PORT/metrics: requests by "
        "method and status class, their durations (histogram), requests in flight, "
        "connections accepted, requests refused by status, workers, worker restarts by "
        "reason, each worker's heartbeat age and memory. Off by default.",
        metavar="HOST:PORT", section="observability",
    ),
    Setting(
        "statsd_host", ("--statsd-host",), None, _tcp_address,
        "Push the same statistics once a second to a statsd (or DogStatsD) server at "
        "HOST:PORT over UDP: counters of what happened since the last push (requests, by "
        "status class and method, refused, connections accepted, worker restarts), the "
        "workers and requests in flight, the mean request duration. Off by default.",
        metavar="HOST:PORT", section="observability",
    ),
    Setting(
        "statsd_prefix", ("--statsd-prefix",), "forkserve", _text,
        "What the names pushed to --statsd-host begin with (forkserve.requests...); empty "
        "for none.", metavar="PREFIX", section="observability", empty_is_value=True,
    ),
    Setting(
        "health_path", ("--health-path",), None, _health_path,
        "A path the workers answer themselves, without calling the app, for load balancers "
        "and Kubernetes probes: 200 'ok' while the server serves, 503 once it stops (TERM, "
        "INT, QUIT; not while workers are replaced by a reload). GET and HEAD; other "
        "methods get 405. Off by default.", metavar="PATH", section="observability",
    ),
    Setting(
        "reload", ("--reload",), False, _flag,
        "For development, not production: when a source file changes (see --reload-dir, "
        "--reload-include, --reload-exclude), do what HUP does: start workers with the new "
        "code, then stop the old ones gracefully. Code that fails to load is logged once and "
        "the old workers keep serving until the next change. Uses watchfiles when installed "
        "(pip install 'forkserve[reload]'), else polls the files. Refused with --preload.",
        flag=True, section="development",
    ),
    Setting(
        "reload_dirs", ("--reload-dir",), [], _directory,
        "With --reload: a directory to watch, with its subdirectories. Repeat for several. "
        "Default: the working directory (--chdir's).", metavar="DIR", repeat=True,
        section="development",
    ),
    Setting(
        "reload_include", ("--reload-include",), list(RELOAD_INCLUDE), _pattern,
        "With --reload: a glob pattern of file names whose changes reload. Repeat for "
        f"several; giving any replaces the default ({', '.join(RELOAD_INCLUDE)}).",
        metavar="PATTERN", repeat=True, section="development",
    ),
    Setting(
        "reload_exclude", ("--reload-exclude",), list(RELOAD_EXCLUDE), _pattern,
        "With --reload: a glob pattern of file or directory names to ignore (a directory "
        "that matches is not looked into). Repeat for several; giving any replaces the "
        f"default ({', '.join(RELOAD_EXCLUDE)}).", metavar="PATTERN", repeat=True,
        section="development",
    ),
    Setting(
        "log_config", ("--log-config",), None, _log_config_file,
        "A logging configuration applied in the master and every worker, so that "
        "forkserve's loggers (forkserve.error, forkserve.access) go where the app's do: a "
        "logging.config.dictConfig as JSON (.json) or TOML (.toml), or an INI file for "
        "logging.config.fileConfig (.ini, .conf, .cfg). It replaces --error-logfile and "
        "--log-format; --log-level still sets forkserve.error's level unless the file "
        "does. Access lines are written when it configures forkserve.access (or with "
        "--access-logfile). A Python or TOML config file may give the dictionary itself as "
        "logconfig_dict.", metavar="FILE", section="logging",
    ),
    Setting(
        "log_format", ("--log-format",), "text", _choice("text", "json"),
        "Error log records as text lines, or as one JSON object a line (time, level, pid, "
        "logger, message, and the traceback if any) for log shippers.", metavar="FORMAT",
        section="logging",
    ),
    Setting(
        "log_level", ("--log-level",), "info", _log_level,
        f"Error log verbosity: {', '.join(LOG_LEVELS)}.", metavar="LEVEL", section="logging",
    ),
    Setting(
        "error_logfile", ("--error-logfile", "--log-file"), "-", _text,
        "Where the error log goes; '-' is standard error.", metavar="FILE", section="logging",
    ),
    Setting(
        "access_logfile", ("--access-logfile",), None, _text,
        "Where the access log goes; '-' is standard output. Off by default.",
        metavar="FILE", section="logging",
    ),
    Setting(
        "access_log_format", ("--access-log-format",), DEFAULT_ACCESS_LOG_FORMAT,
        _access_log_format,
        "Access log line format, with gunicorn's atoms: %(h)s remote address, %(t)s time, "
        '%(r)s request line, %(s)s status, %(b)s body bytes, %(D)s microseconds, '
        "%({header}i)s request header, %({header}o)s response header and more. 'json' "
        "writes one JSON object a line instead: time (RFC 3339), remote_addr, method, path, "
        "query, protocol, status, bytes, duration_us, referer, user_agent, request_id (the "
        "X-Request-ID header).",
        metavar="FORMAT", section="logging",
    ),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
