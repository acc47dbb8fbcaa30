"""Forking one worker: its pipes, the fork, and the child's way out of the master's code.

Each worker gets two pipes: its channel (worker → master: boot, heartbeats, statistics; see
forkserve.channel) and its nudge pipe (master → worker; see forkserve.handoff). The child
never returns into the master's code: whatever happens, it ends with os._exit.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

from forkserve import logs, signals
from forkserve.errors import EXIT_FAILURE, EXIT_OK
from forkserve.logs import error_log
from forkserve.scoreboard import Scoreboard

# In the child: serve with (channel write fd, nudge read fd); return the exit status.
Run = Callable[[int, int], int]


def fork_worker(number: int, scoreboard: Scoreboard, leave_master: Callable[[], None],
                run: Run) -> tuple[int, int, int]:
    """Fork worker `number`. In the master, return (pid, the read end of its channel, the
    write end of its nudge pipe), both non-blocking; raise OSError if the pipes or the
    process cannot be made (out of descriptors, a process limit), with nothing left open.
    In the child, `leave_master()` closes what only the master needs, then `run` serves."""
    fds: list[int] = []
    try:
        fds.extend(os.pipe())
        fds.extend(os.pipe())
        read_fd, write_fd, nudge_r, nudge_w = fds
        # What the master holds now (forkserve, the parser, the loop, a preloaded app) is
        # out of the collector's reach: a worker's collections would write to every such
        # object and so copy the pages it shares with the master.
        gc.freeze()
        scoreboard.join(number)
        with signals.blocked():
            pid = os.fork()
            if pid == 0:
                _child(number, leave_master, run, fds)
    except OSError:
        for fd in fds:
            os.close(fd)
        scoreboard.leave(number)
        raise
    os.close(write_fd)
    os.close(nudge_r)
    os.set_blocking(read_fd, False)
    os.set_blocking(nudge_w, False)
    return pid, read_fd, nudge_w


def _child(number: int, leave_master: Callable[[], None], run: Run, fds: list[int]) -> None:
    """In the forked child: drop the master's state, run a worker, never return. `fds` are
    fork_worker's pipes: the master's ends are closed here."""
    status = EXIT_FAILURE
    try:
        read_fd, write_fd, nudge_r, nudge_w = fds
        os.close(read_fd)
        os.close(nudge_w)
        leave_master()
        os.set_blocking(write_fd, False)
        status = run(write_fd, nudge_r)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else EXIT_OK
    except BaseException:
        error_log.exception("worker %d failed", number)
    finally:
        # Never back into the master's code, whatever is raised here (a stop signal's
        # StopNow while the logs flush): the child would run the master's clean-up.
        try:
            logs.flush()
        finally:
            os._exit(status)
