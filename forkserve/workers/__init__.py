"""Worker processes: boot (load the app, check the worker kind against its interface), then
serve.

The worker is imported here, in the master, so that a worker forked after the master
dropped its privileges needs to read nothing more than the app (wsproto, which a worker
imports for its first WebSocket, is imported by such a master: see workers/websocket_upgrade.py).

`run_worker` is what a forked child runs: `AsyncioWorker` (workers/aio.py), an event loop
whose connections (workers/protocol.py) hand requests to the app's interface: `-k sync`
for WSGI apps (forkserve.wsgi), `-k asgi` for ASGI apps (forkserve.asgi).
"""

from __future__ import annotations

import faulthandler
import signal
import ssl
import sys
import traceback
from collections.abc import Callable
from typing import Any

from forkserve import logs
from forkserve.app import detect_interface, load_app
from forkserve.config import Config
from forkserve.errors import EXIT_BOOT, EXIT_CONFIG, EXIT_OK, ConfigError, StopNow
from forkserve.handoff import HandoffChannel
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import Listener
from forkserve.workers.aio import AsyncioWorker
from forkserve.workers.base import (
    DUMP_SIGNAL,
    Worker,
    report_boot_failure,
    tell_master_stopping,
)


def run_worker(cfg: Config, listeners: list[Listener], channel_fd: int, number: int,
               master_pid: int, scoreboard: Scoreboard, handoff: HandoffChannel,
               app: Callable[..., Any] | None, tls: ssl.SSLContext | None,
               hook: Callable[[str, Worker], None]) -> int:
    """Boot and run one worker in a freshly forked child; return its exit status.

    `app` is the preloaded app, or None to load it here; `tls` the SSL context to serve
    HTTPS with, or None. A failure to load it is reported to
    the master as BOOT_FAILED (status 2 for an app that does not exist, 3 for one that
    raised). `hook(name, worker)` runs the post_fork hook once the app is loaded and the
    worker_exit hook after it stopped serving.
    """
    _boot_signals(channel_fd)
    try:
        if app is None:
            app = load_app(cfg.app, cfg.chdir)
        interface = detect_interface(app, cfg.interface)
        worker_kind(cfg.worker_class, interface)
    except StopNow:
        return EXIT_OK  # told to stop while loading: not a boot failure
    except ConfigError as exc:
        return report_boot_failure(channel_fd, EXIT_CONFIG, str(exc))
    except BaseException:  # the app's own import or factory raised (even SystemExit)
        return report_boot_failure(channel_fd, EXIT_BOOT, traceback.format_exc().rstrip())
    worker = AsyncioWorker(cfg, listeners, channel_fd, number, master_pid, scoreboard, handoff,
                           app, interface, tls)
    hook("post_fork", worker)
    status = worker.run()
    hook("worker_exit", worker)
    return status


def worker_kind(worker_class: str, interface: str) -> str:
    """The worker kind for an app of `interface` ('wsgi', 'asgi3', 'asgi2')."""
    wanted = "sync" if interface == "wsgi" else "asgi"
    if worker_class not in ("auto", wanted):
        described = {"wsgi": "a WSGI", "asgi3": "an ASGI 3", "asgi2": "an ASGI 2"}[interface]
        raise ConfigError(f"-k {worker_class} cannot serve {described} app "
                          f"(use -k {wanted} or --interface)")
    return wanted


def _boot_signals(channel_fd: int) -> None:
    """While the app loads: TERM, INT and QUIT end the child (status 0, the master told);
    USR2 dumps its tracebacks (the master sends it to a worker stuck past --boot-timeout);
    the signals the master forwards to running workers (USR1) or never sends them are
    ignored."""

    def exit_now(signum: int, frame: Any) -> None:
        tell_master_stopping(channel_fd, signum)
        raise StopNow

    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, exit_now)
    for signum in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                   signal.SIGWINCH):
        signal.signal(signum, signal.SIG_IGN)
    faulthandler.register(DUMP_SIGNAL, file=logs.error_stream() or sys.stderr,
                          all_threads=True, chain=False)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the master blocked them around fork
