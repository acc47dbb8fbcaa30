"""The master: forks workers, watches them over their pipes, and acts on signals.

The whole supervision story is one loop (`Master.run`):

    wait on one selector: the signal wakeup pipe and one pipe per worker
    reap exited workers          (a worker that dies before booting is a boot failure)
    act on queued signals, in order
    kill workers silent past --timeout
    stopping? wait for workers, SIGKILL at the deadline : start missing workers

Signal handlers only record: `signal.set_wakeup_fd` writes each signal number into a pipe
that the loop reads, so no signal is lost or handled re-entrantly.

Signals: TERM graceful stop; INT and QUIT quick stop; TTIN one more worker; TTOU one fewer
(never below 1); USR1 reopen log files; CHLD reap. HUP, USR2 and WINCH are logged and
otherwise ignored in this version.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import time
from collections import deque

from setproctitle import setproctitle

from forkserve import channel, logs
from forkserve.config import Config
from forkserve.errors import EXIT_BOOT, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from forkserve.logs import error_log
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import Listener
from forkserve.workers.sync import SyncWorker

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
)
# How long a quick stop (INT/QUIT) waits for workers before SIGKILL.
QUICK_STOP_SECONDS = 5.0


class WorkerProcess:
    """What the master knows of one worker."""

    __slots__ = ("number", "pid", "fd", "reader", "booted", "last_seen", "served",
                 "in_flight", "retiring", "killed")

    def __init__(self, number: int, pid: int, fd: int) -> None:
        self.number = number
        self.pid = pid
        self.fd = fd
        self.reader = channel.FrameReader()
        self.booted = False
        self.last_seen = time.monotonic()
        self.served = 0
        self.in_flight = 0
        self.retiring = False  # told to stop: its exit is expected
        self.killed = False  # SIGKILLed by the master


class Master:
    """Supervises `cfg.workers` workers serving on `listeners` until stopped."""

    def __init__(self, cfg: Config, listeners: list[Listener]) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.pid = os.getpid()
        self.size = cfg.workers
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.signals: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self.scoreboard = Scoreboard()
        self.stop_deadline: float | None = None
        self.exit_status = EXIT_OK
        self.ready = False
        self.started = time.monotonic()

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; return the exit status for the command."""
        self._install_signals()
        for listener in self.listeners:
            error_log.info("listening at %s", listener.url)
        error_log.info("master pid %d starting %d workers of %s", self.pid, self.size,
                       self.cfg.app)
        try:
            while True:
                if self.stop_deadline is None:
                    self._spawn_missing()
                self._wait()
                self._reap()
                self._act_on_signals()
                if self.stop_deadline is None:
                    self._kill_silent()
                elif not self.workers:
                    break
                elif time.monotonic() >= self.stop_deadline:
                    self._kill_all()
        finally:
            self._cleanup()
        error_log.info("master pid %d exiting with status %d", self.pid, self.exit_status)
        return self.exit_status

    def _wait(self) -> None:
        timeout = 0.2 if self.stop_deadline is not None else 1.0
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self._read_signals(key.fd)
            else:
                self._read_channel(key.data)

    # -- signals ------------------------------------------------------------------------------

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe()
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)
        self._wakeup_fds = (read_fd, write_fd)
        self.selector.register(read_fd, selectors.EVENT_READ, None)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _record_only)

    def _read_signals(self, fd: int) -> None:
        try:
            self.signals.extend(os.read(fd, 4096))
        except BlockingIOError:
            pass

    def _act_on_signals(self) -> None:
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # reaping happens every turn of the loop
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM:
                self.stop(graceful=True, reason=name)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.stop(graceful=False, reason=name)
            elif signum == signal.SIGTTIN:
                self.size += 1
                error_log.info("%s: now %d workers", name, self.size)
            elif signum == signal.SIGTTOU:
                self._shrink(name)
            elif signum == signal.SIGUSR1:
                logs.reopen()
                self._signal_workers(signal.SIGUSR1)
                error_log.info("%s: log files reopened", name)
            else:
                error_log.warning("%s is not supported by this version; ignored", name)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            _kill(worker.pid, signum)

    # -- workers ------------------------------------------------------------------------------

    def _spawn_missing(self) -> None:
        active = [w for w in self.workers.values() if not w.retiring]
        taken = {w.number for w in active}
        number = 1
        for _ in range(self.size - len(active)):
            while number in taken:
                number += 1
            taken.add(number)
            self._spawn(number)
        self._set_title()

    def _spawn(self, number: int) -> None:
        read_fd, write_fd = os.pipe()
        self.scoreboard.join(number)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_fd)
            os.close(write_fd)
            self.scoreboard.leave(number)
            error_log.error("cannot fork worker %d: %s", number, exc.strerror)
            return
        if pid == 0:
            self._become_worker(number, read_fd, write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        worker = WorkerProcess(number, pid, read_fd)
        self.workers[pid] = worker
        self.selector.register(read_fd, selectors.EVENT_READ, worker)
        error_log.debug("started worker %d (pid %d)", number, pid)

    def _become_worker(self, number: int, read_fd: int, write_fd: int) -> None:
        """In the forked child: drop the master's state, run a worker, never return."""
        status = EXIT_FAILURE
        try:
            signal.set_wakeup_fd(-1)
            for signum in HANDLED_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            os.close(read_fd)
            for fd in self._wakeup_fds:
                os.close(fd)
            for worker in self.workers.values():
                if worker.fd >= 0:
                    os.close(worker.fd)
            self.selector.close()
            os.set_blocking(write_fd, False)
            worker = SyncWorker(self.cfg, self.listeners, write_fd, number, self.pid,
                                self.scoreboard)
            status = worker.run()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else EXIT_OK
        except BaseException:
            error_log.exception("worker %d failed", number)
        finally:
            logs.flush()
            os._exit(status)

    def _read_channel(self, worker: WorkerProcess) -> bool:
        """Read what the worker wrote; False once nothing more can be read now."""
        try:
            data = os.read(worker.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._unwatch(worker)
            return False
        worker.last_seen = time.monotonic()
        try:
            frames = worker.reader.feed(data)
            for kind, payload in frames:
                self._on_message(worker, kind, payload)
        except channel.ChannelError as exc:
            error_log.error("worker %d (pid %d) sent garbage on its pipe (%s); killing it",
                            worker.number, worker.pid, exc)
            self._unwatch(worker)
            self._kill_worker(worker)
            return False
        return True

    def _on_message(self, worker: WorkerProcess, kind: int, payload: bytes) -> None:
        if kind == channel.HEARTBEAT:
            worker.served, worker.in_flight = channel.read_counters(payload)
        elif kind == channel.BOOTED:
            worker.booted = True
            error_log.info("worker %d booted (pid %d)", worker.number, worker.pid)
            if not self.ready and sum(w.booted for w in self.workers.values()) >= self.size:
                self.ready = True
                error_log.info("ready: %d workers in %.2f s", self.size,
                               time.monotonic() - self.started)
        elif kind == channel.BOOT_FAILED:
            self._boot_failed(worker, payload[0] if payload else EXIT_BOOT,
                              payload[1:].decode("utf-8", "replace"))

    def _boot_failed(self, worker: WorkerProcess, status: int, text: str) -> None:
        """A worker could not load the app: report it once and stop the whole server."""
        worker.retiring = True
        if self.stop_deadline is not None:
            return
        if status == EXIT_CONFIG:
            error_log.error("%s", text)
        else:
            error_log.error("worker %d (pid %d) failed to boot:\n%s", worker.number, worker.pid,
                            text)
        self.exit_status = status
        self.stop(graceful=False, reason="boot failure")

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            while worker.fd >= 0 and self._read_channel(worker):
                pass  # what a dead worker wrote last (a boot failure) is still in its pipe
            self._unwatch(worker)
            self.scoreboard.leave(worker.number)
            self._report_exit(worker, wait_status)

    def _report_exit(self, worker: WorkerProcess, wait_status: int) -> None:
        if os.WIFSIGNALED(wait_status):
            signum = os.WTERMSIG(wait_status)
            how = f"killed by {signal.Signals(signum).name}"
            if signum == signal.SIGKILL and not worker.killed:
                how += " (not by forkserve: out of memory?)"
        else:
            how = f"exited with status {os.WEXITSTATUS(wait_status)}"
        expected = worker.retiring or self.stop_deadline is not None
        if not worker.booted and not expected:
            self._boot_failed(worker, EXIT_BOOT, f"it {how} before loading the app")
            return
        log = error_log.info if expected else error_log.error
        log("worker %d (pid %d) %s", worker.number, worker.pid, how)

    def _unwatch(self, worker: WorkerProcess) -> None:
        if worker.fd < 0:
            return
        self.selector.unregister(worker.fd)
        os.close(worker.fd)
        worker.fd = -1

    def _shrink(self, reason: str) -> None:
        if self.size <= 1:
            error_log.info("%s: already at 1 worker", reason)
            return
        self.size -= 1
        active = [w for w in self.workers.values() if not w.retiring]
        if len(active) > self.size:
            newest = max(active, key=lambda w: w.number)
            newest.retiring = True
            _kill(newest.pid, signal.SIGTERM)
        error_log.info("%s: now %d workers", reason, self.size)
        self._set_title()

    def _kill_silent(self) -> None:
        timeout = self.cfg.timeout
        if timeout <= 0:
            return
        now = time.monotonic()
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if worker.booted and not worker.killed and silent > timeout:
                error_log.error("worker %d (pid %d) silent for %.1f s (timeout %g s); killing it",
                                worker.number, worker.pid, silent, timeout)
                self._kill_worker(worker)

    def _kill_worker(self, worker: WorkerProcess) -> None:
        worker.killed = True
        worker.retiring = True
        _kill(worker.pid, signal.SIGKILL)

    # -- stopping -----------------------------------------------------------------------------

    def stop(self, graceful: bool, reason: str) -> None:
        """Tell every worker to stop; SIGKILL whatever is left at the deadline."""
        grace = self.cfg.graceful_timeout if graceful else min(
            QUICK_STOP_SECONDS, self.cfg.graceful_timeout)
        deadline = time.monotonic() + grace
        if self.stop_deadline is not None and deadline >= self.stop_deadline:
            return
        error_log.info("%s: %s stop of %d workers", reason, "graceful" if graceful else "quick",
                       len(self.workers))
        self.stop_deadline = deadline
        for worker in self.workers.values():
            worker.retiring = True
            _kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if not worker.killed:
                error_log.warning("worker %d (pid %d) still running at the deadline; killing it",
                                  worker.number, worker.pid)
                self._kill_worker(worker)

    def _cleanup(self) -> None:
        """Leave nothing behind: kill and reap every worker, close sockets and pipes."""
        for worker in self.workers.values():
            _kill(worker.pid, signal.SIGKILL)
        for pid in list(self.workers):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._unwatch(self.workers.pop(pid))
        for listener in self.listeners:
            listener.close()
        signal.set_wakeup_fd(-1)
        self.selector.close()

    def _set_title(self) -> None:
        setproctitle(f"forkserve: master [{self.cfg.app}] {self.size} workers")


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing to do, the wakeup fd has already recorded the signal."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
