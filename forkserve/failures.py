"""What a worker's failure means: log it once, wait before the next start, or give up.

A worker that cannot load the app, or that dies right after booting without taking a
connection, counts as a failure in a row; the next start waits longer after each
(`backoff_delay`) so that a crash loop costs little, and with no worker left serving the
master gives up. Before the server was ever ready, the first boot failure stops it: the
error is the user's. A worker killed by a request (it took traffic, or lived long enough)
is replaced at once, unless boots or forks are failing meanwhile. A fork that fails (a
process or descriptor limit) is retried with the same growing delays, for as long as it
takes: the workers still serving go on.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import NamedTuple

from forkserve.errors import EXIT_BOOT, EXIT_CONFIG
from forkserve.logs import error_log
from forkserve.memory import oom_kills
from forkserve.workerset import WorkerProcess, WorkerSet, describe_wait

# A worker that lived this long after booting was not crash-looping.
STABLE_SECONDS = 5.0
# Respawn delays after consecutive failures: 0, then 0.5 s doubling up to 30 s.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# With no worker left serving, stop after this many boot failures in a row.
MAX_BOOT_FAILURES = 5


class GiveUp(NamedTuple):
    """Stop the server quickly, exiting with `status`."""

    status: int
    reason: str


class Failures:
    """Failures in a row, and when the next worker may start (`not_before`)."""

    def __init__(self, workers: WorkerSet) -> None:
        self.workers = workers
        self.in_a_row = 0  # boot failures, and deaths before taking a connection
        self.fork_failures = 0  # failed fork() calls in a row
        self.not_before = 0.0  # no worker starts before this (monotonic)
        self.errors_seen: set[str] = set()
        self.oom_kills = oom_kills()  # the cgroup's count: to name the OOM killer's kills

    def may_start(self, now: float) -> bool:
        """May missing workers start now? (Then the wait is over.)"""
        if now < self.not_before:
            return False
        self.not_before = 0.0
        return True

    def forgive(self) -> None:
        """A reload: earlier failures are the old code's, the new code starts at once."""
        self.in_a_row = 0
        self.not_before = 0.0

    def fork_failed(self, number: int, exc: OSError) -> None:
        self.fork_failures += 1
        delay = backoff_delay(self.fork_failures + 1)  # the first retry waits too
        if self.fork_failures == 1:  # once per episode: a process limit can last
            error_log.error("cannot fork worker %d: %s; retrying in %.1f s, then less often",
                            number, exc.strerror, delay)
        self.not_before = time.monotonic() + delay

    def forked(self) -> None:
        if self.fork_failures:
            error_log.info("fork works again, after %d failed attempts", self.fork_failures)
            self.fork_failures = 0

    def boot_failed(self, worker: WorkerProcess, status: int, text: str, *, ready: bool,
                    stopping: bool, await_change: bool) -> GiveUp | None:
        """`worker` could not load the app (`text` says why; `status` is 2 for a
        configuration error, else 3).

        Before the server was `ready` this gives up. Later (a reload with broken code, a
        replacement) the error is logged once and the boot retried with backoff while the
        other workers serve, until none is left serving; with `await_change` (--reload) it
        is not retried but awaits the next change.
        """
        expected = worker.retiring
        worker.retiring = True
        if stopping or expected:
            return None
        worker.leaving = "crash"  # (for the statistics: a replacement starts, or tries)
        first_time = text not in self.errors_seen
        self.errors_seen.add(text)
        if status == EXIT_CONFIG:
            message = text
        else:
            message = f"worker {worker.number} (pid {worker.pid}) failed to boot:\n{text}"
        if not ready:
            error_log.error("%s", message)
            return GiveUp(status, "boot failure")
        self.in_a_row += 1
        if not self.workers.serving() and self.in_a_row >= MAX_BOOT_FAILURES:
            error_log.error("%s\nworkers keep failing to boot and none is serving: stopping",
                            message)
            return GiveUp(status, "boot failures")
        if first_time:
            error_log.error("%s", message)
        else:
            error_log.error("worker %d (pid %d) failed to boot again (same error)",
                            worker.number, worker.pid)
        if await_change:
            self._await_change()
        else:
            self._back_off()
        return None

    def exited(self, worker: WorkerProcess, wait_status: int, *, ready: bool, stopping: bool,
               await_change: bool) -> GiveUp | None:
        """Log how `worker` exited and count it when it was a failure."""
        how = describe_wait(wait_status)
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGKILL \
                and not worker.killed:
            seen, self.oom_kills = self.oom_kills, oom_kills()
            if seen is not None and self.oom_kills is not None and self.oom_kills > seen:
                how += (f" by the kernel's OOM killer (the cgroup's oom_kill count went "
                        f"from {seen} to {self.oom_kills})")
            else:
                how += " (not by forkserve: out of memory?)"
        if worker.killed:
            how += f" ({worker.kill_reason})"
        if worker.retiring or stopping:
            error_log.info("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return None
        if worker.stop_signal:
            error_log.info("worker %d (pid %d) %s on %s sent to it, not by the master; "
                           "starting a replacement", worker.number, worker.pid, how,
                           signal.Signals(worker.stop_signal).name)
            return None
        if not worker.booted:
            return self.boot_failed(worker, EXIT_BOOT,
                                    f"the worker {how} before loading the app", ready=ready,
                                    stopping=stopping, await_change=await_change)
        current = self.workers.scoreboard.current_request(worker.number)
        if current is not None:
            how += f" while serving {current[0]!r} ({current[1]:.1f} s in)"
        stable = time.monotonic() - worker.booted_at >= STABLE_SECONDS
        if stable:
            self.in_a_row = 0  # its boot worked: earlier failures are over
        if stable or self.workers.scoreboard.took_traffic(worker.number):
            # A request killed it (a crash in a C extension, os._exit, the OOM killer), not
            # its boot: replace it at once, or a few deadly requests would leave no worker.
            error_log.error("worker %d (pid %d) %s; replacing it", worker.number, worker.pid,
                            how)
            if not (self.in_a_row or self.fork_failures):
                self.not_before = 0.0  # unless boots or forks are failing: then wait
            return None
        error_log.error("worker %d (pid %d) %s right after booting, before taking a "
                        "connection", worker.number, worker.pid, how)
        self.in_a_row += 1
        self._back_off()
        return None

    def _await_change(self) -> None:
        """--reload, after a boot failure: no worker starts until the next change (a reload
        lifts this); those a reload was replacing serve on, the others it started stop."""
        replaced = [w for w in self.workers if w.stop_when_replaced]
        for worker in self.workers.active() if replaced else ():
            self.workers.retire(worker, "the new code failed to boot")
        for worker in replaced:
            worker.retiring = worker.stop_when_replaced = False
            if worker.leaving == "reload":
                worker.leaving = ""
        self.not_before = math.inf
        error_log.info("reload: %s until the next change", "the old workers serve on"
                       if replaced else "no worker starts")

    def _back_off(self) -> None:
        delay = backoff_delay(self.in_a_row)
        if delay:
            error_log.warning("%d failures in a row: next worker starts in %.1f s",
                              self.in_a_row, delay)
        self.not_before = time.monotonic() + delay


def backoff_delay(failures: int) -> float:
    """How long to wait before the next start after `failures` in a row: none after one,
    then BACKOFF_FIRST doubling up to BACKOFF_MAX."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2)) if failures > 1 else 0.0
