"""What every worker does after fork: signals, loading the app, reporting to the master.

A worker is created in the child right after `os.fork()` and `run()` returns the exit
status the child ends with. It never returns into the master's code.

Signals: TERM stops gracefully (stop accepting, finish what is in flight, exit); INT and
QUIT exit at once. Every `tick_interval` the worker sends the master a heartbeat with its
counters on its pipe; a worker whose master is gone exits.
"""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

from setproctitle import setproctitle

from forkserve import channel, logs
from forkserve.app import load_app
from forkserve.config import Config
from forkserve.errors import EXIT_BOOT, EXIT_CONFIG, EXIT_OK, ConfigError
from forkserve.logs import error_log
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import Listener


class MasterGone(Exception):
    """The master process exited: the worker must stop too."""


class Worker:
    """Base class of worker kinds; subclasses implement `serve()`."""

    def __init__(self, cfg: Config, listeners: list[Listener], channel_fd: int, number: int,
                 master_pid: int, scoreboard: Scoreboard) -> None:
        self.cfg = cfg
        self.scoreboard = scoreboard
        self.listeners = listeners
        self.channel_fd = channel_fd
        self.number = number
        self.master_pid = master_pid
        self.app: Callable[..., Any] | None = None
        self.alive = True
        self.served = 0
        self.in_flight = 0
        self._title_served = -1
        self.logs_to_reopen = False
        timeout = cfg.timeout
        self.tick_interval = min(1.0, timeout / 4) if timeout > 0 else 1.0
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)

    def run(self) -> int:
        """Load the app, report "booted", serve until told to stop; return the exit status."""
        self._install_signals()
        self.set_title()
        try:
            self.app = load_app(self.cfg.app, self.cfg.chdir)
        except ConfigError as exc:
            return self._boot_failed(EXIT_CONFIG, str(exc))
        except BaseException:  # the app's own import or factory raised (even SystemExit)
            return self._boot_failed(EXIT_BOOT, traceback.format_exc().rstrip())
        try:
            self.serve()
        except (MasterGone, BrokenPipeError):
            error_log.info("worker %d: master is gone, exiting", os.getpid())
        return EXIT_OK

    def serve(self) -> None:
        """Accept and serve until told to stop; call `report_booted()` once accepting."""
        raise NotImplementedError

    def report_booted(self) -> None:
        """Tell the master this worker has loaded the app and is accepting connections."""
        channel.send(self.channel_fd, channel.encode(channel.BOOTED))

    def tick(self) -> None:
        """Periodic duties: heartbeat with counters, title update, check the master lives."""
        if os.getppid() != self.master_pid:
            raise MasterGone
        channel.send(self.channel_fd, channel.heartbeat(self.served, self.in_flight))
        if self.logs_to_reopen:
            self.logs_to_reopen = False
            logs.reopen()
        if self.served != self._title_served:
            self.set_title()

    def set_title(self) -> None:
        self._title_served = self.served
        setproctitle(
            f"forkserve: worker {self.number} [{self.cfg.app}] {self.served} requests"
        )

    def _boot_failed(self, status: int, text: str) -> int:
        try:
            channel.send(self.channel_fd, channel.boot_failed(status, text))
        except BrokenPipeError:
            pass
        return status

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._graceful_stop)
        signal.signal(signal.SIGINT, self._quick_stop)
        signal.signal(signal.SIGQUIT, self._quick_stop)
        signal.signal(signal.SIGUSR1, self._reopen_logs)
        for name in ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR2", "SIGWINCH"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())  # the master blocked them around fork

    def _reopen_logs(self, signum: int, frame: Any) -> None:
        self.logs_to_reopen = True

    def _graceful_stop(self, signum: int, frame: Any) -> None:
        self.alive = False

    def _quick_stop(self, signum: int, frame: Any) -> None:
        raise SystemExit(EXIT_OK)
