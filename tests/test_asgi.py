"""The ASGI worker: scope, lifespan, disconnects, app protocol errors, flow control, loops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from conftest import APP_OF, APPS, Reader, closed_by_peer, exchange, forkserve_command, rss_mib

GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.fixture
def asgi_server(start_server):
    return start_server("asgiapp:app", "-w", "1")


def scope_of(server, raw: bytes) -> dict:
    response = exchange(server, raw)
    assert response.status == 200, response.body
    return json.loads(response.body)


def test_scope(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--root-path", "/mounted")
    (worker,) = server.workers()
    scope = scope_of(server, b"GET /scope?a=1&b=%20 HTTP/1.1\r\nHost: example.org\r\n"
                             b"X-Multi: 1\r\nX-Multi: 2\r\n\r\n")
    assert scope["type"] == "http"
    # 2.3, as uvicorn says: told 2.4, Starlette's streaming responses stop watching for
    # http.disconnect (send() raises an OSError all the same).
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/mounted/scope"  # the root path is part of the path
    assert scope["raw_path"] == "/mounted/scope"
    assert scope["query_string"] == "a=1&b=%20"
    assert scope["root_path"] == "/mounted"
    assert ["x-multi", "1"] in scope["headers"] and ["x-multi", "2"] in scope["headers"]
    assert scope["client"][0] == "127.0.0.1"
    assert scope["server"] == ["127.0.0.1", server.port]
    assert "http.response.trailers" in scope["extensions"]
    assert scope["state"] == {"started_by": worker}  # shared from lifespan startup


@pytest.mark.parametrize("target", [b"/mounted/scope", b"/scope"])
def test_the_path_includes_the_root_path_once(start_server, target):
    """Whether the proxy kept the prefix or stripped it (then it is prepended, as uvicorn
    does), the path starts with the root path once."""
    server = start_server("asgiapp:app", "-w", "1", "--root-path", "/mounted")
    scope = scope_of(server, GET % (target + b"?x=1"))
    assert (scope["path"], scope["raw_path"], scope["root_path"], scope["query_string"]) \
        == ("/mounted/scope", "/mounted/scope", "/mounted", "x=1")


@pytest.mark.parametrize("prefix", [b"/api", b""])
def test_starlette_behind_a_root_path_routes_and_redirects_within_it(start_server, prefix):
    """Behind --root-path /api (the proxy kept the prefix, or stripped it), Starlette routes
    below the root path and its trailing-slash redirects keep it."""
    pytest.importorskip("starlette")
    server = start_server("starletteapp:app", "-w", "1", "--root-path", "/api")
    assert exchange(server, GET % (prefix + b"/state")).body == b'{"ready":true}'
    for target, location in [(b"/state/", "http://t/api/state"),
                             (b"/sub/leaf/", "http://t/api/sub/leaf")]:
        response = exchange(server, GET % (prefix + target))
        assert (response.status, response.header("location")) == (307, location)
    assert json.loads(exchange(server, GET % (prefix + b"/sub/leaf")).body) == {
        "path": "/api/sub/leaf", "root_path": "/api/sub", "url_for": "http://t/api/sub/leaf"}


@pytest.mark.parametrize("target", [b"/api/environ", b"/environ"])
def test_wsgi_root_path_is_script_name(start_server, target):
    server = start_server("wsgiapp:app", "-w", "1", "--root-path", "/api")
    environ = json.loads(exchange(server, GET % target).body)
    assert (environ["SCRIPT_NAME"], environ["PATH_INFO"]) == ("/api", "/environ")


def test_an_app_changing_its_scope_changes_no_later_scope(start_server):
    """Keep-alive requests with the same head get their scope from what is remembered of
    that head: each must get a scope of its own, whatever the app did to the last one."""
    server = start_server("asgiapp:app", "-w", "1", "--root-path", "/mounted")
    request = b"GET /mounted/scope?mutate=1 HTTP/1.1\r\nHost: t\r\n\r\n"
    with server.connect() as sock:
        reader = Reader(sock)
        scopes = []
        for _ in range(3):
            sock.sendall(request)
            scopes.append(json.loads(reader.response().body))
    assert scopes[0] == scopes[1] == scopes[2]
    assert (scopes[2]["path"], scopes[2]["root_path"], scopes[2]["query_string"]) \
        == ("/mounted/scope", "/mounted", "mutate=1")
    assert ["x-mutated", "1"] not in scopes[2]["headers"]
    assert "mutated" not in scopes[2]["extensions"] and "mutated" not in scopes[2]["state"]


def test_path_is_decoded_as_utf8_and_raw_path_is_not(asgi_server):
    # The route table only has /scope, so decode a path that is /scope once decoded.
    scope = scope_of(asgi_server, b"GET /%73cope HTTP/1.1\r\nHost: t\r\n\r\n")
    assert scope["path"] == "/scope"
    assert scope["raw_path"] == "/%73cope"


def test_lifespan_startup_before_serving_and_shutdown_on_stop(start_server):
    server = start_server("asgiapp:app", "-w", "1")
    (worker,) = server.workers()
    log = server.log
    assert log.index(f"LIFESPAN startup {worker}") < log.index(f"booted (pid {worker})")
    os.kill(server.pid, signal.SIGTERM)
    assert server.wait_exit() == 0
    log = server.log
    assert log.index(f"LIFESPAN shutdown {worker}") < log.index(f"(pid {worker}) exited")


def test_lifespan_startup_failure_fails_the_boot():
    result = subprocess.run(forkserve_command() + ["asgiapp:failing_startup", "-w", "2",
                                                   "-b", "127.0.0.1:0"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "lifespan startup failed: database unreachable" in result.stderr
    assert result.stderr.count("database unreachable") == 1


def test_lifespan_auto_carries_on_for_apps_without_it(start_server):
    server = start_server("asgiapp:no_lifespan", "-w", "1")
    server.wait_for("the app does not support lifespan")
    assert exchange(server, GET % b"/hello").body == b"Hello, World!"


def test_lifespan_on_requires_it():
    result = subprocess.run(forkserve_command() + ["asgiapp:no_lifespan", "--lifespan", "on",
                                                   "-b", "127.0.0.1:0", "-w", "1"],
                            cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "ValueError: unsupported scope lifespan" in result.stderr


def test_lifespan_off_never_calls_it(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--lifespan", "off")
    assert exchange(server, GET % b"/hello").status == 200
    assert "LIFESPAN" not in server.log


def test_asgi2_app_detected_and_served(start_server):
    server = start_server("asgiapp:ClassicApp", "-w", "1")
    assert exchange(server, GET % b"/").body == b"asgi2"


def test_interface_override(start_server):
    server = start_server("asgiapp:ClassicApp", "-w", "1", "--interface", "asgi2", "-k", "asgi")
    assert exchange(server, GET % b"/").body == b"asgi2"


def test_app_sees_disconnect(asgi_server):
    sock = asgi_server.connect()
    sock.sendall(b"POST /wait-disconnect HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    sock.close()
    asgi_server.wait_for("DISCONNECT http.disconnect")


def test_endless_stream_stops_when_client_leaves(asgi_server):
    sock = asgi_server.connect()
    sock.sendall(GET % b"/marked?tag=gone&endless=1")
    sock.recv(1000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    asgi_server.wait_for("CLOSED gone")
    assert exchange(asgi_server, GET % b"/hello").status == 200


@pytest.mark.parametrize(("path", "message"), [
    (b"/fail", "RuntimeError: deliberate failure before start_response"),
    (b"/body-before-start", "expected 'http.response.start', got 'http.response.body'"),
    (b"/start-twice", "unexpected ASGI message 'http.response.start'"),
    (b"/returns-early", "the app returned without completing the response"),
])
def test_app_errors_before_the_body_give_500(asgi_server, path, message):
    response = exchange(asgi_server, GET % path)
    assert response.status == 500
    asgi_server.wait_for(message)
    assert exchange(asgi_server, GET % b"/hello").status == 200


def test_exception_after_headers_cuts_the_response(asgi_server):
    with asgi_server.connect() as sock:
        sock.sendall(GET % b"/fail-midway")
        raw = Reader(sock).read_to_eof()
    assert raw.startswith(b"HTTP/1.1 200 OK")
    assert b"first part" in raw and not raw.endswith(b"0\r\n\r\n")
    asgi_server.wait_for("deliberate failure after the headers")


def test_trailers(asgi_server):
    with asgi_server.connect() as sock:
        sock.sendall(GET % b"/trailers")
        reader = Reader(sock)
        head = reader.read_until(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        rest = reader.read_until(b"\r\n\r\n")
    assert rest == b"d\r\nwith trailers\r\n0\r\nx-checksum: abc\r\n\r\n"


def test_requests_run_concurrently_in_one_worker(asgi_server):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        bodies = list(pool.map(lambda _: exchange(asgi_server, GET % b"/barrier").body, range(2)))
    assert bodies == [b"together", b"together"]


def test_a_client_that_never_reads_does_not_make_the_worker_buffer(asgi_server):
    (worker,) = asgi_server.workers()
    sock = asgi_server.connect()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(GET % b"/big-download?mb=256")
        asgi_server.wait_for(r"DOWNLOAD 0 rss=")
        time.sleep(1.0)  # nothing to wait for: this checks that nothing happens
        assert "DOWNLOAD 16777216" not in asgi_server.log  # the app is held back by send()
        assert rss_mib(worker) < 120
        # Reading lets it go on to the end.
        sock.settimeout(30)
        received = 0
        while received < 256 * 2**20:
            data = sock.recv(2**20)
            assert data
            received += len(data)
    finally:
        sock.close()
    asgi_server.wait_for(r"DOWNLOAD 268435456|DOWNLOAD 260046848")


def test_a_pipelined_response_held_for_one_write_is_still_held_back(asgi_server):
    """Responses to pipelined requests are held to go out in one write; a held write escapes
    the transport's flow control, so what is held goes out at 64 KiB: an app sending 8 MiB
    pieces to a client that does not read is held back by send() after the first (16 held
    writes would be 128 MiB: without the bound it sent 16 MiB and more within the second)."""
    (worker,) = asgi_server.workers()
    sock = asgi_server.connect()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(GET % b"/hello" + GET % b"/big-download?mb=256&kb=8192")
        assert Reader(sock).response().body == b"Hello, World!"
        time.sleep(1.0)  # nothing to wait for: this checks that nothing happens
        assert "DOWNLOAD 16777216" not in asgi_server.log
        assert rss_mib(worker) < 120
    finally:
        sock.close()


def test_unread_upload_pauses_reading(asgi_server):
    (worker,) = asgi_server.workers()
    with asgi_server.connect() as sock:
        sock.setblocking(False)
        sock.sendall(b"POST /sleep?s=2&tag=upload HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 100000000\r\n\r\n")  # under --limit-request-body
        asgi_server.wait_for("SLEEPING upload")
        sent = 0
        chunk = b"u" * 65536
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # push until the server stops taking bytes
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        assert sent < 64 * 2**20  # the worker stopped reading after its buffer limit
        assert rss_mib(worker) < 120


def test_blocked_event_loop_is_a_hang(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--timeout", "1")
    (old,) = server.workers()
    mark = server.mark()
    with server.connect() as sock:
        sock.sendall(GET % b"/block?s=60&tag=blocked")
        server.wait_for(rf"worker 1 \(pid {old}\) silent for", start=mark)
        server.wait_for(r"line \d+ in block", start=mark)
        server.wait_for(r"worker 1 booted", start=mark)
    assert exchange(server, GET % b"/hello").status == 200


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loops(start_server, loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = start_server("asgiapp:app", "-w", "2", "--loop", loop)
    with server.connect() as sock:
        reader = Reader(sock)
        for _ in range(20):
            sock.sendall(GET % b"/hello")
            assert reader.response().body == b"Hello, World!"
    assert exchange(server, b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n").body == b"abc"


def test_http10_and_head(asgi_server):
    with asgi_server.connect() as sock:
        sock.sendall(b"GET /stream?n=2 HTTP/1.0\r\n\r\n")
        raw = Reader(sock).read_to_eof()
    assert raw.endswith(b"\r\n\r\npiece 0\npiece 1\n")
    head = exchange(asgi_server, b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n", head_request=True)
    assert head.header("content-length") == "13"


def test_starlette_app_end_to_end(start_server):
    pytest.importorskip("starlette")
    server = start_server("starletteapp:app", "-w", "2")
    assert exchange(server, GET % b"/").body == b'{"hello":"starlette"}'
    body = b'{"n": 1}'
    response = exchange(server, b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
    assert response.status == 201 and json.loads(response.body) == {"n": 2}
    response = exchange(server, GET % b"/stream")
    assert response.chunked and response.body == b"0\n1\n2\n"
    assert exchange(server, GET % b"/state").body == b'{"ready":true}'
    assert exchange(server, GET % b"/missing").status == 404
    assert exchange(server, GET % b"/boom").status == 500
    server.wait_for("ZeroDivisionError")


def test_an_unfinished_request_head_is_dropped_after_keep_alive(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--keep-alive", "1")
    with server.connect() as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nX-Slow: 1\r\n")  # and never the rest
        assert closed_by_peer(sock, timeout=5)


def test_a_client_that_stops_reading_is_dropped_after_the_stall_bound(start_server):
    server = start_server("asgiapp:app", "-w", "1", "--timeout", "2")  # stall bound: 1 s
    sock = server.connect()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(GET % b"/marked?tag=stalled&endless=1")
        server.wait_for("CLOSED stalled", timeout=20)  # send() gave up; the app was told
    finally:
        sock.close()
    assert exchange(server, GET % b"/hello").status == 200


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_a_body_that_stops_arriving_is_dropped_after_the_stall_bound(start_server, interface):
    server = start_server(APP_OF[interface], "-w", "1", "--timeout", "2")  # stall bound: 1 s
    with server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=10)
        assert time.monotonic() - started < 5
    assert exchange(server, GET % b"/hello").status == 200
