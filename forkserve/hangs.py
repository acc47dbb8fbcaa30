"""Hung workers: found by their silence, asked for their tracebacks, then killed.

A booted worker sends a heartbeat at least every quarter of --timeout; one silent past
--timeout (or not booted past --boot-timeout) is sent DUMP_SIGNAL, so that faulthandler
writes every thread's traceback to the error log, and SIGKILLed DUMP_GRACE later unless it
speaks again. A worker whose pipe closed and that does not exit is killed too: without its
pipe it can no longer be supervised.
"""

from __future__ import annotations

from forkserve import logs
from forkserve.logs import error_log
from forkserve.workers.base import DUMP_SIGNAL
from forkserve.workerset import WorkerProcess, WorkerSet, kill

# How long a hung worker gets to write its tracebacks before SIGKILL.
DUMP_GRACE = 1.0
# A worker whose pipe closed and that has not exited after this long is killed.
PIPE_CLOSED_GRACE = 1.0
# A loop that wakes this much later than it asked was stopped, not busy.
LATE_SECONDS = 2.0


def check(workers: WorkerSet, now: float, timeout: float, boot_timeout: float) -> None:
    """Dump the tracebacks of workers silent past `timeout` (or not booted past
    `boot_timeout`; 0: no limit), then SIGKILL them."""
    for worker in workers:
        if worker.killed:
            continue
        if worker.pipe_closed_at:
            if now - worker.pipe_closed_at >= PIPE_CLOSED_GRACE:
                workers.kill(worker, "closed its pipe")
            continue
        if worker.dump_sent_at:
            if worker.last_seen > worker.dump_sent_at:
                worker.dump_sent_at = 0.0  # it woke up after all
            elif now - worker.dump_sent_at >= DUMP_GRACE:
                if not worker.retiring:  # (one stopping for good is not replaced)
                    worker.leaving = "hang"
                workers.kill(worker, "hung")
            continue
        silent = now - worker.last_seen
        if worker.booted:
            limit = timeout
            what = "silent"
        else:
            limit = boot_timeout
            what = "still booting"
            silent = now - worker.started
        if limit <= 0 or silent <= limit:
            continue
        doing = ""
        current = workers.scoreboard.current_request(worker.number)
        if current is not None:
            doing = f", stuck in {current[0]!r} for {current[1]:.1f} s"
        dump(worker, f"{what} for {silent:.1f} s (limit {limit:g} s){doing}", "killed")
        worker.dump_sent_at = now  # killed DUMP_GRACE later unless heard from again


def dump(worker: WorkerProcess, why: str, then: str) -> None:
    """Say why `worker` is hung and what follows (`then`), and have it write every thread's
    traceback to the error log."""
    error_log.error("worker %d (pid %d) %s; its tracebacks follow, then it is %s",
                    worker.number, worker.pid, why, then)
    logs.flush()
    kill(worker.pid, DUMP_SIGNAL)


def forgive_silence(workers: WorkerSet, late: float, now: float) -> bool:
    """If a turn of the master's loop came `late` seconds after its wait should have ended,
    and that is more than LATE_SECONDS, the master was stopped (SIGSTOP, or a frozen cgroup
    as `docker pause` does): that time is not counted as the workers' silence. True then:
    the caller reads what the workers sent meanwhile first (epoll returns nothing after
    such a stop)."""
    if late <= LATE_SECONDS:
        return False
    error_log.warning("the master's loop was stopped for %.1f s (SIGSTOP or a frozen "
                      "cgroup?); that time does not count against the workers", late)
    for worker in workers:
        worker.last_seen = min(now, worker.last_seen + late)
        worker.started = min(now, worker.started + late)
    return True
