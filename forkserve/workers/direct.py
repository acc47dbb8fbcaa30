"""A just-accepted connection's first loop turn, on its socket directly.

Most clients send their request at once after connecting, so a plain connection's first read
usually finds it whole (`AsyncioWorker.take` tries one). Making the event loop's transport
for it costs more than serving it: a dozen system calls (address lookups, non-blocking mode,
TCP_NODELAY, registering with epoll and unregistering) and a loop turn before the first read.
`DirectTransport` stands in for that transport until the end of the loop turn that accepted
the connection. A response written in that turn goes out in one `send`; a connection closed
in it (`Connection: close`, HTTP/1.0, nginx's default `proxy_pass`) never gets a loop
transport. One still open then (keep-alive, a body to read, a client slower than the
response, an app still running) moves to the loop's transport, which takes over what this
one kept: unsent bytes, a pause of reading, an end of writing, a close.

The protocol sees one transport and then, in a second `connection_made`, the other
(`HTTPProtocol.connection_made` hands over with `moved_to`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

_DONTWAIT = socket.MSG_DONTWAIT


class DirectTransport:
    """The transport of `protocol`'s connection on `sock` (a plain stream socket, blocking
    or not: every call here is non-blocking) until `settle()`, called at the end of the loop
    turn that accepted it. `peer` is the address accept() returned, `local` the socket's own
    if known (else it is asked for).

    Writes are sent at once while nothing waits; bytes the socket cannot take wait for the
    loop's transport, and the protocol is told to pause writing meanwhile. `close()` with
    nothing waiting closes the socket, `abort()` always (once moving, both are left to the
    loop's transport); `connection_lost` follows on the next callback, as asyncio has it.
    Reading is the protocol's to pause again once moved (nothing is read here).
    `settle()` moves a connection still open to the loop's transport (`open_transport` makes
    it, from the protocol factory and `sock`, and calls `failed(exc)` if that fails); it calls
    the protocol's `connection_made` again, and the protocol calls `moved_to` with it.
    """

    __slots__ = ("_sock", "_peer", "_local", "_protocol", "_loop", "_pending", "_closing",
                 "_moving", "_eof", "_aborted", "_lost", "_writes", "_paused_protocol")

    def __init__(self, sock: socket.socket, peer: Any, local: Any, protocol: asyncio.Protocol,
                 loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._peer = peer
        self._local = local
        self._protocol = protocol
        self._loop = loop
        self._pending: list[bytes] = []  # bytes the socket could not take yet
        self._closing = False
        self._moving = False  # the loop's transport is being made: the socket is its
        self._eof = False  # write_eof() was asked
        self._aborted = False
        self._lost = False  # the socket is closed here
        self._writes = 0
        self._paused_protocol = False

    # -- the asyncio.Transport calls the protocol makes ---------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._peer
        if name == "sockname":
            if self._local is not None:
                return self._local
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        return default

    def is_closing(self) -> bool:
        return self._closing

    def write(self, data: bytes) -> None:
        if self._closing or self._eof or not data:
            return
        if self._moving or self._pending:
            self._keep(data)
            return
        self._writes += 1
        if self._writes == 2:
            # A second small write while the first is unacknowledged would wait for the
            # client's delayed ACK (Nagle): as the loop's transports do, no delay.
            self._setsockopt_nodelay()
        try:
            sent = self._sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:  # the client is gone (EPIPE, ECONNRESET)
            self._lose(exc)
            return
        if sent < len(data):
            self._keep(data[sent:])

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._moving and not self._pending:
            self._lose(None)
        # else the loop's transport sends what waits, then closes

    def abort(self) -> None:
        if self._aborted or self._lost:
            return
        self._closing = self._aborted = True
        self._pending.clear()
        if not self._moving:
            self._lose(None)

    def pause_reading(self) -> None:
        pass  # nothing is read here after the first read (the protocol pauses the next)

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self._pending))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._eof = True  # the loop's transport ends writing after what waits

    # -- moving to the loop's transport ---------------------------------------------------------

    def settle(self, open_transport: Callable[[Callable[[], asyncio.Protocol], socket.socket],
                                              Coroutine[Any, Any, Any]],
               step: Callable[[Coroutine[Any, Any, Any],
                               Callable[[BaseException | None], None]], None]) -> None:
        """The loop turn that accepted the connection is over: if it is still open, give it
        to the loop's transport (`open_transport(factory, sock)`, run by `step(opening,
        finished)`, which calls `finished` with the exception if it failed, else None)."""
        if self._lost or self._moving:
            return
        self._moving = True
        protocol = self._protocol
        step(open_transport(lambda: protocol, self._sock), self._failed)

    def moved_to(self, transport: asyncio.Transport) -> None:
        """The loop's transport is made and its protocol told: it takes over."""
        if self._aborted:
            transport.abort()
            return
        for data in self._pending:
            transport.write(data)
        self._pending.clear()
        if self._paused_protocol:
            self._paused_protocol = False
            high = transport.get_write_buffer_limits()[1]
            if transport.get_write_buffer_size() <= high:  # (else it paused the protocol)
                self._protocol.resume_writing()
        if self._eof:
            transport.write_eof()
        if self._closing:
            transport.close()

    def _failed(self, exc: BaseException | None) -> None:
        """The loop's transport was made (None), or could not be (`exc`): then the
        connection is lost."""
        if exc is not None:
            self._lose(exc if isinstance(exc, Exception) else None)

    # -- helpers --------------------------------------------------------------------------------

    def _keep(self, data: bytes) -> None:
        self._pending.append(bytes(data) if type(data) is not bytes else data)
        if not self._paused_protocol:
            self._paused_protocol = True
            self._protocol.pause_writing()

    def _lose(self, exc: Exception | None) -> None:
        self._closing = self._lost = True
        self._pending.clear()
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)
        self._protocol = None  # (no reference cycle left for the garbage collector)

    def _setsockopt_nodelay(self) -> None:
        if self._sock.family != socket.AF_UNIX:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
