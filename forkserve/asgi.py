"""The ASGI interface (ASGI 3, HTTP spec 2.4, lifespan spec 2.0): scope, receive/send, lifespan.

HTTP scopes say spec_version 2.3, as uvicorn's do, although `send` raises an OSError once the
request is over as 2.4 asks: told 2.4, Starlette's StreamingResponse and FileResponse stop
watching `receive()` for http.disconnect, and learn that the client left (or that the server
is stopping) only at their next `send`, which may be much later for a stream of events.

No socket I/O happens here. The worker's protocol feeds an `HTTPCycle` what the parser
read (`feed_body`, `feed_end`, `disconnect`) and gives it an `Output` to write to; the
cycle turns the app's `send` messages into bytes through the same sans-I/O HTTP connection
the WSGI worker uses.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import quote, unquote_to_bytes

from forkserve.errors import ClientDisconnected, StopNow
from forkserve.http.base import HTTPConnection, Request, error_response, remember
from forkserve.logs import error_log
from forkserve.proxy import Forwarded

ASGI = {"version": "3.0", "spec_version": "2.4"}
ASGI_HTTP = {"version": "3.0", "spec_version": "2.3"}  # see the module's docstring
Message = dict[str, Any]
ASGIApp = Callable[[dict, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]


def wrap_asgi2(app: Callable[[dict], Any]) -> ASGIApp:
    """An ASGI 3 app calling an ASGI 2 (double-callable) one."""

    async def asgi3(scope: dict, receive: Any, send: Any) -> None:
        await app(scope)(receive, send)

    return asgi3


class Output(Protocol):
    """What a cycle (ASGI's or WSGI's) writes through: the worker's connection."""

    loop: asyncio.AbstractEventLoop

    def write(self, data: bytes) -> None: ...

    @property
    def closing(self) -> bool:
        """The connection is closed or closing: nothing written will arrive."""

    @property
    def paused(self) -> bool:
        """The client is slow to take what was written: `drain()` would wait."""

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written (backpressure)."""

    def resume_reading(self) -> None:
        """The app consumed the buffered body: read more of it."""

    def close(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection now, whatever is buffered for it."""


def http_scope(request: Request, client: Any, server: Any, root_path: str,
               state: dict[str, Any] | None) -> dict[str, Any]:
    """The scope of an HTTP request (ASGI HTTP spec 2.4, announced as 2.3)."""
    scope = connection_scope("http", request, client, server, root_path, state)
    scope["extensions"] = {"http.response.trailers": {}}
    return scope


def connection_scope(kind: str, request: Request, client: Any, server: Any, root_path: str,
                     state: dict[str, Any] | None) -> dict[str, Any]:
    """What the HTTP and WebSocket scopes share (`kind` is 'http' or 'websocket'), and an
    HTTP scope's method.

    `path` and `raw_path` include `root_path`, as the ASGI spec and Starlette want: a target
    that starts with it is taken as it is, and one that does not (a proxy stripped the
    prefix) gets it prepended, as uvicorn does (uvicorn prepends it to every target).
    """
    head = request.head
    known = _SCOPE_PARTS.get(head) if head is not None else None
    if known is None or known[0] != root_path or known[1] != kind:
        known = (root_path, kind, *_request_part(kind, request, root_path))
        if head is not None:
            remember(_SCOPE_PARTS, head, known, _SCOPE_PARTS_MAX)
    part, authority = known[2], known[3]
    scope = part.copy()
    # RFC 9112 §3.2.2: an absolute-form target's authority is the host, whatever Host says.
    scope["headers"] = request.headers if authority is None \
        else _with_host(request.headers, authority)
    scope["client"] = client
    scope["server"] = server
    if state is not None:
        scope["state"] = state.copy()
    return scope


