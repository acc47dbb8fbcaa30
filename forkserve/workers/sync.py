"""The sync worker: a selector loop that accepts and reads request heads, and calls a WSGI app.

The loop owns every socket while it waits: listeners, idle keep-alive connections and
connections whose head is still arriving cost no thread. When a request head is complete,
the connection is served inline (`--threads 1`: the app runs in the loop, which therefore
stops heartbeating if the app hangs) or handed to a pool of `--threads` threads, which hands
it back to the loop through a wakeup pipe when it is waiting for its next request.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from forkserve.http.base import NEED_DATA, ProtocolError, Request
from forkserve.logs import error_log
from forkserve.scoreboard import UNAVAILABLE
from forkserve.workers.base import (
    BALANCE_MARGIN,
    DEFER_POLL,
    LINGER_SECONDS,
    STOP_GRACE,
    Worker,
    quiet_one,
)
from forkserve.workers.connection import (
    DONE,
    LINGER,
    READ,
    ClientConnection,
    ServerContext,
)

_ACCEPT = "accept"
_WAKEUP = "wakeup"


class SyncWorker(Worker):
    """Serves WSGI apps: one selector loop per process, optionally a thread pool."""

    def serve(self) -> None:
        cfg = self.cfg
        threads = cfg.threads
        self.ctx = ServerContext(
            self.app,
            io_timeout=self.io_timeout,
            multithread=threads > 1,
            access_log_format=cfg.access_log_format if cfg.access_logfile else None,
            keep_alive=cfg.keep_alive > 0,
            # Inline, a request waiting on a slow client is not a hung app: keep heartbeating.
            on_wait=self._heartbeat_if_due if threads == 1 else None,
            root_path=cfg.root_path,
            proxies=self.proxies,
        )
        self.selector = selectors.DefaultSelector()
        self.pool = ThreadPoolExecutor(threads, "forkserve") if threads > 1 else None
        self.handed_back: deque[tuple[ClientConnection, str]] = deque()
        self.in_threads: set[ClientConnection] = set()  # being served by the pool
        self.waiting: dict[ClientConnection, float] = {}  # connection -> when it expires
        self.lingering: dict[ClientConnection, float] = {}
        self.accepting = False
        self.accept_resume_at = 0.0  # when a pause of accepting ends (0: none)
        self.rebalancing = False  # that pause leaves connections to a lighter peer
        self.stop_deadline = 0.0  # set by a graceful stop: open connections close by then
        for listener in self.listeners:
            listener.sock.setblocking(False)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, _WAKEUP)
        self._set_accepting(True)
        self.report_booted()
        try:
            self._loop()
        finally:
            self._shutdown()

    def _loop(self) -> None:
        select = self.selector.select
        self.next_tick = 0.0
        while self.alive or self.waiting or self.lingering or (
                self.in_flight > len(self._stuck_in_threads())):
            now = time.monotonic()
            if now >= self.next_tick:
                self.tick()
                self._expire(now)
            if not self.alive:
                self._begin_stop()
            wake_at = self.next_tick
            self._publish()
            if self.accept_resume_at:
                # A pause ends at its time; a rebalancing one also as soon as no peer is
                # lighter any more (looked at every DEFER_POLL): never idle while
                # connections queue.
                if now >= self.accept_resume_at:
                    self._resume_accepting(forced=True)
                elif self.rebalancing and not self.scoreboard.has_lighter_peer(
                        self.number, BALANCE_MARGIN):
                    self._resume_accepting(forced=False)
                else:
                    wake_at = min(wake_at, self.accept_resume_at,
                                  now + DEFER_POLL if self.rebalancing else wake_at)
            elif not self.accepting and self.alive and self._has_room():
                self._set_accepting(True)
            for key, _ in select(max(0.0, wake_at - now)):
                data = key.data
                if type(data) is ClientConnection:
                    self._readable(data)
                elif data is _ACCEPT:
                    self._accept(key.fileobj)
                else:
                    self._wakeup()

    # -- accepting --------------------------------------------------------------------------

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for listener in self.listeners:
            if on:
                self.selector.register(listener.sock, selectors.EVENT_READ, _ACCEPT)
            else:
                self.selector.unregister(listener.sock)

    def _publish(self) -> None:
        """Tell peers, through the scoreboard, how many connections this worker holds."""
        if self.in_flight >= self.cfg.threads:
            load = UNAVAILABLE
        else:
            load = len(self.waiting) + len(self.lingering) + self.in_flight
        self.scoreboard.set(self.number, load)

    def _resume_accepting(self, forced: bool) -> None:
        """End a deferral; `forced`: accept one connection even if a peer is lighter (it may
        be slow to wake)."""
        self.accept_resume_at = 0.0
        self.accept_forced = forced
        if self.alive and self._has_room():
            self._set_accepting(True)

    def _has_room(self) -> bool:
        """May this worker take another connection (--worker-connections, free threads)? At
        --worker-connections it still may when it can close an idle connection for it."""
        if self.in_flight >= self.cfg.threads or self.over_memory:
            return False
        return not self._full() or self._oldest_idle() is not None

    def _full(self) -> bool:
        held = len(self.waiting) + len(self.lingering) + self.in_flight
        return held >= self.cfg.worker_connections

    def _oldest_idle(self) -> ClientConnection | None:
        """The connection waiting longest for a request that has not begun (a new one that
        sent nothing, or keep-alive between requests) and has no bytes waiting, if any.
        `waiting` is in the order connections began to wait."""
        return quiet_one(conn for conn in self.waiting if not conn.head_started)

    def _accept(self, listening: socket.socket) -> None:
        self.accept_batch(listening, self._pause_accepting, self._take)

    def stop_taking_connections(self) -> None:
        self._set_accepting(False)
        self.ctx.stopping = True  # responses say Connection: close: clients move elsewhere

    def _pause_accepting(self, seconds: float, rebalancing: bool) -> None:
        self._set_accepting(False)
        self.accept_resume_at = time.monotonic() + seconds
        self.rebalancing = rebalancing

    def _take(self, sock: socket.socket, peer: Any) -> None:
        if self._full():
            # Idle connections must not lock out new clients (thousands that connect and send
            # nothing): the one idle longest makes room.
            idle = self._oldest_idle()
            if idle is not None:
                self._forget(idle)
                idle.close()
        conn = ClientConnection(sock, peer, self.new_connection(self.limits), self.ctx, self.tls,
                                self.cfg.proxy_protocol)
        self.selector.register(conn.fd, selectors.EVENT_READ, conn)
        self._wait_for_request(conn, self.first_byte_timeout)
        self._publish()
        if not self._has_room():
            self._set_accepting(False)  # the loop starts again once a connection is gone

    # -- reading request heads --------------------------------------------------------------

    def _wait_for_request(self, conn: ClientConnection, timeout: float = 0.0) -> None:
        """Wait for the next request on `conn` for `timeout` seconds (default: the idle
        timeout between keep-alive requests)."""
        conn.head_started = False
        expires = time.monotonic() + (timeout or self.idle_timeout)
        self.waiting[conn] = min(expires, self.stop_deadline) if self.stop_deadline else expires

    def _readable(self, conn: ClientConnection) -> None:
        if conn in self.lingering:
            if conn.receive() == b"":
                self._forget(conn)
                conn.close()
            return
        try:
            data = conn.receive()
            if data is None:  # a TLS handshake under way
                self._head_begun(conn)
                return
            conn.proto.receive_data(data)
            event = conn.proto.next_event()
        except ProtocolError as exc:
            self._after(conn, conn.reject(exc))
            return
        if type(event) is Request:
            self._dispatch(conn, event)
        elif event is not NEED_DATA:
            self._forget(conn)
            conn.close()
        elif data:
            self._head_begun(conn)

    def _head_begun(self, conn: ClientConnection) -> None:
        """A request head (or the TLS handshake before it) has begun: it must be complete
        within --header-timeout (slowloris)."""
        if self.cfg.header_timeout and not conn.head_started:
            conn.head_started = True
            self.waiting[conn] = min(self.waiting[conn],
                                     time.monotonic() + self.cfg.header_timeout)

    def _dispatch(self, conn: ClientConnection, request: Request) -> None:
        del self.waiting[conn]
        self.in_flight += 1
        if self.pool is None:
            # The loop is blocked in the app: peers must not wait for it to accept, and if it
            # hangs the master can tell which request it was serving.
            self.scoreboard.serving(self.number, request.method + b" " + request.target)
            outcome = conn.serve(request)
            self.scoreboard.served(self.number)
            self.in_flight -= 1
            self._after(conn, outcome, registered=True)
            return
        self.selector.unregister(conn.fd)
        conn.begin(request)  # it counts from now, waiting for a free thread included
        self.in_threads.add(conn)
        self.pool.submit(self._serve_in_thread, conn, request)
        if not self._has_room():
            self._set_accepting(False)  # let other workers take new connections

    def _serve_in_thread(self, conn: ClientConnection, request: Request) -> None:
        try:
            outcome = conn.serve(request)
        except BaseException:  # serve() handles errors itself; this is a last resort
            error_log.exception("unexpected error serving a connection")
            conn.close()
            outcome = DONE
        self.handed_back.append((conn, outcome))
        try:
            os.write(self.wakeup_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is being woken anyway

    def _wakeup(self) -> None:
        try:
            os.read(self.wakeup_r, 4096)
        except BlockingIOError:
            pass
        while self.handed_back:
            conn, outcome = self.handed_back.popleft()
            self.in_threads.discard(conn)
            self.in_flight -= 1
            self._after(conn, outcome, registered=False)

    def _after(self, conn: ClientConnection, outcome: str, registered: bool = True) -> None:
        """Put a connection where `outcome` says: back to waiting, lingering, or gone."""
        if self.memory_limit_kib and not self.over_memory:
            self.check_memory()
        if outcome == DONE:
            if registered:
                self._forget(conn)
            return
        if not registered:
            self.selector.register(conn.fd, selectors.EVENT_READ, conn)
        if outcome == READ:
            self._wait_for_request(conn)
        elif outcome == LINGER:
            self.waiting.pop(conn, None)
            self.lingering[conn] = time.monotonic() + LINGER_SECONDS
        else:
            self._forget(conn)
            conn.close()

    def _forget(self, conn: ClientConnection) -> None:
        self.waiting.pop(conn, None)
        self.lingering.pop(conn, None)
        try:
            self.selector.unregister(conn.fd)
        except (KeyError, ValueError):
            pass

    # -- time and stopping ------------------------------------------------------------------

    def tick(self) -> None:
        self.served = self.ctx.served
        super().tick()
        self.next_tick = time.monotonic() + self.tick_interval

    def stuck_request(self) -> str:
        stuck = self._stuck_in_threads()
        if not stuck:
            return ""
        oldest = min(stuck, key=lambda conn: conn.started)
        line = (oldest.request.method + b" " + oldest.request.target).decode("latin-1")
        return (f"stuck in {line!r} in a thread for "
                f"{time.monotonic() - oldest.started:.1f} s (limit {self.cfg.timeout:g} s)")

    def _stuck_in_threads(self) -> list[ClientConnection]:
        """Connections whose request has run in a pool thread past --timeout."""
        timeout = self.cfg.timeout
        if not self.in_threads or timeout <= 0:
            return []
        since = time.monotonic() - timeout
        return [conn for conn in self.in_threads if conn.started < since]

    def _heartbeat_if_due(self) -> None:
        if time.monotonic() >= self.next_tick:
            self.tick()

    def _expire(self, now: float) -> None:
        """Close connections idle past --keep-alive and lingering closes past their time."""
        for table in (self.waiting, self.lingering):
            expired = [conn for conn, deadline in table.items() if deadline <= now]
            for conn in expired:
                self._forget(conn)
                conn.close()

    def _begin_stop(self) -> None:
        """Graceful stop: accept nothing new; requests in flight finish, and open connections
        get STOP_GRACE seconds to bring one more request, answered with Connection: close."""
        if self.stop_deadline:
            return
        self.ctx.stopping = True
        self.accept_resume_at = 0.0
        self._set_accepting(False)
        for listener in self.listeners:
            listener.sock.close()
        self.stop_deadline = time.monotonic() + STOP_GRACE
        for conn, expires in self.waiting.items():
            self.waiting[conn] = min(expires, self.stop_deadline)

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.selector.close()
