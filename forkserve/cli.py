"""The `forkserve` command: arguments to a running master, errors to exit statuses."""

from __future__ import annotations

import os
import sys

from forkserve import ctl, logs
from forkserve.app import check_app_module
from forkserve.config import describe, parse_args
from forkserve.errors import EXIT_CONFIG, EXIT_OK, ConfigError
from forkserve.master import Master
from forkserve.sockets import parse_bind
from forkserve.tls import server_context


def main(argv: list[str] | None = None) -> int:
    """Run forkserve with `argv` (default: sys.argv[1:]); return the exit status.

    Anything wrong with what was asked for (flags, addresses, files) is one line on stderr
    and exit status 2, before any worker starts.
    """
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["ctl"]:
        return ctl.main(args[1:])
    try:
        cfg = parse_args(args)
        if cfg.chdir:
            os.chdir(cfg.chdir)
        logs.setup(cfg)
        check_app_module(cfg.app, cfg.chdir)
        if cfg.check_only:
            for spec in cfg.bind:
                parse_bind(spec)
            server_context(cfg)
            print(describe(cfg))
            return EXIT_OK
        return Master(cfg, args).run()
    except ConfigError as exc:
        print(f"forkserve: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
