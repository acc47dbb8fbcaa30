"""The load-test endpoints as an ASGI app, plus the ``/ws`` WebSocket echo; the contract is in
the package docstring.

Served with ``forkserve --chdir loadtests apps.asgi_app:app``. Lifespan startup creates the
file ``/file`` streams and puts its path in the lifespan state (so the app needs a server that
runs lifespan, as forkserve does by default). ``/hang`` calls ``time.sleep`` on purpose: it
blocks the event loop, so the worker stops heartbeating and the master kills and replaces it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from apps import (
    ALLOW_HANG_ENV,
    DOWNLOAD_MAX,
    FILE_SIZE,
    HANG_SECONDS,
    HELLO,
    JSON_BODY,
    PIECE,
    SLOW_MAX_MS,
    WORKER_HEADER,
    pattern_pieces,
    query_int,
    shared_file,
    upload_reply,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def _headers(length: int, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", content_type), (b"content-length", b"%d" % length),
            (WORKER_HEADER.encode(), b"%d" % os.getpid())]


async def _start(send: Send, length: int, content_type: bytes = b"text/plain",
                 status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _headers(length, content_type)})


async def _reply(send: Send, body: bytes, status: int = 200,
                 content_type: bytes = b"text/plain") -> None:
    await _start(send, len(body), content_type, status)
    await send({"type": "http.response.body", "body": body})


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await _reply(send, HELLO)


async def json_document(scope: Scope, receive: Receive, send: Send) -> None:
    await _reply(send, JSON_BODY, content_type=b"application/json")


async def upload(scope: Scope, receive: Receive, send: Send) -> None:
    digest = hashlib.sha256()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        piece = message.get("body", b"")
        digest.update(piece)
        size += len(piece)
        if not message.get("more_body"):
            break
    chunked = any(name == b"transfer-encoding" and b"chunked" in value.lower()
                  for name, value in scope["headers"])
    await _reply(send, upload_reply(size, digest.hexdigest(), chunked),
                 content_type=b"application/json")


async def _stream(send: Send, size: int, pieces: Iterable[bytes]) -> None:
    await _start(send, size, b"application/octet-stream")
    for piece in pieces:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def download(scope: Scope, receive: Receive, send: Send) -> None:
    size = query_int(scope["query_string"].decode("latin-1"), "size", PIECE, DOWNLOAD_MAX)
    await _stream(send, size, pattern_pieces(size))


async def file(scope: Scope, receive: Receive, send: Send) -> None:
    # Plain blocking reads: the file is small and in the page cache, each read takes
    # microseconds, and send() is where a slow client makes the app wait.
    with open(scope["state"]["file"], "rb") as f:
        await _stream(send, FILE_SIZE, iter(lambda: f.read(PIECE), b""))


async def slow(scope: Scope, receive: Receive, send: Send) -> None:
    ms = query_int(scope["query_string"].decode("latin-1"), "ms", 100, SLOW_MAX_MS)
    await asyncio.sleep(ms / 1000)
    await _reply(send, b"slept %d ms" % ms)


async def hang(scope: Scope, receive: Receive, send: Send) -> None:
    time.sleep(HANG_SECONDS)
    await _reply(send, b"woke up")


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """WebSocket: accept, then send every message back as it came (text or bytes)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.accept",
                "headers": [(WORKER_HEADER.encode(), b"%d" % os.getpid())]})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["file"] = shared_file()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


ROUTES: dict[str, tuple[str, Handler]] = {
    "/": ("GET", hello),
    "/json": ("GET", json_document),
    "/upload": ("POST", upload),
    "/download": ("GET", download),
    "/file": ("GET", file),
    "/slow": ("GET", slow),
}
if os.environ.get(ALLOW_HANG_ENV) == "1":
    ROUTES["/hang"] = ("GET", hang)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI 3 entry point: lifespan, ``/ws`` WebSocket echo, HTTP routes."""
    kind = scope["type"]
    if kind == "lifespan":
        await lifespan(scope, receive, send)
    elif kind == "websocket":
        if scope["path"] == "/ws":
            await echo(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008})  # a 403 before accepting
    else:
        route = ROUTES.get(scope["path"])
        if route is None:
            await _reply(send, b"not found\n", 404)
        elif scope["method"] != route[0]:
            await _reply(send, b"method not allowed\n", 405)
        else:
            await route[1](scope, receive, send)
