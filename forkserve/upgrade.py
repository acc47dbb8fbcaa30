"""USR2: a new master started from the same executable and arguments, on the same sockets.

The old master forks and execs `python -m forkserve ARGS` with the listening sockets'
descriptors named in $FORKSERVE_INHERIT_FDS, so nothing is re-bound and no connection is
refused; its pid file becomes FILE.oldbin. Both masters serve until the operator stops the
old one (TERM), or its workers first (WINCH) to keep a way back. If the new master exits,
the old one takes its pid file and sockets back.

Under systemd (NOTIFY_SOCKET) the new master, once ready, TERMs the old one; the old one,
still the service's main process, then names the new one the main process (MAINPID=) and
stops without a word more to systemd.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

from forkserve import signals
from forkserve.errors import EXIT_FAILURE
from forkserve.logs import error_log
from forkserve.pidfile import Pidfile
from forkserve.sockets import INHERIT_ENV, Listener
from forkserve.systemd import Notifier
from forkserve.workerset import describe_wait, kill


class Upgrade:
    """This master's place in an upgrade: the successor it started (`pid`), and the
    predecessor it was started by (`inherited_from`)."""

    def __init__(self) -> None:
        self.pid = 0  # the new master started by USR2
        self.handed_over = False  # systemd was told the new master is the main process
        self.inherited_from = os.getppid() if INHERIT_ENV in os.environ else 0

    def start(self, argv: list[str], listeners: list[Listener], pidfile: Pidfile | None,
              queue: signals.SignalQueue) -> None:
        """Start the new master, unless one runs already. This master and its workers keep
        running."""
        if self.pid:
            error_log.warning("USR2 ignored: an upgrade (pid %d) is already running", self.pid)
            return
        if pidfile is not None:
            pidfile.rename_to_oldbin()
        fds = [listener.sock.fileno() for listener in listeners]
        env = dict(os.environ)
        env[INHERIT_ENV] = ",".join(map(str, fds))
        env.pop("WATCHDOG_PID", None)  # the new master pings for itself once it is the main pid
        args = [sys.executable, "-m", "forkserve", *argv]
        with signals.blocked():
            try:
                pid = os.fork()
            except OSError as exc:
                error_log.error("USR2: cannot start a new master: %s; this one carries on",
                                exc.strerror)
                if pidfile is not None:
                    pidfile.restore_from_oldbin()
                return
            if pid == 0:
                try:
                    queue.reset_in_child()
                    signal.pthread_sigmask(signal.SIG_SETMASK, ())
                    for fd in fds:
                        os.set_inheritable(fd, True)
                    os.execve(sys.executable, args, env)
                except BaseException:
                    traceback.print_exc()
                finally:
                    os._exit(EXIT_FAILURE)
        self.pid = pid
        for listener in listeners:
            listener.owns_path = False  # the new master serves on them now
        error_log.info("USR2: started new master pid %d; stop this one (pid %d) with TERM, or "
                       "its workers with WINCH", pid, os.getpid())

    def ended(self, wait_status: int, listeners: list[Listener],
              pidfile: Pidfile | None) -> None:
        """The new master exited: this one carries on, with its pid file and sockets."""
        error_log.warning("new master pid %d exited (%s); this master carries on", self.pid,
                          describe_wait(wait_status))
        self.pid = 0
        if pidfile is not None:
            pidfile.restore_from_oldbin()
        for listener in listeners:
            listener.owns_path = listener.address.kind == "unix"

    def hand_over(self, notify: Notifier) -> str:
        """TERM with a successor running: tell systemd (if it watches) that the successor is
        the main process now, and say nothing more. Returns the stop's reason."""
        self.handed_over = True
        notify.send(f"MAINPID={self.pid}")
        return f"new master pid {self.pid}"

    def from_predecessor(self) -> bool:
        """Was this master started by a USR2 upgrade whose old master still runs?"""
        return bool(self.inherited_from) and os.getppid() == self.inherited_from

    def stop_predecessor(self, notify: Notifier) -> None:
        """Once ready: under systemd, the old master hands the service over and stops (as
        its TERM says); elsewhere the operator stops it."""
        if notify.enabled and self.from_predecessor():
            error_log.info("USR2 upgrade under systemd: stopping the old master (pid %d)",
                           self.inherited_from)
            kill(self.inherited_from, signal.SIGTERM)


def in_terminal_foreground() -> bool:
    """Is this process in the foreground of a terminal? There WINCH (which stops the
    workers of an old master) means a window resize."""
    for fd in (0, 1, 2):
        try:
            foreground = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
        if foreground:
            return True
    return False
