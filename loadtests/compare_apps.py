"""The JSON apps of ``loadtests/compare``: a document of a few KB, encoded on every request.

``wsgi`` and ``asgi`` answer every request with the same bytes, ``body()``, so that the load
generator can check each response. The hello-world apps are ``hello/apps.py``'s (a copy of
``../shared/bench/apps.py``).
"""

from __future__ import annotations

import json
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
