"""One WSGI request on the worker's event loop: `WSGICycle`, between an HTTP connection
(`workers/protocol.py`) and the app, called inline in the loop or in a pool thread.

The cycle is fed the request body by the connection and writes the response through it
(`asgi.Output`); a pool thread does both through the loop (`_FromThread`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from time import perf_counter
from typing import Any

from forkserve.asgi import BODY_HIGH_WATER, Output
from forkserve.errors import ClientDisconnected, StopNow
from forkserve.http.base import HTTPConnection, Request, error_response
from forkserve.logs import error_log
from forkserve.threadpool import ThreadPool
from forkserve.wsgi import EnvironFactory, ErrorStream, InputStream, respond


class WSGICycle:
    """One request and its response between an HTTP connection and a WSGI app.

    Driven by the connection's event loop as `asgi.HTTPCycle` is: the body arrives through
    `feed_body`/`feed_end`, `wants_body` is the flow control, `on_complete` is called once the
    exchange is over (`failed`: it broke, the connection must end), and `close` means the
    response must end the connection. The worker calls the app with `run_inline` (in the
    loop, once the whole body is in) or `run_in_thread` (in a pool thread, whose wsgi.input
    reads and writes wait on the loop, each for `io_timeout` at most). Either way the response
    iterable is pulled a piece at a time while the client reads: once it stops, the rest
    waits for the connection to drain, and the loop serves other connections meanwhile.
    """

    # What a new cycle starts with (class attributes: a cycle is made per request).
    environ: dict[str, Any] = {}  # (set when the app is called)
    buffered = 0
    body_complete = False
    disconnected = False
    stopping = False
    waiter: asyncio.Future[None] | None = None  # a pool thread waits for the body
    status = 0
    reason = b""
    headers: list[tuple[bytes, bytes]] = []
    head_sent = False
    sent = 0
    failed = False
    done = False
    # Since when the app has run without waiting on the client (monotonic; inf while it
    # waits): the stuck check.
    started = 0.0
    app_seconds = 0.0  # how long the call in a pool thread took, waits on the client included
    body: deque[bytes] | None = None  # what arrived of the body and was not read yet

    def __init__(self, app: Callable[..., Any], factory: EnvironFactory, request: Request,
                 conn: HTTPConnection, out: Output, close: bool,
                 on_complete: Callable[[WSGICycle], None], io_timeout: float) -> None:
        self.app = app
        self.factory = factory
        self.request = request
        self.conn = conn
        self.out = out
        self.close = close
        self.on_complete = on_complete
        self.io_timeout = io_timeout

    # -- fed by the protocol -------------------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        if self.body is None:
            self.body = deque()
        self.body.append(data)
        self.buffered += len(data)
        self._wake()

    def feed_end(self) -> None:
        self.body_complete = True
        self._wake()

    def disconnect(self) -> None:
        self.disconnected = True
        self._wake()

    def client_eof(self) -> bool:
        """The client will send nothing more: True (drop the connection) if it left during
        the response; before it, a response may still reach a half-closed client."""
        if self.head_sent and not self.done:
            self.disconnect()
            return True
        return False

    def stop(self, deadline: bool = False) -> None:
        """The server stops gracefully: the response says Connection: close. At the
        `deadline` a response under way is cut, so that the worker can exit by itself."""
        self.stopping = True
        if deadline and self.head_sent and not self.done:
            self.out.close()

    @property
    def wants_body(self) -> bool:
        """Should the protocol read more of the body now? (Bounded buffering.)"""
        return self.buffered < BODY_HIGH_WATER

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- calling the app -----------------------------------------------------------------------

    def run_inline(self, on_done: Callable[[], None],
                   app_free: Callable[[], asyncio.Future[None] | None],
                   in_app: Callable[..., Any]) -> None:
        """Call the app in the loop (the body is complete: reading it never waits), and
        `on_done()` once the response is sent. Each call into the app goes through
        `in_app(self, function, *args)`. If the client stops reading, the rest of the
        response is pulled as it drains, each time once `app_free()` says the loop may call
        the app (None, or a future to wait for before asking again). The request's context
        variables live in a context of its own, since other requests run meanwhile."""
        context = contextvars.copy_context()
        rest = in_app(self, context.run, self._first_step)
        if rest is None:
            self._finish_cycle(on_done)
            return
        self.out.loop.create_task(self._resume(context, rest, on_done, app_free, in_app))

    def _first_step(self) -> Iterator[bool] | None:
        """The exchange in the loop up to the first time the client must read (one call into
        the app, as the app sees it): None if it is over, else its rest."""
        rest = self._serve(self)
        return rest if rest is not None and next(rest, False) else None

    async def _resume(self, context: contextvars.Context, rest: Iterator[bool],
                      on_done: Callable[[], None],
                      app_free: Callable[[], asyncio.Future[None] | None],
                      in_app: Callable[..., Any]) -> None:
        try:
            while True:
                try:
                    await self.out.drain()
                except ClientDisconnected:
                    in_app(self, context.run, rest.close)
                    self.failed = True
                    return
                while (busy := app_free()) is not None:
                    await busy
                if not in_app(self, context.run, next, rest, False):
                    return
        finally:
            self._finish_cycle(on_done)

    def run_in_thread(self, pool: ThreadPool, on_done: Callable[[], None]) -> None:
        """Call the app in a thread of `pool`, and `on_done()` in the loop once it returned
        and the response is sent."""
        self.started = time.monotonic()
        bridge = _FromThread(self, self.out.loop, self.io_timeout)
        pool.submit(bridge.run, self._serve, on_done)

    def _serve(self, writer: WSGICycle | _FromThread) -> Iterator[bool] | None:
        """The exchange, run by `writer`'s side: the app's errors are answered and logged.
        None once it is over; else its rest (see `respond`), a generator to run to its end."""
        errors = ErrorStream()
        self.environ = environ = self.factory.build(
            self.request, InputStream(writer.read_chunk), errors)
        try:
            rest = respond(self.app, environ, writer)
        except BaseException as exc:
            self._handle(exc, writer)
            rest = None
        if rest is None:
            errors.flush()
            return None
        return self._serve_rest(rest, errors, writer)

    def _serve_rest(self, rest: Iterator[bool], errors: ErrorStream,
                    writer: WSGICycle | _FromThread) -> Iterator[bool]:
        """The rest of `_serve`, for a response sent a piece at a time."""
        try:
            yield from rest
        except BaseException as exc:
            self._handle(exc, writer)
        errors.flush()

    def _handle(self, exc: BaseException, writer: WSGICycle | _FromThread) -> None:
        """What `_serve` does with an exception from the exchange: a client gone ends it, the
        worker's own quick stop goes on up, anything else is the app's error."""
        if isinstance(exc, ClientDisconnected):
            writer.fail(0)
        elif isinstance(exc, StopNow):
            raise exc
        else:  # the app's SystemExit and KeyboardInterrupt too, as peers do
            self._app_failed(writer)

    def _app_failed(self, writer: WSGICycle | _FromThread) -> None:
        """In an except clause: log the app's error, and answer 500 if nothing was sent."""
        environ = self.environ
        error_log.exception("error handling %s %s", environ["REQUEST_METHOD"],
                            environ["RAW_URI"])
        writer.fail(500)

    def _finish_cycle(self, on_done: Callable[[], None]) -> None:
        self.done = True
        on_done()
        self.on_complete(self)
        # The environ holds wsgi.input, which holds this cycle: dropped, no reference cycle
        # is left for the garbage collector (it ran every 40 or so requests for them).
        self.environ = {}

    # -- the response (ResponseWriter), and the body for wsgi.input ----------------------------

    @property
    def paused(self) -> bool:
        return self.out.paused

    def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers

    def _head(self, body_length: int | None) -> bytes:
        """The response head; adds Date, Server, and Content-Length when `body_length` is
        known and the app gave no framing. Callers set `head_sent` once the bytes that go
        with it are composed: a framing error raised before then still gets a 500."""
        if self.disconnected or self.out.closing:
            raise ClientDisconnected("the client closed the connection")
        conn = self.conn
        close = self.close or self.stopping or (
            conn.client_waiting_for_continue and not self.body_complete)
        return conn.send_app_response(self.status, self.reason, self.headers, body_length,
                                      close)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.head_sent:
            if self.disconnected or self.out.closing:
                raise ClientDisconnected("the client closed the connection")
            out = self.conn.send_data(data)
        else:
            out = self._head(None) + self.conn.send_data(data)
            self.head_sent = True
        self.out.write(out)
        self.sent += len(data)

    def send_head(self, length: int) -> None:
        if not self.head_sent:
            head = self._head(length)
            self.head_sent = True
            self.out.write(head)

    def finish(self, last: bytes | None = None) -> None:
        conn = self.conn
        if self.head_sent:
            out = conn.send_data(last) + conn.send_end() if last else conn.send_end()
        elif last is None:
            # An empty body; for HEAD the length of the GET body is unknown, so say nothing.
            out = self._head(None if self.request.method == b"HEAD" else 0) + conn.send_end()
        else:
            out = self._head(len(last)) + conn.send_data(last) + conn.send_end()
        self.head_sent = True
        if last:
            self.sent += len(last)
        self.out.write(out)

    def fail(self, status: int) -> None:
        """The exchange broke: answer `status` if nothing was sent and it is not 0; the
        connection then ends (`failed`)."""
        if status and not self.head_sent and not self.disconnected and not self.out.closing:
            self.status = status
            self.head_sent = True
            self.out.write(error_response(status, head=self.request.method == b"HEAD"))
        self.failed = True

    def read_chunk(self) -> bytes:
        """The next piece of the body, b"" at its end (for an app called inline: the body
        is all in)."""
        if self.body:
            piece = self.body.popleft()
            self.buffered -= len(piece)
            self.out.resume_reading()
            return piece
        if self.body_complete:
            return b""
        if self.disconnected:
            raise ClientDisconnected("the client closed the connection")
        raise RuntimeError("the body is not complete")  # (run_in_thread waits for it)

    async def wait_for_body(self) -> bytes:
        """The next piece of the body once it arrived (for an app in a pool thread): sends
        100 Continue first if the client waits for it."""
        while not self.body and not self.body_complete:
            if self.disconnected:
                raise ClientDisconnected("the client closed the connection")
            conn = self.conn
            if conn.client_waiting_for_continue and not self.head_sent:
                self.out.write(conn.send_continue())
            self.waiter = self.out.loop.create_future()
            self.out.resume_reading()
            await self.waiter
        return self.read_chunk()


