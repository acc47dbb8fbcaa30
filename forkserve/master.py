"""The master: forks workers, watches them over their pipes, and acts on signals.

The whole supervision story is one loop (`Master._serve`):

    start missing workers (not before a crash-loop backoff ends)
    wait on one selector: the signal wakeup pipe, one pipe per worker, the admin endpoints,
        the --reload watcher
    act on queued signals, in order (`_act_on_signals`: one short branch each)
    reap exited workers
    dump and kill hung workers; stop workers whose replacements have booted
    when stopping: wait for workers, SIGKILL them at the deadline

Signal handlers only record (forkserve.signals), so no signal is lost or handled
re-entrantly. The rest lives beside this module, one job each: the worker table
(forkserve.workerset), forking (forkserve.spawn), what failures mean (forkserve.failures),
hangs (forkserve.hangs), a reload's configuration (forkserve.reconfigure), USR2
(forkserve.upgrade), systemd (forkserve.systemd), the admin endpoints (forkserve.admin) and
the control socket's commands (forkserve.commands).

Replacing a worker always starts the replacement first: the old worker is marked `retiring`
with `stop_when_replaced`, the loop starts a new one, and only when enough workers have
booted is the old one sent TERM. Reload (HUP, or a changed file with --reload), recycling
(--max-requests, memory) and a failed reload all follow from that one rule.
"""

from __future__ import annotations

import os
import selectors
import signal
import ssl
import time
from collections.abc import Callable
from typing import Any

from setproctitle import setproctitle

from forkserve import channel, hangs, logs, privileges
from forkserve.admin import Admin
from forkserve.app import preload
from forkserve.commands import Commands
from forkserve.config import Config
from forkserve.endpoints import Endpoint
from forkserve.errors import EXIT_BOOT, EXIT_FAILURE, EXIT_OK
from forkserve.failures import Failures, GiveUp
from forkserve.handoff import CallPoller, HandoffChannel
from forkserve.http import connection_factory
from forkserve.logs import error_log
from forkserve.memory import check_fit
from forkserve.pidfile import Pidfile
from forkserve.reconfigure import reread
from forkserve.reloader import Watcher, describe, forget_bytecode
from forkserve.scoreboard import Scoreboard
from forkserve.signals import SignalQueue
from forkserve.sockets import Listener, listen
from forkserve.spawn import fork_worker
from forkserve.systemd import Notifier, Reporter, status_text
from forkserve.tls import server_context
from forkserve.upgrade import Upgrade, in_terminal_foreground
from forkserve.workers import run_worker
from forkserve.workers.websocket_upgrade import load as load_websocket
from forkserve.workerset import WorkerProcess, WorkerSet, kill

# How long a quick stop (INT/QUIT) waits for workers before SIGKILL.
QUICK_STOP_SECONDS = 5.0


