"""The ASGI worker: an asyncio (or uvloop) event loop serving HTTP/1.1 to an ASGI app.

The loop accepts on the shared listening sockets itself (so the scoreboard can spread
connections across workers, as in the sync worker), runs one `HTTPProtocol` per connection
and one task per request. The heartbeat is a loop timer: an app that blocks the loop stops
it, and the master then sees a hang and dumps the tracebacks.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from typing import Any

from forkserve.asgi import (
    ClientDisconnected,
    HTTPCycle,
    Lifespan,
    LifespanFailed,
    apply_forwarded,
    http_scope,
    wrap_asgi2,
)
from forkserve.errors import EXIT_BOOT, StopNow
from forkserve.http.base import (
    CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    Data,
    ProtocolError,
    Request,
    error_response,
)
from forkserve.logs import access_log, error_log, format_access_line
from forkserve.proxy import forwarded
from forkserve.proxy_protocol import ProxyHeader, ProxyProtocolError
from forkserve.tls import PLAIN_HTTP_EXPLAIN, is_plain_http, tls_extension
from forkserve.websocket import AVAILABLE as WEBSOCKET_AVAILABLE
from forkserve.websocket import SERVICE_RESTART, WebSocketSession, is_upgrade, websocket_scope
from forkserve.workers.base import (
    BALANCE_MARGIN,
    DEFER_POLL,
    LINGER_SECONDS,
    MAX_DRAIN,
    STOP_GRACE,
    BootFailed,
    ProxyHeaderReader,
    Worker,
    quiet_one,
)

# On a graceful stop, open WebSockets are closed, and responses still streaming without a
# Content-Length ended, this many seconds before --graceful-timeout ends (so that the worker
# can still run lifespan shutdown and exit by itself).
WS_CLOSE_MARGIN = 1.0
# How long lifespan shutdown may take on a graceful stop.
LIFESPAN_SHUTDOWN_SECONDS = 10.0


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop of `kind`: 'uvloop', 'asyncio', or 'auto' (uvloop when installed)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class AsyncioWorker(Worker):
    """Serves ASGI apps from one event loop per process."""

    accepting = False  # listeners registered with the loop
    serving = False  # booted and not stopping: a stop signal must wake its loop
    deferring = False  # accepting paused for a while (a lighter peer, or no descriptors)

    def serve(self) -> None:
        cfg = self.cfg
        self.asgi_app = wrap_asgi2(self.app) if self.interface == "asgi2" else self.app
        self.connections: set[HTTPProtocol] = set()
        # Connections waiting for a request that has not begun, longest waiting first.
        self.idle: dict[HTTPProtocol, None] = {}
        self.accepted = 0  # accepted sockets whose protocol is not set up yet
        self.stopping = False
        self.accepting = False
        self.warned_no_websocket = False
        self.access_log_format = cfg.access_log_format if cfg.access_logfile else None
        try:
            self.loop = new_event_loop(cfg.loop)
        except ImportError:
            raise BootFailed(EXIT_BOOT, "--loop uvloop: uvloop is not installed "
                                        "(pip install 'forkserve[fast]')") from None
        asyncio.set_event_loop(self.loop)
        quick_stop = False
        try:
            self.loop.run_until_complete(self._main())
        except StopNow:
            # The signal may have interrupted the loop anywhere (uvloop can be left
            # "running"): nothing more runs on it, the process exits now.
            quick_stop = True
            raise
        finally:
            if not quick_stop:
                _cancel_leftovers(self.loop)
                self.loop.close()

    async def _main(self) -> None:
        self.stopped = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.lifespan = Lifespan(self.asgi_app, self.cfg.lifespan)
        try:
            await self.lifespan.startup()
        except LifespanFailed as exc:
            raise BootFailed(EXIT_BOOT, str(exc)) from None
        if not self.alive:  # told to stop while starting up: undo what started
            await self.lifespan.shutdown(LIFESPAN_SHUTDOWN_SECONDS)
            return
        loop = self.loop
        loop.add_reader(self.wakeup_r, self._on_wakeup)
        for listener in self.listeners:
            listener.sock.setblocking(False)
        self._set_accepting(True)
        self._publish()  # from now on peers may leave connections to this worker
        self._tick()
        self.serving = True
        self.report_booted()
        await self.stopped.wait()
        await self._drain()
        await self.lifespan.shutdown(LIFESPAN_SHUTDOWN_SECONDS)

    # -- signals, heartbeat, stopping ---------------------------------------------------------

    def _graceful_stop(self, signum: int, frame: Any) -> None:
        super()._graceful_stop(signum, frame)
        # uvloop replaces the signal wakeup fd with its own while it runs, so wake the loop
        # explicitly rather than through the worker's wakeup pipe.
        if self.serving:
            self.loop.call_soon_threadsafe(self._begin_stop)

    def _on_wakeup(self) -> None:
        try:
            os.read(self.wakeup_r, 4096)
        except BlockingIOError:
            pass
        if not self.alive:
            self._begin_stop()

    def _tick(self) -> None:
        try:
            self.tick()
        except Exception as exc:  # the master is gone or the pipe broke: stop now
            error_log.info("worker %d (pid %d): %s; exiting", self.number, os.getpid(), exc)
            self.alive = False
            self._begin_stop()
            return
        if not self.alive:
            self._begin_stop()
        self.loop.call_later(self.tick_interval, self._tick)

    def _begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.serving = False  # a second stop signal has nothing to wake (the loop may close)
        self._set_accepting(False)
        for listener in self.listeners:
            listener.sock.close()
        for protocol in list(self.connections):
            protocol.begin_stop()
        self.loop.call_later(max(0.0, self.cfg.graceful_timeout - WS_CLOSE_MARGIN),
                             self._stop_deadline)
        self.stopped.set()

    def _stop_deadline(self) -> None:
        for protocol in list(self.connections):
            protocol.end_now()

    async def _drain(self) -> None:
        """Wait for open connections to finish, and accepted ones still reading a PROXY
        header or doing a TLS handshake, for --graceful-timeout at most (the master kills a
        worker still running then; one whose master is gone must end by itself)."""
        if not (self.connections or self.accepted):
            return
        try:
            await asyncio.wait_for(self.all_closed.wait(), self.cfg.graceful_timeout)
        except asyncio.TimeoutError:
            error_log.warning("worker %d: %d connections still open after --graceful-timeout "
                              "%g s; closing them", self.number, len(self.connections),
                              self.cfg.graceful_timeout)
            for protocol in list(self.connections):
                protocol.abort()

    # -- accepting ------------------------------------------------------------------------------

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for listener in self.listeners:
            if on:
                self.loop.add_reader(listener.sock.fileno(), self._accept, listener.sock)
            else:
                self.loop.remove_reader(listener.sock.fileno())

    def _resume_accepting(self, forced: bool = True) -> None:
        """End a pause of accepting; `forced`: accept one connection even if a peer is
        lighter (it may be slow to wake)."""
        self.deferring = False
        if not self.stopping and self._has_room():
            self.accept_forced = forced
            self._set_accepting(True)

    def _pause_accepting(self, seconds: float, rebalancing: bool) -> None:
        self.deferring = True  # ended by the timer below, or by a connection closing
        self._set_accepting(False)
        if rebalancing:
            self._poll_deferral(self.loop.time() + seconds)
        else:
            self.loop.call_later(seconds, self._resume_accepting)

    def _poll_deferral(self, until: float) -> None:
        """A rebalancing pause ends at `until` (loop time), or as soon as no peer is lighter
        (looked at every DEFER_POLL): no worker idles while connections queue."""
        if not self.deferring:
            return  # ended already
        if self.loop.time() >= until:
            self._resume_accepting()
        elif not self.scoreboard.has_lighter_peer(self.number, BALANCE_MARGIN):
            self._resume_accepting(forced=False)
        else:
            self.loop.call_later(DEFER_POLL, self._poll_deferral, until)

    def _accept(self, listening: socket.socket) -> None:
        self.accept_batch(listening, self._pause_accepting, self._take)

    def _take(self, sock: socket.socket, peer: Any) -> None:
        if not self._below_limit():
            # Idle connections must not lock out new clients (thousands that connect and
            # send nothing): the one idle longest makes room.
            oldest = quiet_one(self.idle)
            if oldest is not None:
                del self.idle[oldest]
                oldest.close()
        self.accepted += 1
        self._publish()  # count it now: peers must see this worker's load at once
        self.loop.create_task(self._connect(sock))
        if not self._has_room():
            self._set_accepting(False)  # connection_closed starts again once one is gone

    def _has_room(self) -> bool:
        """May this worker take another connection? At --worker-connections it still may
        when it can close an idle connection for it."""
        return not self.over_memory and (
            self._below_limit() or quiet_one(self.idle) is not None)

    def _below_limit(self) -> bool:
        return len(self.connections) + self.accepted < self.cfg.worker_connections

    async def _readable(self, sock: socket.socket, timeout: float) -> None:
        """Wait until `sock` is readable; raises TimeoutError after `timeout` seconds."""
        ready = self.loop.create_future()
        fd = sock.fileno()
        self.loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, timeout))
        finally:
            self.loop.remove_reader(fd)

    async def _proxy_header(self, sock: socket.socket, deadline: float) -> ProxyHeader:
        """Read the PROXY protocol header the connection must start with, by `deadline`
        (loop time)."""
        reader = ProxyHeaderReader()
        while True:
            try:
                header = reader.read(sock)
            except BlockingIOError:
                header = None
            if header is not None:
                return header
            await self._readable(sock, deadline - self.loop.time())

    async def _starts_tls(self, sock: socket.socket, deadline: float) -> bool:
        """Wait for the first byte of the client's TLS handshake (by `deadline`, loop time):
        True when it comes. A client speaking plain HTTP is answered 400 (in plain text)
        and the socket closed; one that leaves is closed."""
        await self._readable(sock, deadline - self.loop.time())
        first = sock.recv(1, socket.MSG_PEEK)
        if first and not is_plain_http(first):
            return True
        try:
            if not first:
                return False
            sock.send(error_response(400, PLAIN_HTTP_EXPLAIN))
            sock.shutdown(socket.SHUT_WR)
            # Read what the client sent before closing: unread bytes would make the kernel
            # reset the connection and destroy the answer.
            while await asyncio.wait_for(self.loop.sock_recv(sock, 65536), STOP_GRACE):
                pass
        finally:
            sock.close()
        return False

    async def _connect(self, sock: socket.socket) -> None:
        """Run an HTTPProtocol on an accepted socket; first read its PROXY header and do the
        TLS handshake when the server wants them. As in the sync worker, the client has
        --keep-alive to send its first byte, then --header-timeout for all that (the request
        head's own bound starts once the protocol runs)."""
        tls = self.tls
        header = None
        deadline = 0.0  # for the PROXY header and the TLS handshake (loop time)
        try:
            if self.cfg.proxy_protocol or tls is not None:
                cfg = self.cfg
                await self._readable(sock, self.first_byte_timeout)
                deadline = self.loop.time() + (cfg.header_timeout or self.idle_timeout)
                if cfg.proxy_protocol:
                    header = await self._proxy_header(sock, deadline)
                if tls is not None and not await self._starts_tls(sock, deadline):
                    return
            await self.loop.connect_accepted_socket(
                lambda: HTTPProtocol(self, header), sock, ssl=tls,
                ssl_handshake_timeout=max(0.001, deadline - self.loop.time()) if tls else None)
        except (OSError, asyncio.TimeoutError, ProxyProtocolError) as exc:
            if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLZeroReturnError):
                error_log.debug("TLS handshake failed: %s", exc)
            elif isinstance(exc, ProxyProtocolError):
                error_log.info("closed a connection: %s", exc)
            sock.close()
        finally:
            self.accepted -= 1
            self._publish()
            if self.stopping:
                self._check_all_closed()
            elif not self.accepting and not self.deferring and self._has_room():
                self._set_accepting(True)

    def stop_taking_connections(self) -> None:
        # Responses say Connection: close from now on (_start_cycle reads over_memory).
        self._set_accepting(False)

    def _publish(self) -> None:
        self.scoreboard.set(self.number, len(self.connections) + self.accepted)

    def connection_opened(self, protocol: HTTPProtocol) -> None:
        self.connections.add(protocol)

    def now_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol` waits for a request: at --worker-connections it can make room for a
        new connection, so a worker that stopped accepting may start again."""
        self.idle[protocol] = None
        if not self.accepting and not self.deferring and not self.stopping \
                and self._has_room():
            self._set_accepting(True)

    def not_idle(self, protocol: HTTPProtocol) -> None:
        """`protocol`'s next request has begun: it can no longer make room for a new
        connection, so a worker at --worker-connections may have to stop accepting."""
        if self.idle.pop(protocol, 0) is None and self.accepting and not self._has_room():
            self._set_accepting(False)  # connection_closed starts again once one is gone

    def connection_closed(self, protocol: HTTPProtocol) -> None:
        self.connections.discard(protocol)
        self.idle.pop(protocol, None)
        self._publish()
        if self.stopping:
            self._check_all_closed()
        elif not self.accepting and self._has_room():
            self._resume_accepting(forced=False)  # also ends a pause: a descriptor is free

    def _check_all_closed(self) -> None:
        if not self.connections and not self.accepted:
            self.all_closed.set()


class HTTPProtocol(asyncio.Protocol):
    """One client connection: bytes to the parser, requests to `HTTPCycle` tasks."""

    def __init__(self, worker: AsyncioWorker, proxy_header: ProxyHeader | None = None) -> None:
        self.worker = worker
        self.proxy_header = proxy_header
        self.loop = worker.loop
        self.conn = worker.new_connection(worker.limits)
        self.transport: asyncio.Transport | None = None
        self.cycle: HTTPCycle | None = None
        self.ws: WebSocketSession | None = None
        self.request: Request | None = None
        self.started = 0.0
        self.discarding = False  # reading and dropping a body the app did not read
        self.discarded = 0
        self.reading_paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.client: Any = None
        self.server: Any = None
        self.trusted = False  # the peer is a trusted proxy: believe its forwarded headers
        self.tls: dict[str, Any] | None = None  # the ASGI TLS extension, on HTTPS
        self.head_started = False  # the next request's first bytes have arrived
        self.fd = -1  # the socket's descriptor

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if sock is not None and sock.family == socket.AF_UNIX:
            self.client, self.server = None, (local or "", None)
        elif peer is None or local is None:  # reset before the transport could ask
            self.closed = True
            transport.abort()
            return
        else:
            self.client, self.server = tuple(peer[:2]), tuple(local[:2])
        self.trusted = self.worker.proxies.trusts(self.client[0] if self.client else None)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = tls_extension(ssl_object)
        header = self.proxy_header
        if header is not None and header.client is not None:
            self.client = header.client
        self.worker.connection_opened(self)
        self._wait_for_request(self.worker.first_byte_timeout)
        if self.worker.stopping:
            self.begin_stop()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.receive_data(data)
            return
        self.conn.receive_data(data)
        self._process()
        # The keep-alive timer runs on until a whole request head is in; once a head has
        # begun it must be complete within --header-timeout (slowloris).
        header_timeout = self.worker.cfg.header_timeout
        if self.cycle is None and self.ws is None and not self.head_started \
                and not self.closed and header_timeout:
            self.head_started = True
            self.worker.not_idle(self)
            if self.timer is None or self.timer.when() > self.loop.time() + header_timeout:
                self._cancel_timer()
                self.timer = self.loop.call_later(header_timeout, self.close)

    def eof_received(self) -> bool:
        if self.ws is not None:
            self.ws.receive_data(None)
            return False
        self.conn.receive_data(b"")
        if self.cycle is not None and self.cycle.client_eof():
            self.transport.abort()  # it left during the response: drop what waits for it
            return False
        self._process()
        # Keep our side open to finish a response in progress (TLS cannot half-close).
        return self.tls is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.cycle is not None:
            self.cycle.disconnect()
        if self.ws is not None:
            self.ws.connection_lost()
        self.writable.set()
        self.worker.connection_closed(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- Output (what the cycle writes through) -------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and data:
            self.transport.write(data)

    @property
    def closing(self) -> bool:
        return self.closed or self.transport.is_closing()

    async def drain(self) -> None:
        if not self.writable.is_set():
            try:
                await asyncio.wait_for(self.writable.wait(), self.worker.io_timeout)
            except asyncio.TimeoutError:  # the client stopped reading: give up on it
                self.transport.abort()
                raise ClientDisconnected(
                    f"client stalled for {self.worker.io_timeout:g} s") from None

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
            self.loop.call_soon(self._process)

    def close(self) -> None:
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, whatever is buffered for it."""
        if not self.closed:
            self.transport.abort()

    # -- parsing ----------------------------------------------------------------------------------

    def _process(self) -> None:
        """Pull events from the parser until it needs bytes or must wait for a response."""
        conn = self.conn
        while not self.closing:
            cycle = self.cycle
            if cycle is not None and cycle.body_complete and not self.discarding:
                # The request is read; the next one waits for this response. Bytes pipelined
                # meanwhile are kept up to a request head's worth, then reading pauses.
                if conn.buffered() > self.worker.limits.head_size and not self.reading_paused:
                    self.reading_paused = True
                    self.transport.pause_reading()
                return
            if cycle is not None and not self.discarding and not cycle.wants_body:
                self.reading_paused = True
                self.transport.pause_reading()
                return
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                self._reject(exc)
                return
            kind = type(event)
            if kind is Data:
                if not self.discarding:
                    cycle.feed_body(event.data)
                else:
                    self.discarded += len(event.data)
                    if self.discarded > MAX_DRAIN:
                        self.close()
                        return
            elif event is END_OF_MESSAGE:
                if self.discarding:
                    self.discarding = False
                    self._cancel_timer()
                    self._next_cycle()
                else:
                    cycle.feed_end()
            elif kind is Request:
                if is_upgrade(event):
                    self._upgrade(event)
                    return
                self._start_cycle(event)
            elif event is NEED_DATA:
                return
            elif event is CLOSED:
                self.close()
                return
            else:  # PAUSED: a response is still in progress
                return

    def _start_cycle(self, request: Request) -> None:
        worker = self.worker
        worker.not_idle(self)
        scope = self._completed(request, http_scope(
            request, self.client, self.server, worker.cfg.root_path,
            worker.lifespan.state if worker.lifespan.supported else None))
        close = worker.stopping or worker.over_memory or worker.cfg.keep_alive <= 0
        self._cancel_timer()
        self.request = request
        self.started = time.time() if worker.access_log_format else 0.0
        self.cycle = HTTPCycle(scope, self.conn, self, close, self._response_complete,
                               worker.io_timeout)
        if worker.stopping:
            self.cycle.stop()
        worker.in_flight += 1
        worker.served += 1
        self.loop.create_task(self._run(self.cycle))

    def _completed(self, request: Request, scope: dict[str, Any]) -> dict[str, Any]:
        """`scope` with what the connection adds: TLS (scheme, extension; or TLS at the load
        balancer, per its PROXY header), then what a trusted proxy's headers say (which
        may change the scheme back)."""
        if self.tls is not None:
            scope.setdefault("extensions", {})["tls"] = self.tls
        if self.tls is not None or (self.proxy_header is not None and self.proxy_header.tls):
            scope["scheme"] += "s"  # http → https, ws → wss
        if self.trusted and request.proxy_headers:
            apply_forwarded(scope, forwarded(request.headers, self.worker.proxies))
        return scope

    async def _run(self, cycle: HTTPCycle) -> None:
        worker = self.worker
        try:
            await cycle.run(worker.asgi_app)
        finally:
            worker.in_flight -= 1
            if worker.memory_limit_kib and not worker.over_memory:
                worker.check_memory()

    def _upgrade(self, request: Request) -> None:
        """Hand the connection to a WebSocket session (or refuse: no wsproto)."""
        worker = self.worker
        if not WEBSOCKET_AVAILABLE:
            if not worker.warned_no_websocket:
                worker.warned_no_websocket = True
                error_log.warning("refusing WebSocket requests: wsproto is not installed "
                                  "(pip install 'forkserve[ws]')")
            self.write(error_response(501, "WebSocket support is not installed"))
            self.close()
            return
        try:
            while self.conn.next_event() is END_OF_MESSAGE:
                pass  # a GET has no body: the parser now waits for the protocol switch
        except ProtocolError as exc:
            self._reject(exc)
            return
        self._cancel_timer()
        worker.not_idle(self)
        cfg = worker.cfg
        scope = self._completed(request, websocket_scope(
            request, self.client, self.server, cfg.root_path,
            worker.lifespan.state if worker.lifespan.supported else None))
        self.ws = WebSocketSession(scope, request, self, cfg.ws_max_size, cfg.ws_ping_interval,
                                   cfg.ws_ping_timeout)
        worker.in_flight += 1
        worker.served += 1
        self.loop.create_task(self._run_websocket(self.ws, self.conn.trailing_data()))

    async def _run_websocket(self, session: WebSocketSession, leftover: bytes) -> None:
        if leftover:
            session.receive_data(leftover)
        try:
            await session.run(self.worker.asgi_app)
        finally:
            self.worker.in_flight -= 1

    def _response_complete(self, cycle: HTTPCycle) -> None:
        self._log_access(cycle)
        if self.closing or cycle.failed:
            return
        if not cycle.body_complete:
            if self.conn.client_waiting_for_continue:
                self.close()  # it never sent the body; the response said Connection: close
                return
            if not self.conn.will_close():
                self._discard_body(self.worker.io_timeout)  # then go on with the next request
            elif self.transport.can_write_eof():
                # The response ended the connection: shut our side, and discard what comes
                # for a moment (closing with unread bytes would make the kernel reset the
                # connection, and the client could lose the response).
                self.transport.write_eof()
                self._discard_body(LINGER_SECONDS)
            else:  # TLS cannot half-close
                self.close()
            return
        self._next_cycle()

    def _discard_body(self, seconds: float) -> None:
        """Read and drop the rest of a body the app did not read: at most MAX_DRAIN bytes,
        for at most `seconds`, after which the connection is closed."""
        self.discarding = True
        self.discarded = 0
        self.timer = self.loop.call_later(seconds, self.close)
        self.resume_reading()
        self._process()

    def _next_cycle(self) -> None:
        self.cycle = None
        if not self.conn.start_next_cycle():
            self.close()
            return
        self._wait_for_request()
        self.resume_reading()  # if pipelined bytes had filled the buffer
        self._process()

    def _reject(self, exc: ProtocolError) -> None:
        error_log.debug("refused request: %s %s", exc.status, exc.detail)
        if self.cycle is not None and self.cycle.head_sent:
            self.close()
            return
        if self.cycle is not None:
            self.cycle.disconnect()  # the app must not answer a request that broke
        self.write(error_response(exc.status, exc.explain))
        self.close()

    def _log_access(self, cycle: HTTPCycle) -> None:
        if not self.started or self.request is None:
            return
        request, scope = self.request, cycle.scope
        access_log.info(format_access_line(
            self.worker.access_log_format,
            remote=self.client[0] if self.client else "",
            method=scope["method"],
            target=request.target.decode("latin-1"),
            version=scope["http_version"],
            status=cycle.status,
            sent=cycle.sent,
            started=self.started,
            duration=time.time() - self.started,
            request_headers=request.headers,
            response_headers=cycle.headers,
        ))
        self.started = 0.0

    # -- timers and stopping ----------------------------------------------------------------------

    def _wait_for_request(self, timeout: float = 0.0) -> None:
        """Wait for the next request for `timeout` seconds (default: the idle timeout
        between keep-alive requests; STOP_GRACE once stopping)."""
        self.head_started = False
        worker = self.worker
        worker.now_idle(self)
        self.timer = self.loop.call_later(
            STOP_GRACE if worker.stopping else timeout or worker.idle_timeout, self.close)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def begin_stop(self) -> None:
        """Graceful stop: a request in progress finishes, but an event stream (SSE) is ended
        (`HTTPCycle.stop`); an idle connection gets STOP_GRACE seconds to bring one more
        (answered with Connection: close). A WebSocket stays open until `end_now`."""
        if self.cycle is not None:
            self.cycle.stop()
        elif self.ws is None:
            self._cancel_timer()
            self._wait_for_request()

    def end_now(self) -> None:
        """--graceful-timeout is about to run out: a WebSocket is closed with 1012 (service
        restart), a response streaming without a Content-Length is ended (`HTTPCycle.stop`);
        a request still to answer may yet do so."""
        if self.ws is not None:
            self.ws.close(SERVICE_RESTART, "server restarting")
        elif self.cycle is not None:
            self.cycle.stop(deadline=True)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel tasks still running when the worker stops (an app's background work)."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
