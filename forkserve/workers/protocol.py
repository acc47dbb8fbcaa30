"""One client connection on a worker's event loop: bytes to the parser, requests to the app.

`HTTPProtocol` is the connection layer of both interfaces. It feeds what the client sends to
the HTTP connection (`forkserve.http`), and hands each request to a cycle of the app's
interface: `asgi.HTTPCycle` (a task per request) or `wsgi.WSGICycle` (the app called inline
or in a pool thread, see `AsyncioWorker.run_wsgi`). It owns the connection's timers (idle,
--header-timeout), flow control (pipelined bytes, unread bodies, a client that does not read)
and the end of each exchange: next request, discard of an unread body, or close.

Elsewhere, called from here: the switch to a WebSocket session (workers/websocket_upgrade.py),
the answers refusing a request (workers/refusals.py), the record of each exchange
(workers/records.py), and what decides whether a peer worker may take the connection over
(workers/handover.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from forkserve.asgi import (
    BODY_HIGH_WATER,
    ASGIApp,
    ClientDisconnected,
    HTTPCycle,
    apply_forwarded,
    http_scope,
)
from forkserve.errors import StopNow
from forkserve.handoff import MAX_REPLAY
from forkserve.http.base import CLOSED, END_OF_MESSAGE, Data, ProtocolError, Request
from forkserve.proxy import forwarded
from forkserve.proxy_protocol import ProxyHeader
from forkserve.tls import tls_environ, tls_extension
from forkserve.workers.base import LINGER_SECONDS, MAX_DRAIN, STOP_GRACE
from forkserve.workers.handover import shut_down
from forkserve.workers.records import record
from forkserve.workers.refusals import body_stalled, reject
from forkserve.workers.websocket_upgrade import is_upgrade, upgrade
from forkserve.wsgi import EnvironFactory
from forkserve.wsgi_cycle import WSGICycle

if TYPE_CHECKING:
    from forkserve.websocket import WebSocketSession
    from forkserve.workers.aio import AsyncioWorker


# The most writes, and bytes, held to go out as one (see HTTPProtocol.corked): more go out at
# once, and the transport's flow control (which a held write escapes) sees them.
MAX_CORKED = 16
MAX_CORKED_SIZE = 65536


class HTTPProtocol(asyncio.Protocol):
    """One client connection: bytes to the parser, requests to the interface's cycles."""

    # What a new connection starts with (class attributes: a connection is made per client,
    # and most of these never change on most of them).
    transport: asyncio.Transport | None = None
    cycle: HTTPCycle | WSGICycle | None = None
    cycle_started = False  # the app has the cycle (see _start_pending)
    ws: WebSocketSession | None = None
    request: Request | None = None
    started = 0.0
    discarding = False  # reading and dropping a body the app did not read
    discarded = 0
    reading_paused = False
    processing = False  # _process is running: an exchange ending inside it goes on
    # Cleared while the transport asks to pause writing; made the first time it does.
    writable: asyncio.Event | None = None
    # One timer per connection: `deadline` (loop time) is when `on_deadline` runs; the
    # timer wakes at or before it (see _set_deadline).
    timer: asyncio.TimerHandle | None = None
    timer_at = math.inf  # when it wakes
    deadline = math.inf
    on_deadline: Callable[[], None] | None = None  # (set with the deadline; None: close)
    closed = False
    client: Any = None
    server: Any = None
    trusted = False  # the peer is a trusted proxy: believe its forwarded headers
    tls: dict[str, Any] | None = None  # the ASGI TLS extension, on HTTPS
    environ_factory: EnvironFactory | None = None  # a WSGI app's per-connection part
    asgi_app: ASGIApp | None = None  # what answers the current request (ASGI)
    head_started = False  # the next request's first bytes have arrived
    fd = -1  # the socket's descriptor
    last_read: bytes | None = None
    # Responses to pipelined requests, held to go out in one write (see _next_cycle); None
    # when writes go straight to the transport.
    corked: list[bytes] | None = None
    corked_size = 0  # bytes in `corked`
    eof = False  # the client ended writing (eof_received)

    def __init__(self, worker: AsyncioWorker, proxy_header: ProxyHeader | None = None,
                 replay: bytes | None = None, adopted: bool = False) -> None:
        self.worker = worker
        self.proxy_header = proxy_header
        self.loop = worker.loop
        self.conn = worker.new_connection(worker.limits)
        # The bytes read from the connection before it was made (maybe none) are received
        # first: those a just-accepted client sent at once (workers/direct.py), or those of a
        # request a peer worker had read when it handed the connection over (`adopted`, see
        # forkserve.handoff). And while the worker may hand connections over
        # (`worker.handover`), it keeps the bytes of the last read if they began a request
        # (which workers/handover.py may hand over with it).
        self.adopted = adopted
        self.replayed = replay
        self.keep_last_read = worker.handover is not None

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # moved from its first turn's (workers/direct.py)
            first, self.transport = self.transport, transport
            first.moved_to(transport)  # type: ignore[attr-defined]
            if self.reading_paused:  # (uvloop starts reading after connection_made)
                self.loop.call_soon(self._pause_reading_again)
            return
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(local, str | bytes):  # a unix socket's path (or "" when unnamed)
            self.client, self.server = None, (local, None)
        elif peer is None or local is None:  # reset before the transport could ask
            self.closed = True
            transport.abort()
            return
        else:
            self.client, self.server = tuple(peer[:2]), tuple(local[:2])
        worker = self.worker
        self.trusted = worker.proxies.trusts(self.client[0] if self.client else None)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls = tls_extension(ssl_object)
        header = self.proxy_header
        if header is not None and header.client is not None:
            self.client = header.client
        if not worker.connection_opened(self):
            self.hand_over()
            return
        if worker.interface == "wsgi":
            self.environ_factory = self._environ_factory(local, peer, ssl_object)
        if self.replayed:
            # The first byte's deadline, its timer armed only if the bytes are not a whole
            # request: a timer made and cancelled costs more than parsing one.
            replayed, self.replayed = self.replayed, b""
            self.deadline = self.loop.time() + worker.first_byte_timeout
            self.data_received(replayed)
            if self.cycle is None and self.ws is None and not self.closing:
                if self.head_started:  # (a head has begun: see data_received)
                    self._set_deadline(self.deadline - self.loop.time())
                else:
                    self._wait_for_request(worker.first_byte_timeout)
        else:
            self._wait_for_request(worker.first_byte_timeout)
        if worker.stopping:
            self.begin_stop()

    def _environ_factory(self, local: Any, peer: Any, ssl_object: Any) -> EnvironFactory:
        """The WSGI environ template of this connection: addresses, TLS, PROXY header."""
        worker = self.worker
        cfg = worker.cfg
        header = self.proxy_header
        https = ssl_object is not None or (header is not None and header.tls)
        factory = EnvironFactory(local, peer, worker.concurrent, cfg.root_path,
                                 "https" if https else "http",
                                 worker.proxies if self.trusted else None)
        variables = tls_environ(ssl_object) if ssl_object is not None else {}
        if header is not None and header.client is not None:
            variables.update(REMOTE_ADDR=header.client[0], REMOTE_PORT=str(header.client[1]))
        if variables:
            factory.extend(variables)
        return factory

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.receive_data(data)
            return
        if self.keep_last_read:
            self.last_read = data if self.cycle is None and len(data) <= MAX_REPLAY \
                and not self.conn.buffered() else None
        if self.cycle is None and not self.closing:
            # The usual keep-alive request, a head seen before in one read: straight to a
            # cycle, as _pull_events would have it with the same events.
            request = self.conn.begin_known(data)
            if request is not None:
                try:
                    self._new_cycle(request)
                    self.cycle.feed_end()
                    self._start_pending()
                except StopNow:  # (as in _process)
                    self.worker.stop_loop_now()
                return
        self.conn.receive_data(data)
        self._process()
        # The keep-alive timer runs on until a whole request head is in; once a head has
        # begun (bytes wait in the parser) it must be complete within --header-timeout
        # (slowloris).
        header_timeout = self.worker.cfg.header_timeout
        if self.cycle is None and self.ws is None and not self.head_started \
                and not self.closed and header_timeout and self.conn.buffered():
            self.head_started = True
            self.worker.not_idle(self)
            if self.deadline > self.loop.time() + header_timeout:
                self._set_deadline(header_timeout)

    def eof_received(self) -> bool:
        if self.eof:  # told already, in its first turn (workers/direct.py)
            return True
        self.eof = True
        if self.ws is not None:
            self.ws.receive_data(None)
            return False
        self.conn.receive_data(b"")
        if self.cycle is not None and self.cycle.client_eof():
            self.transport.abort()  # it left during the response: drop what waits for it
            return False
        self._process()
        if self.tls is None:
            return True  # our side stays open to finish a response in progress
        self.uncork()  # TLS cannot half-close: the transport closes now, after what it has
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.adopted and self.fd >= 0:
            shut_down(self.fd)
        self.closed = True
        self.deadline = math.inf
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = math.inf
        if self.cycle is not None:
            self.cycle.disconnect()
        if self.ws is not None:
            self.ws.connection_lost()
        if self.writable is not None:
            self.writable.set()
        self.worker.connection_closed(self)

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.Event()
        self.writable.clear()

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()

    # -- Output (what the cycles write through) -------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and data:
            corked = self.corked
            if corked is None:
                self.transport.write(data)
            else:
                corked.append(data)
                self.corked_size += len(data)
                if len(corked) >= MAX_CORKED or self.corked_size >= MAX_CORKED_SIZE:
                    self.uncork()

    def uncork(self) -> None:
        """Write the responses held for one write (see _next_cycle), and write directly
        from now on."""
        corked, self.corked = self.corked, None
        self.corked_size = 0
        if corked and not self.closed:
            self.transport.write(b"".join(corked))

    @property
    def closing(self) -> bool:
        return self.closed or self.transport.is_closing()

    @property
    def paused(self) -> bool:
        """The client is not reading fast enough: write no more until `drain()`."""
        return self.writable is not None and not self.writable.is_set()

    async def drain(self) -> None:
        if self.paused:
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

    def _pause_reading_again(self) -> None:
        if self.reading_paused and not self.closed:
            self.transport.pause_reading()

    def close(self) -> None:
        if not self.closed:
            self.uncork()
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, whatever is buffered for it."""
        if not self.closed:
            self.transport.abort()

    def hand_over(self) -> None:
        """A peer worker serves this connection now: close our descriptor without a word
        (and without shutting the connection down, which would end it for the peer too)."""
        self.adopted = False
        self.worker.idle.pop(self, None)  # (its descriptor's number may be reused at once)
        if not self.closed:
            self.closed = True
            self.transport.abort()

    # -- parsing ----------------------------------------------------------------------------------

    def _process(self) -> None:
        """Pull events from the parser until it needs bytes or must wait for a response.

        An exchange that ends while this runs (a discarded body read to its end) goes on to
        the next pipelined request here, not in a nested call."""
        if self.processing:
            return
        self.processing = True
        try:
            self._pull_events()
        except StopNow:  # the quick stop signal came while this ran
            self.worker.stop_loop_now()  # (uvloop would swallow it in a protocol callback)
        finally:
            self.processing = False

    def _pull_events(self) -> None:
        conn = self.conn
        transport = self.transport
        while not self.closed and not transport.is_closing():
            cycle = self.cycle
            if cycle is not None and not self.discarding:
                if cycle.body_complete:
                    # The request is read; the next one waits for this response. Bytes
                    # pipelined meanwhile are kept up to a request head's worth, then
                    # reading pauses.
                    if not self.reading_paused \
                            and conn.buffered() > self.worker.limits.head_size:
                        self.reading_paused = True
                        transport.pause_reading()
                    self._start_pending()
                    return
                if not cycle.wants_body:
                    self.reading_paused = True
                    transport.pause_reading()
                    self._start_pending()
                    return
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                reject(self, exc)
                return
            kind = type(event)
            if kind is Request:
                if self.environ_factory is None and is_upgrade(event):
                    upgrade(self, event)
                    return
                self._new_cycle(event)
            elif event is END_OF_MESSAGE:
                if self.discarding:
                    self.discarding = False
                    self._next_cycle()
                else:
                    cycle.feed_end()
            elif kind is Data:
                if not self.discarding:
                    cycle.feed_body(event.data)
                else:
                    self.discarded += len(event.data)
                    if self.discarded > MAX_DRAIN:
                        self.close()
                        return
            elif event is CLOSED:
                self.close()
                return
            else:  # NEED_DATA, or PAUSED: a response is still in progress
                if self.cycle is not None:
                    self._start_pending()
                return

    def _start_pending(self) -> None:
        """Give the current request to the app if it does not have it yet, now that the
        body bytes that came with the head are fed to it (the app runs later, in a task or in
        the worker's batch: never inside this call)."""
        cycle = self.cycle
        if cycle is None or self.cycle_started \
                or not cycle.body_complete and self._awaits_body(cycle):
            return
        self.deadline = math.inf  # (a body stall timer)
        self.cycle_started = True
        worker = self.worker
        worker.in_flight += 1
        worker.served += 1
        if type(cycle) is WSGICycle:
            worker.start_wsgi(cycle)
        else:
            self.loop.create_task(cycle.run(self.asgi_app, worker.request_done))
            if self.corked is not None:
                self.loop.call_soon(self._uncork_if_waiting, cycle)

    def _uncork_if_waiting(self, cycle: HTTPCycle) -> None:
        """(Right after the first step of `cycle`'s task, while responses are held for one
        write.) An app still running then awaits something: what is held goes out now,
        not once that app is done."""
        if self.cycle is cycle:
            self.uncork()

    def _awaits_body(self, cycle: HTTPCycle | WSGICycle) -> bool:
        """WSGI with --threads 1: a small body still coming (up to BODY_HIGH_WATER) is
        awaited here in the loop, so that the app is called inline and a slow client holds
        no thread and no app call. Not a body the client sends only after 100 Continue (the
        app decides), nor a larger one (the app reads it in the thread). True while it
        waits; a client that sends nothing for the I/O timeout is answered 408. (Asked only
        while the body is not complete.)"""
        if type(cycle) is not WSGICycle or self.worker.app_threaded \
                or not cycle.wants_body or self.conn.client_waiting_for_continue \
                or _length(cycle.request) > BODY_HIGH_WATER:
            return False
        self._set_deadline(self.worker.io_timeout, partial(body_stalled, self))
        return True

    def _new_cycle(self, request: Request) -> None:
        worker = self.worker
        worker.not_idle(self)
        close = worker.close_all or worker.server_stopping[0]
        self.deadline = math.inf
        self.request = request
        self.started = time.time() if worker.access_log_format or worker.stats else 0.0
        self.cycle_started = False
        health = worker.health_path is not None \
            and request.target.partition(b"?")[0] == worker.health_path
        if self.environ_factory is not None:
            self.cycle = WSGICycle(worker.health_app if health else worker.app,
                                   self.environ_factory, request, self.conn, self, close,
                                   self._response_complete, worker.io_timeout)
        else:
            self.asgi_app = worker.health_app if health else worker.asgi_app
            scope = self.completed(request, http_scope(
                request, self.client, self.server, worker.cfg.root_path,
                worker.lifespan.state if worker.lifespan.supported else None))
            self.cycle = HTTPCycle(scope, self.conn, self, close, self._response_complete,
                                   worker.io_timeout)
        if worker.stopping:
            self.cycle.stop()

    def completed(self, request: Request, scope: dict[str, Any]) -> dict[str, Any]:
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

    def _response_complete(self, cycle: HTTPCycle | WSGICycle) -> None:
        if self.started:
            record(self, cycle)
        if self.closing:
            return
        if not cycle.body_complete or cycle.failed:
            if cycle.body_complete:
                self.close()  # failed: the response was cut or said Connection: close
                return
            if self.conn.client_waiting_for_continue:
                self.close()  # it never sent the body; the response said Connection: close
                return
            if not cycle.failed and not self.conn.will_close():
                self._discard_body(self.worker.io_timeout)  # then go on with the next request
            elif self.transport.can_write_eof():
                # The response ended the connection: shut our side, and discard what comes
                # for a moment (closing with unread bytes would make the kernel reset the
                # connection, and the client could lose the response).
                self.uncork()
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
        self._set_deadline(seconds)
        self.resume_reading()
        self._process()

    def _next_cycle(self) -> None:
        self.cycle = None
        self.last_read = None
        if not self.conn.start_next_cycle():
            self.close()
            return
        self._wait_for_request()
        if self.reading_paused:
            self.resume_reading()  # pipelined bytes had filled the buffer
        if self.conn.has_input():  # (else the next bytes start the next request)
            worker = self.worker
            if self.corked is None:
                # A pipelined request: the responses from here on go out in one write, once
                # the pipeline ends, or the worker's batch (WSGI), or an ASGI app that waits
                # for something (see _uncork_if_waiting): a write per response costs more
                # than the response, hello world.
                if worker.in_batch:
                    self.corked = []
                    worker.corked.append(self)
                elif self.environ_factory is None:
                    self.corked = []
            self._process()
            if not worker.in_batch and (self.cycle is None or not self.cycle_started):
                self.uncork()  # no request started (a partial one, an upgrade): none to wait for
        elif self.corked is not None:
            self.uncork()

    # -- timers and stopping ----------------------------------------------------------------------

    def _wait_for_request(self, timeout: float = 0.0) -> None:
        """Wait for the next request for `timeout` seconds (default: the idle timeout
        between keep-alive requests; STOP_GRACE once stopping)."""
        self.head_started = False
        worker = self.worker
        worker.now_idle(self)
        self._set_deadline(STOP_GRACE if worker.stopping else timeout or worker.idle_timeout)

    def _set_deadline(self, seconds: float, action: Callable[[], None] | None = None) -> None:
        """Run `action` (default: close the connection) in `seconds`, instead of what was
        due. The timer is moved only when it would wake too late: a connection that serves
        request after request re-arms nothing (a timer per request costs more than the
        request's HTTP parsing); the timer then wakes early, and sleeps on."""
        when = self.loop.time() + seconds
        self.deadline = when
        self.on_deadline = action
        if when < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(when, self._deadline_passed)
            self.timer_at = when

    def _deadline_passed(self) -> None:
        self.timer = None
        self.timer_at = math.inf
        if self.deadline <= self.loop.time():
            self.deadline = math.inf
            (self.on_deadline or self.close)()
        elif self.deadline != math.inf:
            self.timer = self.loop.call_at(self.deadline, self._deadline_passed)
            self.timer_at = self.deadline

    def begin_stop(self) -> None:
        """Graceful stop: a request in progress finishes, but an event stream (SSE) is ended
        (`HTTPCycle.stop`); an idle connection gets STOP_GRACE seconds to bring one more
        (answered with Connection: close). A WebSocket stays open until `end_now`."""
        if self.cycle is not None:
            self.cycle.stop()
        elif self.ws is None:
            self._wait_for_request()

    def end_now(self) -> None:
        """--graceful-timeout is about to run out: a WebSocket is closed with 1012 (service
        restart), a response streaming without a Content-Length is ended (`HTTPCycle.stop`);
        a request still to answer may yet do so."""
        if self.ws is not None:
            self.ws.close_for_restart()
        elif self.cycle is not None:
            self.cycle.stop(deadline=True)


def _length(request: Request) -> int:
    """The request's Content-Length (checked by the parser), 0 if it has none (chunked)."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0
