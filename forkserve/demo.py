"""The built-in demo app: `forkserve` with no app argument serves this."""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Iterable
from typing import Any

from forkserve import __version__

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>forkserve</title></head>
<body>
<h1>forkserve {version} is serving</h1>
<p>This page came from worker pid <strong>{pid}</strong>; reload to see other workers answer.</p>
<p>{method} {path}</p>
<p>Serve your own app with <code>forkserve MODULE:VARIABLE</code>.</p>
</body></html>
"""


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app answering a small HTML page that names the worker that served it."""
    body = _PAGE.format(
        version=__version__,
        pid=os.getpid(),
        method=html.escape(environ["REQUEST_METHOD"]),
        path=html.escape(environ["PATH_INFO"]),
    ).encode("utf-8")
    start_response("200 OK", [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
    ])
    return [body]
