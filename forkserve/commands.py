"""What the control socket's commands do to the master, and what it reports of itself.

forkserve.control carries the requests (newline-delimited JSON on a unix socket);
`Commands.answer` acts on one. Commands that do what a signal does queue that signal, so
the master's loop acts on them as on the signal itself, in this turn; `status`, `stats`,
`dump` and `scale` are answered here. `status` and the Prometheus text come from here too.
"""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

from forkserve import __version__, logs
from forkserve.control import ControlError
from forkserve.logs import error_log
from forkserve.metrics import exposition, summary
from forkserve.workers.base import DUMP_SIGNAL
from forkserve.workerset import kill

if TYPE_CHECKING:
    from forkserve.master import Master

# Control-socket commands that do what a signal does (the others: status, dump, scale, stop).
SIGNALS = {"reload": signal.SIGHUP, "incr": signal.SIGTTIN, "decr": signal.SIGTTOU,
           "reopen-logs": signal.SIGUSR1}
COMMANDS = ("status", "stats", "stop", "reload", "scale", "incr", "decr", "reopen-logs", "dump")
MAX_WORKERS = 1000  # what `scale` accepts


class Commands:
    """The control socket's commands, acting on `master`."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request (an object with a "command"); raise ControlError for one that
        cannot be done."""
        master = self.master
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "stats":
            return summary(master.workers.totals())
        if command == "dump":
            workers = master.workers.active()
            error_log.info("control: dump: the tracebacks of %d workers follow", len(workers))
            logs.flush()
            for worker in workers:
                kill(worker.pid, DUMP_SIGNAL)
            return {"workers": [worker.pid for worker in workers]}
        if (master.stop_deadline is not None or master.drain_until is not None) \
                and command != "stop":  # (as the signals those commands stand for)
            raise ControlError("the server is stopping")
        if command == "scale":
            size = request.get("workers")
            if type(size) is not int or not 1 <= size <= MAX_WORKERS:
                raise ControlError(f'scale: expected "workers": a whole number from 1 to '
                                   f"{MAX_WORKERS}")
            master.resize(size, "control: scale")
            return {"workers": master.size}
        if command == "stop":
            mode = request.get("mode", "graceful")
            if mode not in ("graceful", "quick"):
                raise ControlError('stop: "mode" is graceful or quick')
            master.signals.push(signal.SIGTERM if mode == "graceful" else signal.SIGQUIT)
            return {"stopping": mode}
        signum = SIGNALS.get(command)
        if signum is None:
            raise ControlError(f"unknown command {command!r} (expected one of "
                               f"{', '.join(COMMANDS)})")
        master.signals.push(signum)
        return {"signal": signal.Signals(signum).name}

    def status(self) -> dict[str, Any]:
        """The master's state and settings, and a row per worker."""
        master = self.master
        now = time.monotonic()
        cfg = master.cfg
        return {
            "master": {
                "pid": master.pid, "version": __version__,
                "uptime": round(now - master.started, 3),
                "state": "stopping" if master.stop_deadline is not None else
                         "draining" if master.drain_until is not None else
                         "reloading" if master.reporter.reloading else "serving",
                "app": cfg.app, "binds": [listener.url for listener in master.listeners],
                "workers": master.size, "threads": cfg.threads, "http": cfg.http,
                "loop": cfg.loop, "timeout": cfg.timeout, "config": cfg.config,
                "served_by_gone_workers": master.workers.served_by_gone,
            },
            "workers": master.workers.rows(now),
        }

    def metrics_text(self) -> str:
        """The Prometheus exposition of the server (--metrics-bind)."""
        workers = self.master.workers
        return exposition(workers.totals(), workers.in_flight(), workers.rows(time.monotonic()),
                          self.master.restarts)