def _request_part(kind: str, request: Request,
                  root_path: str) -> tuple[dict[str, Any], bytes | None]:
    """The scope's items that `request`'s head alone decides (under `root_path`), and the
    authority of an absolute-form target (None for the origin form)."""
    raw_path, _, query = request.target.partition(b"?")
    authority = None
    if b"://" in raw_path and not raw_path.startswith(b"/"):  # absolute form
        authority, _, rest = raw_path.split(b"://", 1)[1].partition(b"/")
        raw_path = b"/" + rest
    path = (unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path).decode(
        "utf-8", "replace")
    if root_path and path[:1] == "/" and path != root_path \
            and not path.startswith(root_path + "/"):
        path = root_path + path
        raw_path = quote(root_path).encode("ascii") + raw_path
    part = {
        "type": kind,
        "asgi": ASGI_HTTP if kind == "http" else ASGI,
        "http_version": request.http_version.decode("ascii"),
        "scheme": "http" if kind == "http" else "ws",
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": root_path,
    }
    if kind == "http":
        part["method"] = request.method.decode("ascii")
    return part, authority


# _request_part's answers for heads remembered by the HTTP connection (Request.head), with
# the root path and kind they were made for: building them was a tenth of the CPU of a
# hello-world request. As bounded as those heads (they hold no credentials).
_SCOPE_PARTS: dict[bytes, tuple[str, str, dict[str, Any], bytes | None]] = {}
_SCOPE_PARTS_MAX = 128


def apply_forwarded(scope: dict[str, Any], info: Forwarded) -> None:
    """Let a trusted proxy's headers decide the scope's client, scheme and Host."""
    if info.client is not None:
        scope["client"] = (info.client, info.port or 0)
    if info.scheme is not None:
        secure = info.scheme in ("https", "wss")
        if scope["type"] == "websocket":
            scope["scheme"] = "wss" if secure else "ws"
        else:
            scope["scheme"] = "https" if secure else "http"
    if info.host:
        scope["headers"] = _with_host(scope["headers"], info.host.encode("latin-1"))


def _with_host(headers: list[tuple[bytes, bytes]], host: bytes) -> list[tuple[bytes, bytes]]:
    """`headers` with `host` as its one Host header."""
    return [(name, value) for name, value in headers if name != b"host"] + [(b"host", host)]


