#!/usr/bin/env python3
"""An HTTP/1.1 load generator in the manner of wrk, stdlib only: keep-alive, with ``--fresh`` a
new connection for every request, or with ``--pipeline DEPTH`` pipelined batches of requests.

Run from anywhere::

    python loadtests/loadgen.py http://127.0.0.1:8000/ -c 32 -d 5
    python loadtests/loadgen.py http://127.0.0.1:8000/ -c 64 -d 10 -p 2 --json
    python loadtests/loadgen.py http://127.0.0.1:8000/ --expect-body-file expected.json
    python loadtests/loadgen.py http://127.0.0.1:8000/ -c 10 --fresh
    python loadtests/loadgen.py http://127.0.0.1:8000/ -c 32 --pipeline 16

``--processes`` processes (forked) share ``--connections`` connections. Each process drives its
connections from one epoll loop, one request in flight per connection (unless pipelining), and
sends the next request as soon as a response is complete, as wrk does. Connections are opened before
the clock starts; the measured window is ``--duration`` seconds, common to all processes, and a
request counts when its response completes inside it. Latency is from writing the request to
reading the last byte of its response, kept in buckets 1 % wide.

With ``--fresh`` each connection carries one request, sent with ``Connection: close`` (as
``wrk -H 'Connection: close'``, nginx's default ``proxy_pass``, ``ab`` without ``-k`` or a
health checker do): once its response is complete and checked, the generator closes the
connection and opens a new one for the next request. Latency is still from writing the request,
as wrk counts it; on loopback the kernel completes the handshake before the server accepts, so
the wait for ``accept`` is in it.

With ``--pipeline DEPTH`` (HTTP/1.1 pipelining, as TechEmpower's plaintext test and some clients
send it) each connection writes DEPTH requests at once, in one ``send``, then reads and checks
DEPTH responses, in order, before it writes the next batch (as wrk with ``pipeline.lua``).
Latency is then one value per batch, from writing it to reading its last response (or the one
after which the server closed), as wrk counts it. A server may answer part of a batch and close
the connection, saying so with ``Connection: close`` (HTTP allows it; gunicorn's sync worker
does it after every response): the requests it left unanswered are counted under
``unanswered``, no error, and the connection is reopened. A server that closes without saying
so, leaves a request unanswered on an open connection (``timeout``), or answers more than it
was asked has it counted as an error. ``sent`` counts the requests written in the window.

Every response is checked: it must be well-framed HTTP/1.x (Content-Length, chunked, or ended
by the server closing), carry ``--expect-status`` and, with ``--expect-body-file`` (``-`` reads
stdin), exactly that body. Errors are counted by kind, as wrk does: ``connect``, ``read`` (the
connection ended or broke before a complete response), ``write``, ``timeout`` (no complete
response within ``--timeout``; the connection is then replaced), ``status``, ``body`` (wrong or
malformed). A connection the server asks to close (``Connection: close``, or an HTTP/1.0
response) after a complete response is reopened and counted under ``reconnects``, which is no
error (with ``--fresh`` every connection is closed after its response, and none of them counts as
a reconnect).

Output: a summary for people, or with ``--json`` one JSON object (requests, rps, latency
percentiles in ms, errors by kind, reconnects, fresh, depth, requests sent and left unanswered,
...). Exit status: 0 when every request in the window succeeded and at least one did, 1
otherwise, 2 on bad arguments.

How fast it is: against nginx answering a canned 13-byte response (one nginx worker, 32
connections, a 2-core machine, Python 3.11), one process made about 100k requests/s on one full
core, about 10 us of CPU per request; wrk ``-t1`` made 185k on one core, about 5.5 us per
request. Two processes (``-p 2``) gain little on 2 cores, as they take the CPU nginx needs. So
one process keeps up with servers that answer below roughly 80k requests/s, which Python servers
do on small machines; but where it shares the cores with the server's workers it takes about
twice the CPU wrk would from them. Against forkserve with 2 workers on 2 cores it measured
about 0.9 of wrk's rate on a quiet machine; on a busy one the run-to-run noise (30 % and more)
swamps that difference. ``loadtests/compare`` reports each run's generator CPU, warns when the
generator saturates, and with wrk installed compares the two on every server.

With ``--fresh`` every request also pays for a connect and a close, on both sides: in one run on
a busy 2-core machine (10 connections against forkserve) that took about 1.8 times the CPU per
request of keep-alive, for wrk (``-H 'Connection: close'``) as for this generator.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import multiprocessing
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ERROR_KINDS = ("connect", "read", "write", "timeout", "status", "body")
BUCKETS_PER_E = 100  # latency buckets per factor e: each about 1 % wide
TICK = 0.05  # seconds between checks of deadlines and pending reconnects
RECONNECT_DELAY = 0.01  # a connection that failed waits this long before it is tried again
START_DELAY = 0.2  # seconds for the processes to open their connections before the clock
MAX_HEAD = 65536  # a response head larger than this is malformed
MAX_BATCH = 16384  # bytes of requests written at once: what a socket's send buffer takes whole
CHUNK_LIMIT = 1 << 30


@dataclass(frozen=True)
class Target:
    """What to request and what a correct answer is."""

    host: str
    port: int
    path: str
    status: int = 200
    body: bytes | None = None  # None: any body
    fresh: bool = False  # one request per connection, sent with Connection: close
    depth: int = 1  # requests written at once, their responses read before the next batch

    @property
    def request(self) -> bytes:
        host = self.host if self.port == 80 else f"{self.host}:{self.port}"
        close = "Connection: close\r\n" if self.fresh else ""
        return f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n".encode("latin-1")

    @property
    def batch(self) -> bytes:
        """What each connection writes at once: `depth` requests."""
        return self.request * self.depth


@dataclass
class Stats:
    """What one process (or, merged, all of them) counted in the measured window."""

    requests: int = 0
    sent: int = 0  # requests written
    reconnects: int = 0
    unanswered: int = 0  # requests of a batch the server closed the connection on
    errors: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)  # bucket -> count
    first_error: str = ""

    def merge(self, other: Stats) -> None:
        self.requests += other.requests
        self.sent += other.sent
        self.reconnects += other.reconnects
        self.unanswered += other.unanswered
        self.errors.update(other.errors)
        self.latency.update(other.latency)
        self.first_error = self.first_error or other.first_error

    def percentile_ms(self, pct: float) -> float | None:
        """The latency below which `pct` % of the requests completed (bucket midpoint)."""
        total = sum(self.latency.values())
        if not total:
            return None
        rank = math.ceil(total * pct / 100.0)
        seen = 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) / BUCKETS_PER_E) * 1000.0
        raise AssertionError("unreachable: the ranks add up to the total")


class ResponseError(Exception):
    """A response that is not what the target expects; `kind` is "status" or "body"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def parse_response(buf: bytes | bytearray, target: Target, eof: bool,
                   at: int = 0) -> tuple[int, bool] | None:
    """Check the response starting at offset `at` of `buf`.

    Returns None while more bytes are needed, else (the offset where it ends, whether the server
    will close the connection). Raises ResponseError for a wrong or malformed response. `eof`
    says the server has closed: then a response without length ends here.
    """
    end = buf.find(b"\r\n\r\n", at)
    if end < 0:
        if len(buf) - at > MAX_HEAD:
            raise ResponseError("body", "response head too large")
        return None
    head = bytes(buf[at:end]).lower()
    if not head.startswith(b"http/1.") or head[8:9] != b" ":
        raise ResponseError("body", f"not an HTTP/1.x status line: {bytes(buf[at:at + 40])!r}")
    status = head[9:12]
    if status != b"%d" % target.status:
        raise ResponseError("status", f"status {status.decode('latin-1')}")
    closing = b"\r\nconnection: close" in head or head.startswith(b"http/1.0")
    start = end + 4
    length = header_value(head, b"content-length")
    if status in (b"204", b"304"):
        body: bytes | bytearray = b""
        stop = start
    elif length is not None:
        if not length.isdigit():
            raise ResponseError("body", f"bad Content-Length {length!r}")
        stop = start + int(length)
        if len(buf) < stop:
            return None
        body = buf[start:stop]
    elif header_value(head, b"transfer-encoding") == b"chunked":
        found = dechunk(buf, start)
        if found is None:
            return None
        body, stop = found
    elif eof:
        body, stop, closing = buf[start:], len(buf), True
    else:
        return None
    if target.body is not None and body != target.body:
        raise ResponseError("body", f"unexpected body of {len(body)} bytes: {bytes(body[:40])!r}")
    return stop, closing


