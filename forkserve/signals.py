"""The master's signals, queued: handlers only record, the master's loop acts.

`signal.set_wakeup_fd` writes each signal's number into a pipe that the master's selector
watches (`fileno`); `read` moves what arrived into `queue`, in order. So no signal is lost or
handled re-entrantly, and the loop wakes for each. Forking blocks them (`blocked`) so that a
signal cannot reach the child before it has dropped the master's handlers
(`reset_in_child`).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

HANDLED = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
)


class SignalQueue:
    """The signals the master received and has not acted on yet."""

    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self._read_fd = self._write_fd = -1

    def install(self) -> None:
        """Record every signal of HANDLED from now on."""
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, _record_only)

    def fileno(self) -> int:
        """The pipe to watch for reading: readable when a signal arrived."""
        return self._read_fd

    def read(self) -> None:
        """Queue what arrived (nothing blocks)."""
        try:
            self.queue.extend(os.read(self._read_fd, 4096))
        except BlockingIOError:
            pass

    def push(self, signum: int) -> None:
        """Queue `signum` as if it had been received (the control socket's commands)."""
        self.queue.append(signum)

    def reset_in_child(self) -> None:
        """In a forked child: default handlers and no wakeup pipe. The signals stay blocked
        (see `blocked`) until the child has handlers of its own, or unblocks them itself."""
        signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        """Stop recording (the master is exiting)."""
        signal.set_wakeup_fd(-1)


@contextmanager
def blocked() -> Iterator[None]:
    """Hold the handled signals back for the duration (around a fork); they arrive after.
    A child forked inside must not leave the block (it would restore the master's mask
    with the master's handlers): it ends with os._exit or exec."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing to do, the wakeup fd has already recorded the signal."""
