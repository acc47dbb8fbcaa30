"""The master: forks workers, watches them over their pipes, and acts on signals.

The whole supervision story is one loop (`Master.run`):

    start missing workers (not before a crash-loop backoff ends)
    wait on one selector: the signal wakeup pipe and one pipe per worker
    act on queued signals, in order
    reap exited workers
    dump and kill hung workers; stop workers whose replacements have booted
    when stopping: wait for workers, SIGKILL them at the deadline

Signal handlers only record: `signal.set_wakeup_fd` writes each signal number into a pipe
that the loop reads, so no signal is lost or handled re-entrantly.

Replacing a worker always starts the replacement first: the old worker is marked `retiring`
with `stop_when_replaced`, the loop starts a new one, and only when enough workers have
booted is the old one sent TERM. Reload (HUP, or a changed file with --reload), recycling
(--max-requests, memory) and a failed reload all follow from that one rule.
"""

from __future__ import annotations

import errno
import gc
import math
import os
import selectors
import signal
import ssl
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from setproctitle import setproctitle

from forkserve import __version__, channel, logs, privileges
from forkserve.app import load_app
from forkserve.config import Config, parse_args
from forkserve.control import ControlError, ControlServer, default_path, memory_kib
from forkserve.endpoints import Endpoint, Server
from forkserve.errors import EXIT_BOOT, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError
from forkserve.handoff import CallPoller, HandoffChannel
from forkserve.logs import error_log
from forkserve.memory import fit_warning, memory_limit, oom_kills
from forkserve.metrics import Totals, exposition, read_report, summary
from forkserve.pidfile import Pidfile
from forkserve.prometheus import MetricsServer
from forkserve.reloader import Watcher, describe, forget_bytecode
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import INHERIT_ENV, Listener, listen, parse_bind
from forkserve.statsd import StatsdPusher
from forkserve.systemd import FDSTORE_PREFIX, Notifier
from forkserve.tls import server_context
from forkserve.workers import run_worker

HANDLED_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH,
)
# Sent to a hung worker so that faulthandler writes every thread's traceback to the log.
DUMP_SIGNAL = signal.SIGUSR2
# Control-socket commands that do what a signal does (the others: status, dump, scale, stop).
CONTROL_SIGNALS = {"reload": signal.SIGHUP, "incr": signal.SIGTTIN, "decr": signal.SIGTTOU,
                   "reopen-logs": signal.SIGUSR1}
CONTROL_COMMANDS = ("status", "stats", "stop", "reload", "scale", "incr", "decr", "reopen-logs",
                    "dump")
