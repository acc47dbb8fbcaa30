"""WebSocket for ASGI apps (ASGI WebSocket spec 2.4) over wsproto, the `ws` extra.

A `WebSocketSession` takes over a connection whose request asked for an upgrade: bytes go
to wsproto, its events become `websocket.*` messages for the app, and the app's messages go
back through wsproto. Pings are answered, and sent every `ping_interval` seconds; a peer
that does not answer within `ping_timeout` is closed (1011). Messages larger than `max_size`
close the connection with 1009. A worker that stops closes open sessions with 1012.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from typing import Any

from forkserve.asgi import ASGIApp, ClientDisconnected, Message, Output, connection_scope
from forkserve.errors import StopNow
from forkserve.http.base import Request
from forkserve.logs import error_log

try:
    from wsproto import ConnectionType, WSConnection
    from wsproto.connection import ConnectionState
    from wsproto.events import (
        AcceptConnection,
        BytesMessage,
        CloseConnection,
        Ping,
        Pong,
        RejectConnection,
        RejectData,
        TextMessage,
    )
    from wsproto.events import Request as WSRequest
    from wsproto.extensions import PerMessageDeflate
except ModuleNotFoundError:  # the ws extra is not installed
    MISSING = "wsproto is not installed (pip install 'forkserve[ws]')"
except (ImportError, OSError) as exc:  # installed where this process cannot read it, or broken
    MISSING = f"wsproto cannot be imported: {exc}"
else:
    MISSING = ""  # (else why upgrade requests are refused)

# Close codes (RFC 6455 §7.4.1).
NORMAL = 1000
TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012

# How long to wait for the peer's answer to our close frame.
CLOSE_TIMEOUT = 5.0


def websocket_scope(request: Request, client: Any, server: Any, root_path: str,
                    state: dict[str, Any] | None) -> dict[str, Any]:
    """The scope of a WebSocket request (ASGI WebSocket spec 2.4)."""
    scope = connection_scope("websocket", request, client, server, root_path, state)
    scope["subprotocols"] = [
        item.strip().decode("latin-1")
        for name, value in request.headers if name == b"sec-websocket-protocol"
        for item in value.split(b",") if item.strip()
    ]
    scope["extensions"] = {"websocket.http.response": {}}
    return scope


class WebSocketSession:
    """One WebSocket connection between wsproto and an ASGI app."""

    def __init__(self, scope: dict[str, Any], request: Request, out: Output, max_size: int,
                 ping_interval: float, ping_timeout: float) -> None:
        self.scope = scope
        self.out = out
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.ws = WSConnection(ConnectionType.SERVER)
        self.ws.initiate_upgrade_connection(request.headers, request.target)
        self.messages: deque[Message] = deque()
        self.event = asyncio.Event()
        self.parts: list[bytes | str] = []
        self.size = 0
        self.accepted = False
        self.response_started = False  # a denial response (websocket.http.response.*)
        self.closed = False  # the app was told of the disconnect, or the socket is gone
        self.close_code = NORMAL
        self.last_pong = time.monotonic()
        self.pinger: asyncio.Task | None = None

    # -- bytes from the client ------------------------------------------------------------------

    def receive_data(self, data: bytes | None) -> None:
        """Feed bytes from the socket (None at its EOF)."""
        self.ws.receive_data(data)
        self._handle_events()

    def _handle_events(self) -> None:
        for event in self.ws.events():
            kind = type(event)
            if kind is WSRequest:
                self._deliver({"type": "websocket.connect"})
            elif kind is TextMessage or kind is BytesMessage:
                self._message_part(event)
            elif kind is Ping:
                self.out.write(self.ws.send(event.response()))
            elif kind is Pong:
                self.last_pong = time.monotonic()
            elif kind is CloseConnection:
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self.out.write(self.ws.send(event.response()))
                self._disconnected(event.code, event.reason or "")
                self.out.close()

    def _message_part(self, event: Any) -> None:
        self.parts.append(event.data)
        self.size += len(event.data)
        if self.size > self.max_size:
            self.close(TOO_BIG, f"message over {self.max_size} bytes")
            return
        if event.message_finished:
            text = type(event) is TextMessage
            data = "".join(self.parts) if text else b"".join(self.parts)
            self.parts.clear()
            self.size = 0
            self._deliver({"type": "websocket.receive", "text" if text else "bytes": data})

    def connection_lost(self) -> None:
        self._disconnected(self.close_code if self.closed else 1006, "")

    def _deliver(self, message: Message) -> None:
        self.messages.append(message)
        self.event.set()

    def _disconnected(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._deliver({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self.pinger is not None:
            self.pinger.cancel()

    # -- the app's receive and send -------------------------------------------------------------

    async def receive(self) -> Message:
        while not self.messages:
            self.event.clear()
            await self.event.wait()
        message = self.messages.popleft()
        if not self.messages and message["type"] == "websocket.disconnect":
            self.messages.append(message)  # every later receive() says the same
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if self.closed or self.out.closing:
            raise ClientDisconnected("the WebSocket is closed")
        if not self.accepted and not self.response_started:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._reject(403)
            elif kind == "websocket.http.response.start":
                self._start_denial(message)
            else:
                raise RuntimeError(f"expected 'websocket.accept' or 'websocket.close', "
                                   f"got {kind!r}")
        elif self.response_started:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected 'websocket.http.response.body', got {kind!r}")
            more = message.get("more_body", False)
            self.out.write(self.ws.send(RejectData(data=message.get("body", b""),
                                                   body_finished=not more)))
            if not more:
                self._disconnected(1006, "")
                self.out.close()
        elif kind == "websocket.send":
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
            if data is None:
                raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            self.out.write(self.ws.send(TextMessage(data=data) if isinstance(data, str)
                                        else BytesMessage(data=data)))
        elif kind == "websocket.close":
            self.close(message.get("code", NORMAL), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        await self.out.drain()

    def _accept(self, message: Message) -> None:
        headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
        self.out.write(self.ws.send(AcceptConnection(
            subprotocol=message.get("subprotocol"), extensions=[PerMessageDeflate()],
            extra_headers=headers)))
        self.accepted = True
        if self.ping_interval > 0:
            self.pinger = asyncio.get_running_loop().create_task(self._ping())

    def _reject(self, status: int) -> None:
        self.out.write(self.ws.send(RejectConnection(status_code=status)))
        self._disconnected(1006, "")
        self.out.close()

    def _start_denial(self, message: Message) -> None:
        headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
        self.out.write(self.ws.send(RejectConnection(
            status_code=message["status"], headers=headers, has_body=True)))
        self.response_started = True

    def close(self, code: int, reason: str = "") -> None:
        """End the session: a close frame if it is open (the peer gets CLOSE_TIMEOUT seconds
        to answer), a 403 (or 500 for an error) if it was never accepted."""
        if self.closed:
            return
        self.close_code = code
        if self.ws.state is ConnectionState.OPEN:
            self.out.write(self.ws.send(CloseConnection(code=code, reason=reason)))
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.out.close)
            self._disconnected(code, reason)
        elif self.response_started or self.accepted:
            self._disconnected(code, reason)
            self.out.close()
        else:
            self._reject(403 if code == NORMAL else 500)

    def close_for_restart(self) -> None:
        """End the session because the worker stops: 1012 (service restart)."""
        self.close(SERVICE_RESTART, "server restarting")

    async def _ping(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.ping_interval)
            if self.closed or self.ws.state is not ConnectionState.OPEN:
                return
            sent = time.monotonic()
            self.out.write(self.ws.send(Ping(payload=b"forkserve")))
            await asyncio.sleep(self.ping_timeout)
            if self.last_pong < sent and not self.closed:
                self.close(INTERNAL_ERROR, "ping timeout")
                return

    # -- running the app -------------------------------------------------------------------------

    async def run(self, app: ASGIApp) -> None:
        self._handle_events()  # the upgrade request itself: websocket.connect
        try:
            await app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            return
        except StopNow:  # the worker's own quick stop, not the app's
            raise
        except (Exception, SystemExit, KeyboardInterrupt):  # as for HTTP: the worker serves on
            error_log.error("error in WebSocket %s\n%s", self.scope["path"],
                            traceback.format_exc().rstrip())
            self.close(INTERNAL_ERROR)
            return
        self.close(NORMAL)
