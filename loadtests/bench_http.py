"""Micro-benchmark of the sans-I/O HTTP layer: the Python cost of one keep-alive request.

Run from the repository root, with the project's environment::

    python loadtests/bench_http.py                          # both parsers
    python loadtests/bench_http.py --parser httptools --iterations 200000

One request is what a worker does for a hello world on a kept-alive connection, minus the
socket and the app: a browser-like GET (Host, User-Agent, Accept, Accept-Encoding,
Accept-Language, Connection: keep-alive, Cookie) goes into one connection with
`receive_data`, `next_event` is called until the end of the request, then the response head
(the app's Content-Type and Content-Length, completed by `send_app_response`), the body and
the end are written, and `start_next_cycle` readies the connection for the next request.

Prints, for each parser, the microseconds per request: the best of `--repeats` runs (5) of
`--iterations` requests each (the best, since on a shared machine noise only ever adds).
"""

from __future__ import annotations

import argparse
import time

from forkserve.http import Limits, new_connection
from forkserve.http.base import END_OF_MESSAGE, NEED_DATA, Request

REQUEST = (
    b"GET /index.html?lang=en HTTP/1.1\r\n"
    b"Host: www.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: sessionid=3f9a1c2b7d4e8f60a1b2c3d4e5f60718; csrftoken=Zx8Yw7Vu6Ts5Rq4Po3Nm2Lk1\r\n"
    b"\r\n"
)
BODY = b"Hello, World!\n"
APP_HEADERS = [(b"Content-Type", b"text/plain; charset=utf-8"),
               (b"Content-Length", b"%d" % len(BODY))]


def serve(parser: str, iterations: int) -> float:
    """Serve `iterations` requests on one connection on `parser`; seconds taken."""
    conn = new_connection(Limits(), parser)
    started = time.perf_counter()
    for _ in range(iterations):
        conn.receive_data(REQUEST)
        event = conn.next_event()
        assert type(event) is Request, event
        while (event := conn.next_event()) is not END_OF_MESSAGE:
            assert event is not NEED_DATA, event
        out = conn.send_app_response(200, b"OK", APP_HEADERS, len(BODY), False) \
            + conn.send_data(BODY) + conn.send_end()
        assert out, out
        if not conn.start_next_cycle():
            raise RuntimeError("the connection did not stay open")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parser", choices=("h11", "httptools", "both"), default="both")
    parser.add_argument("--iterations", type=int, default=50000,
                        help="requests per run (default 50000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best counts (5)")
    args = parser.parse_args()
    parsers = ("h11", "httptools") if args.parser == "both" else (args.parser,)
    for name in parsers:
        serve(name, min(args.iterations, 1000))  # warm-up
        best = min(serve(name, args.iterations) for _ in range(args.repeats))
        print(f"{name:10} {best / args.iterations * 1e6:7.2f} µs/request")


if __name__ == "__main__":
    main()
