"""What every worker does after fork: signals, loading the app, reporting to the master.

A worker is created in the child right after `os.fork()` and `run()` returns the exit
status the child ends with. It never returns into the master's code.

Signals: TERM stops gracefully (stop accepting, finish what is in flight, exit); INT and
QUIT exit at once; USR1 reopens log files; USR2 makes faulthandler write the traceback of
every thread to the error log (the master sends it to a hung worker before killing it).

Every `tick_interval` (at most --timeout/4) the worker's loop sends the master a heartbeat
with its counters; a loop blocked in the app sends none, which is how the master sees a hang.
The tick also checks that the master lives and whether the worker should be recycled.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import random
import resource
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, Protocol, TypeVar

from setproctitle import setproctitle

from forkserve import channel, logs, proxy_protocol
from forkserve.config import Config
from forkserve.errors import EXIT_OK, StopNow
from forkserve.handoff import HandoffChannel
from forkserve.http import Limits, connection_factory
from forkserve.http.base import set_server_header
from forkserve.logs import error_log
from forkserve.metrics import RequestStats
from forkserve.proxy import TrustedProxies
from forkserve.scoreboard import Scoreboard
from forkserve.sockets import Listener


class _HasFd(Protocol):
    fd: int


C = TypeVar("C", bound=_HasFd)
DUMP_SIGNAL = signal.SIGUSR2
# Connections accepted per readiness event at most.
ACCEPT_BATCH = 16
# A worker holding this many connections more than an available peer (and an eighth more, see
# Scoreboard.has_lighter_peer) leaves new ones to the peer for ACCEPT_DEFER seconds, then
# accepts one anyway (the peer may be slow to wake). It looks again every DEFER_POLL seconds
# and takes connections as soon as no peer is lighter: no worker idles while they queue.
BALANCE_MARGIN = 2
ACCEPT_DEFER = 0.02
DEFER_POLL = 0.002
# At --worker-connections, how many of the connections idle longest are looked at for one to
# close (one with no bytes waiting) so as to take a new one.
EVICT_SCAN = 16
# How long accepting pauses when the process is out of file descriptors or memory.
RESOURCE_PAUSE = 0.5
# The I/O stall bound when --timeout is 0.
DEFAULT_IO_TIMEOUT = 60.0
# How long a lingering close (our side shut, the client's bytes discarded) may last.
LINGER_SECONDS = 2.0
# Bytes of a request body the app left unread that are read and discarded to keep the
# connection alive; a longer rest closes it.
MAX_DRAIN = 1 << 20
# On a graceful stop, how long open connections may still bring a request (answered with
# Connection: close). A client that sent one just as we stopped is served, not reset.
STOP_GRACE = 1.0
# Boot error texts longer than this (a huge traceback) are cut in the middle.
MAX_ERROR_TEXT = 65536


class ProxyHeaderReader:
    """Reads a PROXY protocol header off a non-blocking socket, consuming not one byte past
    it (a TLS handshake may follow, read by the ssl module from the socket itself)."""

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = b""

    def read(self, sock: socket.socket) -> proxy_protocol.ProxyHeader | None:
        """The header once complete, None while more bytes are needed.

        Raises ProxyProtocolError for a connection that does not start with a valid header
        (or closed before it ended), BlockingIOError when nothing can be read now, another
        OSError when it closed without sending a byte.
        """
        peeked = sock.recv(proxy_protocol.MAX_HEADER - len(self.received), socket.MSG_PEEK)
        if not peeked:
            if not self.received:  # a load balancer's TCP health check: nothing to report
                raise ConnectionAbortedError("closed before sending anything")
            raise proxy_protocol.ProxyProtocolError("closed before the PROXY header ended")
        seen = self.received + peeked
        header = proxy_protocol.parse(seen)
        # Everything before the header's end is header: take it off the socket.
        taken = len(peeked) if header is None else header.length - len(self.received)
        self.received += sock.recv(taken)
        return header


class BootFailed(Exception):
    """The worker cannot serve (e.g. the app's lifespan startup failed): report `text` to
    the master and exit with `status`."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class MasterGone(Exception):
    """The master exited or the pipe to it broke: the worker must stop."""


class Worker:
    """Base class of worker kinds; subclasses implement `serve()`.

    `app` is the loaded app and `interface` its kind ('wsgi', 'asgi3' or 'asgi2'); `tls` the
    SSL context of an HTTPS server (None: plain HTTP); `handoff` the channel through which
    workers pass each other connections (see forkserve.handoff).
    """

    def __init__(self, cfg: Config, listeners: list[Listener], channel_fd: int, number: int,
                 master_pid: int, scoreboard: Scoreboard, handoff: HandoffChannel,
                 app: Callable[..., Any], interface: str,
                 tls: ssl.SSLContext | None = None) -> None:
        self.cfg = cfg
        self.scoreboard = scoreboard
        self.handoff = handoff
        self.listeners = listeners
        self.channel_fd = channel_fd
        self.number = number
        self.master_pid = master_pid
        self.app = app
        self.interface = interface
        self.tls = tls
        self.alive = True
        self.served = 0
        self.in_flight = 0
        self._title_served = -1
        self.logs_to_reopen = False
        self.recycling = False
        self.accept_forced = False  # after a deferral ends, accept one even if a peer is lighter
        self.took_traffic = False  # accepted a connection yet (told to the master once)
        self.accept_pauses = 0  # accept() failed for want of descriptors or memory: how often
        self.accept_paused_at = 0.0  # and since when
        self.over_memory = False  # past --max-worker-memory: takes no more connections
        # Every response says Connection: close (once set, for good): keep-alive off, the
        # worker stopping or over memory; and while `server_stopping[0]` (--drain-delay).
        self.close_all = cfg.keep_alive <= 0
        self.server_stopping = scoreboard.stopping_flag
        # Request statistics, for the master's --metrics-bind, --statsd-host, control socket.
        self.stats = RequestStats() \
            if cfg.metrics_bind or cfg.statsd_host or cfg.control_socket else None
        self.memory_limit_kib = cfg.max_worker_memory * 1024
        self.max_requests = (
            cfg.max_requests + random.randint(0, cfg.max_requests_jitter)
            if cfg.max_requests else 0
        )
        timeout = cfg.timeout
        self.tick_interval = min(1.0, timeout / 4) if timeout > 0 else 1.0
        # What both worker kinds apply to every connection.
        self.limits = Limits(
            request_line=cfg.limit_request_line,
            header_count=cfg.limit_request_fields,
            header_field_size=cfg.limit_request_field_size,
            body_size=cfg.limit_request_body,
        )
        self.new_connection = connection_factory(cfg.http)  # Limits -> HTTPConnection
        self.proxies = TrustedProxies(cfg.forwarded_allow_ips)
        # How long a connection may wait idle for its next request (--keep-alive 0: a moment
        # for the first one).
        self.idle_timeout = cfg.keep_alive or 1.0
        # A new connection's first byte: --header-timeout, not --keep-alive, so that clients
        # that connect and send nothing are not kept for long.
        self.first_byte_timeout = (min(cfg.header_timeout, self.idle_timeout)
                                   if cfg.header_timeout else self.idle_timeout)
        # How long one read or write may wait on a slow client while a request is served.
        self.io_timeout = timeout / 2 if timeout > 0 else DEFAULT_IO_TIMEOUT
        set_server_header(cfg.server_header)
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)

    def run(self) -> int:
        """Serve until told to stop (reporting "booted" once accepting); return the exit
        status."""
        self._install_signals()
        self.set_title()
        try:
            self.serve()
            self._report()  # what it served since its last tick
        except MasterGone as exc:
            error_log.info("worker %d (pid %d): %s; exiting", self.number, os.getpid(), exc)
        except BootFailed as exc:
            return report_boot_failure(self.channel_fd, exc.status, exc.text)
        return EXIT_OK

    def serve(self) -> None:
        """Accept and serve until told to stop; call `report_booted()` once accepting."""
        raise NotImplementedError

    def report_booted(self) -> None:
        """Tell the master this worker has loaded the app and is accepting connections."""
        self._send(channel.encode(channel.BOOTED))

    def _report(self) -> None:
        """The heartbeat, with the counters (and the statistics, when they are asked for)."""
        self._send(channel.heartbeat(self.served, self.in_flight, self.held_connections()))
        if self.stats is not None:
            self._send(channel.encode(channel.STATS, self.stats.payload()))

    def _send(self, frame: bytes) -> None:
        try:
            channel.send(self.channel_fd, frame)
        except OSError as exc:
            raise MasterGone(f"lost its pipe to the master ({exc.strerror})") from None

    def accept_batch(self, listener: Listener, pause: Callable[[float, bool], None],
                     take: Callable[..., bool]) -> None:
        """Accept up to ACCEPT_BATCH connections from `listener` and `take(sock, peer,
        local=...)` each, while `take` says the worker takes more (`sock` is in blocking
        mode: the event loop's transports make it non-blocking and set TCP_NODELAY; `local`
        is the listener's `accepted_local`).
        Leaves new connections to a lighter peer for a moment (`pause(ACCEPT_DEFER, True)`:
        rebalancing, ended early once no peer is lighter), and pauses accepting when out of
        descriptors (`pause(RESOURCE_PAUSE, False)`)."""
        listening = listener.sock
        local = listener.accepted_local
        # socket.accept() makes the family and type enums for every connection, a third of
        # its cost: accept4 here, and the socket made from plain numbers.
        accept = listening._accept  # type: ignore[attr-defined]
        # (SOCK_NONBLOCK: the socket object's own timeout is 0, whatever the app set as
        # socket.setdefaulttimeout(); the descriptor stays blocking until the loop's
        # transport makes it non-blocking, and workers/direct.py reads with MSG_DONTWAIT.)
        family, proto = int(listening.family), listening.proto
        kind = int(listening.type) | socket.SOCK_NONBLOCK
        for _ in range(ACCEPT_BATCH):
            if self.accept_forced:
                self.accept_forced = False
            elif self.scoreboard.has_lighter_peer(self.number, BALANCE_MARGIN):
                pause(ACCEPT_DEFER, True)
                return
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays queued and the socket readable: pause instead of
                    # spinning, and say so once per episode.
                    if not self.accept_pauses:
                        self.accept_paused_at = time.monotonic()
                        error_log.error("cannot accept connections: %s; pausing %g s at a "
                                        "time until it can", exc.strerror, RESOURCE_PAUSE)
                    self.accept_pauses += 1
                    pause(RESOURCE_PAUSE, False)
                return
            if self.accept_pauses:
                error_log.warning("accepting connections again after %.1f s (%d pauses)",
                                  time.monotonic() - self.accept_paused_at, self.accept_pauses)
                self.accept_pauses = 0
            if not self.took_traffic:
                self.took_traffic = True
                self.scoreboard.mark_took_traffic(self.number)
            sock = socket.socket(family, kind, proto, fd)
            host = peer[0] if isinstance(peer, tuple) else None
            if self.cfg.proxy_protocol and not self.proxies.trusts(host):
                error_log.info("closed a connection from %s: a PROXY header is only believed "
                               "from --forwarded-allow-ips", host or "a unix socket")
                sock.close()
                continue
            if not take(sock, peer, local=local):
                return  # (serving it in this turn may have filled the worker)

    def tick(self) -> None:
        """Periodic duties: heartbeat with counters, title, logs, recycling, master alive.

        A request stuck past --timeout while the loop runs (`stuck_request`) is reported
        once: the master has this worker dump its tracebacks and replaces it (TERM once the
        replacement booted; the worker then stops without waiting for stuck requests)."""
        if os.getppid() != self.master_pid:
            raise MasterGone("the master is gone")
        self._report()
        if not self.recycling:
            stuck = self.stuck_request()
            if stuck:
                self.recycling = True
                self._send(channel.encode(channel.STUCK, stuck.encode("utf-8", "replace")))
        if self.served != self._title_served:
            self.set_title()
        if self.logs_to_reopen:
            self.logs_to_reopen = False
            failed = logs.reopen()  # the master reports a failure, once
            self._register_dump()
            if not failed:
                error_log.info("worker %d reopened its log files", self.number)
        if self.memory_limit_kib:
            self.check_memory()
        if not self.recycling:
            reason = self._recycle_reason()
            if reason:
                self.recycling = True
                self._send(channel.encode(channel.RECYCLE, reason.encode()))

    def stop_taking_connections(self) -> None:
        """Over --max-worker-memory: accept no new connection, and end keep-alive ones after
        their current response (each worker kind knows how)."""
        raise NotImplementedError

    def held_connections(self) -> int:
        """How many client connections this worker holds now."""
        raise NotImplementedError

    def stuck_request(self) -> str:
        """A request this worker's loop cannot end, running past --timeout (in a thread),
        or "" if none is."""
        return ""

    def _recycle_reason(self) -> str:
        if self.max_requests and self.served >= self.max_requests:
            return f"served {self.served} requests (--max-requests {self.cfg.max_requests})"
        return ""

    def check_memory(self) -> None:
        """With --max-worker-memory, called after each request and on every tick: a worker
        whose peak resident set size (getrusage, cheap enough for every request) went over it
        takes no more connections (`over_memory`; its kind stops accepting) and asks to be
        replaced at once, not at the next tick (a fast leak overshoots a second)."""
        if self.over_memory:
            return
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if peak <= self.memory_limit_kib:
            return
        self.over_memory = self.close_all = True
        self.stop_taking_connections()
        if not self.recycling:
            self.recycling = True
            reason = (f"resident memory reached {peak / 1024:.0f} MiB > --max-worker-memory "
                      f"{self.cfg.max_worker_memory}")
            self._send(channel.encode(channel.RECYCLE, reason.encode()))

    def set_title(self) -> None:
        self._title_served = self.served
        setproctitle(
            f"forkserve: worker {self.number} [{self.cfg.app}] {self.served} requests"
        )

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._graceful_stop)
        signal.signal(signal.SIGINT, self._quick_stop)
        signal.signal(signal.SIGQUIT, self._quick_stop)
        signal.signal(signal.SIGUSR1, self._reopen_logs)
        for name in ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGWINCH"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self._register_dump()

    def _register_dump(self) -> None:
        """USR2 → every thread's traceback, written by faulthandler straight to the error
        log's file descriptor, so it works even when the main thread is stuck in C code."""
        faulthandler.register(DUMP_SIGNAL, file=logs.error_stream() or sys.stderr,
                              all_threads=True, chain=False)

    def _reopen_logs(self, signum: int, frame: Any) -> None:
        self.logs_to_reopen = True

    def _graceful_stop(self, signum: int, frame: Any) -> None:
        tell_master_stopping(self.channel_fd, signum)
        self.alive = False

    def _quick_stop(self, signum: int, frame: Any) -> None:
        tell_master_stopping(self.channel_fd, signum)
        raise StopNow