def header_value(head: bytes, name: bytes) -> bytes | None:
    """The value of header `name` in a lowercased response head, None when absent."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    at += len(name) + 3
    stop = head.find(b"\r\n", at)
    return head[at:stop if stop >= 0 else len(head)].strip()


def dechunk(buf: bytes | bytearray, at: int) -> tuple[bytes, int] | None:
    """The chunked body starting at `at` and where it ends; None while incomplete."""
    parts = []
    while True:
        line_end = buf.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = bytes(buf[at:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ResponseError("body", f"bad chunk size {size_text[:20]!r}") from None
        if not 0 <= size < CHUNK_LIMIT:
            raise ResponseError("body", "bad chunk size")
        if size == 0:
            trailers_end = buf.find(b"\r\n\r\n", line_end)  # at line_end when there are none
            return None if trailers_end < 0 else (b"".join(parts), trailers_end + 4)
        start = line_end + 2
        if len(buf) < start + size + 2:
            return None
        if buf[start + size:start + size + 2] != b"\r\n":
            raise ResponseError("body", "chunk not followed by CRLF")
        parts.append(bytes(buf[start:start + size]))
        at = start + size + 2


class Connection:
    __slots__ = ("sock", "buf", "sent_at", "pending", "connecting", "retry_at")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.sent_at = 0.0  # 0: no request in flight
        self.pending = 0  # responses of the last batch still to read
        self.connecting = False
        self.retry_at = 0.0  # 0: not waiting to reconnect


class Driver:
    """One process's connections and its epoll loop."""

    def __init__(self, target: Target, connections: int, timeout: float) -> None:
        self.target = target
        self.batch = target.batch
        self.timeout = timeout
        self.poll = select.epoll()
        self.conns = [Connection() for _ in range(connections)]
        self.by_fd: dict[int, Connection] = {}
        self.stats = Stats()
        self.start = self.stop = 0.0

    def fail(self, conn: Connection, kind: str, detail: str, now: float) -> None:
        if self.start <= now <= self.stop:
            self.stats.errors[kind] += 1
            if not self.stats.first_error:
                self.stats.first_error = f"{kind}: {detail}"
        self.drop(conn)
        conn.retry_at = now + RECONNECT_DELAY

    def drop(self, conn: Connection) -> None:
        if conn.sock is not None:
            self.by_fd.pop(conn.sock.fileno(), None)
            try:
                self.poll.unregister(conn.sock.fileno())
            except OSError:
                pass
            conn.sock.close()
        conn.sock = None
        conn.buf.clear()
        conn.sent_at = 0.0
        conn.pending = 0
        conn.connecting = False

    def connect(self, conn: Connection, now: float) -> None:
        conn.retry_at = 0.0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((self.target.host, self.target.port))
        conn.sock = sock
        if err in (0, errno.EINPROGRESS):
            conn.connecting = err != 0
            conn.sent_at = now  # the connect counts against --timeout too
            self.by_fd[sock.fileno()] = conn
            events = select.EPOLLOUT if conn.connecting else select.EPOLLIN
            self.poll.register(sock.fileno(), events)
            if not conn.connecting:
                self.send(conn, now)
            return
        self.fail(conn, "connect", os.strerror(err), now)

    def send(self, conn: Connection, now: float) -> None:
        """Write the next batch (one request unless pipelining)."""
        assert conn.sock is not None
        try:
            # At most MAX_BATCH bytes on an idle connection: the socket buffer takes them whole.
            sent = conn.sock.send(self.batch)
        except OSError as exc:
            self.fail(conn, "write", str(exc), now)
            return
        if sent != len(self.batch):
            self.fail(conn, "write", f"short write of {sent} bytes", now)
            return
        conn.sent_at, conn.pending = now, self.target.depth
        if self.start <= now <= self.stop:
            self.stats.sent += self.target.depth

    def on_event(self, conn: Connection) -> None:
        now = time.monotonic()
        sock = conn.sock
        assert sock is not None
        if conn.connecting:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(conn, "connect", os.strerror(err), now)
                return
            conn.connecting = False
            self.poll.modify(sock.fileno(), select.EPOLLIN)
            self.send(conn, now)
            return
        try:
            # Not more: a larger buffer is allocated with mmap on every call, which tripled the
            # generator's cost per request.
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(conn, "read", str(exc), now)
            return
        closing = self.take_responses(conn, data, now)
        if closing is None:
            return
        if self.start <= now <= self.stop:  # the batch is over: its latency
            elapsed = max(now - conn.sent_at, 1e-7)
            self.stats.latency[math.floor(math.log(elapsed) * BUCKETS_PER_E)] += 1
        if closing or self.target.fresh:
            if not self.target.fresh and self.start <= now <= self.stop:
                self.stats.reconnects += 1
                self.stats.unanswered += conn.pending
            self.drop(conn)
            self.connect(conn, now)
        else:
            conn.buf.clear()
            self.send(conn, now)

    def take_responses(self, conn: Connection, data: bytes, now: float) -> bool | None:
        """Add `data` (b"" when the server closed) to the connection's buffer and count each
        complete response in it, in order. Returns whether the server closes the connection
        once the batch is over (all answered, or the server said it closes), None while it is
        not over or after an error."""
        buf = conn.buf
        buf += data
        at = 0
        while True:
            try:
                done = parse_response(buf, self.target, eof=not data, at=at)
            except ResponseError as exc:
                self.fail(conn, exc.kind, str(exc), now)
                return None
            if done is None:
                if not data:
                    where = "inside" if at < len(buf) else "before"
                    self.fail(conn, "read", f"connection closed {where} a response "
                              f"({conn.pending} of {self.target.depth} unanswered)", now)
                else:
                    del buf[:at]
                return None
            at, closing = done
            conn.pending -= 1
            if self.start <= now <= self.stop:
                self.stats.requests += 1
            if closing or self.target.fresh or not conn.pending:
                break
        if at != len(buf):
            self.fail(conn, "body", f"{len(buf) - at} bytes after the last response expected",
                      now)
            return None
        return closing

    def tick(self, now: float) -> None:
        """Time out stuck requests and reopen connections whose retry delay is over."""
        for conn in self.conns:
            if conn.sock is None:
                if conn.retry_at <= now:
                    self.connect(conn, now)
            elif conn.sent_at and now - conn.sent_at > self.timeout:
                self.fail(conn, "timeout", f"no complete response in {self.timeout:g} s", now)

    def run(self, start: float, seconds: float) -> Stats:
        """Drive the connections from now until `start` + `seconds`; count from `start`."""
        self.start, self.stop = start, start + seconds
        now = time.monotonic()
        for conn in self.conns:
            self.connect(conn, now)
        next_tick = now + TICK
        while now < self.stop:
            for fd, _ in self.poll.poll(TICK):
                conn = self.by_fd.get(fd)
                if conn is not None:
                    self.on_event(conn)
            now = time.monotonic()
            if now >= next_tick:
                self.tick(now)
                next_tick = now + TICK
        for conn in self.conns:
            self.drop(conn)
        self.poll.close()
        return self.stats


