"""A connection whose request is already there when it is accepted is served on its socket for
the rest of that loop turn, then moved to the event loop's transport if still open
(workers/direct.py). The worker is stopped (SIGSTOP) while the client connects and sends, so
that the request waits in the kernel and the first read finds it: whatever the connection
needs after that turn (more requests, a response the client does not read yet, an app still
running, a head still coming) must go on as on any connection."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import APP_OF, Reader, Server, closed_by_peer, exchange, served_only_after_the_busy

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
# A path of each test app answering ?mb= MiB with a Content-Length.
BIG_PATH = {"wsgi": b"/big?mb=%d", "asgi": b"/big-download?mb=%d"}


@contextmanager
def worker_stopped(server: Server) -> Iterator[None]:
    """The (one) worker is stopped meanwhile: connections wait in the listening queue with
    what their clients sent."""
    [worker] = server.workers()
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker, signal.SIGCONT)


def sent_while_stopped(server: Server, data: bytes, receive_buffer: int = 0) -> socket.socket:
    """A connection made and `data` sent on it while the worker is stopped (with a receive
    buffer of `receive_buffer` bytes, if given)."""
    with worker_stopped(server):
        sock = socket.socket()
        sock.settimeout(10)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(data)
    return sock


@pytest.fixture(params=["wsgi", "wsgi-threads", "asgi"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def one_worker(start_server, kind) -> Server:
    """The test app of `kind` (WSGI with --threads 1 or 4, or ASGI) on one worker."""
    threads = ["--threads", "4"] if kind == "wsgi-threads" else []
    server = start_server(APP_OF[kind.split("-")[0]], "-w", "1", *threads)
    server.interface = kind.split("-")[0]
    return server


def test_a_connection_served_in_its_first_turn_keeps_alive(one_worker):
    with sent_while_stopped(one_worker, GET % b"/hello") as sock:
        reader = Reader(sock)
        first = reader.response()
        assert first.status == 200 and first.header("connection") is None
        for _ in range(2):  # on the loop's transport now
            sock.sendall(GET % b"/hello")
            assert reader.response().status == 200
        sock.sendall(b"GET /hello HTTP/1.0\r\n\r\n")
        assert reader.response().status == 200
        assert closed_by_peer(sock)


def test_requests_pipelined_in_the_first_read_are_answered_in_order(one_worker):
    body = b"abc" * 100
    data = (GET % b"/hello" + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body) + b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    with sent_while_stopped(one_worker, data) as sock:
        reader = Reader(sock)
        assert reader.response().status == 200
        echoed = reader.response()
        assert echoed.status == 200 and echoed.body == body
        last = reader.response()
        assert last.status == 200 and last.header("connection") == "close"
        assert closed_by_peer(sock)


def test_a_response_larger_than_the_socket_takes_is_sent_whole_later(one_worker):
    """The first turn's sends fill the socket; the rest waits for the loop's transport, and
    the worker serves others meanwhile."""
    size = 8
    path = BIG_PATH[one_worker.interface] % size
    with sent_while_stopped(one_worker, GET % path, receive_buffer=4096) as slow:
        reader = Reader(slow)
        head = reader.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert exchange(one_worker, GET % b"/hello").status == 200
        body = reader.read_exact(size << 20)
        assert body.count(body[:1]) == size << 20
        slow.sendall(GET % b"/hello")  # and the connection goes on
        assert reader.response().status == 200


def test_an_app_still_running_after_the_first_turn_answers_on(start_server, interface):
    """An ASGI app awaiting, or a WSGI app in a pool thread, when the first turn ends."""
    threads = ["--threads", "4"] if interface == "wsgi" else []
    server = start_server(APP_OF[interface], "-w", "1", *threads)
    with sent_while_stopped(server, GET % b"/sleep?s=0.3") as sock:
        reader = Reader(sock)
        assert reader.response().body == str(server.workers()[0]).encode()
        sock.sendall(GET % b"/hello")
        assert reader.response().status == 200


def test_a_head_begun_in_the_first_read_is_bounded_by_the_first_byte_timeout(start_server):
    """--keep-alive 1 is shorter than --header-timeout (10 s): a connection whose first
    bytes are part of a head, and no more, is closed after 1 s."""
    server = start_server("wsgiapp:app", "-w", "1", "--keep-alive", "1")
    with sent_while_stopped(server, b"GET /hello HTTP/1.1\r\nX-Slow: 1\r\n") as sock:
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=5)
        assert time.monotonic() - started < 4
    # and its rest, when it comes in time, completes it
    with sent_while_stopped(server, b"GET /hello HTTP/1.1\r\n") as sock:
        sock.sendall(b"Host: t\r\n\r\n")
        assert Reader(sock).response().status == 200


def test_clients_that_leave_before_being_accepted_cost_nothing(start_server):
    """One closes without a word, one resets: the worker closes its side and serves on,
    with no error logged."""
    server = start_server("wsgiapp:app", "-w", "1")
    with worker_stopped(server):
        quiet = server.connect()
        quiet.close()
        rude = server.connect()
        rude.sendall(GET % b"/hello")
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # a reset
    assert exchange(server, GET % b"/hello").status == 200
    assert "Traceback" not in server.log and "ERROR" not in server.log


def test_a_websocket_opened_in_the_first_turn_outlives_the_first_byte_timeout(start_server):
    """The handshake read at accept switches the connection to WebSocket: no timer of a
    connection waiting for its first request (1 s here) applies to it then."""
    server = start_server("asgiapp:app", "-w", "1", "--keep-alive", "1")
    handshake = (b"GET /ws/echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    with sent_while_stopped(server, handshake) as sock:
        reader = Reader(sock)
        assert reader.response(head_request=True).status == 101
        assert not closed_by_peer(sock, timeout=2)
        mask = b"\x01\x02\x03\x04"
        masked = bytes(a ^ b for a, b in zip(b"hi", mask[:2], strict=True))
        sock.sendall(b"\x81\x82" + mask + masked)
        assert reader.read_exact(4) == b"\x81\x02hi"


def test_an_app_default_socket_timeout_does_not_reach_the_worker_sockets(start_server):
    """The app set socket.setdefaulttimeout(2): a client that connects and sends nothing
    yet must not hold the loop for 2 s on its first read, nor be dropped after it."""
    server = start_server("defaulttimeout:app", "-w", "1")
    with server.connect() as quiet:
        started = time.monotonic()
        assert exchange(server, GET % b"/hello").status == 200
        assert time.monotonic() - started < 1.5
        quiet.sendall(GET % b"/hello")
        assert Reader(quiet).response().status == 200


def test_a_client_that_half_closes_after_its_requests_gets_every_response(start_server,
                                                                           interface):
    """Requests and the client's end of writing, all there at accept: the end is seen with
    them (as a transport's read would), before any response is under way, so it does not
    count as the client leaving during a response."""
    server = start_server(APP_OF[interface], "-w", "1")
    with worker_stopped(server):
        sock = server.connect()
        sock.sendall(GET % b"/echo" + GET % b"/stream?n=3")
        sock.shutdown(socket.SHUT_WR)
    with sock:
        reader = Reader(sock)
        assert reader.response().status == 200
        streamed = reader.response()
        assert streamed.status == 200 and streamed.body.count(b"piece") == 3
        assert closed_by_peer(sock)


def test_a_worker_filled_in_its_first_turn_accepts_no_more_in_that_batch(start_server,
                                                                         interface):
    """Two requests that fill the worker (--worker-connections 2) and a third, all waiting
    in the listening queue: the third is not accepted while the first two run (the accept
    batch went on after serving the second had filled the worker; the third then waited
    behind them inside the worker, where no peer could take it)."""
    threads = ["--threads", "4"] if interface == "wsgi" else []
    server = start_server(APP_OF[interface], "-w", "1", "--worker-connections", "2", *threads)
    socks = []
    try:
        with worker_stopped(server):
            for data in (GET % b"/sleep?s=2&tag=a", GET % b"/sleep?s=2&tag=b", GET % b"/hello"):
                socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
                socks[-1].sendall(data)
        *busy, waiting = socks
        server.wait_for("SLEEPING b")
        served_only_after_the_busy(waiting, busy)  # (waiting in the listening queue)
    finally:
        for sock in socks:
            sock.close()