class Master:
    """Supervises `cfg.workers` workers until stopped. `argv` is what started it (for HUP
    and USR2)."""

    def __init__(self, cfg: Config, argv: list[str]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.pid = os.getpid()
        self.size = cfg.workers
        self.saved_size = 0  # the size before WINCH, restored by HUP
        self.listeners: list[Listener] = []
        self.signals = SignalQueue()
        self.selector = selectors.DefaultSelector()
        self.scoreboard = Scoreboard()
        self.workers = WorkerSet(self.selector, self.scoreboard)
        self.failures = Failures(self.workers)
        self.handoff = HandoffChannel()  # connections a blocked worker passes to its peers
        self.call_poller = CallPoller(self.scoreboard)  # tells it when to
        self.pidfile: Pidfile | None = None
        self.app: Callable[..., Any] | None = None  # set with --preload
        self.tls: ssl.SSLContext | None = None  # inherited by the workers forked next
        self.stop_deadline: float | None = None
        self.drain_until: float | None = None  # TERM with --drain-delay: stop from then
        self.turn_due = 0.0  # when the loop's current wait was due to end at the latest
        self.exit_status = EXIT_OK
        self.ready = False
        self.started = time.monotonic()
        self.notify = Notifier()
        self.reporter = Reporter(self.notify)
        self.upgrade = Upgrade()
        self.watcher: Watcher | None = None  # --reload
        commands = Commands(self)
        self.admin = Admin(self.selector, commands.answer, commands.metrics_text)
        self.restarts: dict[str, int] = {}  # workers replaced, by reason

    # -- start and the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Bind, start workers, supervise until stopped; return the exit status.

        Raises ConfigError for what the user asked for that cannot work (before any fork).
        """
        self.signals.install()
        self.selector.register(self.signals.fileno(), selectors.EVENT_READ, None)
        try:
            self.call_hook("on_starting", self)
        except Exception:
            return EXIT_FAILURE
        cfg = self.cfg
        privileges.check_root(cfg.user, cfg.allow_root, cfg.app)
        ids = privileges.resolve(cfg.user, cfg.group)
        connection_factory(cfg.http)  # the parser, imported while the master may read it
        os.umask(cfg.umask)
        self.tls = server_context(cfg)
        self.listeners = listen(cfg.bind, cfg.backlog, self.notify.remove_fds)
        for listener in self.listeners:
            listener.secure = self.tls is not None
        self.notify.store_listeners(self.listeners)
        try:
            if cfg.pidfile:
                self.pidfile = Pidfile(cfg.pidfile)
                self.pidfile.write()
            self.admin.open(cfg, take_over=bool(self.upgrade.inherited_from))
            if ids is not None:
                self.admin.hand_to(*ids)
                load_websocket()  # (read as root; once the user, a worker might not be able to)
                privileges.drop(ids, self.listeners)
            return self._serve()
        finally:
            self._cleanup()

    def _serve(self) -> int:
        for listener in self.listeners:
            error_log.info("listening at %s", listener.url)
        if self.cfg.preload:
            self.app, self.exit_status = preload(self.cfg.app, self.cfg.chdir)
            if self.app is None:
                return self.exit_status
        if self.cfg.reload:
            self.watcher = Watcher(self.cfg.reload_dirs or [os.getcwd()],
                                   self.cfg.reload_include, self.cfg.reload_exclude)
            self.selector.register(self.watcher.fileno(), selectors.EVENT_READ, self.watcher)
        error_log.info("master pid %d starting %d workers of %s", self.pid, self.size,
                       self.cfg.app)
        while True:
            if self.stop_deadline is None:
                self._spawn_missing()
            self._wait()
            self._act_on_signals()
            self._reap()
            now = time.monotonic()
            if self.drain_until is not None and now >= self.drain_until:
                self.stop(graceful=True, reason="drain delay over")
            if self.stop_deadline is None:
                self.call_poller.poll([(worker.number, worker.nudge_fd)
                                       for worker in self.workers], now)
                if hangs.forgive_silence(self.workers, now - self.turn_due, now):
                    self._read_ready(0)
                hangs.check(self.workers, now, self.cfg.timeout, self.cfg.boot_timeout)
                if self.drain_until is None:  # (a drain ends in a stop: nothing to reload)
                    self._reload_on_change(now)
                self.workers.stop_replaced(self.size)
                if not self.upgrade.handed_over:  # (a successor speaks for the service)
                    self.reporter.tick(now, self.workers, self.size, self.cfg.timeout)
                self.admin.push(now, self.workers, self.restarts)
            elif not self.workers:
                break
            elif now >= self.stop_deadline:
                self.workers.kill_all("still running at the stop deadline")
        error_log.info("master pid %d exiting with status %d", self.pid, self.exit_status)
        return self.exit_status

    def _wait(self) -> None:
        stopping = self.stop_deadline is not None
        now = time.monotonic()
        timeout = 0.2 if stopping else 1.0
        if self.notify.watchdog_interval:
            timeout = min(timeout, self.notify.watchdog_interval)
        if self.failures.not_before:
            timeout = max(0.0, min(timeout, self.failures.not_before - now))
        if not stopping:
            timeout = self.call_poller.timeout(timeout)
        if self.drain_until is not None and not stopping:
            timeout = max(0.0, min(timeout, self.drain_until - now))
        if self.watcher is not None:
            timeout = self.watcher.timeout(timeout, now)
        timeout = self.admin.timeout(timeout, now, stopping)
        self.turn_due = time.monotonic() + timeout
        self._read_ready(timeout)
        self.admin.expire()

    def _read_ready(self, timeout: float) -> None:
        """Read the signals, worker pipes and endpoints that are ready within `timeout`
        seconds."""
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                self.signals.read()
            elif isinstance(key.data, Endpoint):
                key.data.ready(mask, time.monotonic())
            elif isinstance(key.data, Watcher):
                if key.data is self.watcher:  # (a stop earlier in this batch closed it)
                    key.data.read(time.monotonic())
            else:
                self.workers.read(key.data, self._on_message)

    # -- signals ------------------------------------------------------------------------------

    def _act_on_signals(self) -> None:
        # Signals that came after the wait are taken too: Ctrl-C and `kill -- -PGID` reach
        # the workers with the master, and a worker that exits at once must be reaped as
        # part of the stop, not as a crash.
        self.signals.read()
        queue = self.signals.queue
        while queue:
            signum = queue.popleft()
            if signum == signal.SIGCHLD:
                continue  # reaping happens every turn of the loop
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM and self.upgrade.pid and not self.upgrade.handed_over:
                self.stop(graceful=True, reason=f"{name} ({self.upgrade.hand_over(self.notify)})")
            elif signum == signal.SIGTERM and self.cfg.drain_delay \
                    and self.drain_until is None and self.stop_deadline is None:
                self._drain(name)
            elif signum == signal.SIGTERM:
                self.stop(graceful=True, reason=name)
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                self.stop(graceful=False, reason=name)
            elif self.stop_deadline is not None or self.drain_until is not None:
                error_log.info("%s ignored: stopping", name)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.resize(self.size + 1, name)
            elif signum == signal.SIGTTOU:
                self.resize(self.size - 1, name)
            elif signum == signal.SIGUSR1:
                self.workers.signal_all(signal.SIGUSR1)
                logs.reopen_and_say(name)
            elif signum == signal.SIGUSR2:
                self.upgrade.start(self.argv, self.listeners, self.pidfile, self.signals)
            elif signum == signal.SIGWINCH:
                self._stop_workers_keep_master(name)

    # -- reload, resize -----------------------------------------------------------------------

    def reload(self, reason: str = "HUP") -> None:
        """HUP: re-read the configuration and replace every worker, new ones first. `reason`
        begins the log lines."""
        new = reread(self.argv, self.cfg, self.tls, reason)
        if new is None:
            return
        self.cfg, self.tls = new
        connection_factory(self.cfg.http)  # (--http may have changed) shared by the workers
        self.size = self.cfg.workers
        self.saved_size = 0
        self.reporter.reload_started()
        self.call_hook("on_reload", self)
        old = self.workers.active()
        for worker in old:
            worker.replace("reload")
        self.failures.forgive()
        error_log.info("%s: reloading: starting %d new workers before stopping %d", reason,
                       self.size, len(old))

    def _reload_on_change(self, now: float) -> None:
        """--reload: reload once the changed files settled (see forkserve.reloader)."""
        changed = self.watcher.due(now) if self.watcher is not None else []
        if not changed:
            return
        reason = f"{describe(changed)} changed"
        if self.saved_size:
            error_log.info("%s: not reloading: the workers were stopped by WINCH (HUP starts "
                           "them)", reason)
            return
        forget_bytecode(changed)
        self.reload(reason)

    def _stop_workers_keep_master(self, name: str) -> None:
        """WINCH: stop every worker gracefully but keep the master (HUP brings them back)."""
        if in_terminal_foreground():
            error_log.info("%s ignored: running in a terminal's foreground (a window resize)",
                           name)
            return
        self.saved_size = self.saved_size or self.size
        self.size = 0
        for worker in self.workers:
            self.workers.retire(worker, "WINCH")
        error_log.info("%s: stopping all workers; the master stays (HUP restarts them)", name)
        self._set_title()

    def resize(self, size: int, reason: str) -> None:
        """Run `size` workers, at least 1: the missing ones start next; the extra ones (the
        highest numbers) stop gracefully."""
        if size < 1:
            error_log.info("%s: already at 1 worker", reason)
            return
        self.size = size
        for worker in sorted(self.workers.active(), key=lambda w: w.number)[size:]:
            self.workers.retire(worker, reason)
        error_log.info("%s: now %d workers", reason, self.size)
        self._set_title()

    # -- workers ------------------------------------------------------------------------------

    def _spawn_missing(self) -> None:
        missing = self.size - len(self.workers.active())
        if missing <= 0 or not self.failures.may_start(time.monotonic()):
            return
        for number in self.workers.free_numbers(missing):
            if not self._spawn(WorkerProcess(number)):
                break
        self._set_title()

    def _spawn(self, worker: WorkerProcess) -> bool:
        """Fork `worker`; False if fork() failed (retried after a growing delay)."""
        self.call_hook("pre_fork", self, worker)
        try:
            pid, read_fd, nudge_fd = fork_worker(worker.number, self.scoreboard,
                                                 self._leave_master, self._run_worker(worker))
        except OSError as exc:
            self.failures.fork_failed(worker.number, exc)
            return False
        self.workers.add(worker, pid, read_fd, nudge_fd)
        error_log.debug("started worker %d (pid %d)", worker.number, pid)
        self.failures.forked()
        return True

    def _leave_master(self) -> None:
        """In a forked worker: close what only the master uses."""
        self.signals.reset_in_child()
        if self.watcher is not None:
            self.watcher.close_inherited()
        self.admin.close_in_child()
        self.workers.close_in_child()
        self.selector.close()

    def _run_worker(self, worker: WorkerProcess) -> Callable[[int, int], int]:
        def run(channel_fd: int, nudge_fd: int) -> int:
            self.handoff.nudges = nudge_fd
            return run_worker(self.cfg, self.listeners, channel_fd, worker.number, self.pid,
                              self.scoreboard, self.handoff, self.app, self.tls,
                              lambda name, w: self.call_hook(name, self, w))
        return run

    def _on_message(self, worker: WorkerProcess, kind: int, payload: bytes) -> None:
        """What a worker said that concerns the master (see WorkerSet.read for the rest)."""
        if kind == channel.BOOTED:
            worker.booted = True
            worker.booted_at = time.monotonic()
            error_log.info("worker %d booted (pid %d)", worker.number, worker.pid)
            if not self.ready and self.workers.booted() >= self.size:
                self._now_ready()
        elif kind == channel.BOOT_FAILED:
            status = payload[0] if payload else EXIT_BOOT
            self._give_up(self.failures.boot_failed(
                worker, status, payload[1:].decode("utf-8", "replace"), ready=self.ready,
                stopping=self.stop_deadline is not None, await_change=self.cfg.reload))
        elif kind == channel.STUCK and not worker.retiring:
            # Its loop still serves: it stops once its other requests are done.
            hangs.dump(worker, payload.decode("utf-8", "replace"), "replaced")
            worker.replace("hang")
        elif kind == channel.CALLING:
            self.call_poller.wake()

    def _now_ready(self) -> None:
        """Every first worker booted: say so (log, systemd, hook), and check the memory."""
        self.ready = True
        warning = check_fit([worker.pid for worker in self.workers.active()], self.size)
        if warning:
            error_log.warning("%s", warning)
        error_log.info("ready: %d workers in %.2f s", self.size,
                       time.monotonic() - self.started)
        self.notify.ready(status_text(self.workers))
        self.call_hook("when_ready", self)
        self.upgrade.stop_predecessor(self.notify)

    def _give_up(self, give_up: GiveUp | None) -> None:
        if give_up is not None:
            self.exit_status = give_up.status
            self.stop(graceful=False, reason=give_up.reason)

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.upgrade.pid:
                self.upgrade.ended(wait_status, self.listeners, self.pidfile)
                self.admin.reclaim_control()
                continue
            worker = self.workers.reaped(pid, self._on_message)
            if worker is None:
                continue
            stopping = self.stop_deadline is not None
            self._give_up(self.failures.exited(worker, wait_status, ready=self.ready,
                                               stopping=stopping, await_change=self.cfg.reload))
            reason = worker.leaving or ("" if worker.retiring or stopping else "crash")
            if reason:
                self.restarts[reason] = self.restarts.get(reason, 0) + 1

    # -- stopping -----------------------------------------------------------------------------

    def _drain(self, reason: str) -> None:
        """TERM with --drain-delay: serve on, but say so to load balancers (health 503,
        Connection: close), and stop gracefully once the delay is over."""
        delay = self.cfg.drain_delay
        error_log.info("%s: draining for %g s (health checks fail, responses close their "
                       "connections), then a graceful stop", reason, delay)
        self.notify.stopping()
        self.scoreboard.set_stopping()
        self.drain_until = time.monotonic() + delay

    def stop(self, graceful: bool, reason: str) -> None:
        """Tell every worker to stop; SIGKILL whatever is left at the deadline."""
        grace = self.cfg.graceful_timeout if graceful else min(
            QUICK_STOP_SECONDS, self.cfg.graceful_timeout)
        deadline = time.monotonic() + grace
        if self.stop_deadline is not None and deadline >= self.stop_deadline:
            return
        error_log.info("%s: %s stop of %d workers", reason, "graceful" if graceful else "quick",
                       len(self.workers))
        if not self.upgrade.handed_over:  # (a successor speaks for the service now)
            self.notify.stopping()
        self.scoreboard.set_stopping()
        self._stop_watching()
        if self.stop_deadline is None:
            # New clients are refused at once instead of queueing for workers that are
            # leaving. (A new master from USR2 keeps its own copies of these sockets.)
            self._close_listeners()
        self.stop_deadline = deadline
        self.drain_until = None
        for worker in self.workers:
            worker.retiring = True
            kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def _stop_watching(self) -> None:
        if self.watcher is not None:
            self.selector.unregister(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None

    def _cleanup(self) -> None:
        """Leave nothing behind: kill and reap every worker, close sockets and pipes."""
        self.workers.kill_and_reap_all()
        self._close_listeners()
        self._stop_watching()
        self.admin.close()
        self.handoff.close()
        if self.pidfile is not None:
            self.pidfile.remove()
        self.signals.close()
        self.selector.close()

    # -- hooks and titles ---------------------------------------------------------------------

    def call_hook(self, name: str, *args: Any) -> None:
        """Run the configured hook `name`; log its exception (and re-raise at on_starting)."""
        hook = self.cfg.hooks.get(name)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            error_log.exception("hook %s raised", name)
            if name == "on_starting":
                raise

    def _close_listeners(self) -> None:
        from_predecessor = self.upgrade.from_predecessor()
        for listener in self.listeners:
            if from_predecessor:
                listener.owns_path = False  # the old master we came from still serves it
            listener.close()
        self.listeners = []

    def _set_title(self) -> None:
        setproctitle(f"forkserve: master [{self.cfg.app}] {self.size} workers")
