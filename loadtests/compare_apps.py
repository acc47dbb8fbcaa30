"""The apps of ``loadtests/compare`` beside hello world (``hello/apps.py``'s, a copy of
``../shared/bench/apps.py``).

- ``wsgi``, ``asgi`` (the "json" app): a document of a few KB, encoded on every request.
- ``blocking_wsgi``, ``blocking_asgi`` (the "blocking" app): a view that waits on a database,
  as real apps do: each process's requests wait 1 ms, and every tenth 40 ms (``time.sleep``
  in WSGI, which blocks its thread; ``asyncio.sleep`` in ASGI).

Each answers every request with the same bytes (``body()``, ``BLOCKING_BODY``), so that the
load generator can check each response.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

# An API-like payload: nested objects, strings, numbers, booleans, lists (about 4 KB encoded).
DOCUMENT: dict[str, Any] = {
    "page": 1,
    "per_page": 25,
    "total": 25,
    "items": [
        {
            "id": n,
            "sku": f"SKU-{n:05d}",
            "name": f"Item number {n}",
            "price": round(4.99 + n * 1.25, 2),
            "in_stock": n % 3 != 0,
            "tags": ["sale", "new"] if n % 2 else ["classic"],
            "dimensions": {"w": 10 + n, "h": 20 + n, "d": 5},
        }
        for n in range(1, 26)
    ],
}
HEADERS = [("Content-Type", "application/json")]


def body() -> bytes:
    """The response body, as both apps encode it."""
    return json.dumps(DOCUMENT).encode()


def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    data = body()
    start_response("200 OK", [*HEADERS, ("Content-Length", str(len(data)))])
    return [data]


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def asgi(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    data = body()
    headers = [(k.lower().encode(), v.encode())
               for k, v in [*HEADERS, ("Content-Length", str(len(data)))]]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


BLOCKING_BODY = b"waited\n"
_BLOCKING_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BLOCKING_BODY)))]
_calls = itertools.count()  # this process's requests (next() on it is atomic across threads)


def _wait_seconds() -> float:
    return 0.040 if next(_calls) % 10 == 9 else 0.001


def blocking_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    time.sleep(_wait_seconds())
    start_response("200 OK", _BLOCKING_HEADERS)
    return [BLOCKING_BODY]


async def blocking_asgi(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return await asgi(scope, receive, send)  # lifespan
    await asyncio.sleep(_wait_seconds())
    headers = [(k.lower().encode(), v.encode()) for k, v in _BLOCKING_HEADERS]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BLOCKING_BODY})