MAX_WORKERS = 1000  # what `scale` accepts
# Settings a reload cannot change: the sockets and servers the master holds.
KEPT_ON_RELOAD = ("bind", "control_socket", "metrics_bind", "statsd_host", "statsd_prefix")
# How long a hung worker gets to write its tracebacks before SIGKILL.
DUMP_GRACE = 1.0
# A worker whose pipe closed and that has not exited after this long is killed.
PIPE_CLOSED_GRACE = 1.0
# How long a quick stop (INT/QUIT) waits for workers before SIGKILL.
QUICK_STOP_SECONDS = 5.0
# A worker that lived this long after booting was not crash-looping.
STABLE_SECONDS = 5.0
# Respawn delays after consecutive failures: 0, then 0.5 s doubling up to 30 s.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# With no worker left serving, stop after this many boot failures in a row.
MAX_BOOT_FAILURES = 5
# How often systemd gets a STATUS= line (when it changed).
STATUS_INTERVAL = 5.0
# A loop that wakes this much later than it asked was stopped, not busy.
LATE_SECONDS = 2.0
# With --timeout 0, workers silent this long stop the watchdog pings.
WATCHDOG_STALE = 10.0


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

    def close_nudge_pipe(self) -> None:
        """Close the master's end of its nudge pipe (it is gone)."""
        if self.nudge_fd >= 0:
            os.close(self.nudge_fd)
            self.nudge_fd = -1


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
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.signals: deque[int] = deque()
        self.selector = selectors.DefaultSelector()
        self.scoreboard = Scoreboard()
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
        self.failures = 0  # consecutive boot failures (and deaths before taking a connection)
        self.fork_failures = 0  # consecutive failed fork() calls
        self.spawn_not_before = 0.0
        self.boot_errors_seen: set[str] = set()
        self.notify = Notifier()
        self.reloading = False  # a HUP is in progress: READY=1 once the new workers are up
        self.served_by_gone = 0  # requests served by workers that exited
        self.next_status = 0.0
        self.last_status = ""
        self.next_watchdog = 0.0
        self.upgrade_pid = 0  # the new master started by USR2
        self.handed_over = False  # systemd was told the new master is the main process
        self.inherited_from = 0  # the old master that handed us its sockets (USR2)
        self.watcher: Watcher | None = None  # --reload
        self.control: ControlServer | None = None  # --control-socket
        self.metrics: MetricsServer | None = None  # --metrics-bind
        self.statsd: StatsdPusher | None = None  # --statsd-host
        self.gone_stats = Totals()  # what the workers that exited reported last
        self.restarts: dict[str, int] = {}  # workers replaced, by reason
        self._wakeup_fds = (-1, -1)
        self.oom_kills = oom_kills()  # the cgroup's count: to name the OOM killer's kills

    # -- start and the loop -------------------------------------------------------------------

    def run(self) -> int:
        """Bind, start workers, supervise until stopped; return the exit status.

        Raises ConfigError for what the user asked for that cannot work (before any fork).
        """
        self._install_signals()
        try:
            self.call_hook("on_starting", self)
        except Exception:
            return EXIT_FAILURE
        self.inherited_from = os.getppid() if INHERIT_ENV in os.environ else 0
        cfg = self.cfg
        privileges.check_root(cfg.user, cfg.allow_root, cfg.app)
        ids = privileges.resolve(cfg.user, cfg.group)
        os.umask(cfg.umask)
        self.tls = server_context(cfg)
        self.listeners = listen(cfg.bind, cfg.backlog, self.notify.remove_fds)
        for listener in self.listeners:
            listener.secure = self.tls is not None
        # (TCP only: a unix socket's path is removed at exit, so its fd would be no use)
        self.notify.store_fds([(listener.sock.fileno(), f"{FDSTORE_PREFIX}{index}")
                               for index, listener in enumerate(self.listeners)
                               if listener.address.kind == "tcp"])
        try:
            if cfg.pidfile:
                self.pidfile = Pidfile(cfg.pidfile)
                self.pidfile.write()
            if cfg.control_socket:
                self._open_control(cfg.control_socket)
            if cfg.metrics_bind:
                self._open_metrics(cfg.metrics_bind)
            if cfg.statsd_host:
                address = parse_bind(cfg.statsd_host)
                self.statsd = StatsdPusher(address.host, address.port, cfg.statsd_prefix)
            if ids is not None:
                if self.control is not None:
                    try:
                        self.control.hand_to(*ids)
                    except (ControlError, OSError) as exc:
                        raise ConfigError(str(exc)) from None
                privileges.drop(ids, self.listeners)
            return self._serve()
        finally:
            self._cleanup()

    def _serve(self) -> int:
        for listener in self.listeners:
            error_log.info("listening at %s", listener.url)
        if self.cfg.preload and not self._preload():
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
                                       for worker in self.workers.values()], now)
                self._check_hung(now)
                self._reload_on_change(now)
                self._stop_replaced()
                self._tell_systemd(now)
                if self.statsd is not None and now >= self.statsd.due:
                    self.statsd.push(now, self._totals(), self._in_flight(),
                                     len(self.workers), self.restarts)
            elif not self.workers:
                break
            elif now >= self.stop_deadline:
                self._kill_all()
        error_log.info("master pid %d exiting with status %d", self.pid, self.exit_status)
        return self.exit_status

    def _wait(self) -> None:
        timeout = 0.2 if self.stop_deadline is not None else 1.0
        if self.notify.watchdog_interval:
            timeout = min(timeout, self.notify.watchdog_interval)
        if self.spawn_not_before:
            timeout = max(0.0, min(timeout, self.spawn_not_before - time.monotonic()))
        if self.stop_deadline is None:
            timeout = self.call_poller.timeout(timeout)
        if self.drain_until is not None and self.stop_deadline is None:
            timeout = max(0.0, min(timeout, self.drain_until - time.monotonic()))
        if self.watcher is not None:
            timeout = self.watcher.timeout(timeout, time.monotonic())
        for server in self._servers():
            timeout = server.timeout(timeout, time.monotonic())
        if self.statsd is not None and self.stop_deadline is None:
            timeout = self.statsd.timeout(timeout, time.monotonic())
        self.turn_due = time.monotonic() + timeout
        self._read_ready(timeout)
        for server in self._servers():
            server.expire(time.monotonic())

    def _read_ready(self, timeout: float) -> None:
        """Read the signals and worker pipes that are ready within `timeout` seconds."""
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                self._read_signals(key.fd)
            elif isinstance(key.data, Endpoint):
                key.data.ready(mask, time.monotonic())
            elif isinstance(key.data, Watcher):
                if key.data is self.watcher:  # (a stop earlier in this batch closed it)
                    key.data.read(time.monotonic())
            else:
                self._read_channel(key.data)

    def _forgive_silence(self, now: float) -> None:
        """If this turn of the loop came much later than its wait allowed, the master was
        stopped (SIGSTOP, or a frozen cgroup as `docker pause` does): what workers sent
        meanwhile is read first (epoll returns nothing after such a stop), and the time the
        master did not watch is not counted as their silence."""
        late = now - self.turn_due
        if late <= LATE_SECONDS:
            return
        error_log.warning("the master's loop was stopped for %.1f s (SIGSTOP or a frozen "
                          "cgroup?); that time does not count against the workers", late)
        for worker in self.workers.values():
            worker.last_seen = min(now, worker.last_seen + late)
            worker.started = min(now, worker.started + late)
        self._read_ready(0)

    def _preload(self) -> bool:
        """Load the app here so workers inherit it; False (with exit_status set) if it fails."""
        try:
            self.app = load_app(self.cfg.app, self.cfg.chdir)
        except ConfigError as exc:
            error_log.error("%s", exc)
            self.exit_status = EXIT_CONFIG
            return False
        except BaseException:
            error_log.error("cannot preload %s:\n%s", self.cfg.app, traceback.format_exc().rstrip())
            self.exit_status = EXIT_BOOT
            return False
        error_log.info("preloaded %s", self.cfg.app)
        return True

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
        # Signals that came after the wait are taken too: Ctrl-C and `kill -- -PGID` reach
        # the workers with the master, and a worker that exits at once must be reaped as
        # part of the stop, not as a crash.
        self._read_signals(self._wakeup_fds[0])
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                continue  # reaping happens every turn of the loop
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM and self.upgrade_pid and not self.handed_over:
                self._hand_over(name)
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
                self._resize(self.size + 1, name)
            elif signum == signal.SIGTTOU:
                self._resize(self.size - 1, name)
            elif signum == signal.SIGUSR1:
                self._signal_workers(signal.SIGUSR1)
                failed = logs.reopen()
                for reason in failed:
                    error_log.error("%s: cannot reopen log file %s; still writing to the file "
                                    "it replaced", name, reason)
                if not failed:
                    error_log.info("%s: log files reopened", name)
            elif signum == signal.SIGUSR2:
                self.upgrade()
            elif signum == signal.SIGWINCH:
                self._stop_workers_keep_master(name)

    def _signal_workers(self, signum: int) -> None:
        for worker in self.workers.values():
            _kill(worker.pid, signum)

    # -- reload, upgrade, resize --------------------------------------------------------------

    def reload(self, reason: str = "HUP") -> None:
        """HUP: re-read the configuration and replace every worker, new ones first. `reason`
        begins the log lines."""
        try:
            cfg = parse_args(self.argv)
        except ConfigError as exc:
            error_log.error("%s: configuration not reloaded: %s", reason, exc)
            return
        for name in KEPT_ON_RELOAD:
            kept = getattr(self.cfg, name)
            if getattr(cfg, name) != kept:
                error_log.warning("%s: --%s changes need a restart or a USR2 upgrade; "
                                  "keeping %s", reason, name.replace("_", "-"),
                                  ", ".join(kept) if isinstance(kept, list) else kept)
                setattr(cfg, name, kept)
        try:
            tls = server_context(cfg)
        except ConfigError as exc:
            # E.g. a key readable by root only, after --user: the rest still reloads.
            error_log.error("%s: %s; the new workers keep the certificate in use", reason, exc)
            tls = self.tls
        if (tls is None) != (self.tls is None):
            error_log.warning("%s: turning TLS on or off needs a restart or a USR2 upgrade; "
                              "keeping it %s", reason, "off" if self.tls is None else "on")
            tls = self.tls
        try:
            logs.setup(cfg)
        except ConfigError as exc:
            logs.restore()  # (the files it was set up from may have changed since)
            error_log.error("%s: configuration not reloaded: %s", reason, exc)
            return
        self.tls = tls
        self.cfg = cfg
        self.size = cfg.workers
        self.saved_size = 0
        self.reloading = True
        self.notify.reloading()
        self.call_hook("on_reload", self)
        old = [w for w in self.workers.values() if not w.retiring]
        for worker in old:
            worker.leaving = "reload"
            worker.retiring = True
            worker.stop_when_replaced = True
        self.failures = 0
        self.spawn_not_before = 0.0
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

    def upgrade(self) -> None:
        """USR2: start a new master from the same executable and arguments that inherits
        the listening sockets. This master and its workers keep running."""
        if self.upgrade_pid:
            error_log.warning("USR2 ignored: an upgrade (pid %d) is already running",
                              self.upgrade_pid)
            return
        if self.pidfile is not None:
            self.pidfile.rename_to_oldbin()
        fds = [listener.sock.fileno() for listener in self.listeners]
        env = dict(os.environ)
        env[INHERIT_ENV] = ",".join(map(str, fds))
        env.pop("WATCHDOG_PID", None)  # the new master pings for itself once it is the main pid
        args = [sys.executable, "-m", "forkserve", *self.argv]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for signum in HANDLED_SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, ())
                for fd in fds:
                    os.set_inheritable(fd, True)
                os.execve(sys.executable, args, env)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(EXIT_FAILURE)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self.upgrade_pid = pid
        for listener in self.listeners:
            listener.owns_path = False  # the new master serves on them now
        error_log.info("USR2: started new master pid %d; stop this one (pid %d) with TERM, or "
                       "its workers with WINCH", pid, self.pid)

    def _upgrade_ended(self, wait_status: int) -> None:
        error_log.warning("new master pid %d exited (%s); this master carries on",
                          self.upgrade_pid, _describe_wait(wait_status))
        self.upgrade_pid = 0
        if self.pidfile is not None:
            self.pidfile.restore_from_oldbin()
        for listener in self.listeners:
            listener.owns_path = listener.address.kind == "unix"
        if self.control is not None and not self.control.still_there():
            path = self.control.path  # the new master took it over, then left
            self.control.close()
            self.control = None
            try:
                self._open_control(path)
            except ConfigError as exc:
                error_log.error("control socket lost: %s", exc)

    def _stop_workers_keep_master(self, name: str) -> None:
        """WINCH: stop every worker gracefully but keep the master (HUP brings them back)."""
        if _in_terminal_foreground():
            error_log.info("%s ignored: running in a terminal's foreground (a window resize)",
                           name)
            return
        self.saved_size = self.saved_size or self.size
        self.size = 0
        for worker in self.workers.values():
            self._retire(worker, "WINCH")
        error_log.info("%s: stopping all workers; the master stays (HUP restarts them)", name)
        self._set_title()

    def _resize(self, size: int, reason: str) -> None:
        """Run `size` workers, at least 1: the missing ones start next; the extra ones (the
        highest numbers) stop gracefully."""
        if size < 1:
            error_log.info("%s: already at 1 worker", reason)
            return
        self.size = size
        for worker in sorted(self._active(), key=lambda w: w.number)[size:]:
            self._retire(worker, reason)
        error_log.info("%s: now %d workers", reason, self.size)
        self._set_title()

    # -- the control socket -------------------------------------------------------------------

    def _check_memory_fit(self) -> None:
        """Once ready: warn if the workers take most of the cgroup's memory limit."""
        limit = memory_limit()
        if limit is not None:
            sizes = [memory_kib(worker.pid) for worker in self._active()]
            warning = fit_warning(limit, [size[0] for size in sizes if size], self.size)
            if warning:
                error_log.warning("%s", warning)

    def _servers(self) -> list[Server]:
        return [server for server in (self.control, self.metrics) if server is not None]

    def _open_metrics(self, spec: str) -> None:
        address = parse_bind(spec)
        try:
            self.metrics = MetricsServer(address.host, address.port, self.selector,
                                         self._metrics_text)
        except OSError as exc:
            raise ConfigError(f"--metrics-bind {spec}: {exc.strerror}") from None
        error_log.info("metrics at %s", self.metrics.url)

    def _totals(self) -> Totals:
        totals = Totals()
        totals.add(self.gone_stats)
        for worker in self.workers.values():
            totals.add(worker.stats)
        return totals

    def _in_flight(self) -> int:
        return sum(worker.in_flight for worker in self.workers.values())

    def _metrics_text(self) -> str:
        return exposition(self._totals(), self._in_flight(),
                          self._worker_rows(time.monotonic()), self.restarts)

    def _open_control(self, path: str) -> None:
        try:
            self.control = ControlServer(default_path() if path == "auto" else path,
                                         self.selector, self._control,
                                         take_over=bool(self.inherited_from))
        except ControlError as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise ConfigError(f"--control-socket {path}: {exc.strerror}") from None
        error_log.info("control socket at %s", self.control.path)

    def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request of the control socket (see forkserve.control): status, dump
        and scale here; the others as their signal would be (acted on in this turn)."""
        command = request["command"]
        if command == "status":
            return self._status()
        if command == "stats":
            return summary(self._totals())
        if command == "dump":
            workers = self._active()
            error_log.info("control: dump: the tracebacks of %d workers follow", len(workers))
            logs.flush()
            for worker in workers:
                _kill(worker.pid, DUMP_SIGNAL)
            return {"workers": [worker.pid for worker in workers]}
        if self.stop_deadline is not None and command != "stop":
            raise ControlError("the server is stopping")
        if command == "scale":
            size = request.get("workers")
            if type(size) is not int or not 1 <= size <= MAX_WORKERS:
                raise ControlError(f'scale: expected "workers": a whole number from 1 to '
                                   f"{MAX_WORKERS}")
            self._resize(size, "control: scale")
            return {"workers": self.size}
        if command == "stop":
            mode = request.get("mode", "graceful")
            if mode not in ("graceful", "quick"):
                raise ControlError('stop: "mode" is graceful or quick')
            self.signals.append(signal.SIGTERM if mode == "graceful" else signal.SIGQUIT)
            return {"stopping": mode}
        signum = CONTROL_SIGNALS.get(command)
        if signum is None:
            raise ControlError(f"unknown command {command!r} (expected one of "
                               f"{', '.join(CONTROL_COMMANDS)})")
        self.signals.append(signum)
        return {"signal": signal.Signals(signum).name}

    def _worker_rows(self, now: float) -> list[dict[str, Any]]:
        """What `status` and the metrics say of each worker."""
        rows = []
        for worker in sorted(self.workers.values(), key=lambda w: (w.number, w.started)):
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

    def _status(self) -> dict[str, Any]:
        now = time.monotonic()
        cfg = self.cfg
        return {
            "master": {
                "pid": self.pid, "version": __version__,
                "uptime": round(now - self.started, 3),
                "state": "stopping" if self.stop_deadline is not None else
                         "draining" if self.drain_until is not None else
                         "reloading" if self.reloading else "serving",
                "app": cfg.app, "binds": [listener.url for listener in self.listeners],
                "workers": self.size, "threads": cfg.threads, "http": cfg.http,
                "loop": cfg.loop, "timeout": cfg.timeout, "config": cfg.config,
                "served_by_gone_workers": self.served_by_gone,
            },
            "workers": self._worker_rows(now),
        }

    # -- workers ------------------------------------------------------------------------------

    def _active(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.retiring]

    def _spawn_missing(self) -> None:
        missing = self.size - len(self._active())
        if missing <= 0 or time.monotonic() < self.spawn_not_before:
            return
        self.spawn_not_before = 0.0
        taken = {w.number for w in self.workers.values()}
        number = 1
        for _ in range(missing):
            while number in taken:
                number += 1
            taken.add(number)
            if not self._spawn(WorkerProcess(number)):
                break
        self._set_title()

    def _spawn(self, worker: WorkerProcess) -> bool:
        """Fork `worker`; False if fork() failed (retried after a growing delay)."""
        self.call_hook("pre_fork", self, worker)
        read_fd, write_fd = os.pipe()
        nudge_r, nudge_w = os.pipe()
        self.scoreboard.join(worker.number)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        # What the master holds now (forkserve, the parser, the loop, a preloaded app) is
        # out of the collector's reach: a worker's collections would write to every such
        # object and so copy the pages it shares with the master.
        gc.freeze()
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            for fd in (read_fd, write_fd, nudge_r, nudge_w):
                os.close(fd)
            self.scoreboard.leave(worker.number)
            self.fork_failures += 1
            delay = _backoff_delay(self.fork_failures + 1)  # the first retry waits too
            if self.fork_failures == 1:  # once per episode: a process limit can last
                error_log.error("cannot fork worker %d: %s; retrying in %.1f s, then less "
                                "often", worker.number, exc.strerror, delay)
            self.spawn_not_before = time.monotonic() + delay
            return False
        if pid == 0:
            os.close(nudge_w)
            self.handoff.nudges = nudge_r
            self._become_worker(worker.number, read_fd, write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_fd)
        os.close(nudge_r)
        os.set_blocking(read_fd, False)
        os.set_blocking(nudge_w, False)
        worker.pid = pid
        worker.fd = read_fd
        worker.nudge_fd = nudge_w
        worker.started = worker.last_seen = time.monotonic()
        self.workers[pid] = worker
        self.selector.register(read_fd, selectors.EVENT_READ, worker)
        error_log.debug("started worker %d (pid %d)", worker.number, pid)
        if self.fork_failures:
            error_log.info("fork works again, after %d failed attempts", self.fork_failures)
            self.fork_failures = 0
        return True

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
            if self.watcher is not None:
                self.watcher.close_inherited()
            for server in self._servers():
                server.close_inherited()
            if self.statsd is not None:
                self.statsd.close()
            for other in self.workers.values():
                for fd in (other.fd, other.nudge_fd):
                    if fd >= 0:
                        os.close(fd)
            self.selector.close()
            os.set_blocking(write_fd, False)
            status = run_worker(self.cfg, self.listeners, write_fd, number, self.pid,
                                self.scoreboard, self.handoff, self.app, self.tls,
                                lambda name, worker: self.call_hook(name, self, worker))
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

    def _read_channel(self, worker: WorkerProcess) -> bool:
        """Read what the worker wrote; False once nothing more can be read now."""
        try:
            data = os.read(worker.fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            # Normal when the worker is exiting; if it is not reaped soon, _check_hung kills
            # it, since a worker without its pipe can no longer be supervised.
            self._unwatch(worker)
            worker.pipe_closed_at = time.monotonic()
            return False
        worker.last_seen = time.monotonic()
        try:
            for kind, payload in worker.reader.feed(data):
                self._on_message(worker, kind, payload)
        except channel.ChannelError as exc:
            self._unwatch(worker)
            self._kill_worker(worker, f"sent garbage on its pipe ({exc})")
            return False
        return True

    def _on_message(self, worker: WorkerProcess, kind: int, payload: bytes) -> None:
        if kind == channel.HEARTBEAT:
            worker.served, worker.in_flight, worker.connections = channel.read_counters(payload)
        elif kind == channel.STATS:
            try:
                worker.stats = read_report(payload, worker.stats)
            except ValueError as exc:
                raise channel.ChannelError(f"bad STATS payload: {exc}") from None
        elif kind == channel.BOOTED:
            worker.booted = True
            worker.booted_at = time.monotonic()
            error_log.info("worker %d booted (pid %d)", worker.number, worker.pid)
            if not self.ready and sum(w.booted for w in self._active()) >= self.size:
                self.ready = True
                self._check_memory_fit()
                error_log.info("ready: %d workers in %.2f s", self.size,
                               time.monotonic() - self.started)
                self.notify.ready(self._status_text())
                self.call_hook("when_ready", self)
                if self.inherited_from and self.notify.enabled \
                        and os.getppid() == self.inherited_from:
                    # A USR2 upgrade under systemd: the old master hands the service over
                    # (MAINPID=) and stops, as its TERM says.
                    error_log.info("USR2 upgrade under systemd: stopping the old master "
                                   "(pid %d)", self.inherited_from)
                    _kill(self.inherited_from, signal.SIGTERM)
        elif kind == channel.BOOT_FAILED:
            status = payload[0] if payload else EXIT_BOOT
            self._boot_failed(worker, status, payload[1:].decode("utf-8", "replace"))
        elif kind == channel.STUCK and not worker.retiring:
            # Its loop still serves: it stops once its other requests are done.
            self._dump(worker, payload.decode("utf-8", "replace"), "replaced")
            worker.leaving = "hang"
            worker.retiring = True
            worker.stop_when_replaced = True
        elif kind == channel.CALLING:
            self.call_poller.wake()
        elif kind == channel.STOPPING and payload:
            worker.stop_signal = payload[0]
        elif kind == channel.RECYCLE and not worker.retiring:
            error_log.info("worker %d (pid %d) recycling: %s", worker.number, worker.pid,
                           payload.decode("utf-8", "replace"))
            worker.leaving = "memory" if payload.startswith(b"resident memory") \
                else "max-requests"
            worker.retiring = True
            worker.stop_when_replaced = True

    def _boot_failed(self, worker: WorkerProcess, status: int, text: str) -> None:
        """A worker could not load the app.

        Before the server was ever ready this stops it (status 2 or 3). Later (a reload with
        broken code, a replacement) the error is logged once and the boot retried with
        backoff while the other workers serve, until none is left serving; with --reload it
        is not retried but awaits the next change (`_await_change`).
        """
        expected = worker.retiring
        worker.retiring = True
        if self.stop_deadline is not None or expected:
            return
        worker.leaving = "crash"  # (for the statistics: a replacement starts, or tries)
        first_time = text not in self.boot_errors_seen
        self.boot_errors_seen.add(text)
        if status == EXIT_CONFIG:
            message = text
        else:
            message = f"worker {worker.number} (pid {worker.pid}) failed to boot:\n{text}"
        if not self.ready:
            error_log.error("%s", message)
            self.exit_status = status
            self.stop(graceful=False, reason="boot failure")
            return
        self.failures += 1
        serving = [w for w in self.workers.values() if w.booted and not w.killed]
        if not serving and self.failures >= MAX_BOOT_FAILURES:
            error_log.error("%s\nworkers keep failing to boot and none is serving: stopping",
                            message)
            self.exit_status = status
            self.stop(graceful=False, reason="boot failures")
            return
        if first_time:
            error_log.error("%s", message)
        else:
            error_log.error("worker %d (pid %d) failed to boot again (same error)",
                            worker.number, worker.pid)
        if self.cfg.reload:
            self._await_change()
        else:
            self._backoff()

    def _await_change(self) -> None:
        """--reload, after a boot failure: no worker starts until the next change (`reload`
        lifts this); those a reload was replacing serve on, the others it started stop."""
        replaced = [w for w in self.workers.values() if w.stop_when_replaced]
        for worker in self._active() if replaced else ():
            self._retire(worker, "the new code failed to boot")
        for worker in replaced:
            worker.retiring = worker.stop_when_replaced = False
            if worker.leaving == "reload":
                worker.leaving = ""
        self.spawn_not_before = math.inf
        error_log.info("reload: %s until the next change", "the old workers serve on"
                       if replaced else "no worker starts")

    def _backoff(self) -> None:
        delay = _backoff_delay(self.failures)
        if delay:
            error_log.warning("%d failures in a row: next worker starts in %.1f s",
                              self.failures, delay)
        self.spawn_not_before = time.monotonic() + delay

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.upgrade_pid:
                self._upgrade_ended(wait_status)
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            while worker.fd >= 0 and self._read_channel(worker):
                pass  # what a dead worker wrote last (a boot failure) is still in its pipe
            self._unwatch(worker)
            self.scoreboard.leave(worker.number)
            self.served_by_gone += worker.served
            self.gone_stats.add(worker.stats)
            self._report_exit(worker, wait_status)
            reason = worker.leaving or (
                "" if worker.retiring or self.stop_deadline is not None else "crash")
            if reason:
                self.restarts[reason] = self.restarts.get(reason, 0) + 1

    def _report_exit(self, worker: WorkerProcess, wait_status: int) -> None:
        how = _describe_wait(wait_status)
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
        if worker.retiring or self.stop_deadline is not None:
            error_log.info("worker %d (pid %d) %s", worker.number, worker.pid, how)
            return
        if worker.stop_signal:
            error_log.info("worker %d (pid %d) %s on %s sent to it, not by the master; "
                           "starting a replacement", worker.number, worker.pid, how,
                           signal.Signals(worker.stop_signal).name)
            return
        if not worker.booted:
            self._boot_failed(worker, EXIT_BOOT, f"the worker {how} before loading the app")
            return
        current = self.scoreboard.current_request(worker.number)
        if current is not None:
            how += f" while serving {current[0]!r} ({current[1]:.1f} s in)"
        stable = time.monotonic() - worker.booted_at >= STABLE_SECONDS
        if stable:
            self.failures = 0  # its boot worked: earlier failures are over
        if stable or self.scoreboard.took_traffic(worker.number):
            # A request killed it (a crash in a C extension, os._exit, the OOM killer), not
            # its boot: replace it at once, or a few deadly requests would leave no worker.
            error_log.error("worker %d (pid %d) %s; replacing it", worker.number, worker.pid,
                            how)
            if not (self.failures or self.fork_failures):
                self.spawn_not_before = 0.0  # unless boots or forks are failing: then wait
            return
        error_log.error("worker %d (pid %d) %s right after booting, before taking a "
                        "connection", worker.number, worker.pid, how)
        self.failures += 1
        self._backoff()

    def _unwatch(self, worker: WorkerProcess) -> None:
        worker.close_nudge_pipe()  # (a worker without its pipe is not nudged either)
        if worker.fd < 0:
            return
        self.selector.unregister(worker.fd)
        os.close(worker.fd)
        worker.fd = -1

    def _retire(self, worker: WorkerProcess, reason: str) -> None:
        """Stop a worker gracefully now, without a replacement."""
        worker.retiring = True
        worker.stop_when_replaced = False
        error_log.debug("%s: stopping worker %d (pid %d)", reason, worker.number, worker.pid)
        _kill(worker.pid, signal.SIGTERM)

    def _stop_replaced(self) -> None:
        """TERM the workers waiting for replacements once enough new ones have booted."""
        waiting = [w for w in self.workers.values() if w.stop_when_replaced]
        if not waiting:
            return
        booted = sum(1 for w in self._active() if w.booted)
        if booted < self.size:
            return
        for worker in waiting:
            self._retire(worker, "replaced")
        error_log.info("replaced %d workers (%s) by booted new ones", len(waiting),
                       ", ".join(f"pid {w.pid}" for w in waiting))

    def _check_hung(self, now: float) -> None:
        """Dump the tracebacks of workers silent past --timeout (or not booted past
        --boot-timeout), then SIGKILL them."""
        self._forgive_silence(now)
        for worker in list(self.workers.values()):
            if worker.killed:
                continue
            if worker.pipe_closed_at:
                if now - worker.pipe_closed_at >= PIPE_CLOSED_GRACE:
                    self._kill_worker(worker, "closed its pipe")
                continue
            if worker.dump_sent_at:
                if worker.last_seen > worker.dump_sent_at:
                    worker.dump_sent_at = 0.0  # it woke up after all
                elif now - worker.dump_sent_at >= DUMP_GRACE:
                    if not worker.retiring:  # (one stopping for good is not replaced)
                        worker.leaving = "hang"
                    self._kill_worker(worker, "hung")
                continue
            silent = now - worker.last_seen
            if worker.booted:
                limit = self.cfg.timeout
                what = "silent"
            else:
                limit = self.cfg.boot_timeout
                what = "still booting"
                silent = now - worker.started
            if limit <= 0 or silent <= limit:
                continue
            doing = ""
            current = self.scoreboard.current_request(worker.number)
            if current is not None:
                doing = f", stuck in {current[0]!r} for {current[1]:.1f} s"
            self._dump(worker, f"{what} for {silent:.1f} s (limit {limit:g} s){doing}", "killed")
            worker.dump_sent_at = now  # killed DUMP_GRACE later unless heard from again

    def _dump(self, worker: WorkerProcess, why: str, then: str) -> None:
        """Say why `worker` is hung and what follows (`then`), and have it write every
        thread's traceback to the error log."""
        error_log.error("worker %d (pid %d) %s; its tracebacks follow, then it is %s",
                        worker.number, worker.pid, why, then)
        logs.flush()
        _kill(worker.pid, DUMP_SIGNAL)

    def _tell_systemd(self, now: float) -> None:
        """READY=1 once a reload is complete, STATUS= now and then, and the watchdog ping
        while workers are heard from."""
        notify = self.notify
        if not notify.enabled or self.handed_over:  # (a successor speaks for the service)
            return
        if self.reloading and not any(w.stop_when_replaced for w in self.workers.values()) \
                and sum(1 for w in self._active() if w.booted) >= self.size:
            self.reloading = False
            notify.ready(self._status_text())
        if now >= self.next_status:
            self.next_status = now + STATUS_INTERVAL
            text = self._status_text()
            if text != self.last_status:
                self.last_status = text
                notify.status(text)
        if notify.watchdog_interval and now >= self.next_watchdog and self._healthy(now):
            self.next_watchdog = now + notify.watchdog_interval
            notify.watchdog()

    def _healthy(self, now: float) -> bool:
        """Are the workers heard from? (A worker may be silent up to --timeout.) Until one has
        booted, the master's own loop running is all there is to check."""
        booted = [w for w in self.workers.values() if w.booted and not w.killed]
        if not booted:
            return True
        stale = self.cfg.timeout if self.cfg.timeout > 0 else WATCHDOG_STALE
        return any(now - w.last_seen <= stale for w in booted)

    def _status_text(self) -> str:
        served = self.served_by_gone + sum(w.served for w in self.workers.values())
        booted = sum(1 for w in self._active() if w.booted)
        return f"{booted} workers, {served} requests served"

    def _kill_worker(self, worker: WorkerProcess, reason: str) -> None:
        if self.workers.get(worker.pid) is not worker:
            return  # already reaped: its pid may belong to another process now
        if not worker.killed:
            error_log.error("killing worker %d (pid %d): %s", worker.number, worker.pid, reason)
        worker.killed = True
        worker.kill_reason = reason
        _kill(worker.pid, signal.SIGKILL)

    # -- stopping -----------------------------------------------------------------------------

    def _hand_over(self, reason: str) -> None:
        """TERM after a USR2 upgrade: the new master serves on. Under systemd this master
        (still the service's main process) names it the main process now, and says nothing
        more; it stops without a drain (the new master keeps the health checks green)."""
        self.handed_over = True
        self.notify.send(f"MAINPID={self.upgrade_pid}")
        self.stop(graceful=True, reason=f"{reason} (new master pid {self.upgrade_pid})")

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
        if not self.handed_over:  # (a successor speaks for the service now)
            self.notify.stopping()
        self.scoreboard.set_stopping()
        self._stop_watching()
        if self.stop_deadline is None:
            # New clients are refused at once instead of queueing for workers that are
            # leaving. (A new master from USR2 keeps its own copies of these sockets.)
            self._close_listeners()
        self.stop_deadline = deadline
        self.drain_until = None
        for worker in self.workers.values():
            worker.retiring = True
            _kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)

    def _stop_watching(self) -> None:
        if self.watcher is not None:
            self.selector.unregister(self.watcher.fileno())
            self.watcher.close()
            self.watcher = None

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            if not worker.killed:
                self._kill_worker(worker, "still running at the stop deadline")

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
        self._close_listeners()
        self._stop_watching()
        for server in self._servers():
            server.close()
        if self.statsd is not None:
            self.statsd.close()
        self.handoff.close()
        if self.pidfile is not None:
            self.pidfile.remove()
        signal.set_wakeup_fd(-1)
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
        handed_over = self.inherited_from and os.getppid() == self.inherited_from
        for listener in self.listeners:
            if handed_over:
                listener.owns_path = False  # the old master we came from still serves it
            listener.close()
        self.listeners = []

    def _set_title(self) -> None:
        setproctitle(f"forkserve: master [{self.cfg.app}] {self.size} workers")


def _backoff_delay(failures: int) -> float:
    """How long to wait before the next start after `failures` in a row: none after one,
    then BACKOFF_FIRST doubling up to BACKOFF_MAX."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2)) if failures > 1 else 0.0


def _record_only(signum: int, frame: object) -> None:
    """Signal handler: nothing to do, the wakeup fd has already recorded the signal."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _describe_wait(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with status {os.WEXITSTATUS(wait_status)}"


def _in_terminal_foreground() -> bool:
    """Is this process in the foreground of a terminal (where WINCH means a resize)?"""
    for fd in (0, 1, 2):
        try:
            foreground = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            continue
        if foreground:
            return True
    return False