def drive(args: tuple[Target, int, float, float, float]) -> Stats:
    """One process's share of the load (a multiprocessing task)."""
    target, connections, timeout, start, seconds = args
    return Driver(target, connections, timeout).run(start, seconds)


def split(total: int, parts: int) -> list[int]:
    """`total` connections over at most `parts` processes, as evenly as possible."""
    parts = min(parts, total)
    return [total // parts + (i < total % parts) for i in range(parts)]


def run(target: Target, connections: int, seconds: float, processes: int = 1,
        timeout: float = 5.0) -> tuple[Stats, float]:
    """Load `target` for `seconds` seconds; return the merged stats and the CPU seconds all
    processes of the generator used (this one included)."""
    shares = split(connections, processes)
    cpu_before = cpu_seconds()
    if len(shares) == 1:
        parts: Iterable[Stats] = [drive((target, connections, timeout,
                                         time.monotonic() + START_DELAY, seconds))]
    else:
        with multiprocessing.get_context("fork").Pool(len(shares)) as pool:
            start = time.monotonic() + START_DELAY
            parts = pool.map(drive, [(target, n, timeout, start, seconds) for n in shares])
            pool.close()
            pool.join()
    stats = Stats()
    for part in parts:
        stats.merge(part)
    return stats, cpu_seconds() - cpu_before


def cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def report(stats: Stats, seconds: float, cpu: float, connections: int, processes: int,
           target: Target) -> dict[str, Any]:
    """The result as a JSON-ready dict."""
    return {
        "requests": stats.requests,
        "seconds": seconds,
        "rps": stats.requests / seconds,
        "p50_ms": stats.percentile_ms(50),
        "p90_ms": stats.percentile_ms(90),
        "p99_ms": stats.percentile_ms(99),
        "max_ms": stats.percentile_ms(100),
        "errors": {kind: stats.errors[kind] for kind in ERROR_KINDS},
        "first_error": stats.first_error,
        "reconnects": stats.reconnects,
        "sent": stats.sent,
        "unanswered": stats.unanswered,
        "connections": connections,
        "fresh": target.fresh,
        "depth": target.depth,
        "processes": processes,
        "cpu_seconds": round(cpu, 3),
    }


def human(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} ms"

    errors, depth = result["errors"], result["depth"]
    how = (" (a new one for every request)" if result["fresh"] else
           f" (pipelined, {depth} requests at once)" if depth > 1 else "")
    lines = [
        f"{result['connections']} connections{how}, "
        f"{result['processes']} process(es), {result['seconds']:g} s",
        f"  latency{' per batch' if depth > 1 else ''} p50 {ms(result['p50_ms'])}, "
        f"p90 {ms(result['p90_ms'])}, p99 {ms(result['p99_ms'])}, max {ms(result['max_ms'])}",
        f"  {result['requests']} requests ({result['sent']} sent, {result['unanswered']} "
        f"unanswered), {result['reconnects']} reconnects",
        "  errors: " + (", ".join(f"{k} {n}" for k, n in errors.items() if n) or "none"),
    ]
    if result["first_error"]:
        lines.append(f"  first error: {result['first_error']}")
    lines += [f"Requests/sec: {result['rps']:.2f}",
              f"Generator CPU: {result['cpu_seconds']:.2f} s"]
    return "\n".join(lines)


def parse_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Target:
    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        parser.error("the URL must be http://HOST[:PORT]/PATH (no TLS)")
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    body = None
    if args.expect_body_file == "-":
        body = sys.stdin.buffer.read()
    elif args.expect_body_file is not None:
        with open(args.expect_body_file, "rb") as f:
            body = f.read()
    target = Target(socket.gethostbyname(url.hostname), url.port or 80, path,
                    args.expect_status, body, args.fresh, args.pipeline)
    if len(target.batch) > MAX_BATCH:
        parser.error(f"--pipeline {args.pipeline} makes batches of {len(target.batch)} bytes; at "
                     f"most {MAX_BATCH} are written at once")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HTTP/1.1 load generator (wrk-like, stdlib only): keep-alive, a new "
                    "connection per request with --fresh, or pipelined with --pipeline.")
    parser.add_argument("url", help="http://HOST[:PORT]/PATH")
    parser.add_argument("-c", "--connections", type=int, default=32,
                        help="connections open at once, in all (default 32)")
    parser.add_argument("-d", "--duration", type=float, default=5.0,
                        help="seconds measured (default 5)")
    parser.add_argument("-p", "--processes", type=int, default=1,
                        help="processes sharing the connections (default 1)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds a request may take, connect included (default 5)")
    parser.add_argument("--expect-status", type=int, default=200,
                        help="the status every response must have (default 200)")
    parser.add_argument("--expect-body-file", metavar="PATH",
                        help="file holding the body every response must have; - for stdin")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true",
                      help="a new connection for every request, sent with Connection: close "
                           "and closed once its response is checked (default: keep-alive)")
    mode.add_argument("--pipeline", type=int, default=1, metavar="DEPTH",
                      help="write DEPTH requests at once on each connection, then read and "
                           "check their DEPTH responses before the next batch (default 1: no "
                           "pipelining)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    for name in ("connections", "processes", "pipeline"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.duration <= 0 or args.timeout <= 0:
        parser.error("--duration and --timeout must be positive")
    target = parse_target(parser, args)
    stats, cpu = run(target, args.connections, args.duration, args.processes, args.timeout)
    result = report(stats, args.duration, cpu, args.connections,
                    len(split(args.connections, args.processes)), target)
    print(json.dumps(result) if args.json else human(result))
    return 0 if stats.requests and not any(stats.errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
