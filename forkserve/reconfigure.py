"""A reload's new configuration: what HUP (or --reload) re-reads, and what it must keep.

The command line, config file and environment are read again as at start. What the master
holds open cannot change without a restart or a USR2 upgrade (KEPT_ON_RELOAD, and TLS on or
off): those keep their values, with a warning. A certificate that cannot be loaded keeps the
one in use; a logging configuration that cannot be applied, or a configuration that cannot
be read, keeps everything as it was.
"""

from __future__ import annotations

import ssl

from forkserve import logs
from forkserve.config import Config, parse_args
from forkserve.errors import ConfigError
from forkserve.logs import error_log
from forkserve.tls import server_context

# Settings a reload cannot change: the sockets and servers the master holds.
KEPT_ON_RELOAD = ("bind", "control_socket", "metrics_bind", "statsd_host", "statsd_prefix")


def reread(argv: list[str], current: Config, tls: ssl.SSLContext | None,
           reason: str) -> tuple[Config, ssl.SSLContext | None] | None:
    """The configuration `argv` gives now and its TLS context, the logging already set up
    from it; None (logged, nothing changed) if it cannot be used. `reason` begins the log
    lines."""
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        error_log.error("%s: configuration not reloaded: %s", reason, exc)
        return None
    for name in KEPT_ON_RELOAD:
        kept = getattr(current, name)
        if getattr(cfg, name) != kept:
            error_log.warning("%s: --%s changes need a restart or a USR2 upgrade; keeping %s",
                              reason, name.replace("_", "-"),
                              ", ".join(kept) if isinstance(kept, list) else kept)
            setattr(cfg, name, kept)
    try:
        new_tls = server_context(cfg)
    except ConfigError as exc:
        # E.g. a key readable by root only, after --user: the rest still reloads.
        error_log.error("%s: %s; the new workers keep the certificate in use", reason, exc)
        new_tls = tls
    if (new_tls is None) != (tls is None):
        error_log.warning("%s: turning TLS on or off needs a restart or a USR2 upgrade; "
                          "keeping it %s", reason, "off" if tls is None else "on")
        new_tls = tls
    try:
        logs.setup(cfg)
    except ConfigError as exc:
        logs.restore()  # (the files it was set up from may have changed since)
        error_log.error("%s: configuration not reloaded: %s", reason, exc)
        return None
    return cfg, new_tls
