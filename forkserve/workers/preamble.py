"""What a connection sends before HTTP: its PROXY protocol header (--proxy-protocol) and its
TLS handshake, read before its `HTTPProtocol` runs (`connect_after_preamble`). A plain
connection has neither: the worker makes its protocol at once (`AsyncioWorker.take`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING

from forkserve.http.base import error_response
from forkserve.logs import error_log
from forkserve.proxy_protocol import ProxyHeader, ProxyProtocolError
from forkserve.tls import PLAIN_HTTP_EXPLAIN, is_plain_http
from forkserve.workers.base import STOP_GRACE, ProxyHeaderReader
from forkserve.workers.protocol import HTTPProtocol

if TYPE_CHECKING:
    from forkserve.workers.aio import AsyncioWorker


async def connect_after_preamble(worker: AsyncioWorker, sock: socket.socket) -> None:
    """Run an HTTPProtocol on `sock`, accepted by `worker`, once its PROXY header is read and
    its TLS handshake done. The client has --keep-alive to send its first byte, then
    --header-timeout for all that (the request head's own bound starts once the protocol
    runs). Ends with `worker.connection_settled()`, whether the protocol runs or the socket
    was closed."""
    loop = worker.loop
    tls = worker.tls
    header = None
    cfg = worker.cfg
    sock.setblocking(False)  # read here before its transport exists
    try:
        await _readable(loop, sock, worker.first_byte_timeout)
        # For the PROXY header and the TLS handshake (loop time):
        deadline = loop.time() + (cfg.header_timeout or worker.idle_timeout)
        if cfg.proxy_protocol:
            header = await _proxy_header(loop, sock, deadline)
        if tls is not None and not await _starts_tls(loop, sock, deadline):
            return
        await loop.connect_accepted_socket(
            lambda: HTTPProtocol(worker, header), sock, ssl=tls,
            ssl_handshake_timeout=max(0.001, deadline - loop.time()) if tls else None)
    except (OSError, asyncio.TimeoutError, ProxyProtocolError) as exc:
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLZeroReturnError):
            error_log.debug("TLS handshake failed: %s", exc)
        elif isinstance(exc, ProxyProtocolError):
            error_log.info("closed a connection: %s", exc)
        sock.close()
    finally:
        worker.connection_settled()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                    timeout: float) -> None:
    """Wait until `sock` is readable; raises TimeoutError after `timeout` seconds."""
    ready = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, max(0.0, timeout))
    finally:
        loop.remove_reader(fd)


async def _proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        deadline: float) -> ProxyHeader:
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
        await _readable(loop, sock, deadline - loop.time())


async def _starts_tls(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                      deadline: float) -> bool:
    """Wait for the first byte of the client's TLS handshake (by `deadline`, loop time):
    True when it comes. A client speaking plain HTTP is answered 400 (in plain text)
    and the socket closed; one that leaves is closed."""
    await _readable(loop, sock, deadline - loop.time())
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
        while await asyncio.wait_for(loop.sock_recv(sock, 65536), STOP_GRACE):
            pass
    finally:
        sock.close()
    return False
