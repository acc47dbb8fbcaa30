"""--threads auto: whether a worker calls its WSGI app in its event loop or in its thread pool.

In the loop a call costs nothing more than the call, but one that waits (on a database, a
service, a lock) holds every other connection of the worker meanwhile; in a pool thread the
loop serves on, for about 16 us of CPU more per request. `AutoThreads` watches how long calls
take and says where the next ones go.
"""

from __future__ import annotations

import resource

# Calls move to the pool once, within one tick of the worker, SLOW_CALLS of them took over
# SLOW_CALL seconds while waiting, and those are at least SLOW_SHARE of the tick's calls; they
# move back into the loop after CALM_SECONDS without such a tick.
SLOW_CALL = 0.001
SLOW_CALLS = 3
SLOW_SHARE = 0.01
CALM_SECONDS = 10.0
# Threads the pool may grow to.
AUTO_THREADS = 64

_RUSAGE_OWN = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)


def _voluntary_switches() -> int:
    """How many times this thread (or, where threads are not counted apart, this process) gave
    up the CPU to wait for something."""
    return resource.getrusage(_RUSAGE_OWN).ru_nvcsw


class AutoThreads:
    """Where the next calls into the app go: `threaded` is false (the loop) at first.

    A call in the loop counts as slow only if the loop thread gave up the CPU of its own
    accord during it: a call the kernel merely preempted (as it does when workers outnumber
    CPUs) does not. The loop reports `batch_begins` before it calls the app, once or for a
    batch of requests, and each call with `called_in_loop`; a call in a pool thread reports
    with `called` (its time includes waits for the client); `tick` once per heartbeat tick.
    Each returns True when `threaded` changed."""

    def __init__(self) -> None:
        self.threaded = False
        self.calls = self.slow_calls = 0  # in this tick
        self.last_slow = 0.0  # when (loop time) a tick last had too many slow calls
        self.waits = 0  # the loop thread's voluntary context switches when the batch began

    def batch_begins(self) -> None:
        self.waits = _voluntary_switches()

    def called_in_loop(self, seconds: float, now: float) -> bool:
        if seconds > SLOW_CALL:
            waits, self.waits = self.waits, _voluntary_switches()
            if self.waits == waits:
                seconds = 0.0  # preempted, not waiting
        return self.called(seconds, now)

    def called(self, seconds: float, now: float) -> bool:
        self.calls += 1
        if seconds <= SLOW_CALL:
            return False
        self.slow_calls += 1
        if self.threaded or not self._slow():
            return False
        self.threaded = True
        self.last_slow = now
        return True

    def tick(self, now: float) -> bool:
        changed = False
        if self._slow():
            self.last_slow = now
        elif self.threaded and now - self.last_slow > CALM_SECONDS:
            self.threaded = False
            changed = True
        self.calls = self.slow_calls = 0
        return changed

    def _slow(self) -> bool:
        return self.slow_calls >= SLOW_CALLS and self.slow_calls >= SLOW_SHARE * self.calls
