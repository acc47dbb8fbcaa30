"""The contract shared by the load-test apps, ``loadtests/locustfile.py`` and ``loadtests/run``.

``wsgi_app.py`` and ``asgi_app.py`` serve the same endpoints (stdlib only; the package is
loaded by forkserve with ``--chdir loadtests apps.wsgi_app:app``):

=====================  ==========================================================================
``GET /``              ``HELLO``
``GET /json``          ``JSON_BODY`` (``DOCUMENT`` serialized, a few KB)
``POST /upload``       reads the body as it arrives (chunked or with Content-Length) and answers
                       ``{"bytes": N, "sha256": HEX, "framing": "chunked" | "length"}``
``GET /download``      ``?size=N``: ``pattern(N)`` (at most ``DOWNLOAD_MAX``), streamed in pieces
``GET /file``          ``pattern(FILE_SIZE)`` from the file ``shared_file()`` (WSGI: through
                       ``wsgi.file_wrapper``; ASGI: read and sent piece by piece)
``GET /slow``          ``?ms=N``: sleeps N ms (at most ``SLOW_MAX_MS``), answers ``slept N ms``
``GET /hang``          sleeps ``HANG_SECONDS`` blocking the worker (even the ASGI one), only when
                       the environment has ``ALLOW_HANG_ENV=1``; 404 otherwise
``/ws`` (ASGI only)    WebSocket echo of every message
=====================  ==========================================================================

Every HTTP response and the WebSocket handshake carry ``WORKER_HEADER`` with the pid of the
worker that answered, so the locustfile can tell on which worker a connection was.
Anything else is a 404 (405 for a wrong method). The constants below the docstring are the
rest of the contract.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qs

HELLO = b"Hello, World!"
WORKER_HEADER = "x-worker-pid"
PIECE = 64 * 1024  # size of the pieces bodies are streamed in
FILE_SIZE = 2 * 1024 * 1024
DOWNLOAD_MAX = 64 * 1024 * 1024
SLOW_MAX_MS = 2000
HANG_SECONDS = 3600
ALLOW_HANG_ENV = "LOADTEST_ALLOW_HANG"

# Between the locustfile and the runner: the stats name of the /hang requests (expected to
# fail); the start of the failure message of a request that got no response (followed by the
# pid of the worker that answered the previous request of that user); the files the locustfile
# writes when locust quits, given locust's --csv PREFIX: final statistics (kind: stats,
# failures, exceptions) and the completion times of the successful requests.
HANG_NAME = "/hang (expected to fail)"
LOST_ON_WORKER = "no response; previous response from worker"
FINAL_CSV = "{prefix}_final_{kind}.csv"
COMPLETIONS = "{prefix}_completions.txt"

DOCUMENT = {
    "service": "forkserve load test",
    "items": [
        {"id": i, "name": f"item {i}", "price": round(i * 1.25, 2), "in_stock": i % 3 != 0,
         "tags": ["alpha", "beta", "gamma"][: i % 4]}
        for i in range(40)
    ],
}
JSON_BODY = json.dumps(DOCUMENT).encode()

# 256 distinct bytes repeated: a shifted, truncated or reordered piece never compares equal.
_BLOCK = bytes(range(256)) * (PIECE // 256)


def pattern_pieces(size: int) -> Iterator[bytes]:
    """``pattern(size)`` as pieces of at most ``PIECE`` bytes, without building it whole."""
    full, rest = divmod(size, PIECE)
    for _ in range(full):
        yield _BLOCK
    if rest:
        yield _BLOCK[:rest]


@lru_cache(maxsize=8)
def pattern(size: int) -> bytes:
    """The ``size`` bytes ``/download?size=N`` and ``/file`` answer with."""
    return b"".join(pattern_pieces(size))


def shared_file() -> Path:
    """The file ``/file`` serves: ``pattern(FILE_SIZE)`` in the temporary directory, created
    when missing. Safe when several workers boot at once (each writes its own copy and renames
    it into place)."""
    path = Path(tempfile.gettempdir()) / f"forkserve-loadtest-{FILE_SIZE}.bin"
    if path.exists() and path.stat().st_size == FILE_SIZE:
        return path
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name)
    with os.fdopen(fd, "wb") as f:
        f.writelines(pattern_pieces(FILE_SIZE))
    os.replace(partial, path)
    return path


def query_int(query: str, name: str, default: int, upper: int) -> int:
    """Parameter `name` of a query string as an int in 0..upper (``default`` when absent or not
    a number)."""
    values = parse_qs(query).get(name)
    try:
        return max(0, min(upper, int(values[0]))) if values else default
    except ValueError:
        return default


def upload_reply(size: int, digest: str, chunked: bool) -> bytes:
    """The body ``/upload`` answers with."""
    framing = "chunked" if chunked else "length"
    return json.dumps({"bytes": size, "sha256": digest, "framing": framing}).encode()