class HTTPCycle:
    """One request and its response between an HTTP connection and an ASGI app.

    The request body arrives through `feed_body`/`feed_end`; `receive()` hands it to the
    app, and `wants_body` tells the protocol whether to keep reading (flow control).
    `send()` writes the response; `on_complete` is called once it is complete (the app may
    go on running). `close` means the response must end the connection. A client that
    sends no byte of a body the app waits for during `body_timeout` seconds is cut off: the
    connection is closed and the app receives http.disconnect.

    The request is over for the app when the client leaves (`disconnect`; also its EOF once
    the response is under way, see `client_eof`) or the server ends it (`stop`):
    `receive()` then says http.disconnect and `send()` raises ClientDisconnected. An app that
    stops for that is not at fault (`run`).
    """

    # What a new cycle starts with (class attributes: a cycle is made per request).
    buffered = 0
    body_complete = False
    body_delivered = False
    disconnected = False  # the connection is gone: send() raises
    client_done = False  # the client sent EOF: receive() says http.disconnect
    interrupted = False  # the server ended the request: as if the client had left
    stopping = False  # the server is stopping: an event stream is interrupted
    told_disconnect = False  # receive() said http.disconnect before the response ended
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    trailers = False
    response_started = False
    head_sent = False
    response_complete = False
    failed = False
    sent = 0
    # Set when something changes that the app may wait for in receive(); made when it
    # first waits (most requests never do).
    event: asyncio.Event | None = None

    def __init__(self, scope: dict[str, Any], conn: HTTPConnection, out: Output, close: bool,
                 on_complete: Callable[[HTTPCycle], None], body_timeout: float) -> None:
        self.scope = scope
        self.body_timeout = body_timeout
        self.conn = conn
        self.out = out
        self.close = close
        self.on_complete = on_complete
        self.body: list[bytes] = []

    # -- fed by the protocol -------------------------------------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.body.append(data)
        self.buffered += len(data)
        self._wake()

    def feed_end(self) -> None:
        self.body_complete = True
        self._wake()

    def disconnect(self) -> None:
        self.disconnected = self.client_done = True
        self._wake()

    def client_eof(self) -> bool:
        """The client will send nothing more. Before the response is under way a response
        may still reach it (a client may half-close and wait for the answer): receive() says
        http.disconnect once the body was delivered. Once the response is under way it has
        left: the cycle is disconnected, and True returned (drop the connection)."""
        if self.head_sent and not self.response_complete:
            self.disconnect()
            return True
        self.client_done = True
        self._wake()
        return False

    def stop(self, deadline: bool = False) -> None:
        """The server stops gracefully: the response may finish, unless it is a stream that
        may have no end. An event stream (SSE) is interrupted now, or once its head is out;
        at the `deadline` (--graceful-timeout nearly ran out) also any other response under
        way without a Content-Length, as WebSockets are closed then."""
        self.stopping = True
        if self.head_sent and (self._event_stream() or deadline and _header(
                self.headers, b"content-length") is None):
            self._interrupt()

    def _interrupt(self) -> None:
        """The server ends the request: the app gets http.disconnect and `send()` raises.
        Once the app returns, an event stream is ended properly and other unfinished
        responses are cut (see `_end_early`)."""
        if not self.response_complete:
            self.interrupted = True
            self._wake()

    def _event_stream(self) -> bool:
        content_type = _header(self.headers, b"content-type") or b""
        return content_type.partition(b";")[0].strip().lower() == b"text/event-stream"

    # -- the app's receive and send ------------------------------------------------------------

    async def receive(self) -> Message:
        """The next piece of the request body; once it was all delivered (or the client
        went away before sending the rest), http.disconnect when the client leaves, the
        server ends the request or the response is complete. Body bytes that arrived are
        delivered even if the client has half-closed the connection since."""
        if self.body_delivered or self.response_complete or self.disconnected \
                or self.interrupted or (
                    self.client_done and not self.body and not self.body_complete):
            while not self.client_done and not self.response_complete \
                    and not self.interrupted:
                await self._wait()  # nothing more to receive until the request is over
            return self._disconnect_message()
        if not self.body and not self.body_complete:
            if self.conn.client_waiting_for_continue and not self.head_sent:
                self.out.write(self.conn.send_continue())
            while not self.body and not self.body_complete and not self.client_done \
                    and not self.interrupted:
                event = self._waiting()  # before resume_reading: the body may come at once
                self.out.resume_reading()
                try:
                    await asyncio.wait_for(event.wait(), self.body_timeout)
                except asyncio.TimeoutError:
                    error_log.info("%s %s: the client sent no body for %g s; closing",
                                   self.scope["method"], _target(self.scope), self.body_timeout)
                    self.disconnect()
                    self.out.close()
            if not self.body and not self.body_complete:  # gone, cut off, or ended by us
                return self._disconnect_message()
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        self.out.resume_reading()
        self.body_delivered = self.body_complete
        return {"type": "http.request", "body": data, "more_body": not self.body_complete}

    def _disconnect_message(self) -> Message:
        if not self.response_complete:
            self.told_disconnect = True
        return {"type": "http.disconnect"}

    async def _wait(self) -> None:
        await self._waiting().wait()

    def _waiting(self) -> asyncio.Event:
        """The event to wait on for the next change, cleared."""
        event = self.event
        if event is None:
            self.event = event = asyncio.Event()
        else:
            event.clear()
        return event

    def _wake(self) -> None:
        if self.event is not None:
            self.event.set()

    @property
    def wants_body(self) -> bool:
        """Should the protocol read more of the body now? (Bounded buffering.)"""
        return self.buffered < BODY_HIGH_WATER

    async def send(self, message: Message) -> None:
        if self.disconnected or self.out.closing:
            self.disconnected = True
            raise ClientDisconnected("the client closed the connection")
        if self.interrupted:
            raise ClientDisconnected("the server ended the request: it is stopping")
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.status = _status(message["status"])
            self.headers = _headers(message.get("headers", ()))
            self.trailers = bool(message.get("trailers", False))
            self.response_started = True
            return
        if self.response_complete:
            raise RuntimeError(f"{kind!r} sent after the response was complete")
        if kind == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            self._send_body(bytes(body) if type(body) is not bytes else body, more)
            if self.stopping and self._event_stream():
                self._interrupt()  # it began while the server was stopping: this is its end
            if self.out.paused:
                await self.out.drain()
        elif kind == "http.response.trailers" and self.trailers and self.head_sent:
            trailers = _headers(message.get("headers", ()))
            if not message.get("more_trailers", False):
                self.out.write(self.conn.send_end(trailers))
                self._completed()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _send_body(self, body: bytes, more: bool) -> None:
        conn = self.conn
        if self.head_sent:
            out = conn.send_data(body) if body else b""
        else:
            length = None if more or self.trailers else len(body)
            # A client still waiting for 100 Continue will not send the body: close after.
            close = self.close or (conn.client_waiting_for_continue and not self.body_complete)
            out = conn.send_app_response(self.status, _reason(self.status), self.headers,
                                         length, close) + conn.send_data(body)
            self.head_sent = True
        self.sent += len(body)
        if not more and not self.trailers:
            out += conn.send_end()
            self.out.write(out)
            self._completed()
        elif out:
            self.out.write(out)

    def _completed(self) -> None:
        self.response_complete = True
        self._wake()
        self.on_complete(self)

    # -- running the app -----------------------------------------------------------------------

    async def run(self, app: ASGIApp, on_done: Callable[[], None]) -> None:
        """Call the app; answer 500 (or drop the connection) if it fails to respond.

        An app that stops because the request is over (it raises what `send()` raised, even
        wrapped, as Starlette's ClientDisconnect does; or returns unfinished after receive()
        said http.disconnect) is not at fault: that is logged at debug level only, and the
        response ended as well as it can be (`_end_early`).
        `on_done()` is called once as this ends, however it ends (the app returned or raised,
        the task was cancelled while it ran, the worker stops at once)."""
        try:
            await app(self.scope, self.receive, self.send)
        except StopNow:  # the worker's own quick stop, not the app's
            raise
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # as peers: a 500
            self._app_raised(exc)
        else:
            if not (self.response_complete or self.disconnected):
                self._app_returned_early()
        finally:
            on_done()

    def _app_raised(self, exc: BaseException) -> None:
        """(In run's except clause.) The app raised `exc`: logged with its traceback and
        answered 500, unless it is what `send()` raised (the request was over)."""
        scope = self.scope
        if not _raised_by_send(exc):
            error_log.error("error handling %s %s\n%s", scope["method"], _target(scope),
                            traceback.format_exc().rstrip())
            self._fail(500)
            return
        error_log.debug("%s %s ended early: %s: %s", scope["method"], _target(scope),
                        type(exc).__name__, exc)
        self._end_early()

    def _app_returned_early(self) -> None:
        """The app returned before its response was complete: an error (500), unless the
        request was over (told http.disconnect, or ended by the server)."""
        scope = self.scope
        unfinished = "completing the response" if self.response_started \
            else "starting a response"
        if not (self.told_disconnect or self.interrupted):
            error_log.error("error handling %s %s: the app returned without %s",
                            scope["method"], _target(scope), unfinished)
            self._fail(500)
            return
        error_log.debug("%s %s ended early: the request was over (%s), the app returned "
                        "without %s", scope["method"], _target(scope),
                        "told http.disconnect" if self.told_disconnect else "server stop",
                        unfinished)
        self._end_early()

    def _end_early(self) -> None:
        """The app stopped because the request is over before its response is. An event
        stream the server interrupted is ended properly if its framing allows (chunked, or
        until the connection closes); any other unfinished response is cut, so the client
        sees it is incomplete. Nothing sent yet: a 503 if the server ended the request."""
        if self.disconnected or self.response_complete:
            return
        if self.interrupted and self.head_sent and not self.out.closing \
                and self._event_stream():
            try:
                end = self.conn.send_end()
            except ValueError:  # short of its Content-Length: only a cut can say so
                pass
            else:
                self.out.write(end)
                self.out.close()
                self._completed()
                return
        self._fail(503 if self.interrupted else 500)

    def _fail(self, status: int) -> None:
        """`status` if nothing went out yet; else the response is cut by closing."""
        if self.disconnected or self.response_complete:
            return
        if not self.head_sent:
            self.status = status
            self.head_sent = True
            self.out.write(error_response(status, head=self.scope["method"] == "HEAD"))
        self.failed = True
        self.out.close()
        self._completed()


