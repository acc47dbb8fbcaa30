"""The master's table of its workers: one `WorkerProcess` each, by pid, with its pipe.

A worker's pipe is watched by the master's selector (the key's data is the worker) and read
with `WorkerSet.read`, which hands each message to the master; the table also answers what
the master, systemd, `status` and the metrics ask of the workers as a whole, and does what
is done to one worker (retire, kill), so that those rules are written once.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from forkserve import channel
from forkserve.logs import error_log
from forkserve.memory import memory_kib
from forkserve.metrics import Totals, read_report
from forkserve.scoreboard import Scoreboard

OnMessage = Callable[["WorkerProcess", int, bytes], None]


class WorkerProcess:
    """What the master knows of one worker."""

    __slots__ = ("number", "pid", "fd", "nudge_fd", "reader", "booted", "started", "booted_at",
                 "last_seen", "served", "in_flight", "connections", "retiring",
                 "stop_when_replaced", "dump_sent_at", "pipe_closed_at", "killed", "kill_reason",
                 "stop_signal", "stats", "leaving")

    def __init__(self, number: int) -> None:
        self.number = number
        self.pid = 0
        self.fd = -1
        self.nudge_fd = -1  # the write end of its nudge pipe (see forkserve.handoff)
        self.reader = channel.FrameReader()
        self.booted = False
        self.started = self.last_seen = time.monotonic()
        self.booted_at = 0.0
        self.served = 0
        self.in_flight = 0
        self.connections = 0
        self.retiring = False  # its exit is expected; it does not count as active
        self.stop_when_replaced = False  # send TERM once enough active workers booted
        self.dump_sent_at = 0.0  # when it was asked for its tracebacks (hung)
        self.pipe_closed_at = 0.0  # when EOF was read on its pipe
        self.killed = False  # SIGKILLed by the master
        self.kill_reason = ""
        self.stop_signal = 0  # the stop signal it said it received (0: none)
        self.stats = Totals()  # its last report (--metrics-bind, --control-socket)
        self.leaving = ""  # why it is being replaced: a restart reason of forkserve.metrics

    def replace(self, reason: str) -> None:
        """Have it stop once its replacement booted (see `WorkerSet.stop_replaced`)."""
        self.leaving = reason
        self.retiring = True
        self.stop_when_replaced = True


class WorkerSet:
    """The workers alive (forked, not reaped yet), and what those that exited served."""

    def __init__(self, selector: selectors.BaseSelector, scoreboard: Scoreboard) -> None:
        self.by_pid: dict[int, WorkerProcess] = {}
        self.selector = selector
        self.scoreboard = scoreboard
        self.served_by_gone = 0  # requests served by workers that exited
        self.gone_stats = Totals()  # what the workers that exited reported last

    def __iter__(self) -> Iterator[WorkerProcess]:
        return iter(list(self.by_pid.values()))

    def __len__(self) -> int:
        return len(self.by_pid)

    def add(self, worker: WorkerProcess, pid: int, read_fd: int, nudge_fd: int) -> None:
        """A worker just forked as `pid`, talking on `read_fd`."""
        worker.pid = pid
        worker.fd = read_fd
        worker.nudge_fd = nudge_fd
        worker.started = worker.last_seen = time.monotonic()
        self.by_pid[pid] = worker
        self.selector.register(read_fd, selectors.EVENT_READ, worker)

    def reaped(self, pid: int, on_message: OnMessage) -> WorkerProcess | None:
        """The worker `pid` exited (None: not one of ours). What it wrote last (a boot
        failure) is read first; its counts join those of the gone."""
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return None
        while worker.fd >= 0 and self.read(worker, on_message):
            pass
        self.unwatch(worker)
        self.scoreboard.leave(worker.number)
        self.served_by_gone += worker.served
        self.gone_stats.add(worker.stats)
        return worker

    def is_alive(self, worker: WorkerProcess) -> bool:
        """Is it still in the table (not reaped: its pid is still its own)?"""
        return self.by_pid.get(worker.pid) is worker

    # -- what is asked of them all ------------------------------------------------------------

    def active(self) -> list[WorkerProcess]:
        """The workers that are to stay: neither retiring nor replaced."""
        return [w for w in self.by_pid.values() if not w.retiring]

    def booted(self) -> int:
        """How many active workers have booted."""
        return sum(1 for w in self.by_pid.values() if w.booted and not w.retiring)

    def serving(self) -> list[WorkerProcess]:
        """The booted workers the master has not killed (retiring ones serve too)."""
        return [w for w in self.by_pid.values() if w.booted and not w.killed]

    def free_numbers(self, count: int) -> list[int]:
        """The `count` lowest worker numbers not in use (a replacement takes its
        predecessor's number once that one is gone)."""
        taken = {w.number for w in self.by_pid.values()}
        free: list[int] = []
        number = 1
        while len(free) < count:
            if number not in taken:
                free.append(number)
            number += 1
        return free

    def served(self) -> int:
        return self.served_by_gone + sum(w.served for w in self.by_pid.values())

    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.by_pid.values())

    def totals(self) -> Totals:
        """The request statistics of every worker that ever ran."""
        totals = Totals()
        totals.add(self.gone_stats)
        for worker in self.by_pid.values():
            totals.add(worker.stats)
        return totals

    def heard_from(self, now: float, stale: float) -> bool:
        """Has a booted worker spoken within `stale` seconds? (True until one has booted:
        the master's own loop running is all there is to check then.)"""
        booted = self.serving()
        return not booted or any(now - w.last_seen <= stale for w in booted)

    def rows(self, now: float) -> list[dict[str, Any]]:
        """What `status` and the metrics say of each worker."""
        rows = []
        for worker in sorted(self.by_pid.values(), key=lambda w: (w.number, w.started)):
            memory = memory_kib(worker.pid) or (None, None)
            rows.append({
                "number": worker.number, "pid": worker.pid,
                "state": "stopping" if worker.retiring else
                         "serving" if worker.booted else "booting",
                "age": round(now - worker.started, 3),
                "served": worker.served, "in_flight": worker.in_flight,
                "connections": worker.connections,
                "heartbeat_age": round(now - worker.last_seen, 3),
                "rss_kib": memory[0], "pss_kib": memory[1],
            })
        return rows

    # -- what is done to them -----------------------------------------------------------------

    def read(self, worker: WorkerProcess, on_message: OnMessage) -> bool:
        """Read what `worker` wrote: its counters, statistics, the stop signal it received,
        its wish to be recycled are noted here; the other messages go to `on_message`.
        False once nothing more can be read now. A closed pipe is noted (`pipe_closed_at`);
        garbage gets the worker killed."""
        try:
            data = os.read(worker.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            # Normal when the worker is exiting; if it is not reaped soon, it is killed
            # (forkserve.hangs), since a worker without its pipe can no longer be supervised.
            self.unwatch(worker)
            worker.pipe_closed_at = time.monotonic()
            return False
        worker.last_seen = time.monotonic()
        try:
            for kind, payload in worker.reader.feed(data):
                if kind in _NOTED:
                    _note(worker, kind, payload)
                else:
                    on_message(worker, kind, payload)
        except channel.ChannelError as exc:
            self.unwatch(worker)
            self.kill(worker, f"sent garbage on its pipe ({exc})")
            return False
        return True

    def unwatch(self, worker: WorkerProcess) -> None:
        """Stop reading its pipe and close it (and its nudge pipe)."""
        if worker.nudge_fd >= 0:
            os.close(worker.nudge_fd)
            worker.nudge_fd = -1
        if worker.fd < 0:
            return
        self.selector.unregister(worker.fd)
        os.close(worker.fd)
        worker.fd = -1

    def close_in_child(self) -> None:
        """In a forked child: close the master's ends of every worker's pipes."""
        for worker in self.by_pid.values():
            for fd in (worker.fd, worker.nudge_fd):
                if fd >= 0:
                    os.close(fd)

    def signal_all(self, signum: int) -> None:
        for worker in self.by_pid.values():
            kill(worker.pid, signum)

    def retire(self, worker: WorkerProcess, reason: str) -> None:
        """Stop a worker gracefully now, without a replacement."""
        worker.retiring = True
        worker.stop_when_replaced = False
        error_log.debug("%s: stopping worker %d (pid %d)", reason, worker.number, worker.pid)
        kill(worker.pid, signal.SIGTERM)

    def stop_replaced(self, size: int) -> None:
        """TERM the workers waiting for replacements once `size` new ones have booted."""
        waiting = [w for w in self.by_pid.values() if w.stop_when_replaced]
        if not waiting or self.booted() < size:
            return
        for worker in waiting:
            self.retire(worker, "replaced")
        error_log.info("replaced %d workers (%s) by booted new ones", len(waiting),
                       ", ".join(f"pid {w.pid}" for w in waiting))

    def replacing(self) -> bool:
        """Are workers waiting for their replacements to boot?"""
        return any(w.stop_when_replaced for w in self.by_pid.values())

    def kill(self, worker: WorkerProcess, reason: str) -> None:
        """SIGKILL `worker` for `reason` (said once), unless it was reaped already."""
        if not self.is_alive(worker):
            return  # its pid may belong to another process now
        if not worker.killed:
            error_log.error("killing worker %d (pid %d): %s", worker.number, worker.pid, reason)
        worker.killed = True
        worker.kill_reason = reason
        kill(worker.pid, signal.SIGKILL)

    def kill_all(self, reason: str) -> None:
        for worker in self.by_pid.values():
            if not worker.killed:
                self.kill(worker, reason)

    def kill_and_reap_all(self) -> None:
        """SIGKILL every worker and wait for each (the master is leaving)."""
        self.signal_all(signal.SIGKILL)
        for worker in list(self.by_pid.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
            del self.by_pid[worker.pid]
            self.unwatch(worker)


_NOTED = (channel.HEARTBEAT, channel.STATS, channel.STOPPING, channel.RECYCLE)


def _note(worker: WorkerProcess, kind: int, payload: bytes) -> None:
    """Take in a message of _NOTED from `worker`; raise ChannelError for a bad one."""
    if kind == channel.HEARTBEAT:
        worker.served, worker.in_flight, worker.connections = channel.read_counters(payload)
    elif kind == channel.STATS:
        try:
            worker.stats = read_report(payload, worker.stats)
        except ValueError as exc:
            raise channel.ChannelError(f"bad STATS payload: {exc}") from None
    elif kind == channel.STOPPING and payload:
        worker.stop_signal = payload[0]
    elif kind == channel.RECYCLE and not worker.retiring:
        error_log.info("worker %d (pid %d) recycling: %s", worker.number, worker.pid,
                       payload.decode("utf-8", "replace"))
        worker.replace("memory" if payload.startswith(b"resident memory") else "max-requests")


def kill(pid: int, signum: int) -> None:
    """Send `signum` to `pid`, which may have exited already."""
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def describe_wait(wait_status: int) -> str:
    """'exited with status N' or 'killed by SIGNAME', from a wait status."""
    if os.WIFSIGNALED(wait_status):
        return f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.WEXITSTATUS(wait_status)}"
