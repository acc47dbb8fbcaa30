"""--metrics-bind: the master answers Prometheus' scrapes over HTTP/1.1.

`GET /metrics` (or `/`) gets the text exposition format of forkserve.metrics; other paths
404, other methods 405, anything that is not a request head 400. One request per connection
(the answer says Connection: close), with the bounds of forkserve.endpoints: a head of at
most 8 KiB, 5 s to send it, 16 scrapers at once.
"""

from __future__ import annotations

import re
import selectors
import socket
from collections.abc import Callable

from forkserve.endpoints import Client, Server
from forkserve.http.base import error_response

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]\r?\n")


class MetricsServer(Server):
    """A TCP listening socket at `host`:`port` whose clients get `render()`."""

    max_request = 8192

    def __init__(self, host: str, port: int, selector: selectors.BaseSelector,
                 render: Callable[[], str]) -> None:
        self.render = render
        # SO_REUSEPORT: the new master of a USR2 upgrade binds it while this one runs (the
        # kernel then splits the scrapes between the two until the old master exits).
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host
                                    else socket.AF_INET, backlog=self.max_clients,
                                    reuse_port=True)
        self.url = "http://{}:{}/metrics".format(f"[{host}]" if ":" in host else host,
                                                 sock.getsockname()[1])
        super().__init__(sock, selector)

    def refusal(self, reason: str) -> bytes:
        status = 503 if reason.startswith("busy") else 408 if "no complete" in reason else 431
        return error_response(status, reason)


class _Scrape(Client):
    """One scrape: a request head in, the metrics (or an error) out, then the close."""

    server: MetricsServer

    def received(self, now: float) -> None:
        if b"\n\r\n" not in self.inbox and b"\n\n" not in self.inbox:
            return  # the head is not complete yet
        self.close_after = True
        line = _REQUEST_LINE.match(self.inbox)
        if line is None:
            self.answer(error_response(400, "not an HTTP/1.1 request"), now)
        elif line[1] not in (b"GET", b"HEAD"):
            self.answer(error_response(405, "GET /metrics"), now)
        elif line[2].partition(b"?")[0] not in (b"/metrics", b"/"):
            self.answer(error_response(404, "GET /metrics"), now)
        else:
            body = self.server.render().encode()
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: " + CONTENT_TYPE
                    + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
            self.answer(head + (b"" if line[1] == b"HEAD" else body), now)
        self.inbox.clear()


MetricsServer.client_class = _Scrape