# Bytes of request body buffered for an app that does not read it before reading pauses.
BODY_HIGH_WATER = 65536


_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _status(status: Any) -> int:
    if type(status) is not int or not 200 <= status <= 999:
        raise RuntimeError(f"invalid response status {status!r}")
    return status


def _headers(headers: Any) -> list[tuple[bytes, bytes]]:
    out = []
    for header in headers:
        name, value = header
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise RuntimeError(f"response header name and value must be bytes: {header!r}")
        out.append((name, value))
    return out


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the first header `name` (lower-case) in `headers`, None if none."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _raised_by_send(exc: BaseException) -> bool:
    """Is `exc` the ClientDisconnected that `send()` raised, or does it come from one (its
    cause or context, or a member of an exception group, at any depth)?"""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ClientDisconnected):
            return True
        pending += [item.__cause__, item.__context__]
        members = getattr(item, "exceptions", None)  # an exception group (or its backport)
        if isinstance(members, tuple):
            pending += [member for member in members if isinstance(member, BaseException)]
    return False


def _target(scope: dict[str, Any]) -> str:
    raw = scope["raw_path"].decode("latin-1")
    query = scope["query_string"]
    return raw + "?" + query.decode("latin-1") if query else raw


class LifespanFailed(Exception):
    """The app's lifespan startup failed: the worker must not serve."""