def tell_master_stopping(channel_fd: int, signum: int) -> None:
    """Say that stop signal `signum` arrived, so that the master takes the exit that follows
    for a stop (Ctrl-C reaches every process of the group) rather than a crash. Safe in a
    signal handler: one small frame is one atomic write."""
    try:
        channel.send(channel_fd, channel.stopping(signum))
    except OSError:
        pass  # the master is gone: nobody to tell


def quiet_one(connections: Iterable[C]) -> C | None:
    """The first of `connections` (EVICT_SCAN at most, each with its socket's `fd`) with no
    bytes waiting to be read, or None. A connection whose request has arrived but is not read
    yet is not idle, however new: closing it would lose that request."""
    batch = [conn for conn in islice(connections, EVICT_SCAN) if conn.fd >= 0]
    if not batch:
        return None
    poller = select.poll()
    for conn in batch:
        poller.register(conn.fd, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(0)}
    for conn in batch:
        if conn.fd not in ready:
            return conn
    return None


def report_boot_failure(channel_fd: int, status: int, text: str) -> int:
    """Tell the master why this worker cannot serve; return `status` to exit with."""
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT // 2] + "\n[...]\n" + text[-MAX_ERROR_TEXT // 2:]
    try:
        channel.send(channel_fd, channel.boot_failed(status, text))
    except OSError:
        pass
    return status
