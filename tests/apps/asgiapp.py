"""Test ASGI apps: the routes of wsgiapp.py that make sense for ASGI, plus ASGI's own."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from urllib.parse import parse_qs

TEXT = [(b"content-type", b"text/plain")]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _query(scope) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


def _route_path(scope) -> str:
    """The path below the root path (the scope's path includes it, as in ASGI)."""
    root, path = scope["root_path"], scope["path"]
    return path[len(root):] if root and path.startswith(root) else path


async def _reply(send, body: bytes, status: int = 200, headers=()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": TEXT + [(b"content-length", b"%d" % len(body))] + list(headers)})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> tuple[bytes, int]:
    parts, messages = [], 0
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        messages += 1
        parts.append(message["body"])
        if not message.get("more_body"):
            return b"".join(parts), messages


async def hello(scope, receive, send):
    await _reply(send, b"Hello, World!")


async def pid(scope, receive, send):
    await _reply(send, str(os.getpid()).encode())


async def echo(scope, receive, send):
    body, messages = await _read_body(receive)
    await _reply(send, body, headers=[(b"x-messages", str(messages).encode())])


async def stream(scope, receive, send):
    n = int(_query(scope).get("n", "3"))
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    for i in range(n):
        await send({"type": "http.response.body", "body": b"piece %d\n" % i, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def ignore_body(scope, receive, send):
    await _reply(send, b"ignored")


async def fail(scope, receive, send):
    raise RuntimeError("deliberate failure before start_response")


async def fail_midway(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    await send({"type": "http.response.body", "body": b"first part\n", "more_body": True})
    raise RuntimeError("deliberate failure after the headers")


async def marked(scope, receive, send):
    """Streams (endlessly with ?endless=1) until the client leaves; logs CLOSED tag."""
    query = _query(scope)
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    try:
        await send({"type": "http.response.body", "body": b"start\n",
                    "more_body": query.get("endless") == "1"})
        while query.get("endless") == "1":
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
    except OSError:
        pass
    finally:
        say(f"CLOSED {query.get('tag', '')}")


async def stream_then_wait(scope, receive, send):
    """Streams a first piece, waits for http.disconnect, then says whether send() raised."""
    await _read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
    message = await receive()
    try:
        await send({"type": "http.response.body", "body": b"more\n", "more_body": True})
    except OSError as exc:
        say(f"AFTER {message['type']}: send raised {type(exc).__name__}")
    else:
        say(f"AFTER {message['type']}: send went through")


async def ticks(scope, receive, send):
    """A chunked text stream: 'tick' every ?interval= seconds until send() raises; logs TICKS
    END tag."""
    query = _query(scope)
    interval = float(query.get("interval", "0.2"))
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    try:
        while True:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(interval)
    finally:
        say(f"TICKS END {query.get('tag', '')}")


async def sleep(scope, receive, send):
    query = _query(scope)
    if "tag" in query:
        say(f"SLEEPING {query['tag']}")
    await asyncio.sleep(float(query.get("s", "0.5")))
    await _reply(send, str(os.getpid()).encode())


async def block(scope, receive, send):
    """Blocks the event loop: a hung app, as the master must see it."""
    query = _query(scope)
    say(f"SLEEPING {query.get('tag', '')}")
    time.sleep(float(query.get("s", "30")))
    await _reply(send, b"woke up")


_waiting: list[asyncio.Event] = []


async def barrier(scope, receive, send):
    """Answers only when a second request reaches it too: proves two run at once."""
    event = asyncio.Event()
    _waiting.append(event)
    if len(_waiting) >= 2:
        for waiting in _waiting:
            waiting.set()
        _waiting.clear()
    try:
        await asyncio.wait_for(event.wait(), 10)
    except TimeoutError:
        await _reply(send, b"alone", 503)
        return
    await _reply(send, b"together")


async def scope_dump(scope, receive, send):
    data = {k: v for k, v in scope.items() if k not in ("headers", "state", "raw_path",
                                                          "query_string")}
    data["headers"] = [[k.decode(), v.decode()] for k, v in scope["headers"]]
    data["raw_path"] = scope["raw_path"].decode("latin-1")
    data["query_string"] = scope["query_string"].decode("latin-1")
    data["state"] = dict(scope.get("state", {}))
    await _reply(send, json.dumps(data).encode())
    if "mutate" in _query(scope):  # as middleware may: the next request must not see it
        scope["path"] = scope["root_path"] = "/mutated"
        scope["query_string"] = b"mutated"
        scope["headers"].append((b"x-mutated", b"1"))
        scope["extensions"]["mutated"] = {}
        scope.get("state", {})["mutated"] = True


async def wait_disconnect(scope, receive, send):
    """Reads the body, then waits for http.disconnect and logs it."""
    await _read_body(receive)
    message = await receive()
    say(f"DISCONNECT {message['type']}")


async def trailers(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "trailers": True,
                "headers": TEXT + [(b"trailer", b"x-checksum")]})
    await send({"type": "http.response.body", "body": b"with trailers"})
    await send({"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")]})


async def body_before_start(scope, receive, send):
    await send({"type": "http.response.body", "body": b"too early"})


async def start_twice(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})


async def returns_early(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": TEXT})


async def big_download(scope, receive, send):
    """?mb= MiB in pieces of ?kb= KiB (64): a client that never reads must not make us buffer
    it all."""
    query = _query(scope)
    total = int(query.get("mb", "64")) * 1024 * 1024
    await send({"type": "http.response.start", "status": 200,
                "headers": TEXT + [(b"content-length", str(total).encode())]})
    piece = b"d" * (int(query.get("kb", "64")) * 1024)
    for sent in range(0, total, len(piece)):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
        if sent % (8 * 1024 * 1024) == 0:
            say(f"DOWNLOAD {sent} rss={_rss_mib():.0f}")
    await send({"type": "http.response.body", "body": b""})


async def events_until_send_fails(scope, receive, send):
    """A server-sent event stream that never calls receive(): it ends when send() raises."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    try:
        while True:
            await send({"type": "http.response.body", "body": b"data: tick\n\n",
                        "more_body": True})
            await asyncio.sleep(0.05)
    except OSError:
        say("EVENTS send raised")


async def raise_exit(scope, receive, send):
    """Raises SystemExit (?kind=exit, the default) or KeyboardInterrupt (?kind=interrupt)."""
    if _query(scope).get("kind") == "interrupt":
        raise KeyboardInterrupt
    raise SystemExit(4)


_hoard: list[bytearray] = []


async def grow(scope, receive, send):
    """Keeps ?mb= more MiB (touched, so resident); answers the total kept, in bytes."""
    _hoard.append(bytearray(int(_query(scope).get("mb", "10")) * 1024 * 1024))
    await _reply(send, str(sum(map(len, _hoard))).encode())


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def respond_with(scope, receive, send):
    """Responds "hello" with the headers the request body lists: JSON [[name, value], ...]."""
    body, _ = await _read_body(receive)
    headers = [(name.encode("latin-1"), value.encode("latin-1"))
               for name, value in json.loads(body)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


ROUTES = {
    "/respond-with": respond_with,
    "/": hello, "/hello": hello, "/pid": pid, "/echo": echo, "/stream": stream,
    "/ignore-body": ignore_body, "/fail": fail, "/fail-midway": fail_midway,
    "/marked": marked, "/sleep": sleep, "/block": block, "/barrier": barrier,
    "/scope": scope_dump, "/wait-disconnect": wait_disconnect, "/trailers": trailers,
    "/body-before-start": body_before_start, "/start-twice": start_twice,
    "/returns-early": returns_early, "/big-download": big_download,
    "/stream-then-wait": stream_then_wait, "/ticks": ticks,
    "/raise-exit": raise_exit, "/grow": grow, "/events-until-send-fails": events_until_send_fails,
}


async def websocket(scope, receive, send):
    """WebSocket routes: /ws/echo, /ws/reject, /ws/deny, /ws/close, /ws/error, /ws/exit,
    /ws/wait."""
    message = await receive()
    assert message["type"] == "websocket.connect", message
    path = _route_path(scope)
    if path == "/ws/reject":
        await send({"type": "websocket.close"})
        return
    if path == "/ws/deny":
        await send({"type": "websocket.http.response.start", "status": 418,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "websocket.http.response.body", "body": b"no sockets for you"})
        return
    subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol,
                "headers": [(b"x-accepted-by", str(os.getpid()).encode())]})
    if path == "/ws/close":
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        return
    if path == "/ws/error":
        raise RuntimeError("deliberate WebSocket failure")
    if path == "/ws/exit":
        raise SystemExit(4)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            say(f"WS DISCONNECT {message['code']}")
            return
        if path == "/ws/echo":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await websocket(scope, receive, send)
        return
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started_by"] = os.getpid()
                say(f"LIFESPAN startup {os.getpid()}")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                say(f"LIFESPAN shutdown {os.getpid()}")
                await send({"type": "lifespan.shutdown.complete"})
                return
    route = ROUTES.get(_route_path(scope))
    if route is None:
        await _reply(send, b"not found", 404)
        return
    await route(scope, receive, send)


async def slow_startup(scope, receive, send):
    """Lifespan startup takes a second (it says when it begins): a stop may come meanwhile."""
    if scope["type"] != "lifespan":
        await app(scope, receive, send)
        return

    async def slow_receive():
        message = await receive()
        if message["type"] == "lifespan.startup":
            say("LIFESPAN startup begins")
            await asyncio.sleep(1)
        return message

    await app(scope, slow_receive, send)


async def failing_startup(scope, receive, send):
    """Lifespan startup fails: the worker must not boot."""
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
        return
    await app(scope, receive, send)


async def no_lifespan(scope, receive, send):
    """Does not do lifespan (raises), like many simple apps."""
    if scope["type"] != "http":
        raise ValueError(f"unsupported scope {scope['type']}")
    await app(scope, receive, send)


class ClassicApp:
    """An ASGI 2 (double-callable) app."""

    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        if self.scope["type"] == "http":
            await _reply(send, b"asgi2")