class Lifespan:
    """Runs the app's lifespan protocol: startup before serving, shutdown after.

    mode 'on' requires the app to support it; 'auto' carries on when the app raises at once
    (it does not do lifespan); 'off' never calls it. `state` is shared into every scope.
    """

    def __init__(self, app: ASGIApp, mode: str) -> None:
        self.app = app
        self.mode = mode
        self.state: dict[str, Any] = {}
        self.supported = mode != "off"
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._started = asyncio.Event()
        self._stopped = asyncio.Event()
        self._failure = ""
        self._task: asyncio.Task | None = None

    async def startup(self) -> None:
        """Raise LifespanFailed with the app's message or traceback if startup fails."""
        if not self.supported:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._queue.put({"type": "lifespan.startup"})
        await self._started.wait()
        if self._failure:
            raise LifespanFailed(self._failure)

    async def shutdown(self, timeout: float) -> None:
        """Send lifespan.shutdown and wait for the app, at most `timeout` seconds."""
        if not self.supported or self._task is None or self._task.done():
            return
        await self._queue.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            error_log.warning("lifespan shutdown did not finish in %g s", timeout)

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        try:
            await self.app(scope, self._queue.get, self._send)
        except asyncio.CancelledError:
            # The worker is ending without a lifespan shutdown (a quick stop): not an error
            # of the app's.
            error_log.debug("lifespan of the app cancelled: the worker is stopping")
            raise
        except BaseException as exc:
            if self._started.is_set():
                error_log.error("lifespan of the app raised:\n%s", traceback.format_exc())
            elif self.mode == "auto":
                self.supported = False
                error_log.info("the app does not support lifespan (%s: %s); carrying on",
                               type(exc).__name__, exc)
            else:
                self._failure = traceback.format_exc().rstrip()
            if not isinstance(exc, Exception):
                raise
        finally:
            if not self._started.is_set() and self.mode == "on" and not self._failure:
                self._failure = "the app returned before lifespan startup completed"
            self._started.set()
            self._stopped.set()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._failure = "lifespan startup failed: " + message.get("message", "")
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._stopped.set()
        elif kind == "lifespan.shutdown.failed":
            error_log.error("lifespan shutdown failed: %s", message.get("message", ""))
            self._stopped.set()
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
