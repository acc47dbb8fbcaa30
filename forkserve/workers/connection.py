"""One client connection of a sync worker: request handling with bounded blocking I/O.

Between requests the socket is watched by the worker's selector. Once a request head is
parsed, `serve()` runs in the worker's loop (or a pool thread) and does the I/O of that
request itself: the body is read on demand, the response written as the app produces it,
each wait bounded by `io_timeout`. The socket stays non-blocking throughout, so a read or
write that would block waits in poll() for at most that long.

On an HTTPS server the connection starts as the accepted socket and becomes an SSLSocket when
its first byte shows a TLS handshake; the handshake then advances in the worker's loop, each
time the socket is readable, and counts as the start of the request head (--header-timeout).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from forkserve.errors import StopNow
from forkserve.http.base import (
    END_OF_MESSAGE,
    NEED_DATA,
    Data,
    FilePart,
    HTTPConnection,
    ProtocolError,
    Request,
    complete_headers,
    error_response,
)
from forkserve.logs import access_log, error_log, format_access_line
from forkserve.proxy import TrustedProxies
from forkserve.proxy_protocol import ProxyProtocolError
from forkserve.tls import PLAIN_HTTP_EXPLAIN, is_plain_http, tls_environ
from forkserve.workers.base import MAX_DRAIN, ProxyHeaderReader
from forkserve.wsgi import EnvironFactory, ErrorStream, InputStream, call_app

RECV_SIZE = 65536
# Piece size when a file is copied through TLS instead of sent with sendfile().
SENDFILE_COPY_SIZE = 256 * 1024
# While waiting on a slow client, the inline worker heartbeats this often (seconds).
WAIT_SLICE = 0.25

# What serve() leaves the connection in.
READ = "read"  # waiting for the next request: watch it for reading
LINGER = "linger"  # our side is shut: discard what the client still sends, then close
DONE = "done"  # closed


class ClientGone(OSError):
    """The client closed the connection, reset it, or stalled past the I/O timeout."""


class ClientError(OSError):
    """The request body broke HTTP/1.1; `status` is what to answer if nothing was sent."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class ServerContext:
    """What every connection of a worker shares: the app, settings and log switches."""

    def __init__(self, app: Callable[..., Any], io_timeout: float, multithread: bool,
                 access_log_format: str | None, keep_alive: bool = True,
                 on_wait: Callable[[], None] | None = None, root_path: str = "",
                 proxies: TrustedProxies | None = None) -> None:
        self.app = app
        self.io_timeout = io_timeout
        self.keep_alive = keep_alive
        self.on_wait = on_wait  # called while a request waits on its client
        self.root_path = root_path
        self.proxies = proxies
        self.multithread = multithread
        self.access_log_format = access_log_format
        self.stopping = False
        self.served = 0  # requests answered (updated from pool threads too: approximate)