class _FromThread:
    """The ResponseWriter and body reader of a cycle whose app runs in a pool thread.

    What the app writes is handed to the loop without waiting (one wakeup of the loop, not a
    round trip per call) while less than BODY_HIGH_WATER bytes of it are not yet written and
    the client reads; past that, a write waits until the client has read, `timeout` seconds
    at most (then ClientDisconnected). The end of the response (`finish`, `fail`) runs in the
    loop with the thread's end (`run`): a whole response costs the loop one wakeup. An error
    of a write handed over is raised by the thread's next call; one of the end is answered
    there as the app's own (logged; 500 if nothing was sent). Reading the body waits."""

    __slots__ = ("cycle", "loop", "timeout", "posted", "written", "error", "ending")
    paused = False  # a write that must wait for the client waits in the thread itself

    def __init__(self, cycle: WSGICycle, loop: asyncio.AbstractEventLoop,
                 timeout: float) -> None:
        self.cycle = cycle
        self.loop = loop
        self.timeout = timeout
        self.posted = 0  # bytes handed to the loop (counted by the thread only)
        self.written = 0  # of those, bytes the loop wrote (counted by the loop only)
        self.error: BaseException | None = None  # a write handed over failed
        self.ending: list[tuple[Callable[..., Any], tuple]] = []  # finish, fail: at the end

    def run(self, serve: Callable[[_FromThread], Iterator[bool] | None],
            on_done: Callable[[], None]) -> None:
        """In the pool thread: the exchange (`serve(self)`, then its rest), then its end in
        the loop (`_ended`)."""
        started = perf_counter()
        try:
            rest = serve(self)
            if rest is not None:
                for _ in rest:
                    pass
        finally:
            self.cycle.app_seconds = perf_counter() - started
            self.loop.call_soon_threadsafe(self._ended, on_done)

    def _ended(self, on_done: Callable[[], None]) -> None:
        cycle = self.cycle
        try:
            for function, args in self.ending:
                function(*args)
        except ClientDisconnected:
            cycle.failed = True
        except Exception:
            cycle._app_failed(cycle)
        cycle._finish_cycle(on_done)

    @property
    def head_sent(self) -> bool:
        return self.cycle.head_sent

    def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.cycle.start(status, reason, headers)  # no I/O: the loop reads it when it writes

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.posted - self.written > BODY_HIGH_WATER or self.cycle.out.paused:
            self._call(self._write_and_drain, data)
        else:
            self.posted += len(data)
            self.loop.call_soon_threadsafe(self._write_now, data)

    def _write_now(self, data: bytes) -> None:
        try:
            if self.error is None:
                self.cycle.write(data)
        except Exception as exc:
            self.error = exc
        self.written += len(data)

    def _write_and_drain(self, data: bytes) -> Awaitable[None] | None:
        if self.error is not None:
            raise self.error
        self.cycle.write(data)
        return self.cycle.out.drain() if self.cycle.out.paused else None

    def send_head(self, length: int) -> None:
        self._call(self.cycle.send_head, length)

    def finish(self, last: bytes | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.ending.append((self.cycle.finish, (last,)))

    def fail(self, status: int) -> None:
        self.ending.append((self.cycle.fail, (status,)))

    def read_chunk(self) -> bytes:
        return self._call(self.cycle.wait_for_body)

    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` run in the loop; if it returns an awaitable, what that gives."""
        done: Future[Any] = Future()
        cycle = self.cycle
        cycle.started = math.inf  # waiting on the client is not the app being stuck
        self.loop.call_soon_threadsafe(_run_in_loop, done, function, args)
        try:
            return done.result(self.timeout)
        except FutureTimeout:
            raise ClientDisconnected(f"client stalled for {self.timeout:g} s") from None
        finally:
            cycle.started = time.monotonic()


def _run_in_loop(done: Future[Any], function: Callable[..., Any], args: tuple) -> None:
    try:
        result = function(*args)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(lambda _: _settle(done, task))
            return
    except BaseException as exc:
        done.set_exception(exc)
        return
    done.set_result(result)


def _settle(done: Future[Any], task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        done.set_exception(ClientDisconnected("the worker is stopping"))
    elif task.exception() is not None:
        done.set_exception(task.exception())
    else:
        done.set_result(task.result())
