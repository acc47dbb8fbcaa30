"""How a WSGI app is called from the worker's event loop: inline with --threads 1 (the body
awaited in the loop, the response pulled as the client reads), in a thread for a body the
app must ask for, and never two calls at once when wsgi.multithread is false."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import Reader, exchange, rss_mib

BIG = 16 << 20


def get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path


def test_a_client_that_does_not_read_holds_no_loop(start_server):
    """--threads 1: a 16 MiB response waits for its client, who reads none of it for a while;
    the worker's one loop serves other requests meanwhile, then sends the rest."""
    server = start_server("wsgiapp:app", "-w", "1")
    with server.connect() as slow:
        slow.sendall(get(b"/big?mb=16"))
        reader = Reader(slow)
        head = reader.read_until(b"\r\n\r\n")  # the response began, and stalls
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % BIG in head
        for _ in range(3):
            assert exchange(server, get(b"/hello")).body == b"Hello, World!"
        received = reader.buffer.count(b"x")
        while received < BIG:
            piece = slow.recv(1 << 20)
            assert piece.count(b"x") == len(piece) > 0
            received += len(piece)
        assert received == BIG


def test_a_client_that_does_not_read_holds_back_a_thread_not_memory(start_server):
    """--threads 2: what a pool thread writes goes to the loop without a round trip per
    write, but only while the client reads; one that stops holds the app in its thread (the
    rest of a 256 MiB response is not produced into memory), and the other thread serves."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "2")
    worker = server.workers()[0]
    with server.connect() as slow:
        slow.sendall(get(b"/big?mb=256&tag=slow"))
        reader = Reader(slow)
        assert reader.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert exchange(server, get(b"/hello")).body == b"Hello, World!"
        with pytest.raises(AssertionError):  # (not logged within that time)
            server.wait_for("BIG slow PRODUCED", timeout=1.5)
        assert rss_mib(worker) < 120, "the response was produced into the worker's memory"
        received = reader.buffer.count(b"x")
        while received < 256 << 20:
            piece = slow.recv(1 << 20)
            assert piece.count(b"x") == len(piece) > 0
            received += len(piece)
    server.wait_for("BIG slow PRODUCED")


def test_a_response_that_hangs_after_waiting_for_its_client_is_named(start_server):
    """--threads 1: a response that waited for its client to read, then hangs in the app,
    is reported as any hang is, with the request it is stuck in."""
    server = start_server("wsgiapp:app", "-w", "1", "--timeout", "2", "--graceful-timeout", "1")
    (old,) = server.workers()
    with server.connect() as sock:
        sock.sendall(get(b"/big?mb=16&hang=1"))
        reader = Reader(sock)
        reader.read_until(b"\r\n\r\n")  # the response began; megabytes wait unread
        # Another request answered: the loop is free, so the big response waits for its client.
        assert exchange(server, get(b"/hello")).status == 200
        received = len(reader.buffer)
        while received < BIG:
            received += len(sock.recv(1 << 20))
        server.wait_for(rf"worker 1 \(pid {old}\) silent for [\d.]+ s \(limit 2 s\), "
                        r"stuck in 'GET /big\?mb=16&hang=1'")


def test_a_small_body_that_comes_late_is_awaited_without_the_app(start_server):
    """--threads 1: a body sent after the head is read by the loop before the app is called:
    meanwhile the worker serves other requests (the app runs once, inline)."""
    server = start_server("wsgiapp:app", "-w", "1")
    with server.connect() as late:
        late.sendall(b"POST /exclusive?tag=late HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nsl")
        for _ in range(3):
            assert exchange(server, get(b"/hello")).status == 200
        assert "EXCLUSIVE late" not in server.log  # the app was not called yet
        late.sendall(b"oth!")
        assert Reader(late).response().body == b"sloth!"


def test_a_body_sent_after_100_continue_is_read_in_a_thread_alone(start_server):
    """--threads 1: the app asks for a body behind Expect: 100-continue from a thread; while
    it runs there, the loop calls the app for nobody else (wsgi.multithread is false), and
    the other request is answered once it returned."""
    server = start_server("wsgiapp:app", "-w", "1")
    with server.connect() as first, server.connect() as second:
        first.sendall(b"POST /exclusive?tag=first&s=0.5 HTTP/1.1\r\nHost: t\r\n"
                      b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        reader = Reader(first)
        assert reader.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
        server.wait_for("EXCLUSIVE first")
        second.sendall(get(b"/exclusive?tag=second"))
        first.sendall(b"hello")
        assert reader.response().body == b"hello"
        assert Reader(second).response().status == 200
    assert "OVERLAP" not in server.log
    assert server.log.index("EXCLUSIVE second") > server.log.index("EXCLUSIVE-END first")


def test_threads_call_the_app_at_once(start_server):
    """--threads 2: two requests run in the pool together (wsgi.multithread is true)."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "2")
    results: list[bytes] = []
    clients = [threading.Thread(target=lambda: results.append(
        exchange(server, get(b"/barrier")).body)) for _ in range(2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(15)
    assert results == [b"together", b"together"]


def test_threads_auto_moves_calls_to_threads_once_one_is_slow_and_back_when_calm(start_server):
    """--threads auto: the app is called in the loop while its calls are fast; once three
    in a tick take more than 1 ms, in the pool, where a slow request holds no other; after
    10 s without such a tick, in the loop again."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "auto", "--log-level", "debug")
    assert exchange(server, get(b"/thread")).body == b"MainThread"
    assert json.loads(exchange(server, get(b"/environ")).body)["wsgi.multithread"] is True
    assert exchange(server, get(b"/sleep?s=0.05")).status == 200
    assert exchange(server, get(b"/thread")).body == b"MainThread"  # one slow call: no move
    for _ in range(2):
        assert exchange(server, get(b"/sleep?s=0.05")).status == 200
    server.wait_for(r"worker 1: 3 of \d+ calls into the app waited over 1 ms; calling it in up "
                    r"to 64 threads")
    assert exchange(server, get(b"/thread")).body.startswith(b"forkserve")
    with server.connect() as slow:
        slow.sendall(get(b"/sleep?s=2&tag=long"))
        server.wait_for("SLEEPING long")
        with server.connect() as other:
            other.settimeout(1.5)  # not behind the 2 s call
            other.sendall(get(b"/hello"))
            assert Reader(other).response().status == 200
        assert Reader(slow).response().status == 200
    server.wait_for("calling it in the loop again", timeout=20)
    assert exchange(server, get(b"/thread")).body == b"MainThread"


def test_threads_auto_reads_a_large_body_from_the_pool_and_the_loop_serves_on(start_server):
    """--threads auto, calls still in the loop: a body over 64 KiB still arriving is read by
    the app from a pool thread, and other calls go on in the loop meanwhile (with
    --threads 1 they would wait for that thread)."""
    server = start_server("wsgiapp:app", "-w", "1", "--threads", "auto")
    worker = server.workers()[0]
    size = 1 << 20
    with server.connect() as upload:
        upload.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
                       + b"x" * 65536)
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{worker}/task")) < 2:  # the pool's thread started
            assert time.monotonic() < deadline, "the upload was not given to a pool thread"
            time.sleep(0.01)
        assert exchange(server, get(b"/thread")).body == b"MainThread"
        upload.sendall(b"x" * (size - 65536))
        response = Reader(upload).response()
    assert response.status == 200 and response.body == b"x" * size
