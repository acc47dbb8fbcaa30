"""The load-test endpoints as a WSGI app; the contract is in the package docstring.

Served with ``forkserve --chdir loadtests apps.wsgi_app:app``. ``/hang`` blocks the worker for
good only with ``--threads 1`` (the default): then its loop stops heartbeating and the master
kills and replaces it after ``--timeout``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
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

Environ = dict[str, Any]
StartResponse = Callable[..., Any]

FILE = shared_file()


def _start(start_response: StartResponse, status: str, length: int,
           content_type: str = "text/plain") -> None:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(length)),
                            (WORKER_HEADER, str(os.getpid()))])


def _reply(start_response: StartResponse, body: bytes, status: str = "200 OK",
           content_type: str = "text/plain") -> list[bytes]:
    _start(start_response, status, len(body), content_type)
    return [body]


def hello(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _reply(start_response, HELLO)


def json_document(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    return _reply(start_response, JSON_BODY, content_type="application/json")


def upload(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    size = 0
    # forkserve sets wsgi.input_terminated: reading until b"" ends a chunked body and one with
    # a Content-Length alike.
    while piece := stream.read(PIECE):
        digest.update(piece)
        size += len(piece)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return _reply(start_response, upload_reply(size, digest.hexdigest(), chunked),
                  content_type="application/json")


def download(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    size = query_int(environ.get("QUERY_STRING", ""), "size", PIECE, DOWNLOAD_MAX)
    _start(start_response, "200 OK", size, "application/octet-stream")
    return pattern_pieces(size)


def file(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    _start(start_response, "200 OK", FILE_SIZE, "application/octet-stream")
    return environ["wsgi.file_wrapper"](open(FILE, "rb"), PIECE)


def slow(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    ms = query_int(environ.get("QUERY_STRING", ""), "ms", 100, SLOW_MAX_MS)
    time.sleep(ms / 1000)
    return _reply(start_response, b"slept %d ms" % ms)


def hang(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    time.sleep(HANG_SECONDS)
    return _reply(start_response, b"woke up")


ROUTES: dict[str, tuple[str, Callable[[Environ, StartResponse], Iterable[bytes]]]] = {
    "/": ("GET", hello),
    "/json": ("GET", json_document),
    "/upload": ("POST", upload),
    "/download": ("GET", download),
    "/file": ("GET", file),
    "/slow": ("GET", slow),
}
if os.environ.get(ALLOW_HANG_ENV) == "1":
    ROUTES["/hang"] = ("GET", hang)


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI entry point: route on PATH_INFO and the method."""
    route = ROUTES.get(environ["PATH_INFO"])
    if route is None:
        return _reply(start_response, b"not found\n", "404 Not Found")
    method, handler = route
    if environ["REQUEST_METHOD"] != method:
        return _reply(start_response, b"method not allowed\n", "405 Method Not Allowed")
    return handler(environ, start_response)
