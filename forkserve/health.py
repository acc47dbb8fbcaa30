"""--health-path: what the workers answer load balancers and probes, without the app.

200 "ok" while the server serves, 503 "stopping" once it stops as a whole (the master's
scoreboard says so: a worker replaced by a reload or recycled is not the server stopping),
405 to methods other than GET and HEAD. As small WSGI and ASGI apps, so that the answer goes
through the same connection layer as the app's (keep-alive, HEAD, access log).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from forkserve.asgi import ASGIApp
from forkserve.scoreboard import Scoreboard


def _answer(scoreboard: Scoreboard, method: str) -> tuple[str, list[tuple[str, str]], bytes]:
    if method not in ("GET", "HEAD"):
        status, body, extra = "405 Method Not Allowed", b"method not allowed\n", [
            ("Allow", "GET, HEAD")]
    elif scoreboard.stopping:
        status, body, extra = "503 Service Unavailable", b"stopping\n", []
    else:
        status, body, extra = "200 OK", b"ok\n", []
    return status, [("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                    *extra], body


def wsgi_app(scoreboard: Scoreboard) -> Callable[..., Iterable[bytes]]:
    """The health answer as a WSGI app."""

    def health(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        status, headers, body = _answer(scoreboard, environ["REQUEST_METHOD"])
        start_response(status, headers)
        return [body]

    return health


def asgi_app(scoreboard: Scoreboard) -> ASGIApp:
    """The health answer as an ASGI app."""

    async def health(scope: dict[str, Any], receive: Any, send: Any) -> None:
        status, headers, body = _answer(scoreboard, scope["method"])
        await send({"type": "http.response.start", "status": int(status[:3]),
                    "headers": [(name.lower().encode(), value.encode())
                                for name, value in headers]})
        await send({"type": "http.response.body", "body": body})

    return health
