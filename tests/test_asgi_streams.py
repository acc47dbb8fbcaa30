"""Streamed ASGI responses: a client that leaves mid-stream, and a graceful stop with streams
open (server-sent events are ended at once, other streams shortly before the timeout)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import Reader

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
LOOPS = ["asyncio", "uvloop"]


def _loop(name: str) -> str:
    if name == "uvloop":
        pytest.importorskip("uvloop")
    return name


@pytest.mark.parametrize("app", ["starletteapp:app", "starletteapp:app_spec_2_4"])
def test_a_client_leaving_a_stream_is_not_an_error(start_server, app):
    """Told ASGI 2.3, Starlette returns early once receive() says http.disconnect; told 2.4,
    it raises ClientDisconnect from the OSError send() raised. Neither is an app error."""
    pytest.importorskip("starlette")
    server = start_server(app, "-w", "1")
    mark = server.mark()
    with server.connect() as sock:
        sock.sendall(GET % b"/events?interval=0.2&tag=left")
        Reader(sock).read_until(b"data: 0\n\n")
    server.wait_for("EVENTS END left", start=mark)
    with server.connect() as sock:  # a real error is still one
        sock.sendall(GET % b"/boom")
        assert Reader(sock).response().status == 500
    server.wait_for(r"\[ERROR\] error handling GET /boom", start=mark)
    before_boom = server.lines[mark:]
    before_boom = before_boom[:next(i for i, line in enumerate(before_boom) if "/boom" in line)]
    assert not [line for line in before_boom if "ERROR" in line or "Traceback" in line]


def test_a_stream_learns_at_once_that_its_client_left(start_server):
    """An event a second: the stream used to run on for about 3 s (until a write failed)."""
    pytest.importorskip("starlette")
    server = start_server("starletteapp:app", "-w", "1")
    with server.connect() as sock:
        sock.sendall(GET % b"/events?interval=1&tag=prompt")
        Reader(sock).read_until(b"data: 0\n\n")
    closed = time.monotonic()
    server.wait_for("EVENTS END prompt")
    assert time.monotonic() - closed < 0.5  # not its next event, a second later


@pytest.mark.parametrize("loop", LOOPS)
def test_eof_during_a_response_ends_the_request(start_server, loop):
    """The client's EOF once the response is under way: http.disconnect, and send() raises."""
    server = start_server("asgiapp:app", "-w", "1", "--loop", _loop(loop))
    with server.connect() as sock:
        sock.sendall(GET % b"/stream-then-wait")
        Reader(sock).read_until(b"first\n")
    server.wait_for("AFTER http.disconnect: send raised ClientDisconnected")


def _stop_while_streaming(server, path: bytes, first: bytes) -> bytes:
    """GET `path`, read until `first` arrives, SIGTERM the master, and return the rest of the
    response up to the close (the socket's timeout, 10 s, bounds this)."""
    with server.connect() as sock:
        sock.sendall(GET % path)
        reader = Reader(sock)
        reader.read_until(first)
        os.kill(server.pid, signal.SIGTERM)
        return reader.read_to_eof()


@pytest.mark.parametrize("loop", LOOPS)
def test_graceful_stop_ends_event_streams_at_once(start_server, loop):
    """SIGTERM with an SSE client connected: the stream gets http.disconnect, its chunked
    body is ended properly, lifespan shutdown runs, and the master exits long before
    --graceful-timeout (it used to wait all of it, then SIGKILL the worker)."""
    pytest.importorskip("starlette")
    server = start_server("starletteapp:app", "-w", "1", "--loop", _loop(loop),
                          "--graceful-timeout", "20")
    stopping = time.monotonic()
    rest = _stop_while_streaming(server, b"/events?tag=stopped", b"data: 0\n\n\r\n")
    assert server.wait_exit() == 0
    assert time.monotonic() - stopping < 10
    assert (b"\r\n" + rest).endswith(b"\r\n0\r\n\r\n")  # the last chunk, then the close
    log = server.log
    assert "EVENTS END stopped" in log and "STARLETTE LIFESPAN shutdown" in log
    assert "killing worker" not in log and "ERROR" not in log


def test_graceful_stop_ends_an_event_stream_that_only_sends(start_server):
    """An SSE app that never calls receive() learns of the stop from send() raising, and
    returns: that is the stream ending as asked, not an app error, and its body is ended."""
    server = start_server("asgiapp:app", "-w", "1", "--graceful-timeout", "20")
    rest = _stop_while_streaming(server, b"/events-until-send-fails", b"data: tick\n\n")
    assert server.wait_exit() == 0
    assert (b"\r\n" + rest).endswith(b"\r\n0\r\n\r\n")
    assert "EVENTS send raised" in server.log and "ERROR" not in server.log


def test_graceful_stop_ends_other_streams_shortly_before_the_timeout(start_server):
    """A stream without a Content-Length that is not SSE may run on during
    --graceful-timeout; a second before it runs out, it is ended and its body cut (the client
    sees it incomplete), so the worker exits by itself after lifespan shutdown instead of
    being killed."""
    server = start_server("asgiapp:app", "-w", "1", "--graceful-timeout", "3")
    rest = _stop_while_streaming(server, b"/ticks?interval=0.1&tag=cut", b"tick\n")
    assert server.wait_exit() == 0
    assert rest.count(b"tick") > 5  # it went on streaming during the grace period
    assert not rest.endswith(b"0\r\n\r\n")
    log = server.log
    assert "TICKS END cut" in log and "LIFESPAN shutdown" in log
    assert "killing worker" not in log and "ERROR" not in log


def test_a_request_still_to_answer_at_the_stop_deadline_may_yet_answer(start_server):
    """Only streams are ended a second before --graceful-timeout: a response not begun yet
    may still come in that last second."""
    server = start_server("asgiapp:app", "-w", "1", "--graceful-timeout", "4")
    with server.connect() as sock:
        sock.sendall(GET % b"/sleep?s=3.4&tag=late")
        server.wait_for("SLEEPING late")
        os.kill(server.pid, signal.SIGTERM)
        assert Reader(sock).response().status == 200
    assert server.wait_exit() == 0