class ClientConnection:
    """A client socket, its HTTP state machine, and the `ResponseWriter` of its request."""

    __slots__ = (
        "sock", "fd", "peer", "proto", "ctx", "environ_factory",
        "method", "status", "reason", "headers", "headers_sent", "sent", "body_done", "_poll",
        "head_started", "tls", "secure", "proxy_reader", "started", "request",
    )

    def __init__(self, sock: socket.socket, peer: Any, proto: HTTPConnection,
                 ctx: ServerContext, tls: ssl.SSLContext | None = None,
                 proxy_protocol: bool = False) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.proto = proto
        self.ctx = ctx
        self.tls = tls  # the context to wrap the socket with, until it is wrapped
        self.secure = False  # self.sock is an SSLSocket
        self.proxy_reader = ProxyHeaderReader() if proxy_protocol else None
        self.environ_factory = EnvironFactory(sock.getsockname(), peer, ctx.multithread,
                                              ctx.root_path, "https" if tls else "http",
                                              ctx.proxies)
        self.head_started = False  # the next request's first bytes have arrived
        self.started = 0.0  # when `request`, served in a pool thread, began (monotonic)
        self.request: Request | None = None
        self.method = b""
        self._poll: select.poll | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_sent = False
        self.sent = 0
        self.body_done = False

    # -- serving ----------------------------------------------------------------------------

    def serve(self, request: Request) -> str:
        """Answer `request` and every complete request already buffered behind it (pipelining).

        Returns READ, LINGER or DONE. Never raises: errors are answered or logged here.
        """
        proto = self.proto
        while True:
            if not self._serve_one(request):
                return self.close_after_error()
            if not proto.start_next_cycle():
                self.close()
                return DONE
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                return self.reject(exc)
            if type(event) is not Request:
                if event is NEED_DATA:
                    return READ
                self.close()
                return DONE
            request = event
            self.begin(request)  # (the worker noted the first when handing it to a thread)

    def begin(self, request: Request) -> None:
        """Note when `request` began, for the stuck-request check of pool threads."""
        self.started = time.monotonic()
        self.request = request

    def _serve_one(self, request: Request) -> bool:
        """One request-response exchange; False when the connection cannot go on."""
        self._reset()
        self.ctx.served += 1
        self.method = request.method
        started = time.time() if self.ctx.access_log_format else 0.0
        errors = ErrorStream()
        environ = self.environ_factory.build(request, InputStream(self.read_chunk), errors)
        go_on = True
        try:
            call_app(self.ctx.app, environ, self)
        except ClientGone:
            go_on = False
        except ClientError as exc:
            error_log.info("bad request body from %s: %s", _peer_text(self.peer), exc)
            if not self.headers_sent:
                self._send_error(exc.status)
            go_on = False
        except StopNow:  # the worker's own quick stop, not the app's
            raise
        except BaseException:  # the app's SystemExit and KeyboardInterrupt too, as peers do
            error_log.exception(
                "error handling %s %s", environ["REQUEST_METHOD"], environ["RAW_URI"]
            )
            if not self.headers_sent:
                self._send_error(500)
            go_on = False
        errors.flush()
        if started:
            self._log_access(request, environ, started)
        if go_on and not self.body_done:
            # The rest of the body is read only to go on with the next request.
            return False if self.proto.will_close() else self._drain()
        return go_on

    def _send_error(self, status: int, explain: str = "") -> None:
        self.status = status
        self.headers_sent = True
        try:
            self.sendall(error_response(status, explain, head=self.method == b"HEAD"))
        except ClientGone:
            pass

    def _drain(self) -> bool:
        """Read and discard the rest of an unread request body, up to MAX_DRAIN bytes."""
        if self.proto.client_waiting_for_continue:
            return False  # the client never sent it; the response said Connection: close
        total = 0
        try:
            while total <= MAX_DRAIN:
                chunk = self.read_chunk()
                if not chunk:
                    return True
                total += len(chunk)
        except (ClientGone, ClientError):
            pass
        return False

    def _log_access(self, request: Request, environ: dict, started: float) -> None:
        access_log.info(format_access_line(
            self.ctx.access_log_format,
            remote=environ["REMOTE_ADDR"],
            method=environ["REQUEST_METHOD"],
            target=environ["RAW_URI"],
            version=request.http_version.decode("ascii"),
            status=self.status,
            sent=self.sent,
            started=started,
            duration=time.time() - started,
            request_headers=request.headers,
            response_headers=self.headers,
            environ=environ,
        ))

    def reject(self, exc: ProtocolError) -> str:
        """Answer a malformed request with its status and close; returns LINGER or DONE."""
        error_log.debug("refused request from %s: %s %s", _peer_text(self.peer), exc.status,
                        exc.detail)
        self.method = b""  # (not the method of the request before it)
        self._send_error(exc.status, exc.explain)
        self.body_done = False  # what follows a refused head is unread: linger
        return self.close_after_error()

    # -- request body (wsgi.input reads through this) ----------------------------------------

    def read_chunk(self) -> bytes:
        """The next piece of the request body, b"" at its end. Sends 100 Continue first if
        the client waits for it."""
        if self.body_done:
            return b""
        proto = self.proto
        if proto.client_waiting_for_continue and not self.headers_sent:
            self.sendall(proto.send_continue())
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                raise ClientError(exc.status, exc.detail) from None
            if type(event) is Data:
                if event.data:
                    return event.data
            elif event is END_OF_MESSAGE:
                self.body_done = True
                return b""
            elif event is NEED_DATA:
                proto.receive_data(self.recv())
            else:
                raise ClientError(400, f"unexpected {event!r} while reading the body")

    # -- ResponseWriter (see forkserve.wsgi) -------------------------------------------------

    def start(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers

    def _head(self, body_length: int | None) -> bytes:
        """The response head; adds Date, Server, and Content-Length when `body_length` is
        known and the app gave no framing. Callers set `headers_sent` once the bytes that go
        with it are composed: a framing error raised before then still gets a 500."""
        close = self.ctx.stopping or not self.ctx.keep_alive or (
            self.proto.client_waiting_for_continue and not self.body_done)
        headers = complete_headers(self.headers, self.status, body_length, close)
        return self.proto.send_response(self.status, self.reason, headers)

    def write(self, data: bytes) -> None:
        if not data:
            return
        proto = self.proto
        if self.headers_sent:
            self.sendall(proto.send_data(data))
        else:
            out = self._head(None) + proto.send_data(data)
            self.headers_sent = True
            self.sendall(out)
        self.sent += len(data)

    def finish(self, last: bytes | None = None) -> None:
        proto = self.proto
        if self.headers_sent:
            out = proto.send_data(last) + proto.send_end() if last else proto.send_end()
        elif last is None:
            # An empty body; for HEAD the length of the GET body is unknown, so say nothing.
            out = self._head(None if self.method == b"HEAD" else 0) + proto.send_end()
        else:
            out = self._head(len(last)) + proto.send_data(last) + proto.send_end()
        self.headers_sent = True
        if last:
            self.sent += len(last)
        if out:
            self.sendall(out)

    def send_file(self, fd: int, offset: int, count: int) -> None:
        if not self.headers_sent:
            head = self._head(count)
            self.headers_sent = True
            self.sendall(head)
        for piece in self.proto.send_file(FilePart(fd, offset, count)):
            if type(piece) is FilePart:
                self._sendfile(piece)
            else:
                self.sendall(piece)
        self.sent += count

    # -- socket I/O, bounded by io_timeout ---------------------------------------------------

    def _wait(self, events: int) -> None:
        poll = self._poll
        if poll is None:
            poll = self._poll = select.poll()
            poll.register(self.fd, events)
        else:
            poll.modify(self.fd, events)
        ctx = self.ctx
        if ctx.on_wait is None:
            ready = poll.poll(ctx.io_timeout * 1000)
        else:
            # Wait in slices so the worker's heartbeat goes on while the client is slow.
            deadline = time.monotonic() + ctx.io_timeout
            while not (ready := poll.poll(min(WAIT_SLICE, ctx.io_timeout) * 1000)):
                ctx.on_wait()
                if time.monotonic() >= deadline:
                    break
        if not ready:
            raise ClientGone(f"client stalled for {ctx.io_timeout:g} s")

    def receive(self) -> bytes | None:
        """For the worker's loop, when the socket is readable: what the client sent, b"" if
        it closed the connection or broke it, None if nothing is complete yet (a TLS
        handshake under way, part of a TLS record). Never blocks.

        Raises ProtocolError when an HTTPS port receives plain HTTP.
        """
        try:
            if self.proxy_reader is not None and not self._read_proxy_header():
                return None
            if self.tls is not None:
                self._handshake()
            data = self.sock.recv(RECV_SIZE)
            if self.secure and self.sock.pending():
                data += self.sock.recv(self.sock.pending())
            return data
        except (BlockingIOError, ssl.SSLWantReadError):
            return None
        except OSError as exc:  # a reset, a failed handshake, TLS garbage
            if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLZeroReturnError):
                error_log.debug("TLS error from %s: %s", _peer_text(self.peer), exc)
            return b""
        except ProxyProtocolError as exc:
            error_log.info("closed a connection from %s: %s", _peer_text(self.peer), exc)
            return b""

    def _read_proxy_header(self) -> bool:
        """Read the PROXY protocol header; True once it is read and its client adopted."""
        header = self.proxy_reader.read(self.sock)
        if header is None:
            return False
        self.proxy_reader = None
        variables = {"wsgi.url_scheme": "https"} if header.tls else {}
        if header.client is not None:
            self.peer = header.client
            variables.update(REMOTE_ADDR=header.client[0], REMOTE_PORT=str(header.client[1]))
        self.environ_factory.extend(variables)
        return True

    def _handshake(self) -> None:
        """Advance the TLS handshake; returns once it is complete (the socket is wrapped), or
        the client closed before it began.

        Raises BlockingIOError or SSLWantReadError while it waits for the client, OSError
        when it failed, ProtocolError for a client speaking plain HTTP.
        """
        if not self.secure:
            first = self.sock.recv(1, socket.MSG_PEEK)
            if is_plain_http(first):
                self.tls = None  # answered in plain text, then closed
                raise ProtocolError(400, "plain HTTP on an HTTPS port", PLAIN_HTTP_EXPLAIN)
            if not first:
                return  # closed before the handshake: recv() says b""
            self.sock = self.tls.wrap_socket(self.sock, server_side=True,
                                             do_handshake_on_connect=False)
            self.secure = True
        try:
            self.sock.do_handshake()
        except ssl.SSLWantWriteError:
            # The handshake's first flight did not fit in an empty send buffer: a client
            # that does not read it is not worth a blocked loop.
            raise ConnectionAbortedError("client does not read the TLS handshake") from None
        self.tls = None
        self.environ_factory.extend(tls_environ(self.sock))

    def recv(self) -> bytes:
        """Bytes from the client (b"" at its EOF), waiting at most io_timeout."""
        while True:
            try:
                return self.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(select.POLLIN)
            except ssl.SSLWantWriteError:  # a TLS key update must go out first
                self._wait(select.POLLOUT)
            except ssl.SSLZeroReturnError:
                return b""
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def sendall(self, data: bytes) -> None:
        """Send all of `data`, waiting at most io_timeout each time the client is slow."""
        sock = self.sock
        try:
            while True:
                try:
                    sent = sock.send(data)
                except (BlockingIOError, ssl.SSLWantWriteError):
                    self._wait(select.POLLOUT)
                    continue
                except ssl.SSLWantReadError:
                    self._wait(select.POLLIN)
                    continue
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
        except ClientGone:
            raise
        except OSError as exc:
            raise ClientGone(str(exc)) from None

    def _sendfile(self, part: FilePart) -> None:
        offset, remaining = part.offset, part.count
        if self.secure:  # the kernel cannot encrypt: copy the file through TLS
            while remaining > 0:
                chunk = os.pread(part.fd, min(remaining, SENDFILE_COPY_SIZE), offset)
                if not chunk:
                    raise ClientGone("file ended before its announced length")
                self.sendall(chunk)
                offset += len(chunk)
                remaining -= len(chunk)
            return
        while remaining > 0:
            try:
                sent = os.sendfile(self.fd, part.fd, offset, remaining)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if sent == 0:
                raise ClientGone("file ended before its announced length")
            offset += sent
            remaining -= sent

    # -- closing ----------------------------------------------------------------------------

    def close_after_error(self) -> str:
        """Close our side after a refused or failed exchange.

        Unread request bytes would make the kernel reset the connection and destroy the
        response in flight, so shut down writing and let the worker discard what arrives.
        """
        if self.body_done:
            self.close()
            return DONE
        self._close_notify()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return DONE
        return LINGER

    def close(self) -> None:
        self._close_notify()
        try:
            self.sock.close()
        except OSError:
            pass

    def _close_notify(self) -> None:
        """On TLS, say the response is complete (close_notify), so that a client reading to
        the end of the connection can tell it from a cut one. Never waits for the reply."""
        if self.secure:
            self.secure = False
            try:
                self.sock.unwrap()
            except (OSError, ValueError):
                pass  # the client's own close_notify is not waited for; or it is gone


def _peer_text(peer: Any) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"

